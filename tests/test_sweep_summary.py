"""`summarize` against hand computations: strata = (seed, target index) with their own matched controls,
the within-stratum rank p by counting, the stratified p by enumerating every target assignment, the
seed-level t-interval, Holm's step-down, and the descriptive pooled bootstrap."""

import json
import math

import numpy as np
import pytest

from rwasym import RwasymError
from rwasym.analyses.sweep import summarize
from rwasym.math.inference import bootstrap_ci, stratified_rank_test

SEEDS, INDICES, N_PER_KIND = (0, 1, 2), (0, 1), 5
T975_DF2 = 4.302652729911275  # Student's t 0.975 quantile, df = 2


def _row(seed, direction, index, matched_to, matrix="blocks.0.attn.W_Q", **metrics):
    return dict(
        id=f"{matrix}-{seed}-{direction}-{index}",
        matrix=matrix,
        head=None,
        mode="transplant",
        alpha=1.0,
        target="pca",
        direction=direction,
        index=index,
        matched_to=matched_to,
        seed=seed,
        **metrics,
    )


def _rows(matrix="blocks.0.attn.W_Q", shift=0.5, seeds=SEEDS):
    """Per seed: 2 pca targets; per kind 10 controls, control j matched to target j % 2 (5 each)."""
    rng = np.random.default_rng(11)
    rows = []
    for s in seeds:
        for i in INDICES:
            rows.append(_row(s, "pca", i, None, matrix, gap_margin=float(rng.normal() + shift), ce=2.0))
        for kind in ("random", "orthogonal"):
            for j in range(N_PER_KIND * len(INDICES)):
                rows.append(_row(s, kind, j, j % len(INDICES), matrix, gap_margin=float(rng.normal()), ce=2.0))
    return rows


def _hand_strata(rows, kinds, metric="gap_margin"):
    """{(seed, i): (target, [controls])} by direct selection."""
    out = {}
    for r in rows:
        if r["direction"] == "pca" and r.get(metric) is not None:
            cs = [
                c[metric]
                for c in rows
                if c["seed"] == r["seed"]
                and c["direction"] in kinds
                and c["matched_to"] == r["index"]
                and c.get(metric) is not None
            ]
            if cs:
                out[(r["seed"], r["index"])] = (r[metric], cs)
    return out


def _doubled_rank(value, others):
    """2 × (#below + ½ #tied) of value among others (exact float equality: no near-ties in these data)."""
    return 2 * sum(o < value for o in others) + sum(o == value for o in others)


def _brute_force_p(strata):
    """P(T ≥ T_obs) over every assignment of which member of each stratum is the target (uniform)."""
    per = []
    for t, cs in strata:
        members = [t, *cs]
        per.append([_doubled_rank(members[k], members[:k] + members[k + 1 :]) for k in range(len(members))])
    observed = sum(ranks[0] for ranks in per)
    total = np.zeros(1, dtype=np.int64)
    for ranks in per:  # the sum over the full product grid, ∏(n_s + 1) assignments, built by broadcasting
        total = (total[:, None] + np.asarray(ranks, dtype=np.int64)[None, :]).ravel()
    assert total.size == math.prod(len(r) for r in per)
    return float(np.mean(total >= observed))


def _cell(summary, control, metric="gap_margin", matrix="blocks.0.attn.W_Q"):
    (row,) = [r for r in summary.rows if (r["matrix"], r["control"], r["metric"]) == (matrix, control, metric)]
    return row


@pytest.mark.parametrize("control, kinds", [("random", ("random",)), ("control", ("random", "orthogonal"))])
def test_strata_rank_p_and_stratified_p_by_enumeration(control, kinds):
    rows = _rows()
    got = _cell(summarize(rows, n_boot=100), control)
    hand = _hand_strata(rows, kinds)
    assert got["n_strata"] == len(hand) == len(SEEDS) * len(INDICES)
    assert [(s["seed"], s["index"]) for s in got["strata"]] == sorted(hand)
    for s in got["strata"]:
        t, cs = hand[(s["seed"], s["index"])]
        assert s["target"] == t and s["n_controls"] == len(cs) == N_PER_KIND * len(kinds)
        assert s["control_mean"] == pytest.approx(sum(cs) / len(cs), rel=1e-12)
        assert s["rank_p"] == pytest.approx((1 + sum(c >= t for c in cs)) / (len(cs) + 1), rel=1e-12)
    p = _brute_force_p([hand[k] for k in sorted(hand)])
    assert got["p_value"] == pytest.approx(p, rel=1e-9)
    assert got["p_floor"] == pytest.approx(1 / (N_PER_KIND * len(kinds) + 1) ** len(hand), rel=1e-12)
    assert got["at_floor"] is False and 0 < got["p_value"] < 1


