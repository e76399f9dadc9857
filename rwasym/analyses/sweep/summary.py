"""Target-versus-control summaries of sweep rows."""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...math.inference import bootstrap_ci, permutation_pvalue
from .config import CONTROLS, DESCRIPTORS
from .store import read_sweep


@dataclass
class SweepSummary:
    """Target-versus-control comparisons, one dict per group × control × metric."""

    rows: list[dict]
    config: dict = field(default_factory=dict)

    def to_dicts(self) -> list[dict]:
        return [dict(r) for r in self.rows]

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps({"config": self.config, "rows": self.rows}, indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_markdown(self, metrics: Sequence[str] | None = None) -> str:
        lines = [
            "| matrix | head | mode | α (or KL budget) | target | control | metric | target mean | control mean "
            "| diff [95% CI] | p |",
            "|" + "---|" * 11,
        ]
        for r in self.rows:
            if metrics is None or r["metric"] in metrics:
                head = "" if r["head"] is None else r["head"]
                target = r["target"] if "rank" not in r else f"{r['target']} (rank {r['rank']})"
                scale = f"KL {r['kl_budget']:g}" if r.get("kl_budget") is not None else f"{r['alpha']:g}"
                lines.append(
                    f"| {r['matrix']} | {head} | {r['mode']} | {scale} | {target} | "
                    f"{r['control']} | {r['metric']} | {r['target_mean']:.4g} | {r['control_mean']:.4g} | "
                    f"{r['diff']:+.4g} [{r['ci_low']:+.4g}, {r['ci_high']:+.4g}] | {r['p_value']:.3g} |"
                )
        return "\n".join(lines)


def _group_order(item: tuple) -> tuple:
    matrix, head, mode, scale, target, rank = item[0]
    return (matrix, -1 if head is None else head, mode, scale, target, rank or 0)


def summarize(
    rows: Sequence[dict] | str | os.PathLike,
    *,
    metrics: Sequence[str] | None = None,
    n_boot: int = 2000,
    n_permutations: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> SweepSummary:
    """Per matrix (or joint set) × head × mode × α (or KL budget) × target family (× rank for joint rows): target
    rows versus each control kind and
    both pooled ("control"), for every numeric metric (default: all but the row descriptors,
    input_energy included): means, diff = target − control, bootstrap CI, permutation p."""
    if isinstance(rows, (str, os.PathLike)):
        _, rows = read_sweep(rows)
    rows = list(rows)
    if metrics is None:
        metrics = sorted(
            {
                k
                for r in rows
                for k, v in r.items()
                if k not in DESCRIPTORS and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
    groups: dict[tuple, list[dict]] = {}
    for r in rows:  # joint rows (rwasym.analyses.joint) are grouped by their edit rank too
        scale = ("kl", r["kl_budget"]) if r.get("kl_budget") is not None else ("alpha", r["alpha"])
        groups.setdefault((r["matrix"], r["head"], r["mode"], scale, r["target"], r.get("rank")), []).append(r)
    out = []
    for (matrix, head, mode, (unit, scale), target, rank), members in sorted(groups.items(), key=_group_order):
        alpha, budget = (scale, None) if unit == "alpha" else (None, scale)
        for control in [c for c in CONTROLS if any(m["direction"] == c for m in members)] + ["control"]:
            wanted = CONTROLS if control == "control" else (control,)
            for metric in metrics:
                t = [m[metric] for m in members if m["direction"] == target and m.get(metric) is not None]
                c = [m[metric] for m in members if m["direction"] in wanted and m.get(metric) is not None]
                if not t or not c:
                    continue
                lo, hi = bootstrap_ci(t, c, n_boot, level, seed)
                out.append(
                    dict(
                        matrix=matrix,
                        head=head,
                        mode=mode,
                        alpha=alpha,
                        **({} if budget is None else {"kl_budget": budget}),
                        target=target,
                        **({} if rank is None else {"rank": rank}),
                        control=control,
                        metric=metric,
                        n_target=len(t),
                        n_control=len(c),
                        target_mean=float(np.mean(t)),
                        control_mean=float(np.mean(c)),
                        diff=float(np.mean(t) - np.mean(c)),
                        ci_low=lo,
                        ci_high=hi,
                        p_value=permutation_pvalue(t, c, n_permutations, seed),
                    )
                )
    config = dict(n_boot=n_boot, n_permutations=n_permutations, level=level, seed=seed)
    return SweepSummary(rows=out, config=config)
