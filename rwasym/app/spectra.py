"""`rwasym spectra ...`: each companion analysis written to a folder (results.json, report.md, PNGs).

The measurements are `rwasym.analyses.companion`; this module only runs them and writes reports.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import report
from ..analyses.companion import (
    expand_checkpoints,
    geometry,
    lifecycle_from_checkpoints,
    post_training_report,
    reconstruction_experiment,
    tuned_weights,
)
from ..math.checks import linalg_threads
from ..math.svd import post_training_svd
from ..models import load
from ..objectives import heldout_ce, preference_accuracy

__all__ = ["run_geometry", "run_lifecycle", "run_post_training"]


def run_post_training(
    base: Any,
    tuned: Any,
    out: str | Path,
    *,
    k: int | None = None,
    matrices: str | None = None,
    data: Any = None,
    pairs: Any = None,
    seed: int = 0,
    images: Sequence[str] = (),
) -> dict:
    """Post-training SVD of every matrix, R_U / R_V images, and — with ``data`` (tokens) and/or
    ``pairs`` — the reconstruction experiment measured by held-out CE and preference accuracy.
    A ``tuned`` Hugging Face checkpoint folder is streamed (read a matrix at a time) unless the
    reconstruction experiment needs the whole model."""
    base = load(base)
    res = post_training_report(base, tuned, k=k, matrices=matrices)
    tuned_weight = tuned_weights(base, tuned)
    results: dict = {"analysis": "post-training", "k": k, "seed": seed, **res}
    out = Path(out)
    figures = out / "figures"
    chosen = list(images) or [s.name for s in base.matrices(matrices) if s.layer == 0][:4]
    with linalg_threads(1):
        for name in chosen:
            spec = base.matrix(name)
            svd = post_training_svd(
                base.weight(name), tuned_weight(name), None if k is None else min(k, min(spec.shape))
            )
            report.rotation_images(
                svd.R_U,
                svd.R_V,
                figures / f"rotations_{name.replace('.', '_')}.png",
                title=f"{name}: consistency {svd.consistency:.3f}",
            )
    metrics: dict = {}
    if data is not None:
        metrics["heldout_ce"] = lambda m: heldout_ce(m, data)
    if pairs is not None:
        metrics["preference_accuracy"] = lambda m: preference_accuracy(m, None, pairs)
    if metrics:
        results["reconstruction"] = reconstruction_experiment(base, load(tuned), metrics, matrices=matrices, seed=seed)
    sections = [
        "# Post-training SVD (arXiv 2509.17866)\n",
        "## Mean per matrix kind\n",
        report.markdown_table([dict(kind=kk, **v) for kk, v in res["by_kind"].items()]),
        "\n## Per matrix\n",
        report.markdown_table(
            res["rows"],
            [
                "matrix",
                "k",
                "ratio_mean",
                "ratio_std",
                "fit_slope",
                "fit_r2",
                "consistency",
                "diag_dominance_u",
                "diag_dominance_v",
            ],
        ),
    ]
    if "reconstruction" in results:
        sections += [
            "\n## Reconstruction: behaviour of rebuilt models\n",
            report.markdown_table(results["reconstruction"]),
        ]
    sections += [f"![{n}](figures/rotations_{n.replace('.', '_')}.png)" for n in chosen]
    report.write_outputs(out, results, sections)
    return results


def run_geometry(
    checkpoints: Any,
    data: Any,
    out: str | Path,
    *,
    layers: Sequence[int] | None = None,
    max_tokens: int | None = None,
    progress: bool | None = None,
) -> dict:
    """RankMe and α-ReQ per layer per checkpoint (`geometry`), with their curves over checkpoints."""
    rows = geometry(expand_checkpoints(checkpoints), data, layers=layers, max_tokens=max_tokens, progress=progress)
    out = Path(out)
    for key, label in (("rankme", "RankMe"), ("alpha_req", "α-ReQ exponent")):
        report.line_plot(
            rows,
            "checkpoint",
            key,
            "layer",
            out / "figures" / f"{key}.png",
            title=f"{label} of resid_post by layer",
            xlabel="checkpoint (step, symlog)",
            ylabel=label,
            logx=all(isinstance(r["checkpoint"], (int, float)) for r in rows),
        )
    results = {"analysis": "geometry", "rows": rows}
    report.write_outputs(
        out,
        results,
        [
            "# Representation geometry (arXiv 2509.23024): RankMe and α-ReQ of resid_post\n",
            report.markdown_table(rows, ["checkpoint", "layer", "n_tokens", "rankme", "alpha_req", "alpha_r2"]),
            "\n![RankMe](figures/rankme.png)\n![alpha-ReQ](figures/alpha_req.png)",
        ],
    )
    return results


def run_lifecycle(
    checkpoints: Any,
    out: str | Path,
    *,
    top_k: int = 10,
    matrices: str | None = None,
    heatmaps: Sequence[str] = (),
) -> dict:
    """Spectral lifecycle of every matrix across checkpoints: per-matrix rows (stable / effective
    rank, top-k energy, spectra), compression timing per layer, kind summaries, σ heatmaps."""
    lc = lifecycle_from_checkpoints(expand_checkpoints(checkpoints), top_k=top_k, matrices=matrices)
    out = Path(out)
    names = list(heatmaps) or sorted({r.name for r in lc.rows if r.layer == 0})
    for name in names:
        report.singular_value_heatmap(lc, name, out / "figures" / f"sv_{name.replace('.', '_')}.png")
    kinds = lc.kind_summary()
    report.line_plot(
        kinds,
        "step",
        "effective_rank_frac_mean",
        "kind",
        out / "figures" / "effective_rank.png",
        title="effective rank by matrix kind (mean over layers)",
        xlabel="step (symlog)",
        logx=True,
        ylabel="effective rank / min(n_out, n_in)",
    )
    results = {
        "analysis": "lifecycle",
        "top_k": top_k,
        "rows": lc.to_rows(include_singular_values=True),
        "compression": lc.compression_timing(),
        "by_kind": kinds,
    }
    report.write_outputs(
        out,
        results,
        [
            "# Spectral lifecycle\n",
            "## Compression timing (step of minimum effective rank)\n",
            report.markdown_table(results["compression"]),
            "\n## By matrix kind\n",
            report.markdown_table(kinds),
            "\n![effective rank](figures/effective_rank.png)",
        ]
        + [f"![{n}](figures/sv_{n.replace('.', '_')}.png)" for n in names],
    )
    return results
