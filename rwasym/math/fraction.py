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

The Haar null (`null_moments`, `null_fractions`, `random_null`) depends on ΔW only through its
normalised spectrum w_i = σ_i²/‖ΔW‖²_F (`delta_spectrum`, one SVD reused for every k and both
sides): its mean and std are exact closed forms, its samples (for percentiles) are drawn in ΔW's
singular basis at O(r k'² + k'³) each, k' = min(k, n − k).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeGuard

import numpy as np
import torch
from jaxtyping import Float, Int
from numpy.typing import NDArray
from torch import Tensor

from ..errors import RwasymError
from ._typed_torch import from_numpy, linalg, tolist
from .checks import (
    as_float64_matrix,
    linalg_threads,
    require_finite,
    require_int,
    require_k,
    require_orthonormal,
    require_positive_int,
    shape_str,
)
from .lowrank import LowRankDelta
from .subspaces import Basis

__all__ = [
    "DeltaSpectrum",
    "FractionCurve",
    "GRAM_FROM",
    "FractionResult",
    "NullMoments",
    "NullResult",
    "Side",
    "column_energies",
    "delta_gram",
    "delta_spectrum",
    "fraction_curve",
    "gradient_shaped_delta",
    "gradient_shaped_fraction",
    "gram_energies",
    "gram_rho",
    "gram_spectrum",
    "kfree_null_std",
    "kfree_rho",
    "kfree_score",
    "KFreeScore",
    "log_k_grid",
    "null_fractions",
    "null_moments",
    "random_null",
    "relative_fraction",
]

Side = Literal["input", "output"]
_SIDES: tuple[Side, ...] = ("input", "output")
_NULL_CHUNK_BYTES = 32 * 2**20  # float64 bytes of Gaussian blocks drawn at once by null_fractions
_NEGLIGIBLE_SIGMA = 1e-10  # σ_i <= this · σ_max is numerical zero: dropped from DeltaSpectrum.weights
# min(n_out, n_in) from which a dense ΔW's spectrum comes from its smaller Gram's eigenvalues, not its SVD
# (4096 × 4096: 3.6 s against 12.4 s; 14,336 × 4096: 6.9 s against 18.4 s, float64, 2 cores); the probe forms
# that Gram once from the same width and takes ρ_C and the projections on its side from it too
GRAM_FROM = 1024
_EPS64 = float(torch.finfo(torch.float64).eps)


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
    """The Haar null of f for one (ΔW, side, k): f over Haar-random k-dim subspaces of the side's space.

    mean and std are the exact moments of the Haar null (`null_moments`: mean = k/n, std from
    tr(S²)); `samples` (`samples.numel()` independent draws of f) serve percentiles, and their own
    moments are `sample_mean` / `sample_std`.
    """

    mean: float
    std: float
    samples: Float[Tensor, " samples"]
    k: int
    n: int
    side: str

    @property
    def sample_mean(self) -> float:
        """Mean of the drawn samples (→ `mean` as samples grow)."""
        return float(self.samples.mean())

    @property
    def sample_std(self) -> float:
        """Sample standard deviation (N − 1) of the drawn samples (→ `std` as samples grow)."""
        return float(self.samples.std())

    def percentile_of(self, observed: "float | FractionResult") -> float:
        """Percentage of null samples <= observed fraction f, in [0, 100]; a sample within 1e-12 of f
        counts as a tie (<=), so a degenerate null (k = n: every f is 1 up to rounding) gives 100."""
        if isinstance(observed, FractionResult):
            mine, theirs = (self.k, self.n, self.side), (observed.k, observed.n, observed.side)
            if mine != theirs:
                raise RwasymError(
                    f"the observed result has (k, n, side)={theirs} but this null was drawn for "
                    f"{mine}; draw the null with the same k and side as the observation."
                )
            observed = observed.fraction
        return 100.0 * float((self.samples <= float(observed) + 1e-12).double().mean())


class NullMoments(NamedTuple):
    """Exact mean and standard deviation of f over Haar-random k-dim subspaces (`null_moments`)."""

    mean: float
    std: float


