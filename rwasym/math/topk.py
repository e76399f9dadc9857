"""The top-k eigenpairs of a symmetric PSD matrix at O(n² b) per iteration, with a certificate per pair.

A probe needs from each n × n covariance only its top-k eigenvectors (k ≤ 64), its trace (the total variance)
and its spectrum up to the k that reaches a variance ratio — not the O(n³) full `eigh`, which at Llama-8B's
14,336-wide MLP state costs ≈ 19 min on 2 cores. `top_eigenpairs` runs a restarted block Krylov method
(block Lanczos with full reorthogonalisation) with a Rayleigh–Ritz step each cycle, on blocks of b = k + oversample
vectors.

Certificate: for each returned Ritz pair (θ_i, u_i) the residual r_i = ‖C u_i − θ_i u_i‖₂ is computed from
the final products, not estimated. For symmetric C every Ritz value lies within r_i of an eigenvalue of C
(Weyl / Bauer–Fike for normal matrices: min_j |θ_i − λ_j| ≤ r_i), and when the top-k eigenvalues are
separated from the rest by a gap δ > 0 the subspace angle satisfies ‖sin Θ(U_k, V_k)‖ ≤ ‖R‖_F / δ
(Davis–Kahan sin Θ theorem). `converged` says whether every r_i ≤ tol · θ_1; an unconverged result is
returned with its true residuals, never silently. Exact `eigh` stays the oracle (tests/test_topk.py) and
the path for small n.
"""

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import RwasymError
from ._typed_torch import linalg
from .checks import as_float64_matrix, require_k, require_positive_int

__all__ = ["TopEigen", "top_eigenpairs", "top_spectrum_until"]

_EXACT_BELOW = 256  # n below this: a full eigh is as cheap as a few iterations


@dataclass(frozen=True, eq=False)
class TopEigen:
    """The top-k eigenpairs of C with their certificates.

    eigenvalues: (k,) Ritz values θ_i, descending. U: (n, k) orthonormal Ritz vectors (signs fixed: each
    column's largest-|entry| positive). residuals: (k,) r_i = ‖C u_i − θ_i u_i‖₂ (each θ_i is within r_i of an
    eigenvalue of C). trace: tr C (the total variance, exact). iterations: subspace iterations run (0 for
    the exact path). converged: every r_i ≤ tol · θ_1. exact: computed by a full eigh."""

    eigenvalues: Float[Tensor, " k"]
    U: Float[Tensor, "n k"]
    residuals: Float[Tensor, " k"]
    trace: float
    iterations: int
    converged: bool
    exact: bool

    @property
    def k(self) -> int:
        return int(self.eigenvalues.shape[0])

    @property
    def explained_variance_ratio(self) -> Float[Tensor, " k"]:
        """θ_i / tr C (negative rounding clamped to 0)."""
        return self.eigenvalues.clamp_min(0.0) / self.trace if self.trace > 0 else torch.zeros_like(self.eigenvalues)

    def angle_bound(self, gap: float) -> float:
        """Davis–Kahan: ‖sin Θ(span U, top-k eigenspace)‖₂ ≤ ‖R‖_F / gap, given a lower bound ``gap`` on
        θ_k − λ_{k+1} (the separation of the top k from the rest); inf when gap ≤ 0."""
        return float(self.residuals.square().sum().sqrt()) / gap if gap > 0 else math.inf


def _fix_signs(vecs: Tensor) -> Tensor:
    idx = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs[idx, torch.arange(vecs.shape[1])])
    signs[signs == 0] = 1.0
    return vecs * signs


def _certify(c: Tensor, theta: Tensor, vecs: Tensor) -> Tensor:
    return linalg.vector_norm(c @ vecs - vecs * theta, dim=0)


def _krylov_block(z: Tensor, blocks: list[Tensor]) -> Tensor:
    """An orthonormal basis of z's part orthogonal to the blocks so far (block Gram–Schmidt, twice), its
    directions lost to rounding (singular value ≤ 1e-10 ‖z‖_F) dropped: an empty block means span(K)
    is invariant under C, and the Rayleigh–Ritz on it is then exact."""
    scale = float(linalg.vector_norm(z)) if z.numel() else 0.0  # ‖z‖_F
    for _ in range(2):
        for b in blocks:
            z = z - b @ (b.T @ z)
    u, sv, _ = linalg.svd(z, full_matrices=False)
    return u[:, sv > 1e-10 * scale] if scale > 0 else z[:, :0]


