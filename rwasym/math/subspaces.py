"""Orthonormal bases for the probes: PCA (read side), prediction (write side), random controls.

Every basis is an (n, k) float64 CPU tensor with orthonormal columns, used as U in the projections
ΔW U (input / read side) and Uᵀ ΔW (output / write side) of `rwasym.math.fraction`.

- `pca_basis`: top-k eigenvectors of an activation covariance (a tensor or a `RunningCovariance`).
- `prediction_basis`: top-k left singular vectors of the (effective) unembedding (d_model, d_vocab).
- `random_basis`: Haar-uniform k-frame in R^n; `complement_basis`: Haar-uniform k-frame inside
  the orthogonal complement of span(U) (the matched "orthogonal" control).
"""

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import RwasymError
from ._typed_torch import linalg
from .checks import (
    as_float64_matrix,
    require_finite,
    require_k,
    require_matrix,
    require_orthonormal,
    require_positive_int,
    shape_str,
)
from .covariance import RunningCovariance

__all__ = [
    "Basis",
    "HasUnembedding",
    "complement_basis",
    "k_for_variance",
    "pca_basis",
    "prediction_basis",
    "prediction_fisher",
    "random_basis",
]

_GRAM_CHUNK_BYTES = 64 * 2**20  # float64 bytes per column chunk when forming W Wᵀ


@dataclass(frozen=True, eq=False)
class Basis:
    """Orthonormal basis of a k-dim subspace of R^n, with the spectrum that ranked it.

    U: (n, k) float64, orthonormal columns, sorted by descending eigenvalue, each column's
    largest-|entry| positive (deterministic sign). eigenvalues: (k,) — covariance eigenvalues λ_i
    for PCA, squared singular values σ_i² for the prediction basis. explained_variance_ratio: (k,)
    λ_i / Σ_all λ (the sum runs over all n eigenvalues, so the ratios of a top-k basis sum to ≤ 1).
    """

    U: Float[Tensor, "n k"]
    eigenvalues: Float[Tensor, " k"]
    explained_variance_ratio: Float[Tensor, " k"]
    k: int
    n: int


@runtime_checkable
class HasUnembedding(Protocol):
    """Anything with `.unembedding()` returning the effective unembedding (d_model, d_vocab)."""

    def unembedding(self) -> Tensor: ...


# --------------------------------------------------------------------------------- helpers
def _fix_signs(U: Tensor) -> Tensor:
    """Flip each column so that its largest-|entry| is positive (first such entry on ties)."""
    rows = U.abs().argmax(dim=0)  # (k,)
    signs = U[rows, torch.arange(U.shape[1])].sign()
    signs[signs == 0] = 1.0
    return U * signs  # (n, k)


def _sign_fixed_qr(gauss: Tensor) -> Tensor:
    """Q of a (batched) QR with the signs of diag(R) moved into Q (Mezzadri 2007, "How to generate
    random matrices from the classical compact groups"): for Gaussian input, exactly Haar instead of
    biased by LAPACK's sign convention."""
    q, r = linalg.qr(gauss)  # (..., n, k), (..., k, k)
    signs = r.diagonal(dim1=-2, dim2=-1).sign()  # (..., k)
    signs[signs == 0] = 1.0
    return q * signs.unsqueeze(-2)


def haar_frames(samples: int, n: int, k: int, generator: torch.Generator | None = None) -> Float[Tensor, "samples n k"]:
    """`samples` independent Haar-uniform (n, k) orthonormal frames, float64 (samples, n, k): the
    one Haar sampler of rwasym (nulls, random bases, complements, random rotations).

    QR of a standard Gaussian matrix with the signs of diag(R) moved into Q (`_sign_fixed_qr`).
    """
    return _sign_fixed_qr(torch.randn(samples, n, k, dtype=torch.float64, generator=generator))