@dataclass(frozen=True, eq=False)
class DeltaSpectrum:
    """What the Haar null of f depends on: ΔW's shape and normalised spectrum w_i = σ_i² / ‖ΔW‖²_F.

    `weights` are descending, from the SVD of ΔW (the small QR core for a `LowRankDelta`; the smaller
    Gram's eigenvalues when both sides are ≥ 1024, see `delta_spectrum`), with
    numerically zero singular values (σ_i <= 1e-10 σ_max) dropped: together they hold under
    min(n_out, n_in) · 1e-20 of the energy, and dropping them gives a dense ΔW and its factored form
    the same r. The nonzero spectrum is the same for both sides (ΔWᵀΔW and ΔWΔWᵀ share it); only n
    differs. Build one with `delta_spectrum` and pass it wherever a delta is accepted by the null.
    """

    weights: Float[Tensor, " r"]
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        # run-time guards for callers that bypass the annotations
        if (
            not isinstance(self.weights, Tensor)  # pyright: ignore[reportUnnecessaryIsInstance]
            or not isinstance(self.shape, (tuple, list))  # pyright: ignore[reportUnnecessaryIsInstance]
        ):
            raise RwasymError(
                f"DeltaSpectrum needs a weights tensor and a shape tuple; got "
                f"{type(self.weights).__name__} and {type(self.shape).__name__}. "
                "Use delta_spectrum(delta)."
            )
        w = self.weights.detach().to("cpu", torch.float64)
        shape = tuple(require_positive_int(x, "each of DeltaSpectrum.shape") for x in self.shape)
        if len(shape) != 2 or w.dim() != 1 or not 1 <= w.shape[0] <= min(shape):
            raise RwasymError(
                f"DeltaSpectrum needs shape (n_out, n_in) and 1 <= r <= min(n_out, n_in) "
                f"weights; got shape {self.shape} and weights of shape {shape_str(w)}."
            )
        if not bool(torch.isfinite(w).all() and (w >= 0).all()) or abs(float(w.sum()) - 1.0) > 1e-9:
            raise RwasymError(
                f"DeltaSpectrum.weights must be w_i = σ_i²/Σσ² (finite, >= 0, summing to 1); "
                f"got sum {float(w.sum())!r}. Build it with delta_spectrum(delta)."
            )
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "shape", shape)

    @property
    def s2(self) -> float:
        """s₂ = tr(S²) = Σ w_i² (S = ΔWᵀΔW/‖ΔW‖²_F or ΔWΔWᵀ/‖ΔW‖²_F; 1/n <= s₂ <= 1)."""
        return float(self.weights.square().sum())

    def n(self, side: Side) -> int:
        """The side's dimension: n_in for side="input", n_out for side="output"."""
        return self.shape[1] if _check_side(side) == "input" else self.shape[0]


class FractionCurve(NamedTuple):
    """f(k) and r(k) = f(k) / (k/n) at the requested k values (unpacks as ks, fraction, relative)."""

    ks: Int[Tensor, " n_ks"]
    fraction: Float[Tensor, " n_ks"]
    relative: Float[Tensor, " n_ks"]


# --------------------------------------------------------------------------------- helpers
def _is_side(side: object) -> TypeGuard[Side]:
    return side in _SIDES


def _check_side(side: object) -> Side:
    if not _is_side(side):
        raise RwasymError(
            f"side must be one of {list(_SIDES)} ('input' = read side, ΔW U with U in R^n_in; "
            f"'output' = write side, Uᵀ ΔW with U in R^n_out); got side={side!r}."
        )
    return side


def _delta64(delta: object) -> tuple[Tensor | LowRankDelta, Tensor]:
    """ΔW as float64 CPU (a LowRankDelta stays factored) and its energy ‖ΔW‖²_F; error when ΔW is
    exactly zero."""
    D = delta if isinstance(delta, LowRankDelta) else as_float64_matrix(delta, "delta (ΔW = W_tuned − W_base)")
    if isinstance(D, LowRankDelta):
        energy = torch.tensor(D.frobenius_sq(), dtype=torch.float64)
    else:
        energy = D.square().sum()
    if float(energy) == 0.0:
        raise RwasymError(
            f"delta has ‖ΔW‖_F = 0 (shape {_dshape(D)}): the tuned and base matrices are "
            "identical, so the fraction of the update inside a subspace is undefined (0/0). Check "
            "that two different checkpoints were passed and that the right matrix was selected."
        )
    return D, energy


