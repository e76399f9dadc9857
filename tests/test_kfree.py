"""The k-free score ρ_C (issue #29): its formula by hand, its Haar null (mean 1 and the closed-form spread)
against Monte Carlo Haar rotations, the fixed-k fraction as the special case C = projection, and the
factored ΔW against the dense one."""

import math

import pytest
import torch

from rwasym import RwasymError
from rwasym.math import LowRankDelta, kfree_score, null_moments, relative_fraction
from rwasym.math.subspaces import haar_frames


@pytest.mark.parametrize("side", ["input", "output"])
def test_rho_by_hand_and_its_haar_null_by_monte_carlo(side):
    g = torch.Generator().manual_seed(0)
    n_out, n_in = 7, 9
    delta = torch.randn(n_out, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, n_in, generator=g, dtype=torch.float64
    )
    n = n_in if side == "input" else n_out
    x = torch.randn(50, n, generator=g, dtype=torch.float64) * torch.linspace(3, 0.2, n, dtype=torch.float64)
    C = x.T @ x / 50  # anisotropic
    got = kfree_score(delta, C, side)
    quad = torch.trace(delta @ C @ delta.T) if side == "input" else torch.trace(delta.T @ C @ delta)
    assert got.rho == pytest.approx(float(n * quad / (torch.trace(C) * delta.square().sum())), rel=1e-12)
    Q = haar_frames(20000, n, n, g)  # uniform orthogonal matrices rotating ΔW's side
    A = delta.T @ delta if side == "input" else delta @ delta.T  # ΔW's Gram on that side
    # ρ of ΔW Q (input) or Q ΔW (output): n · tr(A Q C Qᵀ) / (tr C · ‖ΔW‖²), written out
    draws = n * torch.einsum("ij,bij->b", A, Q @ C @ Q.transpose(1, 2)) / (torch.trace(C) * delta.square().sum())
    se = float(draws.std()) / math.sqrt(len(draws))
    assert float(draws.mean()) == pytest.approx(1.0, abs=4 * se)
    assert float(draws.std()) == pytest.approx(got.null_std, rel=0.03)  # the closed form, within MC error
    assert got.z == pytest.approx((got.rho - 1) / got.null_std)


def test_projection_covariance_gives_r_and_its_null():
    """C = U Uᵀ (a rank-k projection): ρ_C = r(k) = f/(k/n), and its null spread is null_moments's / (k/n)."""
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(6, 10, generator=g, dtype=torch.float64)
    U = haar_frames(1, 10, 3, g)[0]
    got = kfree_score(delta, U @ U.T, "input")
    assert got.rho == pytest.approx(relative_fraction(delta, U, "input").relative, rel=1e-12)
    assert got.null_std == pytest.approx(null_moments(delta, "input", 3).std / (3 / 10), rel=1e-12)


def test_factored_delta_and_errors():
    g = torch.Generator().manual_seed(2)
    B, A = torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    C5, C8 = (
        torch.eye(5, dtype=torch.float64).diag_embed() if False else torch.diag(torch.arange(1.0, 6.0)),
        torch.diag(torch.arange(1.0, 9.0)),
    )
    for side, C in (("input", C5), ("output", C8)):
        dense, factored = kfree_score(0.5 * B @ A, C, side), kfree_score(LowRankDelta(B=B, A=A, scale=0.5), C, side)
        assert factored.rho == pytest.approx(dense.rho, rel=1e-12) and factored.null_std == pytest.approx(
            dense.null_std
        )
    assert kfree_score(B @ A, torch.eye(5, dtype=torch.float64), "input").rho == pytest.approx(1.0)  # isotropic C
    with pytest.raises(RwasymError, match="cov must be \\(5, 5\\)"):
        kfree_score(B @ A, C8, "input")
    with pytest.raises(RwasymError, match="trace"):
        kfree_score(B @ A, torch.zeros(5, 5), "input")