def _symmetric_matrix(C_in: object, what: str) -> Tensor:
    """Validate a finite, square, symmetric matrix; return float64 CPU."""
    C = as_float64_matrix(C_in, what)
    if C.shape[0] != C.shape[1]:
        raise RwasymError(
            f"{what} must be a square (d, d) covariance matrix; got shape {shape_str(C)}. Pass the "
            "covariance of the activations (or a RunningCovariance), not the activations themselves."
        )
    scale = float(C.abs().max())
    asym = float((C - C.T).abs().max())
    if asym > 1e-6 * max(scale, 1e-300):
        raise RwasymError(
            f"{what} must be symmetric; got max |C - Cᵀ| = {asym:.3g} (max |C| = {scale:.3g}). "
            "A covariance is symmetric; symmetrise with 0.5 * (C + C.T) if this is rounding."
        )
    return 0.5 * (C + C.T)


def _as_covariance(cov_or_stats: object, center: bool) -> tuple[Tensor, str]:
    """A (d, d) float64 covariance from a tensor or a RunningCovariance, and its description."""
    if isinstance(cov_or_stats, RunningCovariance):
        what = f"the covariance of {cov_or_stats.label()}"
        cov = cov_or_stats.covariance(center=center).cpu()
        return require_finite(cov, what), what
    if isinstance(cov_or_stats, Tensor):
        what = "the covariance matrix"
        return _symmetric_matrix(cov_or_stats, what), what
    raise RwasymError(
        "expected a (d, d) covariance tensor or a rwasym.math.covariance.RunningCovariance; got "
        f"{type(cov_or_stats).__name__}."
    )


def _descending_spectrum(C: Tensor, what: str) -> tuple[Tensor, Tensor, Tensor]:
    """Eigenvalues (desc), eigenvectors (desc columns) and ratios λ_i / Σλ of a PSD matrix."""
    evals, evecs = linalg.eigh(C)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    top = float(evals[0])
    if float(evals[-1]) < -1e-6 * max(abs(top), 1e-300):
        raise RwasymError(
            f"{what} is not positive semidefinite (smallest eigenvalue {float(evals[-1]):.3g}, "
            f"largest {top:.3g}); a covariance must be PSD. Pass a covariance or Gram matrix."
        )
    clamped = evals.clamp(min=0.0)
    total = clamped.sum()
    if float(total) <= 0.0:
        raise RwasymError(
            f"{what} is zero (total variance 0): there is no variance to explain, so the principal "
            "directions are undefined; check that activations were accumulated from real data."
        )
    return evals, evecs, clamped / total


def _basis_from_symmetric(C: Tensor, k: int, what: str) -> Basis:
    evals, evecs, ratio = _descending_spectrum(C, what)
    U = _fix_signs(evecs[:, :k]).contiguous()
    return Basis(U=U, eigenvalues=evals[:k].clone(), explained_variance_ratio=ratio[:k].clone(), k=k, n=C.shape[0])


def _chunk(W: Tensor, start: int, step: int, row_scale: Tensor | None) -> Tensor:
    """Columns start:start+step of diag(row_scale)·W in float64 (the same values as slicing the whole product)."""
    chunk = W[:, start : start + step].detach().to(device="cpu", dtype=torch.float64)  # (d_model, c)
    return chunk if row_scale is None else row_scale[:, None] * chunk