def test_seed_level_interval_by_hand():
    rows = _rows()
    got = _cell(summarize(rows, n_boot=100), "control")
    hand = _hand_strata(rows, ("random", "orthogonal"))
    per_seed = [
        np.mean([hand[(s, i)][0] - np.mean(hand[(s, i)][1]) for i in INDICES]) for s in SEEDS
    ]  # each seed: mean over its targets of target − mean(its matched controls)
    mean, sd = float(np.mean(per_seed)), float(np.std(per_seed, ddof=1))
    half = T975_DF2 * sd / math.sqrt(len(SEEDS))
    tol = 5e-4 * sd / math.sqrt(len(SEEDS))  # seed_interval's t table is rounded to 3 decimals
    assert got["n_seeds"] == 3 and got["seed_diff"] == pytest.approx(mean, rel=1e-12)
    assert got["seed_ci_low"] == pytest.approx(mean - half, abs=tol)
    assert got["seed_ci_high"] == pytest.approx(mean + half, abs=tol)
    seed1 = [r for r in rows if r["seed"] == 1]
    one = _cell(summarize(seed1, n_boot=100), "control")
    assert one["n_seeds"] == 1 and one["seed_ci_low"] is None and one["seed_ci_high"] is None
    assert one["seed_diff"] == pytest.approx(per_seed[1], rel=1e-12)
    md = summarize(seed1, n_boot=100).to_markdown(["gap_margin"])
    assert all(line.split("|")[-4].strip() == "—" for line in md.splitlines()[2:])


def test_pooled_descriptives_and_bootstrap_ci():
    rows = _rows()
    summary = summarize(rows, n_boot=300, level=0.9, seed=5)
    got = _cell(summary, "orthogonal")
    t = [r["gap_margin"] for r in rows if r["direction"] == "pca"]
    c = [r["gap_margin"] for r in rows if r["direction"] == "orthogonal"]
    assert (got["n_target"], got["n_control"]) == (len(t), len(c)) == (6, 30)
    assert got["target_mean"] == pytest.approx(np.mean(t), rel=1e-12)
    assert got["control_mean"] == pytest.approx(np.mean(c), rel=1e-12)
    assert got["diff"] == pytest.approx(np.mean(t) - np.mean(c), rel=1e-12)
    assert (got["ci_low"], got["ci_high"]) == bootstrap_ci(t, c, 300, 0.9, 5)
    assert summary.config["pooled_bootstrap"].startswith("descriptive")
    assert summary.config["unit"] == "stratum = (seed, target index) with its own matched controls"
    assert "n_permutations" not in summary.config
    assert json.loads(summary.to_json())["rows"][0]["strata"][0]["seed"] == 0  # JSON-able


def test_holm_over_the_primary_metric_family():
    rows = _rows() + _rows(matrix="blocks.1.attn.W_Q", shift=2.0)
    summary = summarize(rows, n_boot=100)
    family = [r for r in summary.rows if r["metric"] == "gap_margin"]
    assert len(family) == 6 and summary.config["holm_family"] == {"metric": "gap_margin", "n_tests": 6}
    ps = [r["p_value"] for r in family]
    order = sorted(range(len(ps)), key=lambda k: ps[k])
    want, running = [0.0] * len(ps), 0.0
    for j, k in enumerate(order):  # step-down: p̃_(j) = max over earlier of min(1, (m − j) p_(j)), j 0-based
        running = max(running, min(1.0, (len(ps) - j) * ps[k]))
        want[k] = running
    assert [r["p_holm"] for r in family] == pytest.approx(want, rel=1e-12)
    assert all(r["p_holm"] is None for r in summary.rows if r["metric"] != "gap_margin")
    assert summary.config["alternative"] == "greater: the target above its controls"
    other = summarize(rows, metrics=["ce"], n_boot=100)  # the primary metric is not summarized: no family
    assert other.config["holm_family"] == {"metric": "gap_margin", "n_tests": 0}
    assert all(r["p_holm"] is None for r in other.rows)
    by_ce = summarize(rows, metrics=["ce", "gap_margin"], primary="ce", n_boot=100)
    assert by_ce.config["holm_family"]["n_tests"] == 6
    assert all(r["p_holm"] == 1.0 for r in by_ce.rows if r["metric"] == "ce")  # all tied: p = 1


