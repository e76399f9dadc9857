"""Bases against torch.linalg.eigvalsh / svd, orthogonality, and Haar statistics."""

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rwasym.math.subspaces as subspaces
from rwasym.errors import RwasymError
from rwasym.math.covariance import RunningCovariance
from rwasym.math.subspaces import Basis, complement_basis, k_for_variance, pca_basis, prediction_basis, random_basis


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orth_err(U: torch.Tensor) -> float:
    return float((U.T @ U - torch.eye(U.shape[1], dtype=U.dtype)).abs().max())


def spiked_covariance(n: int, seed: int) -> torch.Tensor:
    """A float64 SPD matrix with distinct eigenvalues 1/i² in a random eigenbasis."""
    q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen(seed))).Q
    lam = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 2
    return q @ torch.diag(lam) @ q.T


def unchecked(fn):
    """The undecorated function: exercises rwasym's own guard even when a runtime type checker
    (jaxtyping import hook) would reject the input first (here: a non-square "n n" matrix)."""
    return inspect.unwrap(fn)


def assert_sign_rule(U: torch.Tensor) -> None:
    rows = U.abs().argmax(dim=0)
    assert bool((U[rows, torch.arange(U.shape[1])] > 0).all())


# ----------------------------------------------------------------------------- pca_basis
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), data=st.data(), seed=st.integers(0, 2**16))
def test_pca_basis_matches_eigvalsh_and_is_an_eigenbasis(n, data, seed):
    k = data.draw(st.integers(1, n))
    x = torch.randn(3 * n + 2, n, dtype=torch.float64, generator=gen(seed))
    C = torch.cov(x.T).reshape(n, n)
    basis = pca_basis(C, k)
    assert isinstance(basis, Basis) and (basis.k, basis.n) == (k, n)
    assert basis.U.dtype == torch.float64 and basis.U.shape == (n, k)
    assert orth_err(basis.U) < 1e-12
    expected = torch.linalg.eigvalsh(C).flip(0)
    torch.testing.assert_close(basis.eigenvalues, expected[:k], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(basis.explained_variance_ratio, expected[:k] / expected.sum(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(C @ basis.U, basis.U * basis.eigenvalues, rtol=0, atol=1e-10)
    assert_sign_rule(basis.U)


def test_pca_basis_from_running_covariance_centered_and_not():
    x = torch.randn(200, 5, generator=gen(0)) + torch.tensor([4.0, 0, 0, 0, -2.0])
    acc = RunningCovariance(5)
    acc.add(x)
    rows = x.double()
    centered = pca_basis(acc, 2)
    torch.testing.assert_close(centered.eigenvalues, torch.linalg.eigvalsh(torch.cov(rows.T)).flip(0)[:2])
    uncentered = pca_basis(acc, 2, center=False)
    second = rows.T @ rows / rows.shape[0]
    torch.testing.assert_close(uncentered.eigenvalues, torch.linalg.eigvalsh(second).flip(0)[:2])
    # the mean direction dominates the uncentered second moment
    mean_dir = rows.mean(0) / rows.mean(0).norm()
    assert float((uncentered.U[:, 0] @ mean_dir).abs()) > 0.99


def test_pca_basis_is_deterministic_and_descending():
    C = spiked_covariance(7, seed=1)
    a, b = pca_basis(C, 4), pca_basis(C.clone(), 4)
    assert torch.equal(a.U, b.U)
    assert bool((a.eigenvalues[:-1] > a.eigenvalues[1:]).all())
    torch.testing.assert_close(a.eigenvalues, 1.0 / torch.arange(1, 5, dtype=torch.float64) ** 2)


def test_k_for_variance_on_known_spectrum():
    q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=gen(2))).Q
    C = q @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 1.0], dtype=torch.float64)) @ q.T  # cumulative .5 .8 .9 1
    assert [k_for_variance(C, t) for t in (0.5, 0.79, 0.8, 0.81, 0.9, 0.95, 1.0)] == [1, 2, 2, 3, 3, 4, 4]
    assert k_for_variance(C) == 3
    with pytest.raises(RwasymError, match="0 < threshold <= 1.*got 1.5"):
        k_for_variance(C, 1.5)


