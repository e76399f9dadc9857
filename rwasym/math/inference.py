"""Inference over replicates: permutation p-values, bootstrap CIs, t-intervals over seeds, slopes.

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

__all__ = ["bootstrap_ci", "permutation_pvalue", "seed_interval", "slope"]

Sample = Sequence[float] | np.ndarray | torch.Tensor


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
    tol = 1e-12 * max(1.0, float(np.abs(pooled).max()))
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
