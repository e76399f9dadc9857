"""Target-versus-control summaries of sweep rows: exact stratified rank tests, seed-level intervals, Holm.

The unit of inference is the stratum = (seed, target index i): target i of one seed and the controls of
that seed drawn for it (``matched_to == i``). Only a target and its own matched controls are exchangeable
under H0; rows of other targets or other seeds are not. `summarize` tests within each stratum
(`rank_pvalue`), combines the strata exactly (`stratified_rank_test`), gives the seed-level t-interval of
target − mean(controls) (`seed_interval` over per-seed means), and Holm-adjusts the family of primary-
metric tests. The pooled means and bootstrap CI are kept as descriptive numbers only.
"""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import RwasymError
from ...math.inference import bootstrap_ci, holm, rank_pvalue, seed_differences, seed_interval, stratified_rank_test
from .config import CONTROLS, DESCRIPTORS
from .store import read_sweep

_DASH = "—"


@dataclass
class SweepSummary:
    """Target-versus-control comparisons, one dict per group × control kind × metric (fields: `summarize`)."""

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
        """One table line per row (``metrics``: only those metrics): the group, the pooled target and control
        means and their difference (descriptive), the seed-level diff with its 95% t-interval ("—" with one
        seed), the stratified exact p (" (floor)" when at the test's smallest attainable p) and Holm's
        adjusted p ("—" outside the primary-metric family)."""
        lines = [
            "| matrix | head | mode | α (or KL budget) | target | control | metric | target mean | control mean "
            "| diff | seed diff [95% t-CI] | p | p_holm |",
            "|" + "---|" * 13,
        ]
        for r in self.rows:
            if metrics is None or r["metric"] in metrics:
                head = "" if r["head"] is None else r["head"]
                target = r["target"] if "rank" not in r else f"{r['target']} (rank {r['rank']})"
                scale = f"KL {r['kl_budget']:g}" if r.get("kl_budget") is not None else f"{r['alpha']:g}"
                seeds = (
                    _DASH
                    if r["seed_ci_low"] is None
                    else f"{r['seed_diff']:+.4g} [{r['seed_ci_low']:+.4g}, {r['seed_ci_high']:+.4g}]"
                )
                p = _DASH if r["p_value"] is None else f"{r['p_value']:.3g}" + (" (floor)" if r["at_floor"] else "")
                p_holm = _DASH if r["p_holm"] is None else f"{r['p_holm']:.3g}"
                lines.append(
                    f"| {r['matrix']} | {head} | {r['mode']} | {scale} | {target} | "
                    f"{r['control']} | {r['metric']} | {r['target_mean']:.4g} | {r['control_mean']:.4g} | "
                    f"{r['diff']:+.4g} | {seeds} | {p} | {p_holm} |"
                )
        return "\n".join(lines)


def _group_order(item: tuple) -> tuple:
    matrix, head, mode, scale, target, rank = item[0]
    return (matrix, -1 if head is None else head, mode, scale, target, rank or 0)


def _stratum_order(key: tuple) -> tuple:
    seed, index = key
    return (seed is not None, 0 if seed is None else seed, index)


def _strata(
    members: Sequence[dict], target: str, wanted: Sequence[str], metric: str
) -> list[tuple[tuple, float, list]]:
    """[((seed, i), target value, matched control values)] in (seed, i) order, for the strata that have both."""
    targets: dict[tuple, float] = {}
    controls: dict[tuple, list[float]] = {}
    seen: set[tuple] = set()
    for m in members:
        if m["direction"] == target:
            key = (m.get("seed"), m["index"])
            if key in seen:
                raise RwasymError(
                    f"two {target} target rows with seed {key[0]} and index {key[1]} in one group "
                    f"({m['matrix']}, head {m['head']}, {m['mode']}): rows of one seed are passed twice, or "
                    "rows of different models / configurations are mixed; summarize each sweep's rows once"
                )
            seen.add(key)
            if m.get(metric) is not None:
                targets[key] = float(m[metric])
        elif m["direction"] in wanted and m.get("matched_to") is not None and m.get(metric) is not None:
            controls.setdefault((m.get("seed"), m["matched_to"]), []).append(float(m[metric]))
    keys = sorted((k for k in targets if k in controls), key=_stratum_order)
    return [(k, targets[k], controls[k]) for k in keys]


