"""The Haar null of the probe: exact moments and the fast spectral sampler against brute force.

The oracle draws explicit Haar bases (sign-corrected QR of Gaussian n × k matrices, written out
below) and applies them to the dense ΔW itself: none of `rwasym.math.fraction`'s null code runs in
it. Tolerances come from the Monte-Carlo error: the SE of a mean is σ/√N, of a variance
√((μ₄ − σ⁴)/N); the two-sample KS threshold is c(α)·√((N₁ + N₂)/(N₁N₂)) at α = 1e-4.
"""

import math

import pytest
import torch

import rwasym
from rwasym.analyses.probe import probe
from rwasym.errors import RwasymError
from rwasym.math.fraction import (
    DeltaSpectrum,
    NullMoments,
    delta_spectrum,
    log_k_grid,
    null_fractions,
    null_moments,
    random_null,
)
from rwasym.math.lowrank import LowRankDelta
from rwasym.models import head_slice

pytestmark = pytest.mark.usefixtures("one_thread")  # small batched QRs: one thread is fastest here

DRAWS = 20_000
KS_ALPHA = 1e-4


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ the oracle
def explicit_haar_bases(draws: int, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(draws, n, k) Haar-uniform orthonormal frames: Q of QR(Gaussian) times sign(diag R)
    (Mezzadri 2007)."""
    q, r = torch.linalg.qr(torch.randn(draws, n, k, dtype=torch.float64, generator=g))
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs[signs == 0] = 1.0
    return q * signs.unsqueeze(-2)


def brute_null(
    delta: torch.Tensor, side: str, k: int, draws: int, g: torch.Generator, chunk: int = 2000
) -> torch.Tensor:
    """f = ‖ΔW U‖²/‖ΔW‖² (input) or ‖UᵀΔW‖²/‖ΔW‖² (output) over `draws` explicit Haar bases U."""
    D = delta.double()
    n = D.shape[1] if side == "input" else D.shape[0]
    total = D.square().sum()
    out = []
    for start in range(0, draws, chunk):
        U = explicit_haar_bases(min(chunk, draws - start), n, k, g)
        image = U.transpose(1, 2) @ (D.T if side == "input" else D)  # (U ᵀΔWᵀ = (ΔW U)ᵀ) or UᵀΔW
        out.append(image.square().sum((1, 2)) / total)
    return torch.cat(out)


def variance_se(x: torch.Tensor) -> float:
    """Standard error of the sample variance: √((μ₄ − σ⁴)/N)."""
    c = x - x.mean()
    return math.sqrt(max(float(c.pow(4).mean() - c.square().mean() ** 2), 0.0) / x.numel())


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """sup_x |F_a(x) − F_b(x)| of the two empirical CDFs."""
    a, b = a.sort().values, b.sort().values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True).double() / a.numel()
    fb = torch.searchsorted(b, grid, right=True).double() / b.numel()
    return float((fa - fb).abs().max())


def ks_threshold(n1: int, n2: int, alpha: float = KS_ALPHA) -> float:
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n1 + n2) / (n1 * n2))


def assert_same_law(fast: torch.Tensor, brute: torch.Tensor) -> None:
    """KS below its α = 1e-4 threshold, and the fast sampler's quantiles sit at the right level of
    the brute-force ECDF (F_brute(q_fast(p)) = p within 5 SE of a two-sample proportion)."""
    assert ks_statistic(fast, brute) < ks_threshold(fast.numel(), brute.numel())
    for p in (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99):
        q = torch.quantile(fast, p)
        level = float((brute <= q).double().mean())
        se = math.sqrt(p * (1 - p) * (1 / fast.numel() + 1 / brute.numel()))
        assert abs(level - p) < 5 * se + 1 / fast.numel(), (p, level)


# ------------------------------------------------------------------------------ test deltas
def spiky(n_out: int, n_in: int, sigmas, seed: int) -> torch.Tensor:
    """U diag(σ) Vᵀ with Haar U, V: a delta with a prescribed (spiky) spectrum."""
    g = gen(seed)
    r = len(sigmas)
    U = explicit_haar_bases(1, n_out, r, g)[0]
    V = explicit_haar_bases(1, n_in, r, g)[0]
    return U @ torch.diag(torch.tensor(sigmas, dtype=torch.float64)) @ V.T


def lowrank(n_out: int, n_in: int, r: int, seed: int) -> LowRankDelta:
    g = gen(seed)
    return LowRankDelta(
        torch.randn(n_out, r, dtype=torch.float64, generator=g),
        torch.randn(r, n_in, dtype=torch.float64, generator=g),
        scale=0.5,
    )


def dense(d) -> torch.Tensor:
    return d.materialize() if isinstance(d, LowRankDelta) else d


DELTAS = {
    "gaussian": lambda: torch.randn(12, 20, dtype=torch.float64, generator=gen(1)),
    "anisotropic": lambda: (
        torch.randn(12, 20, dtype=torch.float64, generator=gen(2)) * torch.linspace(0.05, 3.0, 20).double()
    ),
    "lowrank": lambda: lowrank(16, 20, 3, seed=3),
    "spiky": lambda: spiky(14, 18, [100.0, 10.0, 3.0, 1.0, 0.3, 0.1], seed=4),
}


def ks_for(n: int) -> list[int]:
    """k = 1, a small k, k > n/2, n − 1 and n."""
    return sorted({1, 3, n // 2 + 2, n - 1, n})


# ------------------------------------------------------------------------------ (a) exact moments
@pytest.mark.parametrize("name", list(DELTAS))
@pytest.mark.parametrize("side", ["input", "output"])
def test_closed_form_moments_match_explicit_haar_bases(name, side):
    delta = DELTAS[name]()
    D = dense(delta)
    n = D.shape[1] if side == "input" else D.shape[0]
    spectrum = delta_spectrum(delta)
    for j, k in enumerate(ks_for(n)):
        exact = null_moments(delta, side, k)
        assert isinstance(exact, NullMoments)
        assert exact == null_moments(spectrum, side, k)  # a precomputed spectrum gives the same numbers
        mc = brute_null(D, side, k, DRAWS, gen(100 + j))
        if k == n:
            assert exact == (1.0, 0.0)
            torch.testing.assert_close(mc, torch.ones_like(mc), rtol=0, atol=1e-12)
            continue
        assert exact.mean == k / n
        assert abs(float(mc.mean()) - exact.mean) < 4.5 * float(mc.std()) / math.sqrt(DRAWS), (k, "mean")
        assert abs(float(mc.var()) - exact.std**2) < 5 * variance_se(mc), (k, "variance")


def test_k1_is_the_quadratic_form_of_a_uniform_unit_vector():
    """k = 1: f = uᵀSu for u uniform on S^{n−1}, tr S = 1. E[(uᵀSu)²] = (tr(S)² + 2 tr(S²))/(n(n+2))
    (the fourth moment of the sphere), so Var f = (1 + 2 s₂)/(n(n+2)) − 1/n² — derived without the Beta law."""
    D = DELTAS["anisotropic"]()
    for side, S in (("input", D.T @ D), ("output", D @ D.T)):
        S = S / torch.trace(S)
        n, s2 = S.shape[0], float(torch.trace(S @ S))
        variance = (1 + 2 * s2) / (n * (n + 2)) - 1 / n**2
        got = null_moments(D, side, 1)
        assert got.mean == pytest.approx(1 / n, rel=1e-14)
        assert got.std**2 == pytest.approx(variance, rel=1e-10)


def test_extreme_spectra_have_the_known_moments():
    n = 10
    for k in range(1, n):  # rank one: f = ‖Uᵀ ŷ‖² ~ Beta(k/2, (n−k)/2)
        beta_var = (k / 2) * ((n - k) / 2) / ((n / 2) ** 2 * (n / 2 + 1))
        got = null_moments(torch.outer(torch.randn(4).double(), torch.randn(n).double()), "input", k)
        assert got.std**2 == pytest.approx(beta_var, rel=1e-10)
    Q = explicit_haar_bases(1, n, n, gen(5))[0]  # ΔWᵀΔW = I: every subspace holds exactly k/n
    assert null_moments(Q, "output", 3).std < 1e-7
    assert null_moments(torch.ones(1, 1), "input", 1) == (1.0, 0.0)  # n = 1 forces k = n


# ------------------------------------------------------------------------------ (b) the fast sampler
# (delta, side, k): which branch of the sampler each case exercises (r nonzero weights, m = n − r, k' = min(k, n − k))
SAMPLER_CASES = {
    "bartlett (m >= k')": ("gaussian", "input", 3),  # r = 12, n = 20, m = 8
    "complement + bartlett": ("gaussian", "input", 15),  # k' = 5
    "m = 0": ("gaussian", "output", 4),  # n = r = 12
    "complement, m = 0": ("anisotropic", "output", 9),  # k' = 3
    "0 < m < k'": ("tall", "output", 5),  # n = 20, r = 18, m = 2
    "lowrank bartlett": ("lowrank", "input", 4),  # r = 3, m = 17
    "lowrank complement": ("lowrank", "output", 13),  # n = 16, k' = 3
    "spiky": ("spiky", "input", 2),
    "k = 1": ("spiky", "output", 1),
}


def _case_delta(name):
    if name == "tall":
        return torch.randn(20, 18, dtype=torch.float64, generator=gen(6))
    return DELTAS[name]()


@pytest.mark.parametrize("case", list(SAMPLER_CASES))
def test_fast_sampler_has_the_law_of_explicit_haar_bases(case):
    name, side, k = SAMPLER_CASES[case]
    delta = _case_delta(name)
    fast = null_fractions(delta, side, k, DRAWS, gen(7))
    brute = brute_null(dense(delta), side, k, DRAWS, gen(8))
    assert fast.shape == (DRAWS,) and fast.dtype == torch.float64
    assert float(fast.min()) >= -1e-12 and float(fast.max()) <= 1 + 1e-12
    assert_same_law(fast, brute)
    exact = null_moments(delta, side, k)  # and its moments are the exact ones
    assert abs(float(fast.mean()) - exact.mean) < 4.5 * exact.std / math.sqrt(DRAWS)
    assert abs(float(fast.var()) - exact.std**2) < 5 * variance_se(fast)


def test_fast_sampler_full_space_is_exactly_one():
    delta = DELTAS["lowrank"]()
    assert torch.equal(null_fractions(delta, "input", 20, 7, gen(9)), torch.ones(7, dtype=torch.float64))
    assert torch.equal(
        random_null(torch.randn(1, 3), "output", 1, 5, gen(9)).samples, torch.ones(5, dtype=torch.float64)
    )
    assert null_fractions(delta, "input", 4, 0, gen(9)).shape == (0,)


def test_random_null_reports_exact_moments_and_samples():
    delta = DELTAS["spiky"]()
    null = random_null(delta, "input", 4, samples=5000, generator=gen(10))
    assert (null.mean, null.std) == null_moments(delta, "input", 4)
    assert null.sample_mean == float(null.samples.mean()) and null.sample_std == float(null.samples.std())
    assert abs(null.sample_mean - null.mean) < 5 * null.std / math.sqrt(5000)


# ------------------------------------------------------------------------------ (c) reproducibility
def test_sampler_is_reproducible_from_the_generator():
    delta = DELTAS["anisotropic"]()
    for side, k in (("input", 3), ("input", 15), ("output", 2)):
        a, b = null_fractions(delta, side, k, 300, gen(11)), null_fractions(delta, side, k, 300, gen(11))
        assert torch.equal(a, b)
        assert not torch.equal(a, null_fractions(delta, side, k, 300, gen(12)))
    g1, g2 = gen(13), gen(13)  # a shared generator advances: successive calls differ, the sequence repeats
    first = [random_null(delta, "input", 3, 50, g1).samples for _ in range(3)]
    second = [random_null(delta, "input", 3, 50, g2).samples for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert not torch.equal(first[0], first[1])
    torch.manual_seed(5)  # generator=None: torch's global generator decides
    c = null_fractions(delta, "input", 3, 20)
    torch.manual_seed(5)
    assert torch.equal(c, null_fractions(delta, "input", 3, 20))


def test_factored_and_dense_deltas_give_the_same_samples():
    d = DELTAS["lowrank"]()
    assert delta_spectrum(d).weights.shape == delta_spectrum(d.materialize()).weights.shape == (3,)
    for side, k in (("input", 4), ("output", 13)):
        torch.testing.assert_close(
            null_fractions(d, side, k, 200, gen(14)),
            null_fractions(d.materialize(), side, k, 200, gen(14)),
            rtol=1e-10,
            atol=1e-14,
        )


def test_null_errors():
    delta = torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(RwasymError, match=r"k=6 exceeds the dimension n=5 of the input space"):
        null_moments(delta, "input", 6)
    with pytest.raises(RwasymError, match=r"k=4 exceeds the dimension n=3 of the output space"):
        null_fractions(delta_spectrum(delta), "output", 4, 10)
    with pytest.raises(RwasymError, match="‖ΔW‖_F = 0"):
        null_moments(torch.zeros(3, 5), "input", 1)
    with pytest.raises(RwasymError, match="samples must be >= 0"):
        null_fractions(delta, "input", 1, -1)
    with pytest.raises(RwasymError, match="summing to 1"):
        DeltaSpectrum(weights=torch.tensor([0.5, 0.2], dtype=torch.float64), shape=(3, 5))
    with pytest.raises(RwasymError, match="1 <= r <= min"):
        DeltaSpectrum(weights=torch.full((4,), 0.25, dtype=torch.float64), shape=(3, 5))


# ------------------------------------------------------------------------------ (d) the probe
@pytest.fixture(scope="module")
def planted(native_cfg):
    """(base, tuned, tokens, deltas): random planted ΔW on W_Q (read) and W_O (write) of block 0."""
    base = rwasym.load(native_cfg)
    tuned = rwasym.load(native_cfg)
    g = gen(20)
    deltas = {}
    for name, scale in (("blocks.0.attn.W_Q", torch.linspace(0.2, 2.0, 32)), ("blocks.0.attn.W_O", torch.ones(32))):
        d = torch.randn(32, 32, dtype=torch.float64, generator=g) * scale.double()  # anisotropic input side for W_Q
        tuned.set_weight(name, base.weight(name) + d)
        deltas[name] = d
    tokens = torch.randint(0, base.d_vocab, (8, 16), generator=gen(21))
    return base, tuned, tokens, deltas


def _by_hand(d: torch.Tensor, side: str, k: int) -> tuple[float, float]:
    """k/n and √(2k(n−k)(n s₂ − 1) / (n²(n+2)(n−1))), s₂ from ΔW's singular values."""
    n = d.shape[1] if side == "input" else d.shape[0]
    s = torch.linalg.svdvals(d.double()).square()
    s2 = float((s / s.sum()).square().sum())
    if k == n:
        return 1.0, 0.0
    return k / n, math.sqrt(2 * k * (n - k) * (n * s2 - 1) / (n**2 * (n + 2) * (n - 1)))


def test_probe_null_is_the_closed_form_and_its_percentile_the_brute_force_one(planted):
    base, tuned, tokens, _ = planted
    names = ["blocks.0.attn.W_Q", "blocks.0.attn.W_O"]
    samples = 2000
    res = probe(base, tuned, tokens, k=4, null_samples=samples, matrices=names, heads=True, progress=False)
    deltas = rwasym.weight_deltas(base, tuned, names)  # the probe's own ΔW (float32 weights subtracted)
    checked = 0
    for row in res.rows:
        spec = base.matrix(row["matrix"])
        d = deltas[row["matrix"]] if row["head"] is None else head_slice(spec, deltas[row["matrix"]], row["head"])
        mean, std = _by_hand(d, row["side"], row["k"])
        assert row["null_mean"] == pytest.approx(mean, rel=1e-12)
        assert row["null_std"] == pytest.approx(std, rel=1e-9)
        checked += 1
        if row["head"] is None:  # every whole-matrix row: both subspaces, residual and inner sides
            brute = brute_null(d, row["side"], row["k"], DRAWS, gen(22 + checked))
            p = float((brute <= row["fraction"]).double().mean())  # brute-force percentile, in [0, 1]
            se = math.sqrt(max(p * (1 - p), 1e-4) * (1 / samples + 1 / DRAWS))
            assert abs(row["null_percentile"] / 100 - p) < 5 * se + 1 / samples, (
                row["matrix"],
                row["null_percentile"],
                p,
            )
    assert checked == len(res.rows) and any(r["head"] is not None for r in res.rows)
    assert 0 < min(r["null_percentile"] for r in res.rows if r["head"] is None) < 50  # the check is not vacuous
    assert res.curves
    for curve in res.curves:
        d, n = deltas[curve["matrix"]], curve["n"]
        assert curve["ks"] == log_k_grid(n)
        expected = [_by_hand(d, curve["side"], k)[1] * n / k for k in curve["ks"]]
        assert curve["null_relative_std"] == pytest.approx(expected, rel=1e-9, abs=1e-15)
        assert curve["null_relative_std"][-1] == 0.0  # k = n: every subspace holds all of ΔW


def test_probe_null_switches_and_seed(planted):
    base, tuned, tokens, _ = planted
    kw = dict(k=4, matrices="blocks.0.attn.W_Q", heads=False, progress=False)
    off = probe(base, tuned, tokens, null_samples=0, curve_null_samples=0, **kw)
    assert all(r["null_mean"] is None and r["null_std"] is None and r["null_percentile"] is None for r in off.rows)
    assert all(c["null_relative_std"] == [] for c in off.curves)
    a, b = (probe(base, tuned, tokens, null_samples=50, seed=s, **kw) for s in (0, 1))
    assert [(r["null_mean"], r["null_std"]) for r in a.rows] == [(r["null_mean"], r["null_std"]) for r in b.rows]
    assert [c["null_relative_std"] for c in a.curves] == [c["null_relative_std"] for c in b.curves]
    assert [r["null_percentile"] for r in a.rows] != [r["null_percentile"] for r in b.rows]  # only the draws move


# ------------------------------------------------------------------------------ (e) a real delta
def test_null_of_a_real_weight_spectrum(real_folder):
    """ΔW with the spectrum of a real matrix (SmolLM2 layer 0 W_K, 192 × 576, plus a small
    perturbation): closed form and fast sampler against explicit Haar bases on both sides."""
    from safetensors import safe_open

    with safe_open(str(real_folder(1) / "model.safetensors"), "pt") as fh:
        W = fh.get_tensor("model.layers.0.self_attn.k_proj.weight").double()
    D = W + 0.01 * float(W.std()) * torch.randn(W.shape, dtype=torch.float64, generator=gen(30))
    s = delta_spectrum(D)
    assert s.s2 > 2 / min(D.shape)  # a real matrix is far from isotropic
    draws = 6000
    for side, k in (("input", 8), ("output", 8)):
        exact = null_moments(s, side, k)
        brute = brute_null(D, side, k, draws, gen(31), chunk=500)
        assert abs(float(brute.mean()) - exact.mean) < 4.5 * float(brute.std()) / math.sqrt(draws)
        assert abs(float(brute.var()) - exact.std**2) < 5 * variance_se(brute)
        fast = null_fractions(s, side, k, 10_000, gen(32))
        assert_same_law(fast, brute)
    for k in (170, 190):  # complement branch on the real spectrum: sampler moments against the closed form
        exact, fast = null_moments(s, "output", k), null_fractions(s, "output", k, 10_000, gen(33))
        assert abs(float(fast.mean()) - exact.mean) < 4.5 * exact.std / math.sqrt(10_000)
        assert abs(float(fast.var()) - exact.std**2) < 5 * variance_se(fast)


def test_probe_draws_one_null_per_matrix_head_side_and_k(planted, monkeypatch):
    """The null's law depends on ΔW's spectrum, the side and k only: the activation and the
    prediction rows of one side share one set of draws, and each row's percentile is that set's."""
    from rwasym.analyses import probe as probe_module

    base, tuned, tokens, _ = planted
    drawn = []
    real = probe_module.random_null

    def recording(spectrum, side, k, samples, generator):
        out = real(spectrum, side, k, samples, generator)
        drawn.append(out)
        return out

    monkeypatch.setattr(probe_module, "random_null", recording)
    names = ["blocks.0.attn.W_Q", "blocks.0.attn.W_O", "blocks.1.mlp.W_out"]
    res = probe(base, tuned, tokens, k=4, null_samples=64, matrices=names, heads=True, progress=False)
    keys = {(r["matrix"], r["head"], r["side"], r["k"]) for r in res.rows}
    assert len(drawn) == len(keys) < len(res.rows)
    for row in res.rows:  # the percentile of every row is one of the drawn sets' percentiles of its f
        assert any(
            row["null_percentile"] == null.percentile_of(row["fraction"])
            and null.k == row["k"]
            and null.side == row["side"]
            for null in drawn
        ), row["matrix"]


def test_wide_delta_spectrum_from_its_gram_equals_the_svd():
    """Both sides ≥ 1024: σ² from the smaller Gram's eigenvalues; oracle: the SVD of the same ΔW (either
    orientation), and a planted rank-5 ΔW keeps exactly 5 weights (the Gram's rounding eigenvalues dropped)."""
    from rwasym.math import fraction

    g = gen(40)
    D = torch.randn(1100, 1030, dtype=torch.float64, generator=g) * torch.linspace(0.1, 3.0, 1030, dtype=torch.float64)
    assert min(D.shape) >= fraction.GRAM_FROM
    sv = torch.linalg.svdvals(D).square()
    for M in (D, D.T):
        w = delta_spectrum(M).weights
        assert w.shape == (1030,) and delta_spectrum(M).shape == tuple(M.shape)
        torch.testing.assert_close(w, sv / sv.sum(), rtol=1e-9, atol=1e-15)
    low = torch.randn(1200, 5, dtype=torch.float64, generator=g) @ torch.randn(
        5, 1100, dtype=torch.float64, generator=g
    )
    w = delta_spectrum(low).weights
    s5 = torch.linalg.svdvals(low)[:5].square()
    assert w.shape == (5,)
    torch.testing.assert_close(w, s5 / s5.sum(), rtol=1e-9, atol=1e-15)
