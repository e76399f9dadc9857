"""relative_fraction / random_null / fraction_curve against brute force and analytic oracles."""

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rwasym.math.fraction as probe_math
from rwasym.errors import RwasymError
from rwasym.math.fraction import FractionResult, NullResult, fraction_curve, log_k_grid, random_null, relative_fraction
from rwasym.math.subspaces import complement_basis, pca_basis, random_basis


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unchecked(fn):
    """The undecorated function: exercises rwasym's own guard even when a runtime type checker
    (jaxtyping import hook) would reject the input first."""
    return inspect.unwrap(fn)


def brute_force_fraction(delta: torch.Tensor, U: torch.Tensor, side: str) -> float:
    """Σ_j ‖ΔW u_j‖² (input) or Σ_j ‖ΔWᵀ u_j‖² (output) over columns, divided by Σ ΔW_ab², in loops."""
    D = delta.double()
    total = sum(float(D[a, b]) ** 2 for a in range(D.shape[0]) for b in range(D.shape[1]))
    inside = 0.0
    for j in range(U.shape[1]):
        image = D @ U[:, j] if side == "input" else D.T @ U[:, j]
        inside += sum(float(v) ** 2 for v in image)
    return inside / total


@st.composite
def problems(draw, min_codim: int = 0):
    """(delta, U, side, n, k): ΔW (n_out, n_in) Gaussian and U a Haar basis of the side's space."""
    n_out, n_in = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    side = draw(st.sampled_from(["input", "output"]))
    n = n_in if side == "input" else n_out
    if n - min_codim < 1:
        n_out, n_in, n = n_out + min_codim, n_in + min_codim, n + min_codim
    k = draw(st.integers(1, n - min_codim))
    g = gen(draw(st.integers(0, 2**20)))
    delta = torch.randn(n_out, n_in, dtype=torch.float64, generator=g)
    return delta, random_basis(n, k, generator=g), side, n, k, g


def embed(coeffs: torch.Tensor, U: torch.Tensor, side: str) -> torch.Tensor:
    """A delta whose side-space component lies in span(U): M Uᵀ (input) or U M (output)."""
    return coeffs @ U.T if side == "input" else U @ coeffs


# ----------------------------------------------------------------------------- relative_fraction
@settings(max_examples=25, deadline=None)
@given(problems())
def test_matches_brute_force_loop(problem):
    delta, U, side, n, k, _ = problem
    result = relative_fraction(delta.float(), U, side)
    assert isinstance(result, FractionResult) and (result.k, result.n, result.side) == (k, n, side)
    assert result.fraction == pytest.approx(brute_force_fraction(delta.float(), U, side), rel=1e-12, abs=1e-15)
    assert result.relative == pytest.approx(result.fraction * n / k, rel=1e-12)
    assert result.expected == k / n


@settings(max_examples=25, deadline=None)
@given(problems())
def test_delta_inside_span_gives_one(problem):
    delta, U, side, _, k, g = problem
    other = delta.shape[0] if side == "input" else delta.shape[1]
    coeffs = torch.randn(other, k, dtype=torch.float64, generator=g)
    inside = embed(coeffs if side == "input" else coeffs.T, U, side)
    assert relative_fraction(inside, U, side).fraction == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(problems(min_codim=1))
def test_complement_gives_zero_and_fractions_sum_to_one(problem):
    delta, U, side, n, k, g = problem
    U_perp = complement_basis(U, n - k, generator=g)
    other = delta.shape[0] if side == "input" else delta.shape[1]
    coeffs = torch.randn(other, n - k, dtype=torch.float64, generator=g)
    outside = embed(coeffs if side == "input" else coeffs.T, U_perp, side)
    assert relative_fraction(outside, U, side).fraction == pytest.approx(0.0, abs=1e-12)
    total = relative_fraction(delta, U, side).fraction + relative_fraction(delta, U_perp, side).fraction
    assert total == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(problems())