def top_eigenpairs(
    C: Float[Tensor, "n n"],
    k: int,
    *,
    oversample: int = 16,
    tol: float = 1e-10,
    max_iter: int = 200,
    depth: int = 8,
    generator: torch.Generator | None = None,
    exact_below: int = _EXACT_BELOW,
) -> TopEigen:
    """The k largest eigenpairs of the symmetric PSD ``C`` (float64), with residual certificates (module doc).

    Restarted block Krylov (block Lanczos with full reorthogonalisation; Golub & Underwood 1977, Musco &
    Musco 2015 "randomized block Krylov"): from a block Q of b = min(n, k + oversample) orthonormal vectors
    (a seeded Gaussian start), each cycle builds K = [Q, CQ, …, C^{depth−1}Q] orthonormalised block by block,
    takes the Rayleigh–Ritz pairs of C on span(K) (the products C K are the ones computed, so no extra
    product), checks the leading k residuals, and restarts from the top b Ritz vectors. Against plain
    subspace iteration, whose eigenvalue i converges like (λ_{b+1}/λ_i)^t, a Krylov space converges in a
    number of products that grows with the square root of 1/gap: on a 4096-wide sample covariance of 2,048
    Gaussian tokens (flat past k = 64) it reached residuals ≤ 1e-8·θ₁ in 56 block products where subspace
    iteration stood at 6e-3 after 60 and 1e-4 after 200. Stops when every r_i ≤ tol · θ_1 (r_i from an
    explicit final product C u_i) or after ``max_iter`` block products (``iterations`` counts them); an
    unconverged result carries its true residuals. n < ``exact_below`` (or b ≥ n): one full eigh, residuals
    computed the same way. Cost: O(n² b) per block product, O(n (depth·b)²) per cycle for the orthogonalisation.
    """
    c = as_float64_matrix(C, "C")
    n = c.shape[0]
    if c.shape[1] != n:
        raise RwasymError(f"top_eigenpairs needs a square symmetric matrix; got {tuple(c.shape)}")
    k = require_k(k, n, f"the matrix (n={n})")
    require_positive_int(max_iter, "max_iter")
    require_positive_int(depth, "depth")
    if not tol > 0:
        raise RwasymError(f"tol must be positive (a relative residual, e.g. 1e-10); got {tol!r}")
    if not torch.equal(c, c.T):  # a covariance is symmetric to the bit: no d × d copy for it (1.6 GB at 14,336)
        c = 0.5 * (c + c.T)
    trace = float(c.diagonal().sum())
    b = min(n, k + max(0, int(oversample)))
    if n < exact_below or b >= n:
        evals, evecs = linalg.eigh(c)
        theta, vecs = evals.flip(0)[:k], _fix_signs(evecs.flip(1)[:, :k].contiguous())
        res = _certify(c, theta, vecs)
        return TopEigen(theta, vecs, res, trace, 0, bool((res <= tol * max(float(theta[0]), 0.0)).all()), True)
    depth = max(2, min(int(depth), n // (2 * b)))  # a restart from the Ritz block needs K wider than it
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    q = linalg.qr(torch.randn(n, b, generator=g, dtype=torch.float64)).Q
    cq: Tensor | None = None  # C q when known from the previous cycle's products
    theta = vecs = torch.empty(0)
    iterations = 0
    while True:
        blocks: list[Tensor] = [q]
        products: list[Tensor] = []
        for j in range(depth):
            if j == 0 and cq is not None:
                z = cq
            elif iterations < max_iter:
                z = c @ blocks[j]
                iterations += 1
            else:
                break
            products.append(z)
            if j + 1 < depth and iterations < max_iter:
                nxt = _krylov_block(z, blocks)
                if nxt.shape[1] == 0:
                    break  # span(K) is invariant: the Ritz pairs below are exact
                blocks.append(nxt)
        blocks = blocks[: len(products)]
        basis, cbasis = torch.cat(blocks, 1), torch.cat(products, 1)
        t = basis.T @ cbasis
        evals, rot = linalg.eigh(0.5 * (t + t.T))
        order = evals.argsort(descending=True)[:b]
        evals, rot = evals[order], rot[:, order]
        ritz, c_ritz = basis @ rot, cbasis @ rot  # Ritz vectors and (to rounding) C times them
        theta, vecs = evals[:k], ritz[:, :k]
        estimate = linalg.vector_norm(c_ritz[:, :k] - vecs * theta, dim=0)
        if bool((estimate <= tol * max(float(evals[0]), 0.0)).all()) or iterations >= max_iter:
            break
        q, cq = ritz, c_ritz
    vecs = _fix_signs(vecs.contiguous())
    res = _certify(c, theta, vecs)  # the certificate from an explicit product, not the recurrence
    converged = bool((res <= tol * max(float(theta[0]), 0.0)).all())
    return TopEigen(theta.clone(), vecs, res, trace, iterations, converged, False)


def top_spectrum_until(
    C: Float[Tensor, "n n"],
    ratio: float,
    *,
    k_min: int = 8,
    cap: int = 512,
    **options: object,
) -> tuple[TopEigen, int | None]:
    """Top eigenpairs of C extended until their explained variance reaches ``ratio`` of tr C, or ``cap``.

    Starts at k_min and doubles k (each call restarting from a fresh block) until Σ_{i≤k} θ_i ≥ ratio · tr C
    or k = min(cap, n). Returns (the pairs computed, the least k reaching ``ratio`` — None when it exceeds
    the cap, which a caller must report, not hide). ``options`` go to `top_eigenpairs`."""
    n = as_float64_matrix(C, "C").shape[0]
    if not 0.0 < float(ratio) <= 1.0:
        raise RwasymError(f"ratio must satisfy 0 < ratio <= 1 (a variance fraction); got {ratio}")
    limit = min(int(cap), n)
    k = min(max(1, int(k_min)), limit)
    while True:
        top = top_eigenpairs(C, k, **options)  # type: ignore[arg-type]
        cum = top.explained_variance_ratio.cumsum(0)
        reached = (cum >= ratio - 1e-12).nonzero()
        if reached.numel():
            return top, int(reached[0]) + 1
        if k >= limit:
            return top, None
        k = min(2 * k, limit)
