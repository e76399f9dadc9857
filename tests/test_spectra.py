"""Tests for rwasym.math.spectra and rwasym.math.svd, each against an independent oracle
(numpy brute force, a hand formula, or a planted ground truth)."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rwasym.errors import RwasymError
from rwasym.math.spectra import alpha_req, lifecycle, parse_matrix_name, rankme, rankme_from_cov, spikiness
from rwasym.math.svd import REBUILD_MODES, post_training_svd, rebuild

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64)


def _orth(n: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(_randn(n, n, seed=seed))
    return q * torch.sign(torch.diagonal(r))


def _small_rotation(n: int, angle: float, seed: int) -> torch.Tensor:
    a = _randn(n, n, seed=seed)
    return torch.linalg.matrix_exp(angle * (a - a.T) / 2)  # orthogonal, det 1, near I


def _np_rankme(z: np.ndarray, eps: float = 1e-7) -> float:
    s = np.linalg.svd(z, compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def _json_ok(d) -> None:
    json.dumps(d, allow_nan=False)  # raises on NaN/Inf or non-plain types


# ----------------------------------------------------------------------------- RankMe


def test_rankme_isotropic_gaussian_is_close_to_d():
    assert rankme(_randn(4000, 32, seed=1)) == pytest.approx(32, rel=0.10)


def test_rankme_of_rank_r_matrix_is_at_most_r():
    r = 5
    z = _randn(500, r, seed=2) @ _randn(r, 64, seed=3)
    value = rankme(z)
    assert 1.0 <= value <= r + 0.01
    assert value > 3.0  # a generic rank-5 product is far from rank 1


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 40), seed=st.integers(0, 10_000), eps=st.sampled_from([0.0, 1e-7, 1e-3]))
def test_rankme_matches_numpy_bruteforce(n, d, seed, eps):
    z = np.random.default_rng(seed).standard_normal((n, d)) * np.geomspace(1, 1e-3, d)
    assert rankme(torch.from_numpy(z), eps=eps) == pytest.approx(_np_rankme(z, eps), rel=1e-10)


def test_rankme_low_precision_input_is_computed_in_float64():
    z = _randn(300, 16, seed=4).to(torch.bfloat16)
    assert rankme(z) == pytest.approx(_np_rankme(z.double().numpy()), rel=1e-12)


@pytest.mark.parametrize("n,d", [(200, 16), (64, 64), (40, 16)])
def test_rankme_from_cov_equals_rankme(n, d):
    z = _randn(n, d, seed=5) * torch.linspace(2.0, 0.1, d, dtype=F64)
    assert rankme_from_cov(z.T @ z) == pytest.approx(rankme(z), rel=1e-9)
    assert rankme_from_cov(z.T @ z / n) == pytest.approx(rankme(z), rel=1e-9)  # scale-free


def test_rankme_from_cov_n_samples_matches_when_n_below_d():
    z = _randn(6, 20, seed=6)
    c = z.T @ z  # 20 x 20 of rank 6
    assert rankme_from_cov(c, n_samples=6) == pytest.approx(rankme(z), rel=1e-6)
    # without n_samples the 14 extra zero eigenvalues each add an eps term
    assert rankme_from_cov(c) > rankme(z)


# ----------------------------------------------------------------------------- alpha-ReQ


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5])
def test_alpha_req_exact_power_law_covariance(alpha):
    d = 64
    lam = torch.arange(1, d + 1, dtype=F64) ** (-alpha)
    q = _orth(d, seed=7)
    res = alpha_req(cov=q @ torch.diag(lam) @ q.T)
    assert res.alpha == pytest.approx(alpha, abs=1e-8)
    assert res.intercept == pytest.approx(0.0, abs=1e-8)  # lambda_1 = 1
    assert res.r2 == pytest.approx(1.0, abs=1e-10)
    assert (res.lo, res.hi, res.d) == (1, 32, 64)  # documented default range 1..floor(d/2)
    _json_ok(res.to_dict())


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5])
def test_alpha_req_from_samples(alpha):
    d, n = 64, 20_000
    lam = torch.arange(1, d + 1, dtype=F64) ** (-alpha)
    z = _randn(n, d, seed=8) * lam.sqrt() @ _orth(d, seed=9).T + 3.0  # offset: centring matters
    assert alpha_req(z).alpha == pytest.approx(alpha, abs=0.05)


def test_alpha_req_index_range_and_negligible_tail():
    lam = torch.cat([torch.arange(1, 9, dtype=F64) ** -2.0, torch.zeros(8, dtype=F64)])
    res = alpha_req(cov=torch.diag(lam))  # default hi = 8, all 8 non-zero -> kept
    assert (res.hi, res.alpha) == (8, pytest.approx(2.0))
    res = alpha_req(cov=torch.diag(lam), index_range=(3, 14))  # zeros skipped: hi lowered to 8
    assert (res.lo, res.hi, res.alpha) == (3, 8, pytest.approx(2.0))


def test_alpha_req_errors():
    c = torch.diag(torch.arange(1, 9, dtype=F64) ** -1.0)
    for bad in [(0, 4), (4, 4), (2, 9)]:
        with pytest.raises(RwasymError, match=r"index_range=.* out of range for d=8"):
            alpha_req(cov=c, index_range=bad)
    with pytest.raises(RwasymError, match="exactly one of Z"):
        alpha_req(_randn(10, 8), cov=c)
    with pytest.raises(RwasymError, match="exactly one of Z"):
        alpha_req()
    with pytest.raises(RwasymError, match="at least 2"):
        alpha_req(_randn(1, 8))
    with pytest.raises(RwasymError, match="non-negligible"):
        alpha_req(cov=torch.diag(torch.tensor([1.0, 0, 0, 0], dtype=F64)))


# ----------------------------------------------------------------------------- spikiness


def test_spikiness_hand_computed_diag():
    lam = [4.0, 2.0, 1.0, 1.0]
    p = np.array(lam) / 8.0
    q = _orth(4, seed=10)
    res = spikiness(q @ torch.diag(torch.tensor(lam, dtype=F64)) @ q.T)
    assert res.top1_share == pytest.approx(0.5)
    assert res.participation_ratio == pytest.approx(64 / 22)
    assert res.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert res.d == 4
    _json_ok(res.to_dict())


def test_spikiness_isotropic_and_rank_one():
    iso = spikiness(torch.eye(10, dtype=F64) * 3.0)
    assert (iso.top1_share, iso.participation_ratio, iso.effective_rank) == pytest.approx((0.1, 10.0, 10.0))
    u = _randn(10, seed=11)
    one = spikiness(torch.outer(u, u))
    assert (one.top1_share, one.participation_ratio, one.effective_rank) == pytest.approx((1.0, 1.0, 1.0), abs=1e-9)


def test_covariance_input_errors():
    with pytest.raises(RwasymError, match="not symmetric"):
        spikiness(torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(RwasymError, match="not positive semidefinite"):
        spikiness(torch.diag(torch.tensor([1.0, -1.0])))
    with pytest.raises(RwasymError, match="no positive eigenvalue"):
        rankme_from_cov(torch.zeros(3, 3))
    with pytest.raises(RwasymError, match="contains 1 non-finite value.*: 1 NaN and 0 Inf"):
        spikiness(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]).triu())


@pytest.mark.parametrize("call", [rankme, lambda z: alpha_req(z)])
def test_geometry_input_errors(call):
    with pytest.raises(RwasymError, match=r"is empty \(shape \(0, 4\)\)"):
        call(torch.zeros(0, 4))
    z = _randn(20, 4)
    z[3, 1] = float("inf")
    with pytest.raises(RwasymError, match="0 NaN and 1 Inf.*nan_to_num"):
        call(z)
    z[3, 1] = float("nan")
    with pytest.raises(RwasymError, match="1 NaN and 0 Inf"):
        call(z)


def test_rankme_zero_matrix_error():
    with pytest.raises(RwasymError, match="all zeros"):
        rankme(torch.zeros(5, 3))


# ----------------------------------------------------------------------------- post-training SVD


def test_post_training_svd_identical_weights():
    w = _randn(12, 8, seed=12)
    res = post_training_svd(w, w.clone())
    eye = torch.eye(8, dtype=F64)
    assert res.k == 8 and (res.n_out, res.n_in) == (12, 8)
    assert (res.ratio_mean, res.ratio_min, res.ratio_max) == pytest.approx((1, 1, 1))
    assert res.ratio_std == pytest.approx(0, abs=1e-12)
    assert torch.allclose(res.R_U, eye, atol=1e-10) and torch.allclose(res.R_V, eye, atol=1e-10)
    assert res.consistency == pytest.approx(0, abs=1e-10)
    assert (res.orth_defect_u, res.orth_defect_v) == pytest.approx((0, 0), abs=1e-10)
    assert (res.diag_dominance_u, res.diag_dominance_v) == pytest.approx((1, 1))
    assert (res.fit_slope, res.fit_intercept, res.fit_r2) == pytest.approx((1, 0, 1), abs=1e-10)
    _json_ok(res.to_dict())
    _json_ok(res.to_dict(include_rotations=True))


def test_post_training_svd_uniform_scaling():
    c = 1.7
    w = _randn(10, 16, seed=13)
    res = post_training_svd(w, c * w, k=6)
    assert res.k == 6 and len(res.sigma_base) == 6
    assert (res.ratio_mean, res.ratio_min, res.ratio_max) == pytest.approx((c, c, c))
    assert res.fit_slope == pytest.approx(1.0)
    assert res.fit_intercept == pytest.approx(math.log(c))
    assert res.consistency == pytest.approx(0, abs=1e-10)


def test_post_training_svd_power_map_of_spectrum():
    u, v = _orth(8, seed=14), _orth(8, seed=15)
    s = torch.linspace(5.0, 0.5, 8, dtype=F64)
    s2 = 2.0 * s**0.8  # monotone: order preserved
    res = post_training_svd(u @ torch.diag(s) @ v.T, u @ torch.diag(s2) @ v.T)
    assert (res.fit_slope, res.fit_intercept, res.fit_r2) == pytest.approx((0.8, math.log(2), 1))
    ratio = (s2 / s).numpy()
    assert res.ratio_mean == pytest.approx(ratio.mean())
    assert res.ratio_std == pytest.approx(ratio.std())
    assert res.consistency == pytest.approx(0, abs=1e-10)


@pytest.mark.parametrize("shape,k", [((9, 9), None), ((12, 8), 5), ((7, 11), 7)])
def test_post_training_svd_rotations_match_bruteforce(shape, k):
    n_out, n_in = shape
    w = _randn(n_out, n_in, seed=16)
    ql, qr = _small_rotation(n_out, 0.1, seed=17), _small_rotation(n_in, 0.1, seed=18)
    res = post_training_svd(w, ql @ w @ qr.T, k=k)
    # oracle: the SVD of Q_L W Q_R^T is (Q_L U) Sigma (Q_R V)^T, so R_U = U^T Q_L U, R_V = V^T Q_R V
    kk = k or min(shape)
    U, _, Vt = np.linalg.svd(w.numpy(), full_matrices=False)
    ru = U[:, :kk].T @ ql.numpy() @ U[:, :kk]
    rv = Vt[:kk] @ qr.numpy() @ Vt[:kk].T
    assert res.consistency == pytest.approx(np.linalg.norm(ru - rv) / np.sqrt(2 * kk), rel=1e-6)
    assert res.orth_defect_u == pytest.approx(np.linalg.norm(ru.T @ ru - np.eye(kk)), abs=1e-9)
    assert res.orth_defect_v == pytest.approx(np.linalg.norm(rv.T @ rv - np.eye(kk)), abs=1e-9)
    assert res.diag_dominance_u == pytest.approx(np.abs(np.diag(ru)).mean(), rel=1e-9)
    # numpy's sign choice conjugates R by a diagonal +-1 matrix: compare magnitudes
    assert np.allclose(res.R_U.abs().numpy(), np.abs(ru), atol=1e-8)
    # signs aligned jointly so that u_i . u'_i >= 0: a small rotation keeps diag(R) positive
    assert (torch.diagonal(res.R_U) > 0).all() and (torch.diagonal(res.R_V) > 0).all()
    assert res.ratio_mean == pytest.approx(1.0)
    assert 0 < res.consistency < 0.2


def test_post_training_svd_consistent_versus_inconsistent_rotation():
    u, v = _orth(8, seed=19), _orth(8, seed=20)
    s = torch.diag(torch.linspace(4.0, 1.0, 8, dtype=F64))
    r = _small_rotation(8, 0.5, seed=21)
    w = u @ s @ v.T
    # U R S R^T V^T: the SVD of the symmetric R S R^T shares left and right vectors -> R_U = R_V
    same = post_training_svd(w, u @ r @ s @ r.T @ v.T)
    assert same.consistency == pytest.approx(0, abs=1e-8)
    assert same.diag_dominance_u < 0.99  # a real rotation happened
    # U R S V^T rotates only the left side: R_U != R_V
    left_only = post_training_svd(w, u @ r @ s @ v.T)
    assert left_only.consistency > 0.1


def test_post_training_svd_errors():
    w = _randn(6, 4)
    with pytest.raises(RwasymError, match=r"shape \(6, 4\) but W_tuned has shape \(4, 6\)"):
        post_training_svd(w, w.T.contiguous())
    for k in (0, 5):
        with pytest.raises(RwasymError, match=r"k=\d is out of range.*1 <= k <= .* = 4"):
            post_training_svd(w, w, k=k)
    low = _randn(6, 2, seed=1) @ _randn(2, 4, seed=2)
    with pytest.raises(RwasymError, match="only 2 non-zero singular.*pass k <= 2"):
        post_training_svd(low, w)
    assert post_training_svd(low, w, k=2).k == 2
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(RwasymError, match="W_tuned.*1 NaN"):
        post_training_svd(w, bad)
    with pytest.raises(RwasymError, match="W_base is empty"):
        post_training_svd(torch.zeros(0, 4), torch.zeros(0, 4))


# ----------------------------------------------------------------------------- rebuild


@pytest.mark.parametrize("shape", [(9, 9), (12, 7), (5, 10)])
def test_rebuild_tuned_reproduces_w_tuned(shape):
    a, b = _randn(*shape, seed=22), _randn(*shape, seed=23)
    out = rebuild(a.float(), b, "tuned")
    assert out.dtype == F64 and out.shape == shape
    assert torch.allclose(out, b, atol=1e-10, rtol=0)


def test_rebuild_oracles_on_pure_rotation_and_pure_scaling():
    w = _randn(10, 7, seed=24)
    ql, qr = _small_rotation(10, 0.3, seed=25), _small_rotation(7, 0.3, seed=26)
    rotated = ql @ w @ qr.T  # same singular values as w
    assert torch.allclose(rebuild(w, rotated, "tuned_rotation_base_sigma"), rotated, atol=1e-10)
    assert torch.allclose(rebuild(w, rotated, "tuned_scaling_only"), w, atol=1e-10)
    scaled = 2.5 * w  # same singular vectors as w
    assert torch.allclose(rebuild(w, scaled, "tuned_scaling_only"), scaled, atol=1e-10)
    assert torch.allclose(rebuild(w, scaled, "identity_rotation"), scaled, atol=1e-10)
    assert torch.allclose(rebuild(w, scaled, "tuned_rotation_base_sigma"), w, atol=1e-10)


def test_rebuild_break_consistency():
    w, wt = _randn(7, 10, seed=27), _randn(7, 10, seed=28)  # n_in > n_out: row space bites
    broken = rebuild(w, wt, "break_consistency", seed=3)
    # singular values are those of W_tuned; row space is W_base's; seeded; != W_tuned
    assert torch.allclose(torch.linalg.svdvals(broken), torch.linalg.svdvals(wt), atol=1e-10)
    U, _, Vh = np.linalg.svd(w.numpy(), full_matrices=False)
    proj = Vh.T @ Vh
    assert np.allclose(broken.numpy() @ proj, broken.numpy(), atol=1e-10)
    assert torch.equal(broken, rebuild(w, wt, "break_consistency", seed=3))
    assert torch.equal(broken, rebuild(w, wt, "break_consistency", generator=_gen(3)))
    assert not torch.allclose(broken, rebuild(w, wt, "break_consistency", seed=4))
    assert (broken - wt).norm() > 0.1 * wt.norm()
    # when W_tuned = W_base the break is a random right rotation: consistency becomes O(1)
    res = post_training_svd(w, rebuild(w, w, "break_consistency", seed=5))
    assert res.ratio_mean == pytest.approx(1.0) and res.consistency > 0.3


def test_rebuild_errors():
    w = _randn(4, 3)
    with pytest.raises(RwasymError, match="unknown mode 'bogus'.*tuned_scaling_only"):
        rebuild(w, w, "bogus")
    with pytest.raises(RwasymError, match="shape"):
        rebuild(w, _randn(3, 4), "tuned")
    assert len(REBUILD_MODES) == 5


# ----------------------------------------------------------------------------- lifecycle


def test_parse_matrix_name():
    assert parse_matrix_name("blocks.3.attn.W_Q") == (3, "attn.W_Q")
    assert parse_matrix_name("blocks.12.mlp.W_out") == (12, "mlp.W_out")
    assert parse_matrix_name("unembed.W_U") == (None, "unembed.W_U")


def _model_weights(seed: int) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    out = {}
    for layer in range(2):
        for kind in ("W_Q", "W_K", "W_V"):
            out[f"blocks.{layer}.attn.{kind}"] = torch.randn(8, 16, generator=g)
        out[f"blocks.{layer}.mlp.W_out"] = torch.randn(16, 32, generator=g)
    return out


def test_lifecycle_matches_per_matrix_bruteforce():
    weights = {0: _model_weights(30), 100: _model_weights(31)}
    lc = lifecycle(weights, top_k=3)
    assert len(lc.rows) == 16 and lc.steps == [0, 100]
    for row in lc.rows:
        w = weights[row.step][row.name].double().numpy()
        s = np.linalg.svd(w, compute_uv=False)  # per-matrix loop, independent of batching
        assert np.allclose(row.singular_values, s, rtol=1e-10)
        assert row.stable_rank == pytest.approx(np.linalg.norm(w, "fro") ** 2 / np.linalg.norm(w, 2) ** 2)
        assert row.effective_rank == pytest.approx(_np_rankme(w), rel=1e-10)
        assert row.top_k_energy == pytest.approx((s[:3] ** 2).sum() / (s**2).sum())
        assert (row.layer, row.kind) == parse_matrix_name(row.name)
        assert (row.n_out, row.n_in) == w.shape
    rows = lc.to_rows()
    assert "singular_values" not in rows[0] and rows[0]["step"] == 0
    _json_ok(lc.to_dict())


def _planted(step_of_min: int, steps, d: int = 12) -> dict[int, torch.Tensor]:
    """W_t = U diag(s_t) V^T; s_t decays faster (lower effective rank) the closer t is to the
    planted step."""
    u, v = _orth(d, seed=40), _orth(d, seed=41)
    out = {}
    for t in steps:
        decay = 1.0 / (1.0 + abs(t - step_of_min) / 100.0)
        s = torch.exp(-3.0 * decay * torch.arange(d, dtype=F64))
        out[t] = u @ torch.diag(s) @ v.T
    return out


def test_lifecycle_compression_timing_finds_planted_minimum():
    steps = [0, 100, 200, 300, 400, 500]
    plant = {"blocks.0.attn.W_Q": 300, "blocks.1.attn.W_Q": 100, "blocks.0.attn.W_V": 500}
    traj = {name: _planted(t, steps) for name, t in plant.items()}
    lc = lifecycle({t: {name: traj[name][t] for name in plant} for t in steps})
    timing = {row["name"]: row for row in lc.compression_timing()}
    assert {name: row["step_of_min"] for name, row in timing.items()} == plant
    assert [row["name"] for row in lc.compression_timing()] == [
        "blocks.0.attn.W_Q",
        "blocks.0.attn.W_V",
        "blocks.1.attn.W_Q",
    ]  # by layer, kind
    q1 = timing["blocks.1.attn.W_Q"]
    assert q1["compression"] == pytest.approx(q1["effective_rank_first"] - q1["effective_rank_min"])
    # kind_summary averages layers 0 and 1 of attn.W_Q at each step
    summary = {(r["kind"], r["step"]): r for r in lc.kind_summary()}
    by = {(r.name, r.step): r for r in lc.rows}
    for t in steps:
        s = summary[("attn.W_Q", t)]
        assert s["n_matrices"] == 2
        expect = (by[("blocks.0.attn.W_Q", t)].stable_rank + by[("blocks.1.attn.W_Q", t)].stable_rank) / 2
        assert s["stable_rank_mean"] == pytest.approx(expect)
        assert summary[("attn.W_V", t)]["n_matrices"] == 1


def test_lifecycle_zero_matrix_gives_none_and_is_skipped_in_timing():
    w = _randn(4, 4, seed=50)
    lc = lifecycle({0: {"blocks.0.attn.W_O": torch.zeros(4, 4)}, 10: {"blocks.0.attn.W_O": w}})
    row0 = lc.to_rows()[0]
    assert row0["stable_rank"] is None and row0["effective_rank"] is None
    assert lc.compression_timing()[0]["step_of_min"] == 10
    _json_ok(lc.to_dict())


def test_lifecycle_errors():
    w = _randn(4, 6)
    with pytest.raises(RwasymError, match="weights_by_step is empty"):
        lifecycle({})
    with pytest.raises(RwasymError, match="step=5 has no matrices"):
        lifecycle({5: {}})
    with pytest.raises(RwasymError, match=r"top_k=0 is out of range"):
        lifecycle({0: {"a": w}}, top_k=0)
    with pytest.raises(RwasymError, match=r"'a' has shape \(6, 4\) at step 1 but \(4, 6\) at step 0"):
        lifecycle({0: {"a": w}, 1: {"a": w.T}})
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(RwasymError, match=r"weights_by_step\[1\]\['a'\].*1 NaN"):
        lifecycle({0: {"a": w}, 1: {"a": bad}})
    with pytest.raises(RwasymError, match="is empty"):
        lifecycle({0: {"a": torch.zeros(0, 3)}})
    assert lifecycle({0: {"a": w}}, top_k=100).rows[0].top_k == 4  # clipped to min(n_out, n_in)