def _dshape(D: "Tensor | LowRankDelta | DeltaSpectrum") -> str:
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


def column_energies(
    delta: Float[Tensor, "n_out n_in"] | LowRankDelta, basis: Float[Tensor, "n m"], side: Side
) -> Float[Tensor, " m"]:
    """e_j = ‖ΔW u_j‖² (input side) or ‖u_jᵀ ΔW‖² (output side) for every column u_j of ``basis``,
    *without* the checks of `relative_fraction`: for callers whose float64 ΔW is known finite and
    whose basis they built orthonormal (the probe). Then f(k) = Σ_{j<k} e_j / ‖ΔW‖²_F for the
    leading k columns: one product ΔW U serves every k (the row's, the 90%-variance one, the curve).
    """
    return _column_energies(delta, basis, side)


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


def delta_spectrum(delta: Float[Tensor, "n_out n_in"] | LowRankDelta | DeltaSpectrum) -> DeltaSpectrum:
    """ΔW's normalised spectrum w_i = σ_i²/Σσ² (descending; σ_i <= 1e-10 σ_max dropped) and shape.

    One SVD (O(n_out n_in min(n_out, n_in)) dense, O(r² (n_out + n_in)) factored) that every k and
    both sides of `null_moments` / `null_fractions` / `random_null` reuse. A dense ΔW whose smaller side
    is ≥ 1024 (an 8B model's matrices) takes σ_i² as the eigenvalues of its smaller Gram (ΔWᵀΔW or
    ΔWΔWᵀ): one GEMM and a symmetric eigvalsh, ≈ 3× faster than the SVD at 4096 wide. The null uses
    the w_i only as energies, and the Gram's eigenvalues carry an absolute error ≲ min(n_out, n_in)·ε·σ_max²
    (symmetric perturbation theory); eigenvalues below that level are rounding and are dropped, so a
    low-rank ΔW keeps its rank. Error when ΔW = 0.
    """
    if isinstance(delta, DeltaSpectrum):
        return delta
    D, _ = _delta64(delta)
    shape = (int(D.shape[0]), int(D.shape[1]))
    if isinstance(D, LowRankDelta):
        svals = D.svdvals()  # the QR core's
    elif min(shape) >= GRAM_FROM:
        return gram_spectrum(delta_gram(D, "input" if shape[0] >= shape[1] else "output"), shape)
    else:  # LAPACK's SVD of a wide matrix runs ~3x slower than of its (tall) transpose
        svals = linalg.svdvals(D if D.shape[0] >= D.shape[1] else D.T)  # descending
    sigma2 = svals.square()
    weights = sigma2 / sigma2.sum()
    keep = svals > _NEGLIGIBLE_SIGMA * svals[0]
    return DeltaSpectrum(weights=weights[keep].contiguous(), shape=shape)


def delta_gram(delta: Float[Tensor, "n_out n_in"], side: Side) -> Float[Tensor, "n n"]:
    """ΔW's Gram on one side, float64: G = ΔWᵀΔW (input side, n_in × n_in) or ΔWΔWᵀ (output side,
    n_out × n_out). One GEMM of O(n² · n_other) serves, on that side, ΔW's spectrum (`gram_spectrum`, when it
    is the smaller Gram), every ρ_C (`gram_rho`: ⟨C, G⟩ = tr(ΔW C ΔWᵀ) resp. tr(ΔWᵀ C ΔW), O(n²) each) and
    column energies (`gram_energies`) — where `kfree_rho` pays the GEMM once per C. Unchecked, like
    `column_energies`: for callers holding a finite dense ΔW (the probe)."""
    D = delta.to(torch.float64)
    gram = D.T @ D if _check_side(side) == "input" else D @ D.T
    return 0.5 * (gram + gram.T)