def test_invariant_to_rotating_the_basis_within_its_span(problem):
    delta, U, side, _, k, g = problem
    rotation = random_basis(k, k, generator=g)  # a random k × k orthogonal matrix
    expected = relative_fraction(delta, U, side).fraction
    assert relative_fraction(delta, U @ rotation, side).fraction == pytest.approx(expected, rel=1e-10, abs=1e-14)


def test_random_gaussian_delta_is_isotropic_on_average():
    """For Gaussian ΔW and any fixed U, E[f] = k/n exactly (ΔW's law is rotation invariant)."""
    U = pca_basis(torch.diag(torch.arange(12, 0, -1, dtype=torch.float64)), 3).U  # a fixed 3-dim basis of R^12
    g = gen(1)
    for side, shape in (("input", (5, 12)), ("output", (12, 7))):
        r = torch.tensor([relative_fraction(torch.randn(shape, generator=g), U, side).relative for _ in range(1000)])
        assert abs(float(r.mean()) - 1.0) < 5 * float(r.std()) / len(r) ** 0.5


def test_basis_object_and_low_precision_delta_are_accepted():
    C = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    basis = pca_basis(C, 2)  # e_1, e_2
    delta = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.bfloat16)
    result = relative_fraction(delta, basis, "input")
    assert (result.fraction, result.relative, result.k, result.n) == (0.5, 1.0, 2, 4)


@pytest.mark.parametrize(
    ("delta", "basis", "side", "match"),
    [
        (
            torch.randn(3, 5),
            random_basis(3, 2),
            "input",
            r"side='input' expects a basis with n_in \(columns of ΔW\) = 5 rows for ΔW of shape "
            r"\(n_out, n_in\) = \(3, 5\); got a basis of shape \(3, 2\).*use side='output'",
        ),
        (
            torch.randn(3, 5),
            random_basis(5, 2),
            "output",
            r"side='output' expects a basis with n_out \(rows of ΔW\) = 3",
        ),
        (torch.zeros(3, 5), random_basis(5, 2), "input", r"‖ΔW‖_F = 0.*matrices are\s+identical"),
        (torch.full((3, 5), float("nan")), random_basis(5, 2), "input", "15 non-finite value"),
        (torch.randn(3, 5), 2 * random_basis(5, 2), "input", "orthonormal columns"),
        (torch.randn(3, 5), torch.zeros(5, 0), "input", "k=0 columns"),
    ],
)
def test_relative_fraction_errors(delta, basis, side, match):
    with pytest.raises(RwasymError, match=match):
        relative_fraction(delta, basis, side)


def test_guards_behind_the_type_annotations():
    with pytest.raises(RwasymError, match=r"side must be one of \['input', 'output'\].*got side='read'"):
        unchecked(relative_fraction)(torch.randn(3, 5), random_basis(5, 2), "read")
    with pytest.raises(RwasymError, match="real floating-point dtype.*torch.int64"):
        unchecked(relative_fraction)(torch.ones(3, 5, dtype=torch.int64), random_basis(5, 2), "input")


# ----------------------------------------------------------------------------- random_null
def test_null_mean_converges_to_k_over_n():
    delta = torch.randn(9, 14, generator=gen(2)) * torch.linspace(0.1, 3.0, 14)  # anisotropic input side
    for side, n in (("input", 14), ("output", 9)):
        null = random_null(delta, side, 3, samples=6000, generator=gen(3))
        assert isinstance(null, NullResult) and (null.k, null.n, null.side) == (3, n, side)
        assert null.samples.shape == (6000,) and null.samples.dtype == torch.float64
        assert null.mean == 3 / n  # the exact moments; the samples agree within their error
        assert abs(null.sample_mean - 3 / n) < 5 * null.std / 6000**0.5
        assert null.sample_std == pytest.approx(float(null.samples.std()))
        assert null.sample_std == pytest.approx(null.std, rel=0.06)  # SE of a std at N = 6000: ~1-2%


