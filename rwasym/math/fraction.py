"""Pure math of the read/write probe: how much of an update ΔW lies in a subspace.

Convention (DESIGN.md): a matrix W ∈ R^{n_out × n_in} acts as y = W a. The *input* (read) side
of W is its input space R^{n_in} — the columns' index, seen by ΔW U; the *output* (write) side is
R^{n_out} — seen by Uᵀ ΔW. With U (n, k) orthonormal,

    side="input":  f = ‖ΔW U‖²_F / ‖ΔW‖²_F,     n = n_in
    side="output": f = ‖Uᵀ ΔW‖²_F / ‖ΔW‖²_F,    n = n_out

and the relative fraction r = f / (k/n): a Haar-random k-dim subspace captures k/n of any ΔW on
average, so r = 1 is isotropic and r > 1 concentrated. All math is float64 on CPU.

ΔW may also be a factored `rwasym.math.lowrank.LowRankDelta` ΔW = s · B A (a LoRA adapter): then
‖ΔW U‖²_F = s²‖B (A U)‖²_F, ‖Uᵀ ΔW‖²_F = s²‖(Uᵀ B) A‖²_F and ‖ΔW‖²_F = s² tr((BᵀB)(AAᵀ)), at
O(r (n_out + n_in) k); the n_out × n_in matrix is never formed.
"""

from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .checks import (
    as_float64_matrix,
    require_int,
    require_k,
    require_orthonormal,
    require_positive_int,
    shape_str,
)
from ..errors import RwasymError
from .lowrank import LowRankDelta
from .subspaces import Basis, haar_frames

__all__ = [
    "FractionCurve",
    "FractionResult",
    "NullResult",
    "Side",
    "fraction_curve",
    "log_k_grid",
    "random_null",
    "relative_fraction",
]

Side = Literal["input", "output"]
_SIDES = ("input", "output")
_NULL_CHUNK_BYTES = 32 * 2**20  # float64 bytes of Haar frames drawn at once by random_null


@dataclass(frozen=True)
class FractionResult:
    """f = energy fraction of ΔW inside span(U); relative r = f / (k/n); k, n, side as measured."""

    fraction: float
    relative: float
    k: int
    n: int
    side: str

    @property
    def expected(self) -> float:
        """Isotropic expectation k/n (the mean of the Haar null)."""
        return self.k / self.n


@dataclass(frozen=True, eq=False)
class NullResult:
    """Fractions f of ΔW in `samples.numel()` Haar-random k-dim subspaces of the side's space.

    mean → k/n as samples grow; std is the sample standard deviation (N − 1).
    """

    mean: float
    std: float
    samples: Float[Tensor, " samples"]
    k: int
    n: int
    side: str

    def percentile_of(self, observed: "float | FractionResult") -> float:
        """Percentage of null samples <= observed fraction f, in [0, 100]."""
        if isinstance(observed, FractionResult):
            mine, theirs = (self.k, self.n, self.side), (observed.k, observed.n, observed.side)
            if mine != theirs:
                raise RwasymError(
                    f"the observed result has (k, n, side)={theirs} but this null was drawn for "
                    f"{mine}; draw the null with the same k and side as the observation."
                )
            observed = observed.fraction
        return 100.0 * float((self.samples <= float(observed)).double().mean())


class FractionCurve(NamedTuple):
    """f(k) and r(k) = f(k) / (k/n) at the requested k values (unpacks as ks, fraction, relative)."""

    ks: Int[Tensor, " n_ks"]
    fraction: Float[Tensor, " n_ks"]
    relative: Float[Tensor, " n_ks"]


# --------------------------------------------------------------------------------- helpers
def _check_side(side: object) -> str:
    if side not in _SIDES:
        raise RwasymError(
            f"side must be one of {list(_SIDES)} ('input' = read side, ΔW U with U in R^n_in; "
            f"'output' = write side, Uᵀ ΔW with U in R^n_out); got side={side!r}."
        )
    return side