def gram_spectrum(gram: Float[Tensor, "n n"], shape: tuple[int, int]) -> DeltaSpectrum:
    """The `DeltaSpectrum` of a ΔW of ``shape`` from its smaller Gram (`delta_gram` on the side of
    min(n_out, n_in)): σ_i² = its eigenvalues (eigvalsh), those ≤ max(1e-20, min(shape)·ε)·σ_max² dropped
    as rounding (the Gram's eigenvalues carry an absolute error of that order), w_i = σ_i² / Σσ²."""
    if gram.shape[0] != min(shape):
        raise RwasymError(
            f"gram_spectrum needs the smaller Gram of ΔW {tuple(shape)} ({min(shape)} × {min(shape)}); got "
            f"{tuple(gram.shape)}: form it with delta_gram on the side of the smaller dimension"
        )
    sigma2 = linalg.eigvalsh(gram).flip(0).clamp_min(0.0)  # descending
    if not float(sigma2[0]) > 0:
        raise RwasymError(
            "ΔW is zero (its Gram has no positive eigenvalue): there is no spectrum to draw the null from"
        )
    keep = sigma2 > max(_NEGLIGIBLE_SIGMA**2, min(shape) * _EPS64) * sigma2[0]
    return DeltaSpectrum(weights=(sigma2 / sigma2.sum())[keep].contiguous(), shape=(int(shape[0]), int(shape[1])))


def gram_energies(gram: Float[Tensor, "n n"], basis: Float[Tensor, "n m"]) -> Float[Tensor, " m"]:
    """e_j = u_jᵀ G u_j for every column of ``basis``: with G = `delta_gram`(ΔW, side) these are
    `column_energies`(ΔW, basis, side) (‖ΔW u_j‖² resp. ‖u_jᵀΔW‖²) at O(n² m) instead of O(n n_other m)."""
    return ((gram @ basis) * basis).sum(dim=0)


def gram_rho(gram: Float[Tensor, "n n"], cov: Float[Tensor, "n n"]) -> float:
    """`kfree_rho` from the side's Gram G (`delta_gram`): ρ_C = n ⟨C, G⟩ / (tr C · tr G), tr G = ‖ΔW‖²_F, O(n²)."""
    if gram.shape != cov.shape:
        raise RwasymError(f"cov must match the Gram's shape {tuple(gram.shape)}; got {tuple(cov.shape)}")
    trace = float(cov.diagonal().sum())
    if not trace > 0:
        raise RwasymError(f"cov has trace {trace}: a covariance with no variance cannot weight ΔW")
    return gram.shape[0] * float((gram * cov).sum()) / (trace * float(gram.diagonal().sum()))


def _null_inputs(
    delta: Tensor | LowRankDelta | DeltaSpectrum, side: object, k: object
) -> tuple[Side, DeltaSpectrum, int, int]:
    """The checked (side, spectrum, n, k) every Haar-null function starts from."""
    side = _check_side(side)
    spectrum = delta_spectrum(delta)
    n = spectrum.n(side)
    return side, spectrum, n, require_k(k, n, f"the {side} space of ΔW (shape {_dshape(spectrum)})")


def _haar_moments(s2: float, n: int, k: int) -> NullMoments:
    """Mean k/n and std of f = Σ_i w_i P_ii for a Haar rank-k projection P of R^n, Σ w_i = 1, Σ w_i² = s2.

    P_ii ~ Beta(k/2, (n−k)/2), so Var P_ii = 2k(n−k) / (n²(n+2)); Σ_i P_ii = tr P = k is constant and
    the P_ii are exchangeable, so Cov(P_ii, P_jj) = −Var P_ii / (n−1) for i ≠ j. Then
    Var f = Var P_ii (Σ w_i² − Σ_{i≠j} w_i w_j / (n−1)) = Var P_ii (n s₂ − 1) / (n − 1). k = n gives
    f ≡ 1 (and n = 1 forces k = n).
    """
    if k == n:
        return NullMoments(mean=1.0, std=0.0)
    var = 2.0 * k * (n - k) * (n * s2 - 1.0) / (n * n * (n + 2.0) * (n - 1.0))
    return NullMoments(mean=k / n, std=math.sqrt(max(var, 0.0)))  # n s₂ − 1 >= 0 up to rounding


