"""Inference over replicates: permutation p-values, bootstrap CIs, t-intervals over seeds, slopes,
and the tests of a target edit against its matched controls (DESIGN "Statistics").

- Within a seed: `rank_pvalue`, the target's exact rank p among its n controls, floor `rank_floor`.
- Across seeds: `stratified_rank_test`, the sum of within-seed ranks against its exact permutation
  null (each seed's target exchangeable with that seed's controls only); `seed_differences` and
  `seed_interval` for the seed-level t-interval of target − mean(controls).
- Over the family of tests a report makes: `holm`, step-down adjusted p-values.
- Per-seed values against a hypothesis: `t_sf` (Student's t survival function), `one_sample_t` (one-sided t test
  of a mean), `tost` (two one-sided tests of equivalence within ± a margin).

All seeded and deterministic; numpy float64 (sweeps compare target rows with control rows,
experiments compare per-seed values).
"""

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from ..errors import RwasymError

__all__ = [
    "bootstrap_ci",
    "holm",
    "one_sample_t",
    "permutation_pvalue",
    "rank_floor",
    "rank_pvalue",
    "seed_differences",
    "seed_interval",
    "slope",
    "stratified_rank_test",
    "t_sf",
    "tost",
]

Sample = Sequence[float] | np.ndarray | torch.Tensor


def _tie_tol(values: NDArray[np.float64]) -> float:
    """Two values tie when they differ by at most 1e-12 · max(1, max |v|) (float rounding is a tie)."""
    return 1e-12 * max(1.0, float(np.abs(values).max()))


