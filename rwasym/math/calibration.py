"""Scale an edit to a budget of collateral effect: the α with effect(α) = budget, to a relative tolerance.

DESIGN "Causal tests: compare edits at equal effect": a target edit and its controls are compared
at the same collateral KL (mean per-token KL(edited ‖ host) on generic text), not at the same
weight norm. Each evaluation of the effect runs the edited model, so `calibrate_scale` spends as
few as it can: for small α a KL grows as c α² (second order in the logit change), so one
evaluation fixes c and the quadratic model's α is exact for a pure quadratic; secant steps on
(log α, log effect) and, once the budget is bracketed, safeguarded bisection on log α do the rest.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import RwasymError
from .checks import require_positive_int

__all__ = ["ScaleSearch", "calibrate_scale"]

_MAX_STEP = 100.0  # the largest factor one secant step before bracketing may move α by
_MIN_DOWN_SLOPE = 1.0  # the smallest log-log slope a step down from above the budget assumes


def _positive(x: float, what: str, fix: str) -> float:
    """A finite float > 0, or RwasymError."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        raise RwasymError(f"{what} must be a number; got {type(x).__name__}") from None
    if not (math.isfinite(value) and value > 0.0):
        raise RwasymError(f"{what} must be a finite number > 0; got {x!r}. {fix}")
    return value


def _log_slope(a: tuple[float, float], b: tuple[float, float]) -> float | None:
    """d log effect / d log α between two (α, effect) points; None when their α coincide."""
    run = math.log(b[0]) - math.log(a[0])
    return None if abs(run) < 1e-15 else (math.log(b[1]) - math.log(a[1])) / run


def _next_alpha(
    history: list[tuple[float, float]],
    below: tuple[float, float] | None,
    above: tuple[float, float] | None,
    budget: float,
    alpha_max: float,
    bisect: bool,
) -> float | None:
    """The next α to evaluate, or None when the effect has stopped increasing below the budget.

    From a single point, the quadratic model α √(budget/effect) (slope 2, no step limit). Then the
    secant on (log α, log effect) through the last two points. Bracketed (a point below and one
    above the budget): the secant α if it falls strictly inside the bracket and ``bisect`` is False,
    else the bracket's geometric midpoint (bisection on log α). Not bracketed: the secant step, at
    most a factor `_MAX_STEP` in α; a step down (effect above the budget) assumes a slope of at least
    `_MIN_DOWN_SLOPE`, since the local slope of a KL rises towards 2 as α → 0 and a chord measured
    where the effect saturates would overshoot; a non-positive slope is the limit of a flat effect:
    saturation (None) below the budget, the full step down above it. Never above ``alpha_max``.
    """
    last = history[-1]
    if len(history) == 1:
        return min(alpha_max, last[0] * math.sqrt(budget / last[1]))
    slope = _log_slope(history[-2], last)
    if below is not None and above is not None:
        lo, hi = sorted((below[0], above[0]))
        if not bisect and slope is not None and slope > 0:
            proposal = last[0] * math.exp((math.log(budget) - math.log(last[1])) / slope)
            if lo < proposal < hi and min(proposal / lo, hi / proposal) > 1 + 1e-12:
                return proposal
        return math.sqrt(lo * hi)
    if slope is None or slope <= 0:
        if last[1] < budget:
            return None  # more α, no more effect: saturated
        return last[0] / _MAX_STEP  # above the budget and flat in α: step down as far as allowed
    if last[1] > budget:
        slope = max(slope, _MIN_DOWN_SLOPE)
    step = (math.log(budget) - math.log(last[1])) / slope
    step = max(-math.log(_MAX_STEP), min(math.log(_MAX_STEP), step))
    return min(alpha_max, last[0] * math.exp(step))


def _bracket_width(below: tuple[float, float] | None, above: tuple[float, float] | None) -> float | None:
    """|log α_above − log α_below|, or None before the budget is bracketed."""
    return None if below is None or above is None else abs(math.log(above[0]) - math.log(below[0]))


