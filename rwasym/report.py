"""Tables → JSON, Markdown and PNG figures. No math here: every number comes from a result object.

Figures need matplotlib (the ``plots`` extra); each function returns the matplotlib Figure and
writes a PNG when ``path`` is given.
"""

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import RwasymError

KIND_ORDER = ("W_Q", "W_K", "W_V", "W_in", "W_gate", "W_O", "W_out")
PathLike = str | Path


def _plt():
    try:
        import sys

        import matplotlib

        if "matplotlib.pyplot" not in sys.modules:  # a script: draw off-screen; a notebook keeps its backend
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RwasymError("figures need matplotlib: pip install 'rwasym[plots]'") from None
    return plt


def _finish(fig, path: PathLike | None):
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (floats to 3 significant digits)."""
    if not rows:
        return "_(no rows)_\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_json(obj: Any, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=_json_default))
    return path


def write_outputs(out: PathLike, results: dict, sections: Sequence[str]) -> Path:
    """An analysis folder: ``results.json`` (``results`` stamped with the package version) and
    ``report.md`` (the Markdown ``sections``, one per line); creates ``out``. Returns ``out``."""
    from ._version import __version__

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results["version"] = __version__
    write_json(results, out / "results.json")
    (out / "report.md").write_text("\n".join(sections) + "\n")
    return out


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def asymmetry_grid(rows: Iterable[dict], subspace: str) -> tuple[list[int], list[str], list[list[float]]]:
    """``(layers, kinds, grid[layer][kind])`` of whole-matrix residual-side relative fractions."""
    cells: dict[tuple[int, str], float] = {}
    for r in rows:
        if r["head"] is None and r["stream"] == "residual" and r["subspace"] == subspace:
            cells[(r["layer"], r["kind"])] = r["relative"]
    layers = sorted({layer for layer, _ in cells})
    kinds = [k for k in KIND_ORDER if any(kind == k for _, kind in cells)]
    grid = [[cells.get((layer, kind), float("nan")) for kind in kinds] for layer in layers]
    return layers, kinds, grid


def asymmetry_heatmap(result: Any, path: PathLike | None = None, title: str = ""):
    """Layer × matrix-kind heatmaps of r on the residual-stream side, activation vs prediction."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, subspace in zip(axes, ("activation", "prediction")):
        layers, kinds, grid = asymmetry_grid(result.rows, subspace)
        if not layers:
            ax.set_axis_off()
            continue
        vmax = max(2.0, max(v for row in grid for v in row if not math.isnan(v)))
        im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(kinds)), [f"{k}\n({'write' if k in ('W_O', 'W_out') else 'read'})" for k in kinds])
        ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < vmax * 0.6 else "k", fontsize=8)
        ax.set_title(f"{subspace} subspace (k={result.config.get('k')})")
        fig.colorbar(im, ax=ax, label="relative fraction r (1 = isotropic)")
    fig.suptitle(title or "Where ΔW concentrates: residual-stream side of each matrix")
    return _finish(fig, path)