def test_null_of_rank_one_delta_is_the_beta_law():
    """ΔW = x yᵀ: f = ‖Uᵀ ŷ‖² ~ Beta(k/2, (n−k)/2), variance 2k(n−k) / (n²(n+2))."""
    n, k, samples = 10, 3, 20000
    x, y = torch.randn(4, 1, generator=gen(4)), torch.randn(1, n, generator=gen(5))
    null = random_null(x @ y, "input", k, samples=samples, generator=gen(6))
    variance = 2 * k * (n - k) / (n**2 * (n + 2))
    assert null.mean == k / n and null.std**2 == pytest.approx(variance, rel=1e-12)
    assert abs(null.sample_mean - k / n) < 5 * variance**0.5 / samples**0.5
    assert null.sample_std**2 == pytest.approx(variance, rel=0.05)


def test_null_of_isotropic_delta_has_no_spread():
    Q = random_basis(8, 8, generator=gen(7))  # orthogonal: ΔWᵀΔW = I
    null = random_null(Q, "output", 2, samples=50, generator=gen(8))
    torch.testing.assert_close(null.samples, torch.full((50,), 2 / 8, dtype=torch.float64), rtol=0, atol=1e-12)


def test_null_matches_explicit_random_bases(monkeypatch):
    """The spectral shortcut has the law of f over explicit Haar bases applied to ΔW itself."""
    monkeypatch.setattr(probe_math, "_NULL_CHUNK_BYTES", 8 * 6 * 2 * 100)  # draws in chunks of 50
    delta = torch.randn(6, 5, generator=gen(9)).double() @ torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.2, 0.1]).double())
    q, r = torch.linalg.qr(torch.randn(3000, 6, 2, dtype=torch.float64, generator=gen(10)))
    frames = q * r.diagonal(dim1=-2, dim2=-1).sign().unsqueeze(-2)  # Haar (Mezzadri 2007), (3000, 6, 2)
    explicit = (frames.transpose(1, 2) @ delta).square().sum((1, 2)) / delta.square().sum()  # ‖UᵀΔW‖²/‖ΔW‖²
    null = random_null(delta, "output", 2, samples=3000, generator=gen(11))
    assert null.samples.shape == (3000,)
    spread = ((explicit.var() + null.samples.var()) / 3000) ** 0.5
    assert abs(null.sample_mean - float(explicit.mean())) < 5 * float(spread)
    assert null.sample_std == pytest.approx(float(explicit.std()), rel=0.1)
    assert null.std == pytest.approx(float(explicit.std()), rel=0.1)  # the exact std, same oracle


def test_null_is_seeded():
    delta = torch.randn(4, 6, generator=gen(12))
    a = random_null(delta, "input", 2, samples=30, generator=gen(13))
    assert torch.equal(a.samples, random_null(delta, "input", 2, samples=30, generator=gen(13)).samples)


def test_percentile_of_a_degenerate_null_is_100():
    """k = n: every draw is f = 1 up to rounding (above or below by ~1e-16), so a tie within 1e-12
    counts as <=; without it, the observed f = 1 read as a low percentile of its own null."""
    d = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    drawn = random_null(d, "input", 6, samples=200, generator=torch.Generator().manual_seed(1))
    assert float((drawn.samples - 1).abs().max()) < 1e-12
    rounded = NullResult(
        mean=1.0,
        std=0.0,
        samples=1 + torch.tensor([2.2e-16, -1.1e-16, 4.4e-16], dtype=torch.float64),
        k=6,
        n=6,
        side="input",
    )
    for null in (drawn, rounded):
        assert null.percentile_of(1.0) == 100.0
        assert null.percentile_of(1.0 - 1e-9) == 0.0  # a tie is only a rounding-close value