class ScaleSearch:
    """The search of `calibrate_scale` as a state machine: read ``alpha``, evaluate the effect there,
    pass it to ``observe``; repeat until ``done``, then ``result()``. Many searches can thus share
    one batched forward per round (a sweep calibrates every edit of a pass in lockstep). Arguments
    and steps as in `calibrate_scale`; ``prior``: (α, effect) points of the same effect measured
    before (e.g. by the search for another budget). They bracket the budget and the two nearest it
    seed the secant, so a second budget often needs one or two evaluations; a prior point within
    tolerance finishes the search with none. ``evaluations`` and ``history`` count only new points."""

    def __init__(
        self,
        budget: float,
        *,
        rtol: float = 0.05,
        alpha0: float | None = None,
        max_evals: int = 12,
        alpha_max: float = 1e6,
        prior: Sequence[tuple[float, float]] = (),
    ):
        self.budget = _positive(budget, "budget", "Pass the collateral KL to match, e.g. 0.01 (nats per token).")
        self.rtol = _positive(rtol, "rtol", "Pass a relative tolerance in (0, 1), e.g. 0.05.")
        if self.rtol >= 1.0:
            raise RwasymError(f"rtol must be in (0, 1); got {rtol}: a tolerance ≥ 1 accepts any effect")
        self.alpha_max = _positive(alpha_max, "alpha_max", "Pass the largest scale worth trying, e.g. 1e6.")
        self.alpha = 1.0 if alpha0 is None else _positive(alpha0, "alpha0", "Pass a first scale to try, e.g. 1.0.")
        if self.alpha > self.alpha_max:
            raise RwasymError(f"alpha0={self.alpha} exceeds alpha_max={self.alpha_max}; pass alpha0 <= alpha_max")
        self.max_evals = require_positive_int(max_evals, "max_evals")
        self.history: list[tuple[float, float]] = []
        self.done = False
        self._below: tuple[float, float] | None = None  # the largest-α point under the budget
        self._above: tuple[float, float] | None = None  # the smallest-α point over the budget
        self._widths: list[float] = []  # the bracket's log-width after each bracketed evaluation
        self._result: dict[str, Any] | None = None
        # points of the same effect measured before (another budget's search): they bracket and steer
        # the search for free; the two nearest the budget (in log effect) seed the secant, nearest last
        known = sorted(
            ((_positive(a, "prior α", "Pass (α, effect) pairs."), _check(v, a)) for a, v in prior),
            key=lambda point: -abs(math.log(point[1] / self.budget)),
        )
        self._known = known[-2:]
        for point in known:
            self._bracket(point)
        if known and abs(known[-1][1] - self.budget) <= self.rtol * self.budget:
            self._finish(known[-1], True, False)  # already measured within tolerance: no evaluation
        elif known:
            nxt = _next_alpha(self._known, self._below, self._above, self.budget, self.alpha_max, False)
            if nxt is None:
                self._finish(max(known), False, True)
            else:
                self.alpha = nxt

    def _bracket(self, point: tuple[float, float]) -> None:
        alpha, value = point
        if value < self.budget:
            self._below = point if self._below is None or alpha > self._below[0] else self._below
        elif value > self.budget:
            self._above = point if self._above is None or alpha < self._above[0] else self._above

    def observe(self, value: float) -> bool:
        """Record effect(``alpha``) = ``value``; move ``alpha`` to the next point to try. Returns ``done``."""
        if self.done:
            raise RwasymError("this search is finished; read result() instead of observing more values")
        alpha, budget = self.alpha, self.budget
        value = _check(value, alpha)
        self.history.append((alpha, value))
        if abs(value - budget) <= self.rtol * budget:
            return self._finish(self.history[-1], True, False)
        self._bracket((alpha, value))
        if value < budget and alpha >= self.alpha_max:
            return self._finish(self._best(), False, True)
        if len(self.history) >= self.max_evals:
            return self._finish(self._best(), False, False)
        width = _bracket_width(self._below, self._above)
        if width is not None:
            self._widths.append(width)
        w = self._widths
        stalled = len(w) >= 3 and w[-1] > 0.5 * w[-3]  # Brent's safeguard: halve the bracket in 2 steps
        nxt = _next_alpha(self._known + self.history, self._below, self._above, budget, self.alpha_max, stalled)
        if nxt is None:
            return self._finish(self._best(), False, True)
        self.alpha = nxt
        return False

    def result(self) -> dict[str, Any]:
        """The outcome (`calibrate_scale`'s Returns); RwasymError while the search is running."""
        if self._result is None:
            raise RwasymError(f"the search has not finished: evaluate the effect at alpha={self.alpha:.6g} first")
        return self._result

    def _best(self) -> tuple[float, float]:
        return min(self.history or self._known, key=lambda point: abs(math.log(point[1] / self.budget)))

    def _finish(self, point: tuple[float, float], reached: bool, saturated: bool) -> bool:
        self.done, self.alpha = True, point[0]
        self._result = _result(self.history, point, reached, saturated)
        return True