def null_moments(delta: Float[Tensor, "n_out n_in"] | LowRankDelta | DeltaSpectrum, side: Side, k: int) -> NullMoments:
    """Exact mean and std of f over Haar-random k-dim subspaces of the side's space (no sampling).

    With S = ΔWᵀΔW/‖ΔW‖²_F (input side) or ΔWΔWᵀ/‖ΔW‖²_F (output side), f(U) = tr(S P) for the Haar
    projection P = UUᵀ of R^n; in S's eigenbasis f = Σ_i w_i P_ii (w_i its eigenvalues, zero-padded to
    n, Σ w_i = 1). P_ii ~ Beta(k/2, (n−k)/2) (the squared norm of k coordinates of a uniform unit
    vector), Σ_i P_ii = k, hence Cov(P_ii, P_jj) = −Var P_ii / (n−1) and, with s₂ = tr(S²) = Σ w_i²,

        E f = k/n,    Var f = 2k(n−k)(n s₂ − 1) / (n²(n+2)(n−1))    (0 when k = n).

    Example: rank-one ΔW (s₂ = 1) gives the Beta variance 2k(n−k)/(n²(n+2)); ΔW with ΔWᵀΔW ∝ I (s₂ =
    1/n) gives 0. `delta` may be a `DeltaSpectrum` (from `delta_spectrum`) to reuse one SVD.
    """
    side, spectrum, n, k = _null_inputs(delta, side, k)
    return _haar_moments(spectrum.s2, n, k)


def _bartlett_factor(rng: np.random.Generator, samples: int, m: int, k: int) -> NDArray[np.float64]:
    """Lower-triangular L (samples, k, k) with L Lᵀ ~ Wishart(m, I_k), m >= k (Bartlett decomposition):
    L_ii = sqrt(χ²_{m−i}) for i = 0..k−1, L_ij ~ N(0, 1) below the diagonal, all independent."""
    L = np.tril(rng.standard_normal((samples, k, k)), -1)
    idx = np.arange(k)
    L[:, idx, idx] = np.sqrt(rng.chisquare(m - idx, size=(samples, k)))
    return L