def _unembedding_gram(W: Tensor, row_scale: Tensor | None = None) -> Tensor:
    """G = W Wᵀ (W := diag(row_scale)·W when given) in float64, accumulated over column chunks so the float64
    copy stays small."""
    d_model, d_vocab = W.shape
    step = max(1, _GRAM_CHUNK_BYTES // (8 * d_model))
    gram = torch.zeros(d_model, d_model, dtype=torch.float64)
    for start in range(0, d_vocab, step):
        chunk = _chunk(W, start, step, row_scale)
        require_finite(chunk, "the unembedding")
        gram += chunk @ chunk.T
    return 0.5 * (gram + gram.T)


# --------------------------------------------------------------------------------- public API
def pca_basis(cov_or_stats: Float[Tensor, "n n"] | RunningCovariance, k: int, *, center: bool = True) -> Basis:
    """Top-k principal directions of a covariance, as a `Basis` (float64).

    C = V Λ Vᵀ (torch.linalg.eigh); U = the k eigenvectors of the largest eigenvalues, sorted
    descending, signs fixed so each column's largest-|entry| is positive; explained ratio
    λ_i / Σ_{j=1..n} λ_j (negative rounding eigenvalues clamped to 0). Within a degenerate
    eigenvalue the basis is not unique; only its span is meaningful.

    `cov_or_stats`: a symmetric PSD (n, n) tensor, or a `RunningCovariance` whose
    `covariance(center=center)` is used (`center` is ignored for a tensor).
    """
    C, what = _as_covariance(cov_or_stats, center)
    k = require_k(k, C.shape[0], what)
    return _basis_from_symmetric(C, k, what)


def k_for_variance(
    cov_or_stats: Float[Tensor, "n n"] | RunningCovariance, threshold: float = 0.9, center: bool = True
) -> int:
    """Smallest k with Σ_{i<=k} λ_i / Σ_j λ_j >= threshold (eigenvalues descending), 0 < threshold <= 1."""
    if not 0.0 < float(threshold) <= 1.0:
        raise RwasymError(f"threshold must satisfy 0 < threshold <= 1 (a variance fraction); got {threshold}.")
    C, what = _as_covariance(cov_or_stats, center)
    _, _, ratio = _descending_spectrum(C, what)
    return k_reaching(ratio, threshold)


def k_reaching(ratio: Float[Tensor, " n"], threshold: float = 0.9) -> int:
    """Smallest k with Σ_{i<=k} ratio_i >= threshold, for explained-variance ratios in descending order
    (a `Basis`'s ``explained_variance_ratio``); ratios that fall short by rounding give k = n."""
    cumulative = ratio.cumsum(0)  # (n,)
    k = int((cumulative < float(threshold) - 1e-12).sum()) + 1
    return min(k, ratio.shape[0])


def prediction_basis(
    unembedding: Float[Tensor, "d_model d_vocab"] | HasUnembedding,
    k: int,
    *,
    center_vocab: bool = False,
    row_scale: Float[Tensor, " d_model"] | None = None,
) -> Basis:
    """Top-k left singular vectors of the unembedding W_U (d_model, d_vocab), as a `Basis`.

    center_vocab=True: of the vocabulary-centred W_U − w̄ 1ᵀ (w̄ = the mean unembedding column), whose Gram is
    W_U W_Uᵀ − V w̄ w̄ᵀ. The direction w̄ moves every logit together, which the softmax ignores; the centred
    basis (the probe's ``prediction_centered``) drops that share of it.

    W_U = U Σ Vᵀ; the basis spans the residual-stream directions the logits read most strongly
    (the write side's prediction subspace). Pass the *effective* unembedding diag(γ_final) · W_U
    (final norm scale folded in), or any object whose `.unembedding()` returns it. Orientation
    is not guessed: rows must be d_model. eigenvalues = σ_i², ratio = σ_i² / Σ_all σ².

    Computed as the eigenvectors of the Gram matrix W_U W_Uᵀ (d_model, d_model), accumulated
    in float64 over vocabulary chunks, which equals the SVD's left singular vectors (up to sign,
    fixed as in `pca_basis`) and never materialises a float64 copy of W_U. ``row_scale``: the basis of
    diag(row_scale)·W for a raw W (the final norm's γ_eff and the host weight, `Model.unembedding_parts`), with
    the same numbers as passing the product, and no d_model × d_vocab float64 copy at all.
    """
    if isinstance(unembedding, HasUnembedding) and not isinstance(unembedding, Tensor):
        unembedding = unembedding.unembedding()
    W = require_matrix(unembedding, "the unembedding")
    d_model, d_vocab = W.shape
    k = require_k(k, d_model, f"the unembedding's row space (d_model={d_model})")
    if k > d_vocab:
        raise RwasymError(
            f"k={k} exceeds d_vocab={d_vocab}: an unembedding of shape {shape_str(W)} has at most "
            f"min(d_model, d_vocab)={d_vocab} nonzero singular values; choose k <= {d_vocab} "
            "(or check the orientation: rwasym expects (d_model, d_vocab))."
        )
    gram = _unembedding_gram(W, row_scale)
    if center_vocab:
        mean = _column_sum(W, row_scale) / d_vocab
        gram = gram - d_vocab * torch.outer(mean, mean)
        gram = 0.5 * (gram + gram.T)
    return _basis_from_symmetric(gram, k, "the unembedding's Gram matrix W_U W_Uᵀ")


def prediction_fisher(
    unembedding: Float[Tensor, "d_model d_vocab"],
    p_mean: Float[Tensor, " d_vocab"],
    g_second_moment: Float[Tensor, "d_model d_model"],
) -> Float[Tensor, "d_model d_model"]:
    """The mean Fisher metric of the next-token cross-entropy on the residual-stream side of the logits,
    E_t[W̃_U (diag p_t − p_t p_tᵀ) W̃_Uᵀ] = W̃_U diag(p̄) W̃_Uᵀ − E_t[g_t g_tᵀ], g_t = W̃_U p_t — the metric the
    loss sees (its top eigenvectors: the probe's ``prediction_fisher`` subspace). Linear in p_t in its first
    term, so a corpus needs only p̄ = E_t p_t (d_vocab) and the second moment of g_t (d_model × d_model)
    (`rwasym.hooks.activations.prediction_statistics`). W̃_U = diag(γ_final)·W_U, (d_model, d_vocab); float64.
    """
    W = require_matrix(unembedding, "the unembedding")
    d_model, d_vocab = W.shape
    p = as_float64_matrix(p_mean.reshape(1, -1), "p_mean").reshape(-1)
    G = as_float64_matrix(g_second_moment, "g_second_moment")
    if p.shape[0] != d_vocab or G.shape != (d_model, d_model):
        raise RwasymError(
            f"p_mean must have d_vocab={d_vocab} entries and g_second_moment be {d_model} × {d_model}; got "
            f"{p.shape[0]} and {shape_str(G)}"
        )
    step = max(1, _GRAM_CHUNK_BYTES // (8 * d_model))
    weighted = torch.zeros(d_model, d_model, dtype=torch.float64)
    for start in range(0, d_vocab, step):
        chunk = W[:, start : start + step].detach().to(device="cpu", dtype=torch.float64)
        weighted += (chunk * p[start : start + step]) @ chunk.T
    fisher = weighted - G
    return 0.5 * (fisher + fisher.T)


def _column_sum(W: Tensor, row_scale: Tensor | None = None) -> Tensor:
    """Σ_j W[:, j] (W := diag(row_scale)·W when given) in float64, over column chunks."""
    d_model, d_vocab = W.shape
    step = max(1, _GRAM_CHUNK_BYTES // (8 * d_model))
    total = torch.zeros(d_model, dtype=torch.float64)
    for start in range(0, d_vocab, step):
        total += _chunk(W, start, step, row_scale).sum(1)
    return total


def random_basis(n: int, k: int, generator: torch.Generator | None = None) -> Float[Tensor, "n k"]:
    """Haar-uniform random (n, k) orthonormal frame, float64: QR of a Gaussian, signs by diag(R).

    E[U Uᵀ] = (k/n) I, so the expected fraction of any ΔW in span(U) is k/n.
    """
    n = require_positive_int(n, "n")
    k = require_k(k, n, f"the ambient space R^{n}")
    return haar_frames(1, n, k, generator)[0]


def complement_basis(
    U: Float[Tensor, "n k_U"] | Basis, k: int, generator: torch.Generator | None = None
) -> Float[Tensor, "n k"]:
    """Haar-uniform (n, k) orthonormal frame inside the orthogonal complement of span(U), float64.

    Projects a Gaussian G (n, k) onto the complement, G ← (I − U Uᵀ) G (applied twice for
    orthogonality to rounding), then orthonormalises by sign-corrected QR. With V an orthonormal
    basis of the complement, (I − UUᵀ)G = V (VᵀG) and VᵀG is Gaussian, so the result is V·(Haar
    frame): uniform on the complement. Requires 1 <= k <= n − k_U.
    """
    basis = U.U if isinstance(U, Basis) else U
    basis = as_float64_matrix(basis, "U")
    require_orthonormal(basis, "U")
    n, k_U = basis.shape
    k = require_k(k, n - k_U, f"the orthogonal complement of span(U) (ambient n={n} minus k_U={k_U})")
    gauss = torch.randn(n, k, dtype=torch.float64, generator=generator)
    for _ in range(2):  # project twice: "twice is enough" for Gram-Schmidt
        gauss = gauss - basis @ (basis.T @ gauss)  # (n, k)
    return _sign_fixed_qr(gauss)  # (n, k)
