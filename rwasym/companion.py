"""Model-level drivers for the companion analyses; the formulas live in `spectra` / `svd_compare`.

- `post_training_report(base, tuned)`: per-matrix post-training SVD (arXiv 2509.17866) plus
  per-kind summaries; `reconstruction_experiment` rebuilds every matrix from mixed SVD factors
  and measures behaviour with a user metric.
- `geometry(checkpoints, data)`: RankMe and α-ReQ of residual-stream activations per layer per
  checkpoint (arXiv 2509.23024), from streaming statistics (`activations.capture`).
- `lifecycle_from_checkpoints(folders)`: full spectra of every studied matrix across a
  checkpoint trajectory, loading one checkpoint at a time.
"""

import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ._checks import linalg_threads
from .activations import capture
from .errors import RwasymError
from .models import Model, check_same_architecture, load, read_meta
from .spectra import Lifecycle, alpha_req, lifecycle, rankme_from_cov
from .svd_compare import REBUILD_MODES, post_training_svd, rebuild


def post_training_report(base: Any, tuned: Any, *, k: Optional[int] = None,
                         matrices: Optional[str] = None) -> dict:
    """{"rows": one dict per matrix, "by_kind": means per matrix kind} of `post_training_svd`."""
    base, tuned = load(base), load(tuned)
    check_same_architecture(base, tuned)
    rows = []
    for spec in base.matrices(matrices):
        k_used = None if k is None else min(k, min(spec.shape))
        with linalg_threads(1):
            res = post_training_svd(base.weight(spec.name), tuned.weight(spec.name), k_used)
        row = dict(matrix=spec.name, layer=spec.layer, kind=spec.kind, side=spec.side)
        row.update(res.to_dict())
        row.pop("sigma_base", None), row.pop("sigma_tuned", None)
        rows.append(row)
    keys = ("ratio_mean", "ratio_std", "fit_slope", "consistency", "diag_dominance_u", "diag_dominance_v")
    by_kind = {}
    for kind in sorted({r["kind"] for r in rows}):
        sel = [r for r in rows if r["kind"] == kind]
        by_kind[kind] = {key: sum(r[key] for r in sel) / len(sel) for key in keys if sel[0].get(key) is not None}
    return {"rows": rows, "by_kind": by_kind}


def reconstruction_experiment(
    base: Any, tuned: Any, metric: Union[Callable[[Model], float], Mapping[str, Callable[[Model], float]]], *,
    modes: Sequence[str] = ("tuned", "tuned_rotation_base_sigma", "tuned_scaling_only", "break_consistency"),
    matrices: Optional[str] = None, seed: int = 0,
) -> list[dict]:
    """Rebuild every matrix of ``tuned`` from mixed SVD factors (`svd_compare.rebuild`) and run
    ``metric(model)`` on the rebuilt model; also reports the metric of base and tuned as they are.

    metric: one callable (column "metric") or {column name: callable}. The tuned model is
    edited through `Model.edit` and restored bit-exactly afterwards.
    """
    base, tuned = load(base), load(tuned)
    check_same_architecture(base, tuned)
    bad = [m for m in modes if m not in REBUILD_MODES]
    if bad:
        raise RwasymError(f"unknown rebuild mode(s) {bad}; valid: {', '.join(REBUILD_MODES)}")
    metrics = dict(metric) if isinstance(metric, Mapping) else {"metric": metric}

    def measure(model: Model) -> dict:
        return {name: float(fn(model)) for name, fn in metrics.items()}

    specs = tuned.matrices(matrices)
    rows = [dict(mode="base", **measure(base)), dict(mode="tuned_as_is", **measure(tuned))]
    for mode in modes:
        g = torch.Generator().manual_seed(seed)
        updates = {s.name: rebuild(base.weight(s.name), tuned.weight(s.name), mode, generator=g) for s in specs}
        with tuned.edit(updates):
            rows.append(dict(mode=mode, **measure(tuned)))
    return rows