def rk_curves(result: Any, path: PathLike | None = None, kinds: Sequence[str] = ("W_Q", "W_O", "W_in", "W_out")):
    """r(k) curves of whole matrices (residual side, both subspaces) with the ±2σ Haar-null band."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, subspace in zip(axes, ("activation", "prediction")):
        band_drawn = False
        for c in result.curves:
            if c["stream"] != "residual" or c["subspace"] != subspace or c["kind"] not in kinds:
                continue
            (line,) = ax.plot(c["ks"], c["relative"], marker="o", ms=3, label=f"L{c['layer']} {c['kind']}")
            if c.get("null_relative_std") and not band_drawn:
                lo = [1 - 2 * s for s in c["null_relative_std"]]
                hi = [1 + 2 * s for s in c["null_relative_std"]]
                ax.fill_between(c["ks"], lo, hi, color="0.8", alpha=0.6, label="random null ±2σ")
                band_drawn = True
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("subspace dimension k")
        ax.set_title(f"{subspace} subspace")
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("relative fraction r(k) = f(k) / (k/n)")
    return _finish(fig, path)


def spectra_plot(
    spectra: dict[str, Sequence[float]],
    path: PathLike | None = None,
    title: str = "",
    ylabel: str = "eigenvalue / sum",
):
    """Normalised eigenvalue spectra on log-log axes (e.g. C_a versus C_δ of one matrix)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, values in spectra.items():
        total = sum(values)
        ys = [v / total for v in values if v > 0]
        ax.plot(range(1, len(ys) + 1), ys, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index i")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _finish(fig, path)


def line_plot(
    rows: Sequence[dict],
    x: str,
    y: str,
    group: str,
    path: PathLike | None = None,
    title: str = "",
    xlabel: str | None = None,
    ylabel: str | None = None,
    hline: float | None = None,
    yerr: tuple[str, str] | None = None,
    logx: bool = False,
):
    """One line per value of ``group``: y against x (trajectories, λ sweeps, RankMe curves).

    ``yerr``: (low, high) keys of an interval drawn as a shaded band (e.g. a 95% CI over seeds).
    ``logx``: log x axis (symmetric-log when an x ≤ 0 is plotted: log-spaced checkpoints with step 0).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    groups: dict[Any, list] = {}
    for r in rows:
        band = (r[yerr[0]], r[yerr[1]]) if yerr else (None, None)
        groups.setdefault(r[group], []).append((r[x], r[y], *band))
    for label, pts in groups.items():
        pts.sort(key=lambda p: p[0])
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=str(label))
        if yerr:
            ax.fill_between(
                [p[0] for p in pts], [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(), alpha=0.2, lw=0
            )
    if hline is not None:
        ax.axhline(hline, color="k", lw=0.8, ls="--")
    if logx:  # log where every x is positive; symmetric-log where step 0 (or a negative x) is plotted
        xs = [r[x] for r in rows]
        if xs and min(xs) > 0:
            ax.set_xscale("log")
        else:
            ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, title=group, title_fontsize=7)
    return _finish(fig, path)


def singular_value_heatmap(lifecycle: Any, matrix: str, path: PathLike | None = None, top: int = 32):
    """Singular values of one matrix (rows: checkpoints; columns: index) on a log colour scale."""
    plt = _plt()
    rows = [r for r in lifecycle.rows if r.name == matrix]
    if not rows:
        raise RwasymError(f"no lifecycle rows for {matrix!r}")
    rows.sort(key=lambda r: r.step)
    grid = [[math.log10(max(s, 1e-12)) for s in list(r.singular_values)[:top]] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    im = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_yticks(range(len(rows)), [str(r.step) for r in rows])
    ax.set_xlabel("singular value index")
    ax.set_ylabel("training step")
    ax.set_title(f"{matrix}: log10 singular values over training")
    fig.colorbar(im, ax=ax, label="log10 σ")
    return _finish(fig, path)


def rotation_images(R_U: Any, R_V: Any, path: PathLike | None = None, title: str = ""):
    """|R_U| = |U_kᵀ U'_k| and |R_V| = |V_kᵀ V'_k| side by side (a consistent rotation shows the
    same pattern twice; no rotation is the identity)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
    for ax, R, label in (
        (axes[0], R_U, "|R_U| = |U_kᵀ U'_k| (output side)"),
        (axes[1], R_V, "|R_V| = |V_kᵀ V'_k| (input side)"),
    ):
        im = ax.imshow(
            abs(R.detach().cpu().double()).numpy() if hasattr(R, "detach") else abs(R), vmin=0, vmax=1, cmap="viridis"
        )
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("tuned singular direction")
        ax.set_ylabel("base singular direction")
        fig.colorbar(im, ax=ax, label="|cosine|", fraction=0.046, pad=0.04)
    fig.suptitle(title)
    return _finish(fig, path)


def effect_plot(rows: Sequence[dict], metric: str, path: PathLike | None = None, title: str = ""):
    """Strip plot of one intervention metric by direction kind (target vs controls), per matrix."""
    plt = _plt()
    matrices = sorted({r["matrix"] for r in rows})
    kinds = sorted({r["direction"] for r in rows})
    fig, ax = plt.subplots(figsize=(min(14, max(5, 1.6 * len(matrices) * len(kinds) / 2)), 4.2))
    for i, m in enumerate(matrices):
        for j, kind in enumerate(kinds):
            ys = [r[metric] for r in rows if r["matrix"] == m and r["direction"] == kind and r.get(metric) is not None]
            xpos = i * (len(kinds) + 1) + j
            ax.scatter([xpos] * len(ys), ys, s=10, alpha=0.6, label=kind if i == 0 else None, color=f"C{j}")
    ax.set_xticks(
        [i * (len(kinds) + 1) + (len(kinds) - 1) / 2 for i in range(len(matrices))],
        matrices,
        rotation=30,
        ha="right",
        fontsize=7,
    )
    ax.set_ylabel(metric)
    ax.set_title(title or f"rank-1 edits: {metric} by direction")
    ax.legend(fontsize=7)
    return _finish(fig, path)


def dose_response(rows: Sequence[dict], metric: str, path: PathLike | None = None, title: str = ""):
    """Behaviour against cost for effect-matched sweep rows (``match="kl"``): per matrix or set (and rank),
    ``metric`` against the achieved collateral KL (log axis), each control family as its median over the
    draws of each budget with a 10–90% band, each target as its own line (one per seed and index)."""
    import numpy as np

    plt = _plt()
    rows = [r for r in rows if r.get("kl_budget") is not None and r.get(metric) is not None]
    panels = sorted({(r["matrix"], r.get("rank") or 0, r["mode"]) for r in rows}, key=str)
    if not panels:
        raise RwasymError(f"no effect-matched rows with {metric!r} to plot (rows need kl_budget; match='kl')")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (matrix, rank, mode) in zip(axes[0], panels):
        sel = [r for r in rows if (r["matrix"], r.get("rank") or 0, r["mode"]) == (matrix, rank, mode)]
        controls = sorted({r["direction"] for r in sel if r["direction"] != r["target"]})
        for j, kind in enumerate(controls):
            budgets = sorted({r["kl_budget"] for r in sel if r["direction"] == kind})
            ys = [[r[metric] for r in sel if r["direction"] == kind and r["kl_budget"] == b] for b in budgets]
            xs = [float(np.median([r["collateral_kl"] for r in sel if r["kl_budget"] == b])) for b in budgets]
            lo, mid, hi = (np.array([np.percentile(y, q) for y in ys]) for q in (10, 50, 90))
            ax.fill_between(xs, lo, hi, color=f"C{j + 1}", alpha=0.2)
            ax.plot(xs, mid, color=f"C{j + 1}", label=f"{kind} (median, 10–90%)")
        for n, key in enumerate(sorted({(r["seed"], r["index"]) for r in sel if r["direction"] == r["target"]})):
            t = sorted(
                (r for r in sel if r["direction"] == r["target"] and (r["seed"], r["index"]) == key),
                key=lambda r: r["kl_budget"],
            )
            ax.plot(
                [r["collateral_kl"] for r in t],
                [r[metric] for r in t],
                "o-",
                color="C0",
                lw=1.5,
                label="target" if n == 0 else None,
            )
        ax.set_xscale("log")
        budgets = sorted({r["kl_budget"] for r in sel})
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("collateral KL (nats / token)")
        ax.set_title(f"{matrix}{f', rank {rank}' if rank else ''} ({mode})", fontsize=8)
        ax.set_ylabel(metric)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return _finish(fig, path)


def stage_shares(kind_rows: Sequence[dict], path: PathLike | None = None, value: str = "projection", title: str = ""):
    """Stacked bars of a chain's stage shares per matrix kind (`rwasym.analyses.chain.ChainResult.kind_shares`):
    each stage's mean ``value`` (projection ⟨ΔW_s, T⟩/‖T‖², or share ‖ΔW_s‖²/‖T‖²) of the total's ‖T‖²."""
    plt = _plt()
    kinds = list(dict.fromkeys(r["kind"] for r in kind_rows))
    stages = list(dict.fromkeys(r["stage"] for r in kind_rows))
    lookup = {(r["kind"], r["stage"]): r[value] for r in kind_rows}
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(kinds) + 2), 4))
    bottom_pos, bottom_neg = [0.0] * len(kinds), [0.0] * len(kinds)
    for j, stage in enumerate(stages):
        vals = [lookup.get((k, stage), 0.0) for k in kinds]
        bottoms = [bp if v >= 0 else bn for v, bp, bn in zip(vals, bottom_pos, bottom_neg)]
        ax.bar(range(len(kinds)), vals, bottom=bottoms, color=f"C{j}", label=stage)
        for i, v in enumerate(vals):
            if v >= 0:
                bottom_pos[i] += v
            else:
                bottom_neg[i] += v
    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylabel(f"mean {value} of ‖T‖²")
    ax.set_title(title or "each stage's part of the total change, by matrix kind")
    ax.legend(fontsize=7)
    return _finish(fig, path)