@pytest.mark.parametrize(
    ("cov", "k", "match"),
    [
        (torch.eye(4), 0, "k=0 must be a positive subspace dimension; choose 1 <= k <= n=4"),
        (torch.eye(4), 5, r"k=5 exceeds the dimension n=4 of the covariance matrix; choose 1 <= k <= n=4"),
        (torch.ones(3, 4), 1, r"square \(d, d\) covariance matrix; got shape \(3, 4\)"),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), 1, "non-finite"),
        (torch.tensor([[1.0, 0.5], [0.0, 1.0]]), 1, "must be symmetric"),
        (torch.tensor([[1.0, 0.0], [0.0, -1.0]]), 1, "not positive semidefinite"),
        (torch.zeros(3, 3), 1, "zero \\(total variance 0\\)"),
    ],
)
def test_pca_basis_errors(cov, k, match):
    with pytest.raises(RwasymError, match=match):
        unchecked(pca_basis)(cov, k)


def test_pca_basis_rejects_empty_statistics_and_other_types():
    with pytest.raises(RwasymError, match="no tokens were accumulated"):
        pca_basis(RunningCovariance(3), 1)
    with pytest.raises(RwasymError, match="covariance tensor or a rwasym.math.covariance.RunningCovariance; got list"):
        subspaces._as_covariance([[1.0]], center=True)


# ----------------------------------------------------------------------------- prediction_basis
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prediction_basis_matches_svd(dtype):
    W = torch.randn(12, 90, generator=gen(3)).to(dtype)
    basis = prediction_basis(W, 5)
    U, S, _ = torch.linalg.svd(W.double(), full_matrices=False)
    aligned = U[:, :5] * torch.sign((U[:, :5] * basis.U).sum(0))  # SVD signs are arbitrary
    torch.testing.assert_close(basis.U, aligned, rtol=0, atol=1e-10)
    torch.testing.assert_close(basis.eigenvalues, S[:5] ** 2, rtol=1e-10, atol=0)
    torch.testing.assert_close(basis.explained_variance_ratio, S[:5] ** 2 / (S**2).sum(), rtol=1e-10, atol=0)
    assert orth_err(basis.U) < 1e-12 and (basis.k, basis.n) == (5, 12)
    assert_sign_rule(basis.U)


def test_prediction_basis_chunked_gram_and_duck_typing(monkeypatch):
    W = torch.randn(8, 50, generator=gen(4))
    whole = prediction_basis(W, 3)
    monkeypatch.setattr(subspaces, "_GRAM_CHUNK_BYTES", 8 * 8 * 7)  # 7 vocab columns per chunk

    class Adapter:
        def unembedding(self):
            return W

    chunked = prediction_basis(Adapter(), 3)
    torch.testing.assert_close(chunked.U, whole.U, rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked.eigenvalues, whole.eigenvalues, rtol=1e-12, atol=0)


def test_prediction_basis_errors():
    with pytest.raises(RwasymError, match=r"k=9 exceeds the dimension n=8 of the unembedding's row space"):
        prediction_basis(torch.randn(8, 50), 9)
    with pytest.raises(RwasymError, match=r"k=4 exceeds d_vocab=3.*\(d_model, d_vocab\)"):
        prediction_basis(torch.randn(8, 3), 4)
    with pytest.raises(RwasymError, match="zero \\(total variance 0\\)"):
        prediction_basis(torch.zeros(4, 10), 1)
    W = torch.randn(4, 10)
    W[0, 9] = float("inf")
    with pytest.raises(RwasymError, match="unembedding contains 1 non-finite"):
        prediction_basis(W, 1)