def test_gradient_shaped_delta_has_the_law_of_the_token_sum():
    """`gradient_shaped_delta` draws from S = Σ_t a_t a_tᵀ alone; brute force draws Σ_t ξ_t a_tᵀ token by token.
    Both must have E[ΔWᵀΔW] = n_out·S (uncentred: the inputs here have a large mean) and the energy share in a
    subspace must approach `gradient_shaped_fraction`, tr(UᵀSU)/tr S."""
    from rwasym.math import gradient_shaped_delta, gradient_shaped_fraction

    g = torch.Generator().manual_seed(0)
    n, T, n_out, draws = 5, 40, 3, 20000
    a = torch.randn(T, n, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5, 0.2, 0.1]) + 2.0
    S = a.T @ a
    fast = torch.stack([gradient_shaped_delta(S, n_out, g) for _ in range(draws)])  # (draws, n_out, n)
    xi = torch.randn(draws, n_out, T, generator=g, dtype=torch.float64)
    brute = xi @ a  # Σ_t ξ_t a_tᵀ for every draw
    for D in (fast, brute):
        gram = (D.transpose(1, 2) @ D).mean(0)
        # MC error of a Wishart mean: sd of an entry ≤ √(n_out (S_ii S_jj + S_ij²) / draws)
        sd = (n_out * (S.diagonal()[:, None] * S.diagonal()[None, :] + S.square()) / draws).sqrt()
        assert bool(((gram - n_out * S).abs() <= 5 * sd).all())
    U = torch.linalg.qr(torch.randn(n, 2, generator=g, dtype=torch.float64)).Q
    want = gradient_shaped_fraction(S, U)
    assert want == pytest.approx(float(torch.trace(U.T @ S @ U) / torch.trace(S)), rel=1e-12)
    for D in (fast, brute):
        share = float((D @ U).square().sum() / D.square().sum())
        assert share == pytest.approx(want, abs=0.01)
    # the centred covariance gives another law here: the test can tell them apart
    centred = (a - a.mean(0)).T @ (a - a.mean(0))
    assert abs(gradient_shaped_fraction(centred, U) - want) > 0.05


def test_kfree_rho_in_blocks_equals_the_whole_product(monkeypatch):
    """Above `_RHO_BLOCK` entries ρ's product ΔW C (or C ΔW) is formed in blocks: the same ρ to rounding."""
    import rwasym.math.fraction as fraction

    g = torch.Generator().manual_seed(4)
    D = torch.randn(40, 30, generator=g, dtype=torch.float64)
    A = torch.randn(30, 30, generator=g, dtype=torch.float64)
    B = torch.randn(40, 40, generator=g, dtype=torch.float64)
    whole = (fraction.kfree_rho(D, A @ A.T, "input"), fraction.kfree_rho(D, B @ B.T, "output"))
    monkeypatch.setattr(fraction, "_RHO_BLOCK", 100)  # blocks of 3 rows / 2 columns
    blocked = (fraction.kfree_rho(D, A @ A.T, "input"), fraction.kfree_rho(D, B @ B.T, "output"))
    assert blocked == pytest.approx(whole, rel=1e-13)


def test_gram_route_equals_the_direct_products():
    """`delta_gram` / `gram_rho` / `gram_energies` / `gram_spectrum` against `kfree_rho`, `column_energies`, the
    SVD, on both sides of a rectangular ΔW, and ⟨C, G⟩ against tr(ΔW C ΔWᵀ) written out."""
    from rwasym.math.fraction import column_energies, delta_gram, gram_energies, gram_rho, gram_spectrum, kfree_rho

    g = torch.Generator().manual_seed(3)
    D = torch.randn(30, 12, dtype=torch.float64, generator=g)
    for side, n in (("input", 12), ("output", 30)):
        A = torch.randn(n, 2 * n, dtype=torch.float64, generator=g)
        C = A @ A.T
        U = torch.linalg.qr(torch.randn(n, 5, dtype=torch.float64, generator=g)).Q
        G = delta_gram(D, side)
        assert G.shape == (n, n)
        assert gram_rho(G, C) == pytest.approx(kfree_rho(D, C, side), rel=1e-12)
        quad = torch.trace(D @ C @ D.T) if side == "input" else torch.trace(D.T @ C @ D)
        assert gram_rho(G, C) == pytest.approx(
            n * float(quad) / (float(C.trace()) * float(D.square().sum())), rel=1e-12
        )
        torch.testing.assert_close(gram_energies(G, U), column_energies(D, U, side), rtol=1e-12, atol=0)
    s = torch.linalg.svdvals(D).square()
    torch.testing.assert_close(
        gram_spectrum(delta_gram(D, "input"), (30, 12)).weights, s / s.sum(), rtol=1e-10, atol=1e-15
    )
    with pytest.raises(RwasymError, match="smaller Gram"):
        gram_spectrum(delta_gram(D, "output"), (30, 12))