def stage_overlaps(kind_rows: Sequence[dict], path: PathLike | None = None, title: str = ""):
    """Heatmaps (input side, output side) of the mean overlap of top-r subspaces between stages per matrix kind
    (`rwasym.analyses.chain.ChainResult.kind_angles`), the Haar mean r/n marked in each cell's text."""
    plt = _plt()
    pairs = list(dict.fromkeys(f"{r['stage_a']} | {r['stage_b']}" for r in kind_rows))
    kinds = list(dict.fromkeys(r["kind"] for r in kind_rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.2 * len(kinds) + 4), 0.6 * len(pairs) + 2.2), squeeze=False)
    for ax, side in zip(axes[0], ("input", "output")):
        grid = [[float("nan")] * len(kinds) for _ in pairs]
        for r in kind_rows:
            if r["side"] == side:
                grid[pairs.index(f"{r['stage_a']} | {r['stage_b']}")][kinds.index(r["kind"])] = r["overlap"]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for r in kind_rows:
            if r["side"] == side:
                i, j = pairs.index(f"{r['stage_a']} | {r['stage_b']}"), kinds.index(r["kind"])
                ax.text(
                    j, i, f"{r['overlap']:.2f}\n({r['null_mean']:.2f})", ha="center", va="center", fontsize=6, color="w"
                )
        ax.set_xticks(range(len(kinds)), kinds, fontsize=7)
        ax.set_yticks(range(len(pairs)), pairs if side == "input" else [""] * len(pairs), fontsize=6)
        ax.set_title(f"{side} side ({'row' if side == 'input' else 'column'} spaces)", fontsize=9)
    fig.suptitle(title or "overlap of stages' top-r ΔW subspaces (mean cos²; Haar mean)", fontsize=9)
    return _finish(fig, path)