def _spectral_null_draws(
    weights: Float[Tensor, " r"], n: int, k: int, samples: int, rng: np.random.Generator
) -> Float[Tensor, " samples"]:
    """`samples` draws of f = Σ_{i<r} w_i ‖Ũ_i,:‖² for a Haar (n, k) frame Ũ, k <= n/2 (see null_fractions).

    Ũ spans the columns of a Gaussian G (n, k), so ‖Ũ_i‖² = g_iᵀ (GᵀG)⁻¹ g_i, and only the r rows G_r
    with w_i > 0 are needed once GᵀG = G_rᵀG_r + M is known, M = G_restᵀG_rest ~ Wishart(n − r, I_k).
    With M = L Lᵀ (`_bartlett_factor`) and the QR H = Q R of the (r + k, k) stack H = [G_r; Lᵀ],
    HᵀH = GᵀG and G_r = Q_{:r} R, so g_iᵀ (GᵀG)⁻¹ g_i = ‖Q_i,:‖²: cost O((r + k) k²) per sample.
    When n − r < k the rest is drawn as Gaussian rows (H = G, n < r + k rows). The batched QR runs
    on one thread: many small factorisations, where thread start-up costs more than it saves.
    """
    r, m = weights.shape[0], n - weights.shape[0]
    rows = r + (m if m < k else k)
    chunk = max(1, _NULL_CHUNK_BYTES // (8 * 2 * rows * k))
    draws: list[Tensor] = []
    for start in range(0, samples, chunk):
        s = min(chunk, samples - start)
        parts = [rng.standard_normal((s, r, k))]  # G_r
        if 0 < m < k:
            parts.append(rng.standard_normal((s, m, k)))  # G_rest itself
        elif m >= k:
            parts.append(np.swapaxes(_bartlett_factor(rng, s, m, k), 1, 2))  # Lᵀ: same Gram as G_rest
        H = from_numpy(np.concatenate(parts, axis=1))  # (s, rows, k)
        with linalg_threads(1):  # many small QRs: OpenMP start-up would dominate (see linalg_threads)
            Q = linalg.qr(H).Q  # (s, rows, k)
        draws.append(Q[:, :r, :].square().sum(dim=-1) @ weights)  # (s, r) @ (r,) -> (s,)
    return torch.cat(draws)


def null_fractions(
    delta: Float[Tensor, "n_out n_in"] | LowRankDelta | DeltaSpectrum,
    side: Side,
    k: int,
    samples: int,
    generator: torch.Generator | None = None,
) -> Float[Tensor, " samples"]:
    """`samples` independent draws of f over Haar-random k-dim subspaces of the side's space, float64.

    By rotation invariance f(U) = Σ_i w_i ‖Ũ_i,:‖² with Ũ = VᵀU again Haar (V: S's eigenvectors,
    w_i: its eigenvalues), and only the r rows with w_i > 0 matter: `_spectral_null_draws` draws them
    from r Gaussian rows plus a Bartlett factor of the Wishart remainder, O(r k'² + k'³) per sample.
    For k > n/2 the complement is drawn, f(U) = 1 − f(U⊥) with U⊥ Haar of dimension n − k; k = n gives
    exactly 1. The randomness is a numpy Generator seeded by one `torch.randint` draw from
    `generator` (None: torch's global generator): the same generator state gives the same samples.
    """
    side, spectrum, n, k = _null_inputs(delta, side, k)
    samples = require_int(samples, "samples")
    if samples < 0:
        raise RwasymError(f"samples must be >= 0; got samples={samples}.")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))  # advances `generator` once per call
    if k == n or samples == 0:
        return torch.ones(samples, dtype=torch.float64)
    complement = 2 * k > n
    draws = _spectral_null_draws(spectrum.weights, n, n - k if complement else k, samples, np.random.default_rng(seed))
    return 1.0 - draws if complement else draws


def random_null(
    delta: Float[Tensor, "n_out n_in"] | LowRankDelta | DeltaSpectrum,
    side: Side,
    k: int,
    samples: int = 1000,
    generator: torch.Generator | None = None,
) -> NullResult:
    """Null distribution of f over Haar-random k-dim subspaces of the side's space.

    mean and std are the exact moments of the Haar null (`null_moments`: E f = k/n,
    Var f = 2k(n−k)(n s₂ − 1)/(n²(n+2)(n−1)), s₂ = tr(S²)); the `samples` draws (`null_fractions`,
    in ΔW's singular basis, the law of f over explicit random bases applied to ΔW) serve percentiles.
    `delta` may be a `DeltaSpectrum` to reuse one SVD across k and sides.
    """
    side, spectrum, n, k = _null_inputs(delta, side, k)
    samples = require_int(samples, "samples")
    if samples < 2:
        raise RwasymError(f"samples must be >= 2 to estimate a spread; got samples={samples}.")
    moments = _haar_moments(spectrum.s2, n, k)
    fractions = null_fractions(spectrum, side, k, samples, generator)
    return NullResult(mean=moments.mean, std=moments.std, samples=fractions, k=k, n=n, side=side)


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


def _check_ks(ks: Sequence[object] | Tensor | None, m: int) -> Tensor:
    if ks is None:
        return torch.arange(1, m + 1)
    values = [require_int(k, "each k in ks") for k in (tolist(ks) if isinstance(ks, Tensor) else ks)]
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
    grid: list[int] = []
    k = 1
    while k < n:
        grid.append(k)
        k *= 2
    return grid + [n]


