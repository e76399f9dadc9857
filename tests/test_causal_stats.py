"""The pure-math blocks of effect-matched causal tests (issue #28), each against an independent oracle:
the within-seed rank p (a brute-force count), the stratified rank test (enumeration of every position
assignment), the seed-level t-interval (by hand), Holm (a hand example and the sequential procedure),
the spectrum-matched random delta (its singular values, and the Haar moment of its singular vectors),
and the KL-budget calibration (analytic effects with known inverses)."""

import itertools
import math
import random

import numpy as np
import pytest
import torch

from rwasym.errors import RwasymError
from rwasym.math.calibration import calibrate_scale
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


# -- the KL-budget calibration -------------------------------------------------------------------
GRID = [(c, b) for c in (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3) for b in (1e-3, 1e-2, 0.1, 1.0)]


def _bracket(inverse, budget: float, rtol: float) -> tuple[float, float]:
    """The α range an increasing effect maps into [budget (1 − rtol), budget (1 + rtol)]."""
    return inverse(budget * (1 - rtol)), inverse(budget * (1 + rtol))


def _check_reached(result: dict, inverse, budget: float, rtol: float = 0.05) -> None:
    lo, hi = _bracket(inverse, budget, rtol)
    assert result["reached"] and not result["saturated"]
    assert abs(result["achieved"] - budget) <= rtol * budget
    assert lo * (1 - 1e-12) <= result["alpha"] <= hi * (1 + 1e-12)
    assert result["history"][-1] == (result["alpha"], result["achieved"])
    assert result["evaluations"] == len(result["history"])


def test_calibrate_quadratic_effect_in_two_evaluations():
    for c, b in GRID:
        result = calibrate_scale(lambda a, c=c: c * a * a, b)
        _check_reached(result, lambda e, c=c: math.sqrt(e / c), b)
        assert result["evaluations"] <= 2
        assert result["alpha"] == pytest.approx(math.sqrt(b / c), rel=1e-12)


def test_calibrate_quartic_and_piecewise_effects():
    for c, b in GRID:
        for d in (0.1 * c, c, 10 * c):
            # c α² + d α⁴ = e: α² = (−c + √(c² + 4 d e)) / (2d)
            inverse = lambda e, c=c, d=d: math.sqrt((-c + math.sqrt(c * c + 4 * d * e)) / (2 * d))
            _check_reached(calibrate_scale(lambda a, c=c, d=d: c * a * a + d * a**4, b), inverse, b)
    # α² up to α = 1, then a steep line 1 + 8 (α − 1): a kink at the budget's scale
    piecewise = lambda a: a * a if a <= 1 else 1 + 8 * (a - 1)
    inverse = lambda e: math.sqrt(e) if e <= 1 else 1 + (e - 1) / 8
    for b in (0.05, 0.5, 0.97, 1.02, 3.0, 40.0):
        _check_reached(calibrate_scale(piecewise, b, alpha0=0.3), inverse, b)


def test_calibrate_saturating_effect():
    sat = lambda a: 1 - math.exp(-a * a)
    result = calibrate_scale(sat, 2.0)  # above the plateau at 1
    assert result["saturated"] and not result["reached"] and result["achieved"] < 2.0 * 0.95
    _check_reached(calibrate_scale(sat, 0.5), lambda e: math.sqrt(-math.log(1 - e)), 0.5)
    # reachable, but only above alpha_max
    capped = calibrate_scale(lambda a: 1e-6 * a * a, 1.0, alpha_max=100.0)
    assert capped["saturated"] and not capped["reached"] and capped["alpha"] == 100.0


def test_calibrate_never_returns_an_alpha_outside_tolerance():
    """A jump at α = 1.2 from 0.72·budget to 2.88·budget: no α meets 5%, so reached is False after
    max_evals, with the bisection closing on the jump."""
    b = 0.1
    jump = lambda a: (0.5 if a < 1.2 else 2.0) * b * a * a
    result = calibrate_scale(jump, b, max_evals=12)
    assert not result["reached"] and not result["saturated"] and result["evaluations"] == 12
    assert abs(result["achieved"] - b) > 0.05 * b
    assert result["alpha"] == pytest.approx(1.2, rel=0.02)