def geometry(checkpoints: Mapping[Any, Any], data: Any, *, layers: Optional[Sequence[int]] = None,
             batch_size: int = 16, max_tokens: Optional[int] = None, progress: Optional[bool] = None) -> list[dict]:
    """RankMe and α-ReQ of the residual stream (resid_post of each layer) per checkpoint.

    checkpoints: {label: model source}. RankMe uses the uncentered second moment Σ a aᵀ
    (RankMe does not centre); α-ReQ the centred covariance (default index range, see
    `spectra.alpha_req`). One pass over the data per checkpoint, one checkpoint in memory at a time.
    """
    rows = []
    for label, source in checkpoints.items():
        model = load(source)
        chosen = range(model.n_layers) if layers is None else layers
        sites = [f"blocks.{layer}.hook_resid_post" for layer in chosen]
        acts = capture(model, data, sites=sites, batch_size=batch_size, max_tokens=max_tokens, progress=progress)
        for layer, site in zip(chosen, sites):
            stat = acts[site]
            second = stat.second_moment() * stat.count
            with linalg_threads(1):
                a = alpha_req(cov=stat.covariance())
                rm = rankme_from_cov(second, n_samples=stat.count)
            rows.append(dict(checkpoint=label, layer=layer, site=site, n_tokens=stat.count,
                             rankme=rm,
                             alpha_req=a.alpha, alpha_r2=a.r2, alpha_lo=a.lo, alpha_hi=a.hi))
    return rows


class _LazyWeights(Mapping):
    """{step: {name: W}} that loads a checkpoint folder only when its step is read."""

    def __init__(self, folders: Mapping[int, Path], matrices: Optional[str]):
        self._folders, self._matrices = folders, matrices

    def __getitem__(self, step: int) -> dict[str, Tensor]:
        model = load(self._folders[step])
        return {s.name: model.weight(s.name) for s in model.matrices(self._matrices)}

    def __iter__(self) -> Iterator[int]:
        return iter(self._folders)

    def __len__(self) -> int:
        return len(self._folders)


def checkpoint_folders(root: Union[str, Path]) -> dict[int, Path]:
    """{step: folder} for ``root/step_XXXXXX`` checkpoint folders (step from rwasym.json meta or the name)."""
    root = Path(root)
    found = {}
    for folder in sorted(root.glob("step_*")):
        if (folder / "rwasym.json").exists():
            step = read_meta(folder).get("meta", {}).get("step")
            found[int(step) if step is not None else int(re.sub(r"\D", "", folder.name))] = folder
    if not found:
        raise RwasymError(f"no checkpoint folders (step_*/rwasym.json) under {str(root)!r}; point at a training output folder")
    return found


def lifecycle_from_checkpoints(checkpoints: Union[str, Path, Mapping[int, Any]], *, top_k: int = 10,
                               matrices: Optional[str] = None) -> Lifecycle:
    """`spectra.lifecycle` over a checkpoint trajectory: a folder of ``step_*`` checkpoints or
    {step: folder}; checkpoints are loaded one at a time."""
    folders = checkpoint_folders(checkpoints) if isinstance(checkpoints, (str, Path)) else dict(checkpoints)
    with linalg_threads(1):
        return lifecycle(_LazyWeights(folders, matrices), top_k=top_k)


# -- `rwasym spectra ...`: each analysis written to a folder (results.json, report.md, PNGs) ------
def run_post_training(base: Any, tuned: Any, out: Union[str, Path], *, k: Optional[int] = None,
                      matrices: Optional[str] = None, data: Any = None, pairs: Any = None, seed: int = 0,
                      images: Sequence[str] = ()) -> dict:
    """Post-training SVD of every matrix, R_U / R_V images, and — with ``data`` (tokens) and/or
    ``pairs`` — the reconstruction experiment measured by held-out CE and preference accuracy."""
    from . import report
    from .train import heldout_ce, preference_accuracy

    base, tuned = load(base), load(tuned)
    res = post_training_report(base, tuned, k=k, matrices=matrices)
    results: dict = {"analysis": "post-training", "k": k, "seed": seed, **res}
    out = Path(out)
    figures = out / "figures"
    chosen = list(images) or [s.name for s in base.matrices(matrices) if s.layer == 0][:4]
    with linalg_threads(1):
        for name in chosen:
            spec = base.matrix(name)
            svd = post_training_svd(base.weight(name), tuned.weight(name), None if k is None else min(k, min(spec.shape)))
            report.rotation_images(svd.R_U, svd.R_V, figures / f"rotations_{name.replace('.', '_')}.png",
                                   title=f"{name}: consistency {svd.consistency:.3f}")
    metrics: dict = {}
    if data is not None:
        metrics["heldout_ce"] = lambda m: heldout_ce(m, data)
    if pairs is not None:
        metrics["preference_accuracy"] = lambda m: preference_accuracy(m, None, pairs)
    if metrics:
        results["reconstruction"] = reconstruction_experiment(base, tuned, metrics, matrices=matrices, seed=seed)
    sections = ["# Post-training SVD (arXiv 2509.17866)\n", "## Mean per matrix kind\n",
                report.markdown_table([dict(kind=kk, **v) for kk, v in res["by_kind"].items()]),
                "\n## Per matrix\n", report.markdown_table(res["rows"], [
                    "matrix", "k", "ratio_mean", "ratio_std", "fit_slope", "fit_r2", "consistency",
                    "diag_dominance_u", "diag_dominance_v"])]
    if "reconstruction" in results:
        sections += ["\n## Reconstruction: behaviour of rebuilt models\n", report.markdown_table(results["reconstruction"])]
    sections += [f"![{n}](figures/rotations_{n.replace('.', '_')}.png)" for n in chosen]
    report.write_outputs(out, results, sections)
    return results


