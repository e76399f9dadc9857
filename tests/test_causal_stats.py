"""The pure-math blocks of effect-matched causal tests (issue #28), each against an independent oracle:
the within-seed rank p (a brute-force count), the stratified rank test (enumeration of every position
assignment), the seed-level t-interval (by hand), Holm (a hand example and the sequential procedure),
and the spectrum-matched random delta (its singular values, and the Haar moment of its singular vectors)."""

import itertools
import math
import random

import numpy as np
import pytest
import torch

from rwasym.errors import RwasymError
from rwasym.math.checks import linalg_threads
from rwasym.math.inference import (
    holm,
    rank_floor,
    rank_pvalue,
    seed_differences,
    seed_interval,
    stratified_rank_test,
)
from rwasym.math.rank1 import spectrum_matched_delta


# -- within a seed -------------------------------------------------------------------------------
def _count_pvalue(target: float, controls: list[float]) -> float:
    """The oracle: a plain loop over the controls, ties against the target."""
    at_least = 0
    for c in controls:
        if c >= target:
            at_least += 1
    return (1 + at_least) / (len(controls) + 1)


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "integer-ties"])
def test_rank_pvalue_matches_a_brute_force_count(ties):
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(1, 12)
        draw = (lambda mu: float(rng.randint(0, 4))) if ties else (lambda mu: rng.gauss(mu, 1))
        controls = [draw(0.0) for _ in range(n)]
        target = draw(0.5)
        assert rank_pvalue(target, controls) == _count_pvalue(target, controls)


def test_rank_pvalue_floor_and_near_ties():
    assert rank_pvalue(5.0, [1.0, 2.0, 3.0]) == rank_floor(3) == 0.25
    assert rank_pvalue(3.0, [1.0, 2.0, 3.0]) == 0.5  # a tie counts against the target
    assert rank_pvalue(0.1 + 0.2, [0.3, 0.0]) == 2 / 3  # 0.30000000000000004 ties 0.3 (rounding)
    assert rank_pvalue(-1.0, np.zeros(9)) == 1.0
    with pytest.raises(RwasymError, match="non-empty"):
        rank_pvalue(1.0, [])
    with pytest.raises(RwasymError, match="NaN"):
        rank_pvalue(1.0, [0.0, float("nan")])
    with pytest.raises(RwasymError, match="at least one control"):
        rank_floor(0)


# -- across seeds --------------------------------------------------------------------------------
def _midrank(values: list[float], i: int) -> float:
    """values[i]'s 0-based mid-rank among the others: #strictly below + ½ #equal (exact ties)."""
    below = sum(1 for j, v in enumerate(values) if j != i and v < values[i])
    equal = sum(1 for j, v in enumerate(values) if j != i and v == values[i])
    return below + equal / 2


def _enumerate(strata) -> dict:
    """The oracle: every assignment of the target's position in every stratum (∏(n_s + 1) of them)."""
    stratum_values = [[t, *c] for t, c in strata]
    ranks = [[_midrank(vals, i) for i in range(len(vals))] for vals in stratum_values]
    observed = sum(r[0] for r in ranks)
    stats = [sum(combo) for combo in itertools.product(*ranks)]
    top = max(stats)
    return dict(
        p=sum(1 for s in stats if s >= observed - 1e-9) / len(stats),
        statistic=observed,
        null_mean=sum(stats) / len(stats),
        max_statistic=top,
        floor=sum(1 for s in stats if s >= top - 1e-9) / len(stats),
        at_floor=observed >= top - 1e-9,
    )