def test_calibrate_errors_name_the_problem():
    with pytest.raises(RwasymError, match="must be > 0"):
        calibrate_scale(lambda a: 0.0, 0.1)
    with pytest.raises(RwasymError, match="not finite"):
        calibrate_scale(lambda a: float("nan"), 0.1)
    with pytest.raises(RwasymError, match="not finite"):
        calibrate_scale(lambda a: a * a if a <= 1 else float("inf"), 10.0)
    with pytest.raises(RwasymError, match="budget"):
        calibrate_scale(lambda a: a, -1.0)
    with pytest.raises(RwasymError, match="rtol"):
        calibrate_scale(lambda a: a, 1.0, rtol=1.0)
    with pytest.raises(RwasymError, match="alpha_max"):
        calibrate_scale(lambda a: a, 1.0, alpha0=10.0, alpha_max=1.0)
    with pytest.raises(RwasymError, match="max_evals"):
        calibrate_scale(lambda a: a, 1.0, max_evals=0)


def _softmax_kl(scale: float):
    """A realistic collateral effect: the mean KL(softmax(z + α s δ) ‖ softmax(z)) over 8 positions
    (≈ c α² for small α, linear growth, then a plateau at the mean −log q of the top-δ tokens)."""
    g = torch.Generator().manual_seed(0)
    z, delta = (
        torch.randn(8, 50, dtype=torch.float64, generator=g),
        torch.randn(8, 50, dtype=torch.float64, generator=g),
    )
    base = torch.log_softmax(z, 1)

    def kl(alpha: float) -> float:
        edited = torch.log_softmax(z + alpha * scale * delta, 1)
        return float((edited.exp() * (edited - base)).sum(1).mean())

    return kl


@linalg_threads(1)  # (8, 50) softmaxes: thread start-up would dominate
def test_calibrate_average_evaluations():
    """Evaluations per calibration over the 7 × 4 grid of (c, budget) above (c ∈ 1e-3..1e3 so the
    answer lies up to 3 decades from α₀ = 1), rtol 5%, measured:

    | effect                                   | mean | max |
    |------------------------------------------|------|-----|
    | c α²                                     | 1.86 | 2   |
    | c α² + c α⁴                              | 3.64 | 4   |
    | c α^1.5                                  | 2.71 | 3   |
    | softmax KL of a logit shift, α₀ = 1      | 3.29 | 5   |
    | softmax KL, α₀ within 2× of the answer   | 2.18 | 4   |

    The issue's target, ≤ 3 per edit on average, holds for a KL with a warm start (α₀ = the α of a
    similar edit: the target's for its controls); a cold start up to 3 decades away costs ~3.3.
    """
    families = {
        "quadratic": (lambda c: lambda a: c * a * a, 1.9),
        "quartic": (lambda c: lambda a: c * a * a + c * a**4, 3.7),
        "power 1.5": (lambda c: lambda a: c * a**1.5, 2.8),
        "softmax KL": (lambda c: _softmax_kl(math.sqrt(c)), 3.35),
    }
    for name, (make, bound) in families.items():
        counts = []
        for c, b in GRID:
            result = calibrate_scale(make(c), b)
            assert result["reached"] or (name == "softmax KL" and result["saturated"]), (name, c, b)
            counts.append(result["evaluations"])
        assert sum(counts) / len(counts) <= bound, (name, sum(counts) / len(counts))
    rng, warm = random.Random(0), []
    for c, b in GRID:
        effect = _softmax_kl(math.sqrt(c))
        exact = calibrate_scale(effect, b, rtol=1e-9, max_evals=60)
        assert exact["reached"]
        result = calibrate_scale(effect, b, alpha0=exact["alpha"] * 2 ** rng.uniform(-1, 1))
        assert result["reached"]
        warm.append(result["evaluations"])
    assert sum(warm) / len(warm) <= 2.3, sum(warm) / len(warm)