def _delta64(delta: object) -> tuple[Tensor | LowRankDelta, Tensor]:
    """ΔW as float64 CPU (a LowRankDelta stays factored) and its energy ‖ΔW‖²_F; error when ΔW is
    exactly zero."""
    if isinstance(delta, LowRankDelta):
        D, energy = delta, torch.tensor(delta.frobenius_sq(), dtype=torch.float64)
    else:
        D = as_float64_matrix(delta, "delta (ΔW = W_tuned − W_base)")
        energy = D.square().sum()
    if float(energy) == 0.0:
        raise RwasymError(
            f"delta has ‖ΔW‖_F = 0 (shape {_dshape(D)}): the tuned and base matrices are "
            "identical, so the fraction of the update inside a subspace is undefined (0/0). Check "
            "that two different checkpoints were passed and that the right matrix was selected."
        )
    return D, energy


def _dshape(D: Tensor | LowRankDelta) -> str:
    """`(3, 4)`-style shape text of ΔW, dense or factored."""
    return "(" + ", ".join(str(s) for s in D.shape) + ")"


def _side_dim(D: Tensor | LowRankDelta, side: str) -> int:
    """n: n_in for the input side, n_out for the output side."""
    return D.shape[1] if side == "input" else D.shape[0]


def _basis64(basis: object, D: Tensor | LowRankDelta, side: str) -> Tensor:
    """The (n, k) basis as float64, checked against ΔW's side dimension and for orthonormality."""
    U = as_float64_matrix(basis.U if isinstance(basis, Basis) else basis, "basis")
    n = _side_dim(D, side)
    if U.shape[0] != n:
        axis = "n_in (columns of ΔW)" if side == "input" else "n_out (rows of ΔW)"
        other = "output" if side == "input" else "input"
        raise RwasymError(
            f"side={side!r} expects a basis with {axis} = {n} rows for ΔW of shape (n_out, n_in) = "
            f"{_dshape(D)}; got a basis of shape {shape_str(U)}. If the basis lives in the other "
            f"space use side={other!r}; bases are (n, k) with basis vectors as columns."
        )
    if U.shape[1] == 0:
        raise RwasymError(f"basis has k=0 columns (shape {shape_str(U)}); pass at least one direction.")
    require_orthonormal(U, "basis")
    return U


def _column_energies(D: Tensor | LowRankDelta, U: Tensor, side: str) -> Tensor:
    """e_j = ‖ΔW u_j‖² (input) or ‖u_jᵀ ΔW‖² (output) for each column u_j of U, shape (k,)."""
    if isinstance(D, LowRankDelta):  # s² ‖B (A U)‖² / s² ‖(Uᵀ B) A‖², O(r (n_out + n_in) k)
        if side == "input":
            return D.scale**2 * (D.B @ (D.A @ U)).square().sum(dim=0)  # (n_out, k) -> (k,)
        return D.scale**2 * ((U.T @ D.B) @ D.A).square().sum(dim=1)  # (k, n_in) -> (k,)
    if side == "input":
        return (D @ U).square().sum(dim=0)  # (n_out, k) -> (k,)
    return (U.T @ D).square().sum(dim=1)  # (k, n_in) -> (k,)


# --------------------------------------------------------------------------------- public API
def relative_fraction(
    delta: Float[Tensor, "n_out n_in"] | LowRankDelta, basis: Float[Tensor, "n k"] | Basis, side: Side
) -> FractionResult:
    """Fraction of ‖ΔW‖²_F inside span(U) on one side of W, and r = f / (k/n). float64.

    side="input" (read side, y = W a reads a ∈ R^{n_in}): f = ‖ΔW U‖²_F / ‖ΔW‖²_F, U (n_in, k).
    side="output" (write side, output in R^{n_out}): f = ‖Uᵀ ΔW‖²_F / ‖ΔW‖²_F, U (n_out, k).
    U must have orthonormal columns (a `Basis` is accepted). Example: ΔW = u vᵀ with unit v and
    basis [v] on the input side gives f = 1 and r = n_in.
    """
    side = _check_side(side)
    D, energy = _delta64(delta)
    U = _basis64(basis, D, side)
    k, n = U.shape[1], U.shape[0]
    f = float(_column_energies(D, U, side).sum() / energy)
    return FractionResult(fraction=f, relative=f * n / k, k=k, n=n, side=side)