class KFreeScore(NamedTuple):
    """ρ_C (`kfree_score`) with its Haar null: mean 1, standard deviation ``null_std``; z = (ρ − 1)/null_std."""

    rho: float
    null_std: float
    n: int
    side: str

    @property
    def z(self) -> float:
        return (self.rho - 1.0) / self.null_std if self.null_std > 0 else math.nan


def kfree_score(
    delta: Float[Tensor, "n_out n_in"] | LowRankDelta,
    cov: Float[Tensor, "n n"],
    side: Side,
    spectrum: DeltaSpectrum | None = None,
) -> KFreeScore:
    """The k-free concentration of ΔW in a covariance C (issue #29): no subspace dimension to choose.

    Input side (C on R^{n_in}, e.g. the input covariance): ρ_C = n · tr(ΔW C ΔWᵀ) / (tr C · ‖ΔW‖²_F).
    Output side (C on R^{n_out}): ρ_C = n · tr(ΔWᵀ C ΔW) / (tr C · ‖ΔW‖²_F). It is the energy-weighted
    mean eigenvalue of C along ΔW's directions relative to C's mean eigenvalue: 1 for an isotropic C or
    a ΔW spread evenly over R^n, up to n · λ_max / tr C when ΔW lies on C's top eigenvector; the
    fixed-k fraction r(k) is the special case C = a rank-k projection.

    Haar null (ΔW's side rotated by a uniform orthogonal Q): E ρ = 1 exactly, and with s₂ = Σ w_i² of
    ΔW's normalised spectrum (`DeltaSpectrum.s2`) and c₂ = tr(C²)/tr(C)²,
    Var ρ = 2 (n s₂ − 1)(n c₂ − 1) / ((n − 1)(n + 2)) — the variance of tr(A Q B Qᵀ) for symmetric
    A, B (Haar moments of the orthogonal group; with B a rank-k projection it is `null_moments`'s).
    ``spectrum``: ΔW's `DeltaSpectrum` when the caller has it (one SVD shared with the other nulls).
    float64; C symmetric positive semi-definite with tr C > 0.
    """
    side = _check_side(side)
    C = torch.as_tensor(cov).detach().to("cpu", torch.float64)
    require_finite(C, "cov")
    rho = kfree_rho(delta, C, side)
    n = C.shape[0]
    trace = float(C.trace())
    s2 = (spectrum or delta_spectrum(delta)).s2
    c2 = float(C.square().sum()) / trace**2
    return KFreeScore(rho=rho, null_std=kfree_null_std(s2, c2, n), n=n, side=side)


_RHO_BLOCK = 2**24  # float64 entries of ρ's n_out × n product formed at once (128 MiB)