def _random_strata(rng: random.Random, ties: bool, max_strata: int = 4, max_n: int = 5):
    def draw(shift: float = 0.0) -> float:
        return float(rng.randint(0, 3)) if ties else rng.gauss(shift, 1.0)

    return [(draw(0.7), [draw() for _ in range(rng.randint(1, max_n))]) for _ in range(rng.randint(1, max_strata))]


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "integer-ties"])
def test_stratified_rank_test_matches_full_enumeration(ties):
    rng = random.Random(7 + ties)
    for _ in range(60):
        strata = _random_strata(rng, ties)
        got, want = stratified_rank_test(strata), _enumerate(strata)
        for key in ("p", "statistic", "null_mean", "max_statistic", "floor"):
            assert got[key] == pytest.approx(want[key], abs=1e-12), (key, strata)
        assert got["at_floor"] == want["at_floor"]
        assert got["exact"] is True
        assert got["n_controls"] == [len(c) for _, c in strata]


def test_stratified_rank_test_a_million_assignments_and_the_floor():
    """6 strata × 9 controls: 10⁶ assignments, enumerated by broadcasting the oracle's per-stratum
    ranks; then every target on top gives p = the floor 1/∏(n_s + 1) and at_floor."""
    rng = random.Random(3)
    strata = [(rng.gauss(0.8, 1), [rng.gauss(0, 1) for _ in range(9)]) for _ in range(6)]
    total = np.zeros(())
    for t, c in strata:
        vals = [t, *c]
        total = np.add.outer(total, [_midrank(vals, i) for i in range(len(vals))])
    observed = sum(_midrank([t, *c], 0) for t, c in strata)
    got = stratified_rank_test(strata)
    assert got["p"] == pytest.approx(float(np.mean(total >= observed - 1e-9)), abs=1e-12)
    on_top = [(max(c) + 1.0, c) for _, c in strata]
    top = stratified_rank_test(on_top)
    assert top["at_floor"] and top["p"] == top["floor"] == pytest.approx(1e-6, rel=1e-12)
    tied_top = stratified_rank_test([(1.0, [1.0, 0.0]), (2.0, [0.0])])  # a tie at the top: floor 2/3 · 1/2
    assert tied_top["at_floor"] and tied_top["floor"] == pytest.approx(1 / 3, abs=1e-15)


def test_one_stratum_is_the_within_seed_rank_p():
    rng = random.Random(5)
    for _ in range(50):
        target, controls = float(rng.randint(0, 5)), [float(rng.randint(0, 5)) for _ in range(rng.randint(1, 9))]
        assert stratified_rank_test([(target, controls)])["p"] == pytest.approx(rank_pvalue(target, controls))


def test_stratified_rank_test_large_and_errors():
    rng = random.Random(11)
    strata = [(rng.gauss(0.3, 1), [rng.gauss(0, 1) for _ in range(200)]) for _ in range(40)]
    got = stratified_rank_test(strata)  # 201^40 assignments: exact by convolution
    assert got["floor"] <= got["p"] <= 1 and got["null_mean"] == pytest.approx(40 * 100)
    with pytest.raises(RwasymError, match="at least one stratum"):
        stratified_rank_test([])
    with pytest.raises(RwasymError, match="stratum 1's controls"):
        stratified_rank_test([(1.0, [0.0]), (1.0, [])])


def test_seed_interval_of_seed_differences_by_hand():
    strata = [(1.0, [0.2, 0.4]), (0.8, [0.5, 0.1, 0.3]), (1.5, [1.0]), (0.9, [0.9, 0.3]), (1.2, [0.0, 0.6])]
    diffs = [0.7, 0.5, 0.5, 0.3, 0.9]  # target − mean(controls), by hand
    assert seed_differences(strata) == pytest.approx(diffs, abs=1e-15)
    mean = sum(diffs) / 5  # 0.58
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    half = 2.776 * std / math.sqrt(5)  # t_0.975 with 4 degrees of freedom (a table, 3 decimals)
    got = seed_interval(seed_differences(strata))
    assert got["n"] == 5 and got["mean"] == pytest.approx(0.58)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((mean - half, mean + half), abs=1e-12)