def test_unmatched_and_empty_strata_are_left_out():
    rows = _rows()
    base = {(s["seed"], s["index"]): s for s in _cell(summarize(rows, n_boot=100), "random")["strata"]}
    planted = rows + [
        _row(0, "random", 99, 1, gap_margin=1e6),  # an extreme control of seed 0 matched to target 1
        _row(7, "pca", 0, None, gap_margin=5.0),  # seed 7: a target without controls
        _row(0, "random", 98, None, gap_margin=-1e6),  # a control matched to no target
    ]
    got = _cell(summarize(planted, n_boot=100), "random")
    strata = {(s["seed"], s["index"]): s for s in got["strata"]}
    assert set(strata) == set(base) and got["n_strata"] == 6 and got["n_seeds"] == 3
    assert strata[(0, 0)] == base[(0, 0)]  # index 0's stratum does not see the control matched to index 1
    t, cs = _hand_strata(planted, ("random",))[(0, 1)]
    assert 1e6 in cs and strata[(0, 1)]["n_controls"] == N_PER_KIND + 1
    assert strata[(0, 1)]["rank_p"] == pytest.approx((1 + sum(c >= t for c in cs)) / (len(cs) + 1))
    assert got["n_target"] == 7 and got["n_control"] == 32  # the descriptive pool keeps every row


def test_target_above_all_controls_is_at_the_floor():
    rows = _rows(shift=100.0)
    summary = summarize(rows, n_boot=100)
    got = _cell(summary, "random")
    assert all(s["rank_p"] == pytest.approx(1 / (N_PER_KIND + 1)) for s in got["strata"])
    assert got["at_floor"] is True and got["p_value"] == pytest.approx((1 / (N_PER_KIND + 1)) ** 6, rel=1e-12)
    assert got["p_value"] == pytest.approx(_brute_force_p(list(_hand_strata(rows, ("random",)).values())))
    md = summary.to_markdown(["gap_margin"])
    assert md.count("\n") == 4  # header, rule, random / orthogonal / control
    assert "| blocks.0.attn.W_Q |  | transplant | 1 | pca | random | gap_margin |" in md
    line = next(x for x in md.splitlines() if "| random | gap_margin |" in x)
    assert line.endswith(f"| {got['p_value']:.3g} (floor) | {got['p_holm']:.3g} |")
    ce = next(x for x in summary.to_markdown(["ce"]).splitlines() if "| control | ce |" in x)
    assert ce.endswith("| 1 (floor) | — |")  # all tied: the floor is 1; not in the gap_margin family


def test_errors_and_rows_without_strata():
    rows = _rows()
    with pytest.raises(RwasymError, match="two pca target rows with seed 0 and index 1"):
        summarize(rows + [dict(rows[1])], n_boot=100)
    legacy = [dict(r, matched_to=None) for r in rows]  # controls matched to no target: no stratum
    got = _cell(summarize(legacy, n_boot=100), "control")
    assert got["p_value"] is None and got["n_strata"] == 0 and got["p_holm"] is None and got["strata"] == []
    assert summarize(legacy, n_boot=100).config["holm_family"]["n_tests"] == 0
    assert "| — | — |" in summarize(legacy, n_boot=100).to_markdown(["gap_margin"])


def test_brute_force_oracle_counts_ties_as_half():
    """The enumeration oracle itself, on a case small enough to list: strata [1 | 0, 1] and [2 | 3]."""
    # doubled ranks (2 · #below + #tied) in stratum 1 of (1, 0, 1): (3, 0, 3); in stratum 2 of (2, 3): (0, 2);
    # T_obs = 3 + 0; sums over the 6 assignments: 3, 5, 0, 2, 3, 5 → P(T ≥ 3) = 4/6
    assert _brute_force_p([(1.0, [0.0, 1.0]), (2.0, [3.0])]) == pytest.approx(4 / 6)
    assert stratified_rank_test([(1.0, [0.0, 1.0]), (2.0, [3.0])])["p"] == pytest.approx(4 / 6)