# ----------------------------------------------------------------------------- random bases
def test_random_basis_is_orthonormal_float64_and_seeded():
    U = random_basis(10, 4, generator=gen(5))
    assert U.shape == (10, 4) and U.dtype == torch.float64 and orth_err(U) < 1e-12
    assert torch.equal(U, random_basis(10, 4, generator=gen(5)))
    assert not torch.equal(U, random_basis(10, 4, generator=gen(6)))


def test_random_basis_haar_moments():
    """E[UUᵀ] = (k/n) I, and E[U] = 0 (fails without the diag(R) sign correction)."""
    n, k, draws = 6, 2, 1000
    g = gen(7)
    frames = torch.stack([random_basis(n, k, generator=g) for _ in range(draws)])  # (draws, n, k)
    projector = (frames @ frames.transpose(1, 2)).mean(0)
    # P_ii ~ Beta(k/2, (n-k)/2): std 0.236 per draw -> 0.0075 for the mean; ~5.3 sigma
    torch.testing.assert_close(projector, torch.eye(n, dtype=torch.float64) * k / n, rtol=0, atol=0.04)
    assert float(frames.mean(0).abs().max()) < 5 * (1 / n) ** 0.5 / draws**0.5


def test_complement_basis_is_orthogonal_to_U():
    U = pca_basis(spiked_covariance(9, seed=8), 3)
    C = complement_basis(U, 4, generator=gen(9))
    assert C.shape == (9, 4) and orth_err(C) < 1e-12
    assert float((U.U.T @ C).abs().max()) < 1e-12
    full = torch.cat([U.U, complement_basis(U.U, 6, generator=gen(10))], dim=1)  # k = n - k_U
    torch.testing.assert_close(full @ full.T, torch.eye(9, dtype=torch.float64), rtol=0, atol=1e-12)


def test_complement_basis_is_uniform_on_the_complement():
    """E[C Cᵀ] = k/(n − k_U) · (I − U Uᵀ) for a uniformly random k-frame of the complement."""
    n, k_U, k, draws = 5, 2, 1, 1000
    U = random_basis(n, k_U, generator=gen(11))
    g = gen(12)
    frames = torch.stack([complement_basis(U, k, generator=g) for _ in range(draws)])
    projector = (frames @ frames.transpose(1, 2)).mean(0)
    expected = (torch.eye(n, dtype=torch.float64) - U @ U.T) * k / (n - k_U)
    torch.testing.assert_close(projector, expected, rtol=0, atol=0.04)  # entry std <= 0.3/sqrt(1000): ~4 sigma


def test_random_and_complement_basis_errors():
    with pytest.raises(RwasymError, match=r"k=5 exceeds the dimension n=4 of the ambient space R\^4"):
        random_basis(4, 5)
    with pytest.raises(RwasymError, match="n must be a positive integer; got n=0"):
        random_basis(0, 1)
    U = random_basis(5, 3, generator=gen(13))
    with pytest.raises(
        RwasymError,
        match=r"k=3 exceeds the dimension n=2 of the orthogonal complement of span\(U\) "
        r"\(ambient n=5 minus k_U=3\); choose 1 <= k <= n=2",
    ):
        complement_basis(U, 3)
    with pytest.raises(RwasymError, match="orthonormal columns.*max \\|UᵀU - I\\|"):
        complement_basis(2.0 * U, 1)


def test_k_reaching_is_the_smallest_k_whose_cumulative_ratio_reaches_the_threshold():
    """Brute force over k for random descending spectra; k_for_variance is k_reaching of its eigenvalue ratios."""
    from rwasym.math.subspaces import k_for_variance, k_reaching

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 30):
        for threshold in (0.1, 0.5, 0.9, 0.99, 1.0):
            ratio = torch.rand(n, generator=g, dtype=torch.float64).sort(descending=True).values
            ratio = ratio / ratio.sum()
            brute = next((k for k in range(1, n + 1) if float(ratio[:k].sum()) >= threshold - 1e-12), n)
            assert k_reaching(ratio, threshold) == brute, (n, threshold)
            C = torch.diag(ratio * 3.0)
            assert k_for_variance(C, threshold, center=False) == brute