def calibrate_scale(
    effect: Callable[[float], float],
    budget: float,
    *,
    rtol: float = 0.05,
    alpha0: float | None = None,
    max_evals: int = 12,
    alpha_max: float = 1e6,
) -> dict[str, Any]:
    """Find α > 0 with |effect(α) − budget| ≤ rtol · budget, in few evaluations of ``effect``.

    ``effect``: the collateral effect of the edit scaled by α (e.g. the mean per-token KL of
    W + α u vᵀ against the host), positive, increasing in α, ≈ c α² for small α. Steps:
    1. effect(α₀) at α₀ = ``alpha0`` (default 1.0).
    2. The quadratic model: α₁ = α₀ √(budget / effect(α₀)) (exact when effect = c α²: 2 evaluations).
    3. Secant steps on (log α, log effect) through the last two points, at most a factor 100 in α
       per step (a step down assumes a slope ≥ 1) and never above ``alpha_max``; once a point below
       and one above the budget bracket it, a secant α outside the bracket, or one after two steps
       that did not halve the bracket's log-width, is replaced by bisection on log α (the geometric
       midpoint; Brent 1973's safeguard).
    Stops at the first α within tolerance, after ``max_evals`` evaluations, or on saturation. A
    start near the answer saves evaluations: pass the α calibrated for a similar edit (the target's,
    for its controls) as ``alpha0``. `ScaleSearch` is the same search, driven from outside.

    Returns alpha and achieved = effect(alpha): the first point within tolerance, else the point
    with the smallest |log(effect/budget)|; reached (|achieved − budget| ≤ rtol · budget; False
    whenever the tolerance was not met, never a silent out-of-tolerance α); saturated (the effect
    cannot reach the budget: it is below the budget at ``alpha_max``, or it did not increase
    between two α below the budget); evaluations; history, the (α, effect) pairs in order.
    Raises RwasymError for a zero, negative or non-finite effect (a zero edit, or a diverged run).
    """
    search = ScaleSearch(budget, rtol=rtol, alpha0=alpha0, max_evals=max_evals, alpha_max=alpha_max)
    while not search.observe(float(effect(search.alpha))):
        pass
    return search.result()


def _check(value: float, alpha: float) -> float:
    """``value`` = effect(alpha) as a float, or RwasymError for zero, negative or non-finite values."""
    value = float(value)
    if not math.isfinite(value):
        raise RwasymError(
            f"effect(α={alpha:.6g}) = {value}: not finite. The edited model diverged (fp16 overflow at a large α?) "
            "or the metric divided by zero; run in float32 or lower alpha_max"
        )
    if value <= 0.0:
        raise RwasymError(
            f"effect(α={alpha:.6g}) = {value:.6g}: a collateral effect must be > 0 to be scaled to a budget. "
            "Zero means the edit changes nothing (u = 0: ΔW has no component along this direction) or α is "
            "too small to register (pass a larger alpha0); a negative KL is a bug in the metric"
        )
    return value


def _result(
    history: list[tuple[float, float]], point: tuple[float, float], reached: bool, saturated: bool
) -> dict[str, Any]:
    return dict(
        alpha=point[0],
        achieved=point[1],
        evaluations=len(history),
        reached=reached,
        saturated=saturated,
        history=list(history),
    )