def _expand_checkpoints(sources: Union[str, Path, Sequence[Any], Mapping[Any, Any]]) -> dict:
    """{label: source}: a mapping as is; a training folder (step_*) → {step: folder}; a list of
    folders / names, each a training folder (expanded) or one checkpoint (labelled by position)."""
    if isinstance(sources, Mapping):
        return dict(sources)
    if isinstance(sources, (str, Path)):
        sources = [sources]
    found: dict = {}
    for i, src in enumerate(sources):
        if isinstance(src, (str, Path)) and Path(src).is_dir() and any(Path(src).glob("step_*")):
            found.update(checkpoint_folders(src))
        else:
            found[i] = src
    return found


def run_geometry(checkpoints: Any, data: Any, out: Union[str, Path], *, layers: Optional[Sequence[int]] = None,
                 max_tokens: Optional[int] = None, progress: Optional[bool] = None) -> dict:
    """RankMe and α-ReQ per layer per checkpoint (`geometry`), with their curves over checkpoints."""
    from . import report

    rows = geometry(_expand_checkpoints(checkpoints), data, layers=layers, max_tokens=max_tokens, progress=progress)
    out = Path(out)
    for key, label in (("rankme", "RankMe"), ("alpha_req", "α-ReQ exponent")):
        report.line_plot(rows, "checkpoint", key, "layer", out / "figures" / f"{key}.png",
                         title=f"{label} of resid_post by layer", xlabel="checkpoint (step, symlog)", ylabel=label,
                         logx=all(isinstance(r["checkpoint"], (int, float)) for r in rows))
    results = {"analysis": "geometry", "rows": rows}
    report.write_outputs(out, results, ["# Representation geometry (arXiv 2509.23024): RankMe and α-ReQ of resid_post\n",
                          report.markdown_table(rows, ["checkpoint", "layer", "n_tokens", "rankme", "alpha_req", "alpha_r2"]),
                          "\n![RankMe](figures/rankme.png)\n![alpha-ReQ](figures/alpha_req.png)"])
    return results


def run_lifecycle(checkpoints: Any, out: Union[str, Path], *, top_k: int = 10, matrices: Optional[str] = None,
                  heatmaps: Sequence[str] = ()) -> dict:
    """Spectral lifecycle of every matrix across checkpoints: per-matrix rows (stable / effective
    rank, top-k energy, spectra), compression timing per layer, kind summaries, σ heatmaps."""
    from . import report

    lc = lifecycle_from_checkpoints(_expand_checkpoints(checkpoints), top_k=top_k, matrices=matrices)
    out = Path(out)
    names = list(heatmaps) or sorted({r.name for r in lc.rows if r.layer == 0})
    for name in names:
        report.singular_value_heatmap(lc, name, out / "figures" / f"sv_{name.replace('.', '_')}.png")
    kinds = lc.kind_summary()
    report.line_plot(kinds, "step", "effective_rank_frac_mean", "kind", out / "figures" / "effective_rank.png",
                     title="effective rank by matrix kind (mean over layers)", xlabel="step (symlog)", logx=True,
                     ylabel="effective rank / min(n_out, n_in)")
    results = {"analysis": "lifecycle", "top_k": top_k, "rows": lc.to_rows(include_singular_values=True),
               "compression": lc.compression_timing(), "by_kind": kinds}
    report.write_outputs(out, results, ["# Spectral lifecycle\n", "## Compression timing (step of minimum effective rank)\n",
                          report.markdown_table(results["compression"]), "\n## By matrix kind\n",
                          report.markdown_table(kinds), "\n![effective rank](figures/effective_rank.png)"]
           + [f"![{n}](figures/sv_{n.replace('.', '_')}.png)" for n in names])
    return results
