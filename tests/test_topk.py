"""`rwasym.math.top_eigenpairs` (issue #31: top-k spectral math at O(n²b)) against the exact eigh oracle, on
spiked, clustered and flat spectra: the Ritz values, the subspace, and that every certificate is true."""

import pytest
import torch

from rwasym import RwasymError
from rwasym.math.topk import top_eigenpairs, top_spectrum_until


def _psd(evals, seed=0):
    """V diag(evals) Vᵀ with a Haar V: a symmetric PSD matrix with exactly these eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    n = len(evals)
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    return (V * torch.tensor(evals, dtype=torch.float64)) @ V.T, V


def _check_certificates(C, top):
    """Every reported residual is the true ‖C u − θ u‖, and each θ_i is within it of an eigenvalue of C."""
    true = torch.linalg.vector_norm(C @ top.U - top.U * top.eigenvalues, dim=0)
    assert torch.allclose(top.residuals, true, rtol=1e-6, atol=1e-13 * float(top.eigenvalues[0]))
    lam = torch.linalg.eigvalsh(C)
    for theta, r in zip(top.eigenvalues.tolist(), top.residuals.tolist()):
        assert float((lam - theta).abs().min()) <= r + 1e-12 * abs(theta)
    assert torch.allclose(top.U.T @ top.U, torch.eye(top.k, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("n", [300, 600])
def test_spiked_spectrum_matches_eigh(n):
    evals = [100.0 / (i + 1) ** 1.5 for i in range(n)]
    C, V = _psd(evals, seed=n)
    top = top_eigenpairs(C, 8, generator=torch.Generator().manual_seed(1))
    assert top.converged and not top.exact and top.iterations > 0
    assert torch.allclose(top.eigenvalues, torch.tensor(evals[:8], dtype=torch.float64), rtol=1e-9)
    # the subspace: projector distance within the Davis–Kahan bound
    P, Pt = top.U @ top.U.T, V[:, :8] @ V[:, :8].T
    sin = float(torch.linalg.matrix_norm(P - Pt, ord=2))
    assert sin <= top.angle_bound(evals[7] - evals[8]) + 1e-12
    assert sin < 1e-6
    assert top.trace == pytest.approx(sum(evals), rel=1e-12)
    _check_certificates(C, top)


def test_clustered_top_eigenvalues_give_the_cluster_span():
    """λ₁ = λ₂ = λ₃ (degenerate: the vectors are not unique, the span is) and a cluster straddling k."""
    n = 400
    evals = [10.0, 10.0, 10.0, 5.0, 5.0 + 1e-9, 4.0, 3.0, 2.0] + [1.0 / (i + 1) for i in range(n - 8)]
    C, V = _psd(evals, seed=3)
    top = top_eigenpairs(C, 3, generator=torch.Generator().manual_seed(2))
    assert top.converged
    P, Pt = top.U @ top.U.T, V[:, :3] @ V[:, :3].T
    assert float(torch.linalg.matrix_norm(P - Pt, ord=2)) < 1e-6
    _check_certificates(C, top)
    # k = 4 cuts the (5, 5 + 1e-9) pair: the values are right, and the certificate still holds
    top4 = top_eigenpairs(C, 4, generator=torch.Generator().manual_seed(2))
    assert top4.eigenvalues[3] == pytest.approx(5.0, rel=1e-8)
    _check_certificates(C, top4)


def test_flat_spectrum_is_reported_unconverged_with_true_residuals():
    """A spectrum flat past k converges slowly: with few iterations the result says so, and its residuals are
    still the true ones (every Ritz value within them of an eigenvalue)."""
    n = 400
    g = torch.Generator().manual_seed(5)
    evals = (1.0 + 0.01 * torch.rand(n, generator=g, dtype=torch.float64)).sort(descending=True).values.tolist()
    C, _ = _psd(evals, seed=5)
    top = top_eigenpairs(C, 8, max_iter=3, tol=1e-12, oversample=4)
    assert not top.converged and top.iterations == 3
    _check_certificates(C, top)


def test_small_matrices_take_the_exact_path_and_spectrum_until_a_ratio():
    evals = [2.0**-i for i in range(40)]
    C, _ = _psd(evals, seed=7)
    top = top_eigenpairs(C, 5)
    assert top.exact and top.converged
    assert torch.allclose(top.eigenvalues, torch.tensor(evals[:5], dtype=torch.float64), rtol=1e-12)
    # 90% of the variance: the least k with Σ_{i≤k} 2^-i ≥ 0.9 · Σ_all, by hand
    total = sum(evals)
    want = next(j + 1 for j in range(40) if sum(evals[: j + 1]) >= 0.9 * total)
    got, k90 = top_spectrum_until(C, 0.9, k_min=1)
    assert k90 == want and got.k >= want
    n = 300
    flat = [1.0] * n
    C2, _ = _psd(flat, seed=8)
    _, none = top_spectrum_until(C2, 0.9, k_min=8, cap=32, max_iter=5)
    assert none is None  # 90% of a flat spectrum needs 270 > cap directions: said, not hidden
    with pytest.raises(RwasymError, match="k=41"):
        top_eigenpairs(C, 41)
    with pytest.raises(RwasymError, match="ratio"):
        top_spectrum_until(C, 1.5)