def kfree_rho(delta: Float[Tensor, "n_out n_in"] | LowRankDelta, cov: Float[Tensor, "n n"], side: Side) -> float:
    """ρ_C of `kfree_score` alone (no spectrum, no null): n tr(ΔW C ΔWᵀ)/(tr C ‖ΔW‖²_F) on the input side,
    n tr(ΔWᵀ C ΔW)/(tr C ‖ΔW‖²_F) on the output side; C float64, symmetric PSD, tr C > 0. Its products are
    n_out × n (dense) or r × r (factored): no d × d temporary beside C."""
    side = _check_side(side)
    D, energy = _delta64(delta)
    n = _side_dim(D, side)
    C = torch.as_tensor(cov).detach().to("cpu", torch.float64)
    if C.shape != (n, n):
        raise RwasymError(f"cov must be ({n}, {n}) for the {side} side of ΔW {_dshape(D)}; got {tuple(C.shape)}")
    trace = float(C.trace())
    if not trace > 0:
        raise RwasymError(f"cov has trace {trace}: a covariance with no variance cannot weight ΔW")
    if isinstance(D, LowRankDelta):  # ΔW = s B A: traces of small r × r products, ΔW never formed
        A, B = D.A, D.B
        inner = (B.T @ B) * (A @ C @ A.T) if side == "input" else (A @ A.T) * (B.T @ C @ B)
        quad = D.scale**2 * float(inner.sum())
    elif D.numel() <= _RHO_BLOCK:
        quad = float(((D @ C) * D).sum()) if side == "input" else float(((C @ D) * D).sum())
    else:  # an 8B MLP matrix: the n_out × n product in row (input) or column (output) blocks, not whole
        step = max(1, _RHO_BLOCK // n)
        if side == "input":
            quad = sum(float(((D[i : i + step] @ C) * D[i : i + step]).sum()) for i in range(0, D.shape[0], step))
        else:
            quad = sum(float(((C @ D[:, j : j + step]) * D[:, j : j + step]).sum()) for j in range(0, D.shape[1], step))
    return n * quad / (trace * float(energy))


def kfree_null_std(s2: float, c2: float, n: int) -> float:
    """The Haar-null standard deviation of ρ_C (`kfree_score`; its mean is 1): with s₂ = Σ w_i² of ΔW's
    normalised spectrum and c₂ = tr(C²)/tr(C)² = Σ ℓ_j² of C's eigenvalue shares,
    √(2 (n s₂ − 1)(n c₂ − 1) / ((n − 1)(n + 2))); 0 for n = 1."""
    if n < 2:
        return 0.0
    return math.sqrt(max(2.0 * (n * s2 - 1.0) * (n * c2 - 1.0) / ((n - 1.0) * (n + 2.0)), 0.0))


def gradient_shaped_delta(
    scatter: Float[Tensor, "n_in n_in"], n_out: int, generator: torch.Generator | None = None
) -> Float[Tensor, "n_out n_in"]:
    """One draw of the gradient-shaped null update ΔW = Σ_t ξ_t a_tᵀ, ξ_t ~ N(0, I_{n_out}) independent
    over the tokens t, for inputs a_t with the *uncentred* scatter S = Σ_t a_t a_tᵀ (n_in × n_in).

    Each row Σ_t ξ_{it} a_tᵀ is N(0, S) and the rows are independent, so ΔW = Z Λ^{1/2} Vᵀ with
    S = V Λ Vᵀ and Z (n_out × n_in) standard normal has the same law — drawn from S alone, no per-token
    activations kept. It is what any update of the form −η Σ_t δ_t a_tᵀ inherits from its inputs when the
    back-propagated δ_t carry no structure (issue #29's ``random_delta`` baseline). Float64."""
    S = as_float64_matrix(scatter, "the scatter S = Σ_t a_t a_tᵀ")
    if S.shape[0] != S.shape[1]:
        raise RwasymError(f"the scatter must be square (n_in × n_in); got {shape_str(S)}")
    require_positive_int(n_out, "n_out")
    evals, evecs = linalg.eigh(0.5 * (S + S.T))
    root = evals.clamp_min(0.0).sqrt()[:, None] * evecs.T  # Λ^{1/2} Vᵀ: rootᵀ root = S
    z = torch.randn(n_out, S.shape[0], generator=generator, dtype=torch.float64)
    return z @ root


def gradient_shaped_fraction(second_moment: Float[Tensor, "n n"], U: Float[Tensor, "n k"]) -> float:
    """The share of a gradient-shaped null update's energy in span(U) on the side whose second moment is
    given: E‖ΔW U‖²_F / E‖ΔW‖²_F = tr(Uᵀ M U) / tr M (input side: M = the uncentred input second moment,
    `gradient_shaped_delta`; output side M ∝ I, or diag(γ²) after a post-norm scale, gives k/n or its γ-weighted
    analogue). A ratio of expectations: a draw's f concentrates on it as n_out grows (relative spread
    O(1/√n_out)). Invariant to M's scale, so a mean or a sum over tokens gives the same value."""
    M = as_float64_matrix(second_moment, "the second moment M")
    basis = as_float64_matrix(U, "the basis U")
    if M.shape[0] != M.shape[1] or basis.shape[0] != M.shape[0]:
        raise RwasymError(f"M must be n × n and U n × k; got M {shape_str(M)}, U {shape_str(basis)}")
    trace = float(M.diagonal().sum())
    if not trace > 0.0:
        raise RwasymError("the second moment has zero trace (no input energy): no gradient-shaped update exists")
    return float(((M @ basis) * basis).sum()) / trace
