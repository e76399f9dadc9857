"""Model-level drivers for the companion analyses; the formulas live in `rwasym.math.spectra` / `rwasym.math.svd`.

- `post_training_report(base, tuned)`: per-matrix post-training SVD (arXiv 2509.17866) plus
  per-kind summaries; `reconstruction_experiment` rebuilds every matrix from mixed SVD factors
  and measures behaviour with a user metric.
- `geometry(checkpoints, data)`: RankMe and α-ReQ of residual-stream activations per layer per
  checkpoint (arXiv 2509.23024), from streaming statistics (`rwasym.hooks.activations.capture`).
- `lifecycle_from_checkpoints(folders)`: full spectra of every studied matrix across a
  checkpoint trajectory, loading one checkpoint at a time.
"""

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import RwasymError
from ..hooks.activations import capture
from ..math.checks import linalg_threads
from ..math.spectra import Lifecycle, alpha_req, lifecycle, rankme_from_cov
from ..math.svd import REBUILD_MODES, post_training_svd, rebuild
from ..models import Model, check_same_architecture, load, read_meta
from ..models.audit import warn_unchanged
from ..models.checkpoint import CheckpointWeights, is_checkpoint_folder


def post_training_report(base: Any, tuned: Any, *, k: int | None = None, matrices: str | None = None) -> dict:
    """{"rows": one dict per matrix, "by_kind": means per matrix kind} of `post_training_svd`.

    A ``tuned`` Hugging Face checkpoint folder (config.json + safetensors) is read one matrix at a
    time from its files (`rwasym.models.checkpoint.CheckpointWeights`), never loaded."""
    base = load(base)
    tuned_weight = tuned_weights(base, tuned)
    rows = []
    for spec in base.matrices(matrices):
        k_used = None if k is None else min(k, min(spec.shape))
        with linalg_threads(1):
            res = post_training_svd(base.weight(spec.name), tuned_weight(spec.name), k_used)
        row = dict(matrix=spec.name, layer=spec.layer, kind=spec.kind, side=spec.side)
        row.update(res.to_dict())
        row.pop("sigma_base", None)
        row.pop("sigma_tuned", None)
        rows.append(row)
    keys = ("ratio_mean", "ratio_std", "fit_slope", "consistency", "diag_dominance_u", "diag_dominance_v")
    by_kind = {}
    for kind in sorted({r["kind"] for r in rows}):
        sel = [r for r in rows if r["kind"] == kind]
        by_kind[kind] = {key: sum(r[key] for r in sel) / len(sel) for key in keys if sel[0].get(key) is not None}
    return {"rows": rows, "by_kind": by_kind}


def tuned_weights(base: Model, tuned: Any) -> Callable[[str], Tensor]:
    """name → W_tuned (float64, nn.Linear layout): read from a Hugging Face checkpoint folder one
    matrix at a time (the model never loaded), else from ``rwasym.load(tuned)``; checked to be
    ``base``'s architecture."""
    if is_checkpoint_folder(tuned):
        weights = CheckpointWeights(tuned)
        check_same_architecture(base, weights.model)
        return weights.weight
    tuned = load(tuned)
    check_same_architecture(base, tuned)
    return tuned.weight


def reconstruction_experiment(
    base: Any,
    tuned: Any,
    metric: Callable[[Model], float] | Mapping[str, Callable[[Model], float]],
    *,
    modes: Sequence[str] = ("tuned", "tuned_rotation_base_sigma", "tuned_scaling_only", "break_consistency"),
    matrices: str | None = None,
    seed: int = 0,
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


def geometry(
    checkpoints: Mapping[Any, Any],
    data: Any,
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool | None = None,
) -> list[dict]:
    """RankMe and α-ReQ of the residual stream (resid_post of each layer) per checkpoint.

    checkpoints: {label: model source}. RankMe uses the uncentered second moment Σ a aᵀ
    (RankMe does not centre); α-ReQ the centred covariance (default index range, see
    `spectra.alpha_req`). One pass over the data per checkpoint, one checkpoint in memory at a time.
    """
    rows = []
    warn_unchanged(list(checkpoints.values()), list(checkpoints), what="the geometry")
    for label, source in checkpoints.items():
        model = load(source)
        chosen = range(model.n_layers) if layers is None else layers
        sites = [f"blocks.{layer}.hook_resid_post" for layer in chosen]
        acts = capture(
            model,
            data,
            sites=sites,
            batch_size=batch_size,
            max_tokens=max_tokens,
            progress=progress,
            gram_dtype=torch.float64,
        )  # RankMe / α-ReQ read the whole spectrum, tail included
        for layer, site in zip(chosen, sites):
            stat = acts[site]
            second = stat.second_moment() * stat.count
            with linalg_threads(1):
                a = alpha_req(cov=stat.covariance())
                rm = rankme_from_cov(second, n_samples=stat.count)
            rows.append(
                dict(
                    checkpoint=label,
                    layer=layer,
                    site=site,
                    n_tokens=stat.count,
                    rankme=rm,
                    alpha_req=a.alpha,
                    alpha_r2=a.r2,
                    alpha_lo=a.lo,
                    alpha_hi=a.hi,
                )
            )
    return rows


class _LazyWeights(Mapping):
    """{step: {name: W}} that loads a checkpoint folder only when its step is read."""

    def __init__(self, folders: Mapping[int, Path], matrices: str | None):
        self._folders, self._matrices = folders, matrices

    def __getitem__(self, step: int) -> dict[str, Tensor]:
        model = load(self._folders[step])
        return {s.name: model.weight(s.name) for s in model.matrices(self._matrices)}

    def __iter__(self) -> Iterator[int]:
        return iter(self._folders)

    def __len__(self) -> int:
        return len(self._folders)


def checkpoint_folders(root: str | Path) -> dict[int, Path]:
    """{step: folder} for ``root/step_XXXXXX`` checkpoint folders: native checkpoints (step from their
    rwasym.json meta) and Hugging Face ones written by `rwasym train` (step from rwasym-train.json);
    the folder name's digits where the meta has no step."""
    root = Path(root)
    found = {}
    for folder in sorted(root.glob("step_*")):
        if (folder / "rwasym.json").exists():
            step = read_meta(folder).get("meta", {}).get("step")
        elif (folder / "rwasym-train.json").exists():
            step = json.loads((folder / "rwasym-train.json").read_text()).get("step")
        else:
            continue
        found[int(step) if step is not None else int(re.sub(r"\D", "", folder.name))] = folder
    if not found:
        raise RwasymError(
            f"no checkpoint folders (step_*/rwasym.json or step_*/rwasym-train.json) under "
            f"{str(root)!r}; point at a training output folder"
        )
    return found


def lifecycle_from_checkpoints(
    checkpoints: str | Path | Mapping[int, Any], *, top_k: int = 10, matrices: str | None = None
) -> Lifecycle:
    """`spectra.lifecycle` over a checkpoint trajectory: a folder of ``step_*`` checkpoints or
    {step: folder}; checkpoints are loaded one at a time."""
    folders = checkpoint_folders(checkpoints) if isinstance(checkpoints, (str, Path)) else dict(checkpoints)
    warn_unchanged(list(folders.values()), list(folders), what="the lifecycle")
    with linalg_threads(1):
        return lifecycle(_LazyWeights(folders, matrices), top_k=top_k)


def expand_checkpoints(sources: str | Path | Sequence[Any] | Mapping[Any, Any]) -> dict:
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