def _stratified(strata: list[tuple[tuple, float, list]]) -> dict[str, Any]:
    """The row fields of the stratified rank test and of the seed-level interval (None without strata)."""
    if not strata:
        return dict(
            n_strata=0,
            n_seeds=0,
            p_value=None,
            p_floor=None,
            at_floor=None,
            seed_diff=None,
            seed_ci_low=None,
            seed_ci_high=None,
            strata=[],
        )
    pairs = [(t, c) for _, t, c in strata]
    test = stratified_rank_test(pairs)
    by_seed: dict[Any, list[float]] = {}
    for ((seed, _), _, _), d in zip(strata, seed_differences(pairs)):
        by_seed.setdefault(seed, []).append(d)
    interval = seed_interval([sum(ds) / len(ds) for ds in by_seed.values()])
    return dict(
        n_strata=len(strata),
        n_seeds=interval["n"],
        p_value=test["p"],
        p_floor=test["floor"],
        at_floor=bool(test["at_floor"]),
        seed_diff=interval["mean"],
        seed_ci_low=interval["ci_low"],
        seed_ci_high=interval["ci_high"],
        strata=[
            dict(
                seed=seed,
                index=index,
                target=t,
                control_mean=float(np.mean(c)),
                n_controls=len(c),
                rank_p=rank_pvalue(t, c),
            )
            for (seed, index), t, c in strata
        ],
    )


def summarize(
    rows: Sequence[dict] | str | os.PathLike,
    *,
    metrics: Sequence[str] | None = None,
    primary: str = "gap_margin",
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> SweepSummary:
    """Target rows versus their matched controls, per group × control kind × metric.

    Group: matrix (or joint set) × head × mode × α (or KL budget, effect-matched sweeps) × target family
    (× rank for joint rows); rows of several seeds (several sweep files, or a path to one) may be passed
    together. Control kinds: each of "random" / "orthogonal" present, and both pooled ("control").
    Metrics: ``metrics``, default every numeric field that is not a row descriptor (input_energy
    included); a None value leaves that row out of that metric.

    Unit of inference — stratum (s, i) = seed s, target index i: the target row (direction == target,
    index == i, seed s) and the control rows of seed s of the control kind with ``matched_to == i``
    (under H0 the target is exchangeable with these controls only). A stratum without a target value
    or without a control value is skipped. Per row:

    - ``p_value``: `stratified_rank_test` over the strata, exact and one-sided (alternative: the target
      above its controls): T = Σ_(s,i) mid-rank of the target among its stratum, p = P₀(T ≥ T_obs) with
      each stratum's target position uniform and independent under H0; ``p_floor``, the smallest
      attainable p (1/∏(n_(s,i) + 1) without ties); ``at_floor``, T_obs is the maximum (report "at the
      test's floor"). None (and at_floor None) without strata.
    - ``strata``: per stratum {seed, index, target, control_mean, n_controls, rank_p}, rank_p the
      within-stratum exact p `rank_pvalue` = (1 + #{controls ≥ target}) / (n + 1); ``n_strata``.
    - Seed level: d_s = mean over seed s's strata of (target − mean(controls)); ``seed_diff`` = mean_s d_s,
      [``seed_ci_low``, ``seed_ci_high``] = `seed_interval`'s 95% t-interval mean ± t₀.₉₇₅(S−1)·sd/√S over
      the S = ``n_seeds`` seeds (None with one seed).
    - ``p_holm``: Holm step-down adjusted p (`holm`) over the family of every row with
      ``metric == primary`` and a p_value (all groups and control kinds reported); None for other rows.
      The default primary, gap_margin, is oriented so that larger = more of the base → tuned gap moved in
      both modes (transplant and ablate), which is what the one-sided alternative tests.
    - Descriptive only (they resample rows across seeds and targets as if exchangeable; not tests):
      ``target_mean``, ``control_mean`` over all target / control rows of the group with a value
      (``n_target``, ``n_control``), ``diff`` = target_mean − control_mean, and [``ci_low``, ``ci_high``]
      = `bootstrap_ci`(targets, controls, n_boot, level, seed), the pooled percentile bootstrap.

    Non-finite metric values in a stratum raise `RwasymError` (drop or recompute the diverged rows);
    two target rows with the same (seed, index) in one group raise too (rows passed twice, or rows of
    different configurations mixed). ``config`` records n_boot, level, seed, the unit, the alternative,
    the Holm family ({"metric": primary, "n_tests": n}; 0 when primary is not summarized) and that the
    pooled bootstrap is descriptive.
    """
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
                t = [float(m[metric]) for m in members if m["direction"] == target and m.get(metric) is not None]
                c = [float(m[metric]) for m in members if m["direction"] in wanted and m.get(metric) is not None]
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
                        **_stratified(_strata(members, target, wanted, metric)),
                        p_holm=None,
                    )
                )
    family = [r for r in out if r["metric"] == primary and r["p_value"] is not None]
    for r, p in zip(family, holm([r["p_value"] for r in family])):
        r["p_holm"] = p
    config = dict(
        n_boot=n_boot,
        level=level,
        seed=seed,
        unit="stratum = (seed, target index) with its own matched controls",
        alternative="greater: the target above its controls",
        holm_family={"metric": primary, "n_tests": len(family)},
        pooled_bootstrap="descriptive: resamples rows across seeds",
    )
    return SweepSummary(rows=out, config=config)