def audit_unchanged_grid(result: Any) -> tuple[list[str], list, list[list[float]]]:
    """(row labels, columns, grid) behind `audit_grid`: for each consecutive pair of an audit's checkpoints and each
    layer (``None``: tensors whose name holds no layer index), the fraction of tensors stored unchanged. Layers are
    read from names like ``layers.12.`` / ``h.12.`` / ``blk.12.`` / ``blocks.12.``."""
    import re

    fps = result.fingerprints

    def layer(name: str) -> int | None:
        found = re.search(r"(?:layers|h|blk|blocks)\.(\d+)\.", name)
        return int(found.group(1)) if found else None

    layers = sorted({x for fp in fps for x in (layer(n) for n in fp.tensors) if x is not None})
    columns: list = [*layers, None]
    grid, labels = [], []
    for i in range(1, len(fps)):
        a, b = fps[i - 1].tensors, fps[i].tensors
        row = []
        for col in columns:
            common = [n for n in a if n in b and layer(n) == col]
            row.append(sum(a[n].same(b[n]) for n in common) / len(common) if common else float("nan"))
        grid.append(row)
        labels.append(f"[{i - 1}] → [{i}]")
    return labels, columns, grid


def audit_grid(result: Any, path: PathLike | None = None, title: str = ""):
    """Heatmap of an audit (`rwasym.models.audit.AuditResult`, `audit_unchanged_grid`): consecutive pairs of
    checkpoints (rows) by layer (columns), the fraction of tensors stored unchanged (1: the layer did not move)."""
    plt = _plt()
    labels, columns, grid = audit_unchanged_grid(result)
    fig, ax = plt.subplots(figsize=(max(5, 0.22 * len(columns) + 2.5), 0.45 * len(grid) + 1.6))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="magma_r", aspect="auto")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ticks = list(range(0, len(columns), max(1, len(columns) // 12)))
    if len(columns) - 1 not in ticks:
        ticks.append(len(columns) - 1)
    ax.set_xticks(ticks, [str(columns[t]) if columns[t] is not None else "other" for t in ticks], fontsize=7)
    ax.set_xlabel("layer (last column: tensors outside the layers)")
    fig.colorbar(image, ax=ax, label="fraction of tensors unchanged")
    ax.set_title(title or "unchanged tensors between consecutive checkpoints", fontsize=9)
    return _finish(fig, path)


def stage_trajectory(rows: Sequence[dict], path: PathLike | None = None, title: str = ""):
    """A chain's trajectory (`rwasym.analyses.chain.ChainResult.trajectory`): per matrix kind, the part of the total
    change reached after each stage (cumulative projection on T), against the stage's end checkpoint."""
    plt = _plt()
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(stages) + 3), 4))
    for j, kind in enumerate(kinds):
        mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["step"])
        ax.plot(
            [0] + [r["step"] for r in mine],
            [0.0] + [r["reached"] for r in mine],
            marker="o",
            ms=3,
            color=f"C{j}",
            label=kind,
        )
    ax.set_xticks(
        range(len(stages) + 1), ["start", *[s.split(" → ")[-1] for s in stages]], rotation=30, ha="right", fontsize=7
    )
    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set_ylabel("part of the total change reached (projection on T)")
    ax.set_title(title or "the chain's trajectory along its total change")
    ax.legend(fontsize=7)
    return _finish(fig, path)


def readout_tokens(row: dict, path: PathLike | None = None, title: str = ""):
    """One readout row (`rwasym.analyses.readouts`): the logit change per unit of u of its top and bottom tokens,
    as horizontal bars (top in one colour, bottom in another), labelled with the decoded tokens."""
    plt = _plt()
    entries = row["tokens"]["bottom"] + row["tokens"]["top"][::-1]  # bottom to top: the largest logit last (top bar)
    labels = [repr(e["token"]) if e["token"] is not None else str(e["id"]) for e in entries]
    values = [e["logit"] for e in entries]
    fig, ax = plt.subplots(figsize=(5.5, 0.22 * len(entries) + 1.2))
    ax.barh(range(len(entries)), values, color=["C2" if v > 0 else "C3" for v in values])
    ax.set_yticks(range(len(entries)), labels, fontsize=7)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xlabel("logit change per unit of u  (W̃_Uᵀ u)")
    where = f"{row['matrix']} direction {row['direction']}" if row.get("matrix") else f"prediction {row['direction']}"
    ax.set_title(title or f"{where}: σ = {row.get('sigma', float('nan')):.3g}", fontsize=9)
    return _finish(fig, path)