def test_scale_searches_in_lockstep_equal_one_calibration_each():
    """ScaleSearch driven from outside (a sweep's lockstep rounds: every open search evaluated in one
    batch) gives the same α, history and flags as calibrate_scale on each effect alone."""
    from rwasym.math.calibration import ScaleSearch

    effects = [lambda a, c=c: c * a * a + 0.3 * c * a**3 for c in (0.01, 0.5, 3.0)]
    effects.append(lambda a: 1 - math.exp(-a * a))  # saturates at 1: budget 2 is out of reach
    budgets = [0.02, 0.02, 0.02, 2.0]
    searches = [ScaleSearch(b, alpha0=1.0) for b in budgets]
    rounds = 0
    while not all(s.done for s in searches):
        rounds += 1
        open_ = [(s, f) for s, f in zip(searches, effects) if not s.done]
        values = [f(s.alpha) for s, f in open_]  # "one batched forward"
        for (s, _), v in zip(open_, values):
            s.observe(v)
    for s, f, b in zip(searches, effects, budgets):
        alone = calibrate_scale(f, b, alpha0=1.0)
        assert s.result() == alone
    assert searches[3].result()["saturated"] and not searches[3].result()["reached"]
    assert rounds == max(s.result()["evaluations"] for s in searches)
    with pytest.raises(RwasymError, match="finished"):
        searches[0].observe(0.02)
    with pytest.raises(RwasymError, match="has not finished"):
        ScaleSearch(0.1).result()


def test_spectrum_controls_take_the_target_direction_on_a_spectrum_matched_delta():
    """directions("spectrum"): draw j is the target's own unit vector (frames[j mod k]) applied to the j-th
    spectrum-matched random delta from the generator — so its edit leaves ΔW's column space, where every
    input-side random / orthogonal control (u = ΔW v) stays; norms rescaled to the matched target's."""
    from rwasym.math.rank1 import directions, spectrum_matched_delta

    g = torch.Generator().manual_seed(3)
    delta = torch.randn(12, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 9, generator=g, dtype=torch.float64)
    cov = torch.randn(40, 9, generator=g, dtype=torch.float64).T.cov()
    targets = directions("pca", delta, 2, cov=cov)
    frames = torch.stack([t.direction for t in targets])
    got = directions("spectrum", delta, 5, side="input", frames=frames, generator=torch.Generator().manual_seed(7))
    replay = torch.Generator().manual_seed(7)
    col = torch.linalg.svd(delta, full_matrices=False)[0][:, :2]  # ΔW's column space (rank 2)
    for j, d in enumerate(got):
        R = spectrum_matched_delta(delta, replay)
        assert torch.allclose(d.v, frames[j % 2]) and torch.allclose(d.u, R @ frames[j % 2], atol=1e-12)
        assert d.matched_to == j % 2 and d.kind == "spectrum"
        assert float((d.u - col @ (col.T @ d.u)).norm()) > 0.1 * float(d.u.norm())  # off ΔW's column space
    for d in directions("random", delta, 5, side="input", generator=g):
        assert float((d.u - col @ (col.T @ d.u)).norm()) < 1e-10 * float(d.u.norm())  # inside it
    norms = [t.norm for t in targets]
    again = torch.Generator().manual_seed(7)
    scaled = directions("spectrum", delta, 4, side="input", frames=frames, generator=again, target_norms=norms)
    assert [d.norm for d in scaled] == pytest.approx([norms[j % 2] for j in range(4)], rel=1e-12)
    out = directions("spectrum", delta, 2, side="output", frames=torch.eye(12, dtype=torch.float64)[:1], generator=g)
    assert torch.allclose(out[0].u / out[0].u.norm(), torch.eye(12, dtype=torch.float64)[0])  # p pᵀ R: along p
    with pytest.raises(RwasymError, match="frames="):
        directions("spectrum", delta, 2, side="input", generator=g)