def random_null(
    delta: Float[Tensor, "n_out n_in"] | LowRankDelta,
    side: Side,
    k: int,
    samples: int = 1000,
    generator: torch.Generator | None = None,
) -> NullResult:
    """Null distribution of f over `samples` Haar-random k-dim subspaces of the side's space.

    By rotation invariance only the spectrum of ΔW matters: with σ_i its singular values and
    w_i = σ_i² / Σσ², f(U) = Σ_i w_i ‖(VᵀU)_i‖² where V holds the side's singular vectors, and
    VᵀU is again Haar. So each sample draws a Haar frame Ũ (n, k) (batched sign-corrected QR)
    and sets f = Σ_i w_i ‖Ũ_i,:‖²: the same distribution as applying random bases to ΔW, at
    O(n k²) per sample instead of O(n_out n_in k). E[f] = k/n exactly.
    """
    side = _check_side(side)
    D, _ = _delta64(delta)
    n = _side_dim(D, side)
    k = require_k(k, n, f"the {side} space of ΔW (shape {_dshape(D)})")
    samples = require_int(samples, "samples")
    if samples < 2:
        raise RwasymError(f"samples must be >= 2 to estimate a spread; got samples={samples}.")
    svals = D.svdvals() if isinstance(D, LowRankDelta) else torch.linalg.svdvals(D)  # factored: QR core
    sigma2 = svals.square()  # (r,), r = min(n_out, n_in) <= n (<= the LoRA rank when factored)
    weights = sigma2 / sigma2.sum()
    chunk = max(1, _NULL_CHUNK_BYTES // (8 * n * k))
    draws = []
    for start in range(0, samples, chunk):
        frames = haar_frames(min(chunk, samples - start), n, k, generator)  # (s, n, k)
        row_energy = frames[:, : weights.shape[0], :].square().sum(dim=-1)  # (s, r)
        draws.append(row_energy @ weights)  # (s,)
    fractions = torch.cat(draws)
    return NullResult(
        mean=float(fractions.mean()), std=float(fractions.std()), samples=fractions, k=k, n=n, side=side
    )


def fraction_curve(
    delta: Float[Tensor, "n_out n_in"] | LowRankDelta,
    basis_full: Float[Tensor, "n m"] | Basis,
    side: Side,
    ks: Sequence[int] | Tensor | None = None,
) -> FractionCurve:
    """f(k) and r(k) for the leading k columns of `basis_full` (ordered by importance), one pass.

    Per-column energies e_j (‖ΔW u_j‖² input, ‖u_jᵀ ΔW‖² output) are computed once; then
    f(k) = Σ_{j<=k} e_j / ‖ΔW‖²_F and r(k) = f(k) / (k/n). Default ks = 1..m.
    """
    side = _check_side(side)
    D, energy = _delta64(delta)
    U = _basis64(basis_full, D, side)
    n, m = U.shape
    k_values = _check_ks(ks, m)  # (n_ks,) int64
    cumulative = _column_energies(D, U, side).cumsum(0) / energy  # (m,)
    fraction = cumulative[k_values - 1]
    return FractionCurve(ks=k_values, fraction=fraction, relative=fraction * n / k_values.double())


def _check_ks(ks: object, m: int) -> Tensor:
    if ks is None:
        return torch.arange(1, m + 1)
    values = [require_int(k, "each k in ks") for k in (ks.tolist() if isinstance(ks, Tensor) else ks)]
    bad = [k for k in values if not 1 <= k <= m]
    if not values or bad:
        raise RwasymError(
            f"ks must be a non-empty list of integers with 1 <= k <= m={m} (the basis has m "
            f"columns); got out-of-range values {bad if values else '[] (empty)'}."
        )
    return torch.tensor(values, dtype=torch.int64)


def log_k_grid(n: int) -> list[int]:
    """Sorted unique k values 1, 2, 4, ..., (powers of two below n), n. Example: 10 -> [1, 2, 4, 8, 10]."""
    n = require_positive_int(n, "n")
    grid, k = [], 1
    while k < n:
        grid.append(k)
        k *= 2
    return grid + [n]
