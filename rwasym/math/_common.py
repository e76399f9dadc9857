"""Helpers shared by `rwasym.math.spectra` and `rwasym.math.svd`: float64 input, a least-squares
line and JSON-able results."""

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

from torch import Tensor

from ._typed_torch import tolist
from .checks import as_float64_array

__all__ = ["as_f64", "fit_line", "jsonable"]


def as_f64(x: object, name: str, fn: str, ndim: int = 2) -> Tensor:
    """``x`` validated (a non-empty finite tensor with ``ndim`` axes) as a float64 CPU copy."""
    return as_float64_array(x, f"{fn}: {name}", ndim)


def fit_line(x: Tensor, y: Tensor) -> tuple[float, float, float]:
    """Least-squares y = slope * x + intercept; returns (slope, intercept, r2).

    slope and r2 are NaN when x has no spread; r2 is NaN when y has no spread.
    """
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    if sxx <= 1e-24 * max(1.0, float((x**2).sum())):
        return math.nan, float(ym), math.nan
    slope = float(((x - xm) * (y - ym)).sum()) / sxx
    intercept = float(ym) - slope * float(xm)
    ss_res = float(((y - (slope * x + intercept)) ** 2).sum())
    ss_tot = float(((y - ym) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    return slope, intercept, r2


def jsonable(v: object) -> Any:
    """Plain JSON-able Python: non-finite floats -> None, tuples/tensors -> lists."""
    if isinstance(v, Tensor):
        return jsonable(tolist(v))
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):  # isinstance cannot know the item types: any mapping's are objects
        return {str(k): jsonable(x) for k, x in cast(Mapping[object, object], v).items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in cast(Sequence[object], v)]
    return v