def test_percentile_of():
    null = NullResult(
        mean=0.25, std=0.1, samples=torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), k=1, n=4, side="input"
    )
    assert [null.percentile_of(v) for v in (0.0, 0.1, 0.25, 0.4, 0.9)] == [0.0, 25.0, 50.0, 100.0, 100.0]
    assert null.percentile_of(FractionResult(fraction=0.35, relative=1.4, k=1, n=4, side="input")) == 75.0
    with pytest.raises(
        RwasymError, match=r"\(k, n, side\)=\(2, 4, 'input'\) but this null was drawn for \(1, 4, 'input'\)"
    ):
        null.percentile_of(FractionResult(fraction=0.35, relative=0.7, k=2, n=4, side="input"))


def test_concentrated_delta_lies_above_the_null():
    U = random_basis(16, 2, generator=gen(14))
    delta = torch.randn(5, 2, dtype=torch.float64, generator=gen(15)) @ U.T
    delta = delta + 0.05 * torch.randn(5, 16, dtype=torch.float64, generator=gen(16))
    observed = relative_fraction(delta, U, "input")
    assert observed.relative > 5
    assert random_null(delta, "input", 2, samples=500, generator=gen(17)).percentile_of(observed) == 100.0


def test_random_null_errors():
    delta = torch.randn(3, 5)
    with pytest.raises(RwasymError, match=r"k=6 exceeds the dimension n=5 of the input space of ΔW"):
        random_null(delta, "input", 6)
    with pytest.raises(RwasymError, match="samples must be >= 2"):
        random_null(delta, "output", 1, samples=1)
    with pytest.raises(RwasymError, match="matrices are\\s+identical"):
        random_null(torch.zeros(3, 5), "output", 1)
    with pytest.raises(RwasymError, match=r"side must be one of \['input', 'output'\]"):
        unchecked(random_null)(delta, "in", 1)


# ----------------------------------------------------------------------------- fraction_curve
@pytest.mark.parametrize(("side", "n"), [("input", 7), ("output", 4)])
def test_fraction_curve_equals_relative_fraction_per_k(side, n):
    delta = torch.randn(4, 7, generator=gen(18))
    full = random_basis(n, n, generator=gen(19))
    ks, f, r = fraction_curve(delta, full, side)
    assert ks.tolist() == list(range(1, n + 1))
    for k, fk, rk in zip(ks.tolist(), f.tolist(), r.tolist()):
        single = relative_fraction(delta, full[:, :k], side)
        assert fk == pytest.approx(single.fraction, rel=1e-12)
        assert rk == pytest.approx(single.relative, rel=1e-12)
    assert float(f[-1]) == pytest.approx(1.0, abs=1e-12)  # the full basis holds all of ΔW


def test_fraction_curve_selected_ks_and_errors():
    delta = torch.randn(5, 9, generator=gen(20))
    basis = pca_basis(torch.cov(torch.randn(50, 9, generator=gen(21)).T), 6)
    curve = fraction_curve(delta, basis, "input", ks=torch.tensor([4, 1, 6]))
    assert curve.ks.tolist() == [4, 1, 6]
    assert curve.fraction[0] == pytest.approx(relative_fraction(delta, basis.U[:, :4], "input").fraction, rel=1e-12)
    with pytest.raises(RwasymError, match=r"1 <= k <= m=6.*out-of-range values \[0, 7\]"):
        fraction_curve(delta, basis, "input", ks=[0, 3, 7])
    with pytest.raises(RwasymError, match=r"\[\] \(empty\)"):
        fraction_curve(delta, basis, "input", ks=[])


# ----------------------------------------------------------------------------- log_k_grid
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 10_000))
def test_log_k_grid(n):
    expected = sorted({2**i for i in range(15) if 2**i < n} | {n})
    assert log_k_grid(n) == expected


def test_log_k_grid_examples_and_error():
    assert log_k_grid(1) == [1] and log_k_grid(8) == [1, 2, 4, 8] and log_k_grid(10) == [1, 2, 4, 8, 10]
    with pytest.raises(RwasymError, match="n must be a positive integer; got n=0"):
        log_k_grid(0)