def permutation_pvalue(x: Sample, y: Sample, n_permutations: int = 10000, seed: int = 0) -> float:
    """Two-sided permutation p-value of mean(x) − mean(y).

    Exact when the C(n_x + n_y, n_x) splits number at most ``n_permutations``: p = #{splits with
    |d| ≥ |d_obs|} / C. Otherwise Monte Carlo with the +1 correction (Phipson & Smyth 2010):
    p = (1 + #{|d_π| ≥ |d_obs|}) / (1 + n_permutations), permutations from
    ``numpy.random.default_rng(seed)``. ≥ holds to a relative 1e-12 so float ties count.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size == 0 or y.size == 0:
        raise RwasymError(f"permutation_pvalue needs two non-empty samples; got sizes {x.size} and {y.size}")
    pooled, nx = np.concatenate([x, y]), x.size
    total = pooled.sum()
    observed: float = abs(x.mean() - y.mean())  # a numpy float64, a float subclass
    tol = _tie_tol(pooled)
    if math.comb(pooled.size, nx) <= n_permutations:
        idx = np.array(list(itertools.combinations(range(pooled.size), nx)))  # (C, n_x)
        sx = pooled[idx].sum(1)
        diffs: NDArray[np.float64] = np.abs(sx / nx - (total - sx) / y.size)
        return float(np.mean(diffs >= observed - tol))
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_permutations, pooled.size)), axis=1)  # uniform permutations
    sx = pooled[perms[:, :nx]].sum(1)
    diffs = np.abs(sx / nx - (total - sx) / y.size)
    return float((1 + np.sum(diffs >= observed - tol)) / (1 + n_permutations))


def bootstrap_ci(x: Sample, y: Sample, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap CI of mean(x) − mean(y): x and y resampled independently with
    replacement (rng = numpy.random.default_rng(seed); x's indices ``rng.integers(0, n_x,
    (n_boot, n_x))`` first, then y's), quantiles (1 − level)/2 and (1 + level)/2 (numpy "linear")."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size == 0 or y.size == 0 or not 0 < level < 1:
        raise RwasymError(
            f"bootstrap_ci needs two non-empty samples and 0 < level < 1; got sizes {x.size}, {y.size}, level {level}"
        )
    rng = np.random.default_rng(seed)
    bx = x[rng.integers(0, x.size, (n_boot, x.size))].mean(1)
    by = y[rng.integers(0, y.size, (n_boot, y.size))].mean(1)
    lo, hi = np.quantile(bx - by, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# Two-sided 95% quantiles of Student's t, df = 1..30 (above: the expansion in `t975`).
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom: the table for df ≤ 30 (3
    decimals), above it the Cornish–Fisher expansion in 1/df about z = 1.959964 (Abramowitz & Stegun
    26.7.5; error < 1e-6 for df > 30)."""
    if df < 1:
        raise RwasymError(f"t975 needs df >= 1; got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = 1.959963984540054, float(df)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / v + g2 / v**2 + g3 / v**3 + g4 / v**4


def seed_interval(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample std and the 95% t-interval mean ± t₀.₉₇₅(n−1)·std/√n of per-seed values
    (None values, e.g. a metric a seed lacks, are left out; None for the interval when n < 2)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        raise RwasymError("seed_interval needs at least one value")
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return dict(n=n, mean=mean, std=None, ci_low=None, ci_high=None)
    std = (sum((v - mean) ** 2 for v in xs) / (n - 1)) ** 0.5
    half = t975(n - 1) * std / n**0.5
    return dict(n=n, mean=mean, std=std, ci_low=mean - half, ci_high=mean + half)


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys on xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise RwasymError("slope needs at least two distinct x values")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


# -- a target against its matched controls: within a seed, across seeds, over a family ------------
Stratum = tuple[float, Sample]  # (the target's value, its controls' values) in one seed or pair


def _values(x: object, what: str) -> NDArray[np.float64]:
    """A non-empty, finite, 1-D float64 array, or RwasymError naming the problem."""
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise RwasymError(f"{what} must be a sequence of numbers; got {type(x).__name__}") from None
    if a.ndim != 1 or a.size == 0:
        raise RwasymError(f"{what} must be a non-empty 1-D sequence of numbers; got shape {a.shape}")
    if not np.isfinite(a).all():
        raise RwasymError(
            f"{what} holds {int((~np.isfinite(a)).sum())} NaN/Inf value(s); a failed run or a diverged "
            "metric leaves them: drop or recompute that seed's rows before testing"
        )
    return a


def rank_floor(n_controls: int) -> float:
    """The smallest p `rank_pvalue` can return with n controls: 1 / (n + 1) (the target above all)."""
    if n_controls < 1:
        raise RwasymError(f"a rank test needs at least one control; got n_controls={n_controls}")
    return 1.0 / (n_controls + 1)


def rank_pvalue(target: float, controls: Sample) -> float:
    """Exact one-sided p of a target against its n exchangeable controls (large = target larger).

    p = (1 + #{i : c_i ≥ target}) / (n + 1). Under H0 (target and controls exchangeable, e.g. the
    target direction's effect and its Haar-random control directions' effects in one seed) the
    target's position among the n + 1 values is uniform, so P(p ≤ j/(n + 1)) ≤ j/(n + 1): exact
    for any n, floor `rank_floor(n)` = 1/(n + 1). Ties count against the target: ≥ holds to
    1e-12 · max(1, max |v|), as in `permutation_pvalue`. Source: Barnard's Monte Carlo test
    (Barnard 1963; Phipson & Smyth 2010, "Permutation p-values should never be zero").
    """
    c = _values(controls, "controls")
    t = float(_values([target], "target")[0])
    tol = _tie_tol(np.append(c, t))
    return float((1 + np.sum(c >= t - tol)) / (c.size + 1))


def _doubled_ranks(values: NDArray[np.float64]) -> NDArray[np.int64]:
    """2 × the mid-rank of each value among the others: 2 · #{j : x_j < x_i} + #{j ≠ i : x_j ties x_i},
    integers in 0..2(len − 1) (ties as in `_tie_tol`; sorted counts, O(n log n))."""
    tol = _tie_tol(values)
    s = np.sort(values)
    below = np.searchsorted(s, values - tol, side="left")
    upto = np.searchsorted(s, values + tol, side="right")  # counts x_i itself
    return (2 * below + (upto - below - 1)).astype(np.int64)


def _strata(strata: Sequence[Stratum]) -> list[NDArray[np.float64]]:
    """Each stratum as one array [target, c_1, ..., c_n], validated."""
    if len(strata) == 0:
        raise RwasymError("stratified_rank_test needs at least one stratum (target, controls)")
    out: list[NDArray[np.float64]] = []
    for s, stratum in enumerate(strata):
        if len(stratum) != 2:
            raise RwasymError(f"stratum {s} must be a pair (target value, control values); got {len(stratum)} items")
        target, controls = stratum
        out.append(np.append(_values([target], f"stratum {s}'s target"), _values(controls, f"stratum {s}'s controls")))
    return out


def stratified_rank_test(strata: Sequence[Stratum]) -> dict[str, Any]:
    """Exact stratified permutation test of "the target beats its controls" across seeds (or pairs).

    Stratum s (one seed) holds the target's value and its n_s controls' values. Statistic:
    T = Σ_s r_s, r_s the target's mid-rank among the n_s + 1 values of its stratum, 0-based:
    r_s = #{controls < target} + ½ #{controls tied with target} (ties as in `rank_pvalue`), so
    0 ≤ r_s ≤ n_s. H0: in each stratum the target is exchangeable with that stratum's controls only,
    so the null draws the target's position uniformly among its stratum's n_s + 1 values,
    independently across strata. p = P₀(T ≥ T_obs), one-sided (large T = target larger), computed
    exactly for any size by convolving the per-stratum null distributions of 2 r_s (integers in
    0..2n_s) in float64: O(S · Σ_s n_s) work instead of enumerating the ∏_s (n_s + 1) position
    assignments. With one stratum, p = `rank_pvalue`. Source: the stratified Wilcoxon rank-sum with
    one target per stratum, unweighted (van Elteren 1960, "On the combination of independent
    two-sample tests of Wilcoxon", weights stratum s by 1/(n_s + 2)), and its exact conditional
    (permutation) null.

    Returns p; statistic T; null_mean E₀T; max_statistic (every target on top); floor, the smallest
    attainable p, P₀(T = max) = ∏_s t_s/(n_s + 1) with t_s the number of values tied at the top of
    stratum s (1/∏(n_s + 1) without ties); at_floor (T_obs = max, so p = floor: report it as "at
    the test's floor"); exact (always True: the null is computed exactly, no Monte Carlo);
    n_strata; n_controls, a list of the n_s. Pmf entries below ~1e-308 (∏(n_s + 1) beyond that)
    underflow to 0.
    """
    arrays = _strata(strata)
    pmf = np.ones(1, dtype=np.float64)  # null pmf of 2T over 0..Σ 2n_s
    observed = top = 0
    floor, null_mean = 1.0, 0.0
    for values in arrays:
        doubled = _doubled_ranks(values)  # (n_s + 1,)
        kernel = np.bincount(doubled, minlength=2 * values.size - 1).astype(np.float64) / values.size
        pmf = np.convolve(pmf, kernel)
        observed += int(doubled[0])
        top += int(doubled.max())
        floor *= float(np.sum(doubled == doubled.max())) / values.size
        null_mean += float(doubled.mean()) / 2
    at_floor = observed == top
    p = floor if at_floor else min(1.0, float(pmf[observed:].sum()))
    return dict(
        p=p,
        statistic=observed / 2,
        null_mean=null_mean,
        max_statistic=top / 2,
        floor=floor,
        at_floor=at_floor,
        exact=True,
        n_strata=len(arrays),
        n_controls=[int(v.size - 1) for v in arrays],
    )


def seed_differences(strata: Sequence[Stratum]) -> list[float]:
    """Per stratum (seed), target − mean(controls): the per-seed values for `seed_interval`'s t-interval."""
    return [float(v[0] - v[1:].mean()) for v in _strata(strata)]


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni step-down adjusted p-values, in the input order.

    With the m p-values sorted ascending, p_(1) ≤ … ≤ p_(m) (ties kept in input order):
    p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j)). Rejecting every hypothesis with p̃ ≤ α is Holm's
    sequentially rejective procedure at family-wise error α (reject H_(1), H_(2), … while
    p_(j) ≤ α/(m − j + 1), stop at the first that fails), under any dependence. Source: Holm 1979,
    "A simple sequentially rejective multiple test procedure"; adjusted p-values: Wright 1992.
    """
    if len(pvalues) == 0:
        return []
    p = _values(pvalues, "pvalues")
    if float(p.min()) < 0.0 or float(p.max()) > 1.0:
        raise RwasymError(f"holm needs p-values in [0, 1]; got min {float(p.min())!r}, max {float(p.max())!r}")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])  # (m − j + 1) p_(j), j 1-based
    adjusted = np.empty(m, dtype=np.float64)
    adjusted[order] = np.maximum.accumulate(scaled)
    return [float(v) for v in adjusted]


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise RwasymError(f"the incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float | int, df: float | int) -> float:
    """P(T > t) for Student's t with ``df`` > 0 degrees of freedom: ½ I_{df/(df+t²)}(df/2, ½) for t ≥ 0 and
    1 − P(T > −t) below (Abramowitz & Stegun 26.7.1 via 26.5.27)."""
    if not df > 0:
        raise RwasymError(f"t_sf needs df > 0; got {df}")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def one_sample_t(values: Sample, mu: float | int = 0.0, alternative: str = "greater") -> dict[str, Any]:
    """One-sample t test of the mean of per-seed ``values`` against ``mu``: t = (x̄ − mu)/(s/√n), df = n − 1,
    p = P(T ≥ t) (``"greater"``), P(T ≤ t) (``"less"``). Needs n ≥ 2 and s > 0 (equal values are refused:
    no test can say anything about their spread)."""
    x = _values(values, "values")
    n = x.size
    if n < 2:
        raise RwasymError(f"one_sample_t needs at least two values; got {n}")
    if alternative not in ("greater", "less"):
        raise RwasymError(f"alternative must be 'greater' or 'less'; got {alternative!r}")
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    if sd == 0:
        raise RwasymError("one_sample_t: every value is the same (s = 0); the test is undefined")
    t = (mean - mu) / (sd / math.sqrt(n))
    p = t_sf(t, n - 1) if alternative == "greater" else t_sf(-t, n - 1)
    return dict(n=n, mean=mean, std=sd, t=t, df=n - 1, p=p, mu=mu, alternative=alternative)


def tost(values: Sample, margin: float | int) -> dict[str, Any]:
    """Two one-sided tests (Schuirmann 1987) that the mean of per-seed ``values`` lies within (−margin, margin):
    p = max(P(T ≥ (x̄ + margin)/se), P(T ≤ (x̄ − margin)/se)), df = n − 1; equivalence is shown at level α when
    p < α (the 1 − 2α interval of the mean lies inside the margin). Also the 90% interval."""
    if not margin > 0:
        raise RwasymError(f"tost needs a margin > 0; got {margin}")
    low = one_sample_t(values, -margin, "greater")
    high = one_sample_t(values, margin, "less")
    n, mean, sd = low["n"], low["mean"], low["std"]
    se = sd / math.sqrt(n)
    q = _t_quantile(0.95, n - 1)
    return dict(n=n, mean=mean, std=sd, margin=margin, p=max(low["p"], high["p"]), ci90=(mean - q * se, mean + q * se))


def _t_quantile(level: float, df: float | int) -> float:
    """The ``level`` quantile of Student's t (bisection on `t_sf`; level in (0.5, 1))."""
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > 1 - level:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_sf(mid, df) > 1 - level:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