# -- over a family -------------------------------------------------------------------------------
def test_holm_hand_examples():
    # sorted 0.005, 0.01, 0.03, 0.04 → 4·0.005, 3·0.01, 2·0.03, 1·0.04 = 0.02, 0.03, 0.06, 0.04 → cummax
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    assert holm([0.5, 0.2, 0.3]) == pytest.approx([0.6, 0.6, 0.6], abs=1e-15)  # 0.6, 0.6, 0.5 → monotone
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    assert holm([0.02]) == [0.02] and holm([]) == []
    with pytest.raises(RwasymError, match=r"\[0, 1\]"):
        holm([0.5, 1.5])


def _holm_rejections(p: list[float], alpha: float) -> set[int]:
    """The oracle: Holm's sequential procedure — reject the j-th smallest while p_(j) ≤ α/(m − j + 1)."""
    m, rejected = len(p), set()
    for j, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        if p[i] > alpha / (m - j):
            break
        rejected.add(i)
    return rejected


def test_holm_rejects_what_the_sequential_procedure_rejects():
    rng = random.Random(2)
    for _ in range(300):
        p = [round(rng.random() ** 3, 2) for _ in range(rng.randint(1, 8))]  # ties from rounding
        adjusted = holm(p)
        for alpha in [rng.random() * 0.3 for _ in range(10)]:
            assert {i for i, a in enumerate(adjusted) if a <= alpha} == _holm_rejections(p, alpha)
        assert all(a >= q for a, q in zip(adjusted, p))


# -- the spectrum-matched random delta -----------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 4), (3, 7), (5, 5)])
def test_spectrum_matched_delta_keeps_the_spectrum(shape):
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(*shape, generator=g, dtype=torch.float64)
    r = spectrum_matched_delta(delta, torch.Generator().manual_seed(1))
    assert r.shape == delta.shape and r.dtype == torch.float64
    s, s_r = torch.linalg.svdvals(delta), torch.linalg.svdvals(r)
    assert float((s_r - s).abs().max() / s.max()) < 1e-10
    assert float(r.norm()) == pytest.approx(float(delta.norm()), rel=1e-12)
    assert float((r - delta).norm()) > 0.1 * float(delta.norm())  # a new matrix, not ΔW
    assert torch.equal(r, spectrum_matched_delta(delta, torch.Generator().manual_seed(1)))
    assert not torch.equal(r, spectrum_matched_delta(delta, torch.Generator().manual_seed(2)))
    with pytest.raises(RwasymError, match="non-finite"):
        spectrum_matched_delta(torch.full(shape, float("nan"), dtype=torch.float64), g)


def test_spectrum_matched_delta_has_haar_singular_vectors():
    """Over N draws (ΔW 4 × 3, distinct σ), the mean of u₁u₁ᵀ (top left singular vector) is I/4 and of
    v₁v₁ᵀ I/3, and the mean of R is 0. Tolerance 5 standard errors: an entry of u uᵀ, u uniform on
    S^{n−1}, has variance ≤ E u_i⁴ = 3/(n(n + 2)); an entry of R has variance ‖σ‖²/(n_out n_in)."""
    delta = torch.tensor([[3.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [0, 0, 0]], dtype=torch.float64)
    N, g = 800, torch.Generator().manual_seed(0)
    uu, vv, mean = torch.zeros(4, 4, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64), 0 * delta
    with linalg_threads(1):  # 4 × 3 SVDs: thread start-up would dominate
        for _ in range(N):
            r = spectrum_matched_delta(delta, g)
            U, _, Vh = torch.linalg.svd(r)
            uu += torch.outer(U[:, 0], U[:, 0]) / N
            vv += torch.outer(Vh[0], Vh[0]) / N
            mean += r / N
    for avg, n in [(uu, 4), (vv, 3)]:
        tol = 5 * math.sqrt(3 / (n * (n + 2)) / N)
        assert float((avg - torch.eye(n, dtype=torch.float64) / n).abs().max()) < tol
    assert float(mean.abs().max()) < 5 * math.sqrt(14 / 12 / N)
