"""RunningCovariance against torch.cov / hand-computed sums over the concatenated data."""

import inspect

import pytest
import torch

from rwasym.errors import RwasymError
from rwasym.math.covariance import RunningCovariance

D = 6


def unchecked(fn):
    """The undecorated function: exercises rwasym's own guard even when a runtime type checker
    (jaxtyping import hook) would reject the input first."""
    return inspect.unwrap(fn)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def make_batches(dtype: torch.dtype, seed: int = 0):
    """Four (batch, pos, D) batches with a nonzero mean and correlated features, plus bool masks."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(D, D, generator=g)
    batches, masks = [], []
    for b, pos in [(2, 5), (3, 7), (1, 4), (4, 3)]:
        x = torch.randn(b, pos, D, generator=g) @ mix + 3.0
        batches.append(x.to(dtype))
        masks.append(torch.rand(b, pos, generator=g) > 0.3)
    return batches, masks


def selected_rows(batches, masks) -> torch.Tensor:
    """The oracle's data: all kept rows, concatenated, exactly cast to float64."""
    return torch.cat([x.double()[m] for x, m in zip(batches, masks)])  # (N, D)


@pytest.mark.parametrize("gram_dtype", [None, torch.float64], ids=["fp32-products", "float64-products"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_matches_torch_cov_over_masked_batches(dtype, gram_dtype):
    batches, masks = make_batches(dtype)
    acc = RunningCovariance(D, gram_dtype=gram_dtype)
    for x, m in zip(batches, masks):
        acc.add(x, weight_mask=m)
    rows = selected_rows(batches, masks)
    # float32 batch products (the default below float64 inputs): measured ~3e-8; float64: ~1e-16
    tol = 1e-10 if dtype == torch.float64 or gram_dtype == torch.float64 else 1e-6
    assert acc.count == rows.shape[0]
    assert acc.mean().dtype == torch.float64
    assert rel_err(acc.mean(), rows.mean(0)) < 1e-10  # the sum is float64 always
    assert rel_err(acc.covariance(), torch.cov(rows.T)) < tol
    assert rel_err(acc.covariance(unbiased=False), torch.cov(rows.T, correction=0)) < tol
    assert rel_err(acc.second_moment(), rows.T @ rows / rows.shape[0]) < tol
    assert torch.equal(acc.covariance(center=False), acc.second_moment())


def test_wide_sites_use_block_sized_temporaries_with_the_same_numbers(monkeypatch):
    """issue #31 (8B widths): `covariance` is formed by row blocks (bit-equal to the whole-matrix expression
    (S − N μμᵀ)/(N − 1), symmetrised), and a site at least `_BLOCKED_ABOVE` wide adds its float32 product in
    column blocks (equal to the one-product sum up to the float32 product's rounding, ~1e-7 relative)."""
    import rwasym.math.covariance as cov_module

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 40, 37, generator=g) * 3 + 1
    whole = RunningCovariance(37)
    for batch in x:
        whole.add(batch)
    s, n = whole.scatter, whole.count
    mu = whole.mean()
    by_hand = (s - n * torch.outer(mu, mu)) / (n - 1)
    assert torch.equal(whole.covariance(), 0.5 * (by_hand + by_hand.T))  # one block (the default at d = 37)
    monkeypatch.setattr(cov_module, "_COV_BLOCK_BYTES", 8 * 37 * 5)  # row blocks of 5
    assert torch.equal(whole.covariance(), 0.5 * (by_hand + by_hand.T))
    monkeypatch.setattr(cov_module, "_BLOCKED_ABOVE", 16)
    monkeypatch.setattr(cov_module, "_PRODUCT_BLOCK", 8)
    blocked = RunningCovariance(37)
    for batch in x:
        blocked.add(batch)
    assert float((blocked.scatter - s).abs().max()) <= 1e-6 * float(s.abs().max()) and blocked.scatter is not s
    assert torch.equal(blocked.mean(), mu)


def test_unmasked_add_flattens_leading_axes():
    x = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(1))
    acc = RunningCovariance(D)
    acc.add(x)
    assert acc.count == 12
    assert rel_err(acc.covariance(), torch.cov(x.reshape(-1, D).double().T)) < 1e-6  # float32 products


def test_input_with_grad_is_accepted_and_detached():
    x = torch.randn(10, D, requires_grad=True)
    acc = RunningCovariance(D)
    acc.add(x * 2)
    assert not acc.covariance().requires_grad


def test_merge_equals_single_accumulator():
    batches, masks = make_batches(torch.float32, seed=2)
    whole, left, right = RunningCovariance(D), RunningCovariance(D), RunningCovariance(D)
    for i, (x, m) in enumerate(zip(batches, masks)):
        whole.add(x, m)
        (left if i < 2 else right).add(x, m)
    merged = left.merge(right)
    assert merged is left and merged.count == whole.count
    assert rel_err(merged.covariance(), whole.covariance()) < 1e-12
    assert rel_err(merged.mean(), whole.mean()) < 1e-12

    summed = RunningCovariance(D)
    summed += right
    summed += RunningCovariance(D)  # an empty shard is a no-op
    assert summed.count == right.count
    assert torch.equal(summed.state_dict()["sum_outer"], right.state_dict()["sum_outer"])


def test_merge_rejects_other_dimension():
    with pytest.raises(RwasymError, match=r"dimensions differ \(5 != 6\)"):
        RunningCovariance(D).merge(RunningCovariance(5))


def test_state_dict_round_trip_and_resume(tmp_path):
    batches, masks = make_batches(torch.bfloat16, seed=3)
    full = RunningCovariance(D)
    for x, m in zip(batches, masks):
        full.add(x, m)

    first = RunningCovariance(D)
    for x, m in zip(batches[:2], masks[:2]):
        first.add(x, m)
    torch.save(first.state_dict(), tmp_path / "stats.pt")
    state = torch.load(tmp_path / "stats.pt", weights_only=True)
    assert set(state) == {"dim", "count", "sum", "sum_outer"}
    assert isinstance(state["count"], int) and isinstance(state["dim"], int)

    resumed = RunningCovariance.from_state_dict(state, name="resumed")
    assert resumed.count == first.count
    assert torch.equal(resumed.covariance(), first.covariance())
    for x, m in zip(batches[2:], masks[2:]):
        resumed.add(x, m)
    assert rel_err(resumed.covariance(), full.covariance()) < 1e-12


def test_state_dict_is_a_copy():
    acc = RunningCovariance(D)
    acc.add(torch.randn(5, D))
    state = acc.state_dict()
    acc.add(torch.randn(5, D))
    assert state["count"] == 5 and not torch.equal(state["sum"], acc.state_dict()["sum"])


def test_load_state_dict_errors():
    acc = RunningCovariance(D)
    with pytest.raises(RwasymError, match=r"missing keys \['sum_outer'\]"):
        acc.load_state_dict({"dim": D, "count": 1, "sum": torch.zeros(D)})
    with pytest.raises(RwasymError, match="state dict has dim=4 but"):
        acc.load_state_dict(RunningCovariance(4).state_dict())
    bad = RunningCovariance(D).state_dict() | {"sum_outer": torch.zeros(D)}
    with pytest.raises(RwasymError, match=r"state\['sum_outer'\] must be a tensor of shape \(6, 6\)"):
        acc.load_state_dict(bad)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_input_names_the_statistic(bad_value):
    acc = RunningCovariance(D, name="blocks.0.attn.hook_in")
    x = torch.randn(4, D)
    x[2, 1] = bad_value
    with pytest.raises(RwasymError, match=r"'blocks\.0\.attn\.hook_in'.*1 non-finite value"):
        acc.add(x)
    assert acc.count == 0  # nothing half-added


def test_float32_products_are_centred_so_a_large_mean_costs_no_accuracy():
    """Rows with mean 1000 and unit spread (a residual stream's massive activations): the float32
    product about the batch mean keeps the covariance to ~1e-7; the uncentred float32 product
    Σ a aᵀ − N μ μᵀ would lose it to cancellation (its entries are 1e6 times the covariance's)."""
    g = torch.Generator().manual_seed(3)
    batches = [1000.0 + torch.randn(256, D, generator=g) for _ in range(4)]
    acc = RunningCovariance(D)
    for x in batches:
        acc.add(x)
    rows = torch.cat(batches).double()
    ref = torch.cov(rows.T)
    assert rel_err(acc.covariance(), ref) < 1e-5
    f = torch.cat(batches)
    naive = ((f.T @ f).double() - rows.shape[0] * torch.outer(rows.mean(0), rows.mean(0))) / (rows.shape[0] - 1)
    assert rel_err(naive, ref) > 1e-2  # what the centring avoids


def test_non_finite_values_in_masked_out_rows_are_ignored():
    x = torch.randn(4, D)
    x[3] = float("nan")  # e.g. a padded position
    mask = torch.tensor([True, True, True, False])
    acc = RunningCovariance(D)
    acc.add(x, weight_mask=mask)
    assert rel_err(acc.covariance(), torch.cov(x[:3].double().T)) < 1e-6  # float32 products


def test_input_validation_messages():
    acc = RunningCovariance(D)
    with pytest.raises(RwasymError, match=r"trailing dimension d=6; got shape \(4, 5\)"):
        acc.add(torch.randn(4, 5))
    with pytest.raises(RwasymError, match="real floating-point dtype.*torch.int64"):
        unchecked(RunningCovariance.add)(acc, torch.ones(4, D, dtype=torch.int64))
    with pytest.raises(RwasymError, match="weight_mask must be a bool tensor.*torch.float32"):
        unchecked(RunningCovariance.add)(acc, torch.randn(4, D), torch.ones(4))
    with pytest.raises(RwasymError, match=r"weight_mask shape \(3,\) must equal the leading shape \(4,\)"):
        unchecked(RunningCovariance.add)(acc, torch.randn(4, D), torch.ones(3, dtype=torch.bool))
    with pytest.raises(RwasymError, match="dim must be a positive integer; got dim=0"):
        RunningCovariance(0)


def test_empty_accumulator_readouts_explain_the_fix():
    acc = RunningCovariance(D)
    acc.add(torch.randn(2, 3, D), weight_mask=torch.zeros(2, 3, dtype=torch.bool))
    for readout in (acc.mean, acc.second_moment, acc.covariance):
        with pytest.raises(RwasymError, match="no tokens were accumulated.*check the data / attention mask"):
            readout()


def test_single_token_unbiased_covariance_needs_two():
    acc = RunningCovariance(D)
    acc.add(torch.randn(1, D))
    with pytest.raises(RwasymError, match="count=1 token.*at least 2.*unbiased=False"):
        acc.covariance()
    assert torch.count_nonzero(acc.covariance(unbiased=False)) == 0  # one point has zero spread


def test_t975_is_the_student_t_quantile_for_every_df():
    """t975(df) against the t CDF integrated numerically (Simpson, 20,000 intervals): CDF = 0.975
    to 1e-6 for df in 1..30 (3-decimal table) and well above (the expansion), and seed_interval
    uses it (n = 41 seeds: df = 40, no longer the normal 1.96)."""
    import math

    from rwasym.math.inference import seed_interval, t975

    def cdf(t, df):
        c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        n, h = 20000, t / 20000
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    for df in (1, 2, 5, 30):
        assert abs(cdf(t975(df), df) - 0.975) < 1e-3 / df  # the table has 3 decimals
    for df in (31, 40, 60, 120, 1000):
        assert abs(cdf(t975(df), df) - 0.975) < 1e-6, df
    xs = [float(i % 7) for i in range(41)]
    ci = seed_interval(xs)
    mean = sum(xs) / 41
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / 40)
    assert ci["ci_high"] - mean == pytest.approx(t975(40) * std / math.sqrt(41), rel=1e-12)
    assert t975(40) > 2.02 > 1.96
    with pytest.raises(RwasymError, match="df >= 1"):
        t975(0)


# -- written to kill surviving mutants of rwasym.math.inference (tests/MUTATION.md) ----------------
def test_seed_interval_small_n_by_hand():
    from rwasym.math.inference import seed_interval

    assert seed_interval([2.5, None]) == dict(n=1, mean=2.5, std=None, ci_low=None, ci_high=None)
    got = seed_interval([1.0, 3.0])  # n = 2: std √2, half-width t975(1)·√2/√2 = 12.706
    assert got == dict(
        n=2,
        mean=2.0,
        std=pytest.approx(2**0.5),
        ci_low=pytest.approx(2.0 - 12.706),
        ci_high=pytest.approx(2.0 + 12.706),
    )
    with pytest.raises(RwasymError, match="at least one value"):
        seed_interval([None])


def test_t975_table_boundary_and_expansion_terms():
    from rwasym.math.inference import t975

    assert t975(30) == 2.042 and t975(1) == 12.706  # the table up to df = 30, the expansion above
    assert 2.0395 < t975(31) < 2.0396 and 1.95996 < t975(10**9) < 1.95997
    with pytest.raises(RwasymError, match="df >= 1"):
        t975(0)


def test_permutation_and_bootstrap_edge_cases():
    from rwasym.math.inference import bootstrap_ci, permutation_pvalue

    assert permutation_pvalue([1.0], [2.0]) == 1.0  # one target, one control: 2 splits, both as extreme
    for bad in (([], [1.0, 2.0]), ([1.0, 2.0], [])):
        with pytest.raises(RwasymError, match="non-empty"):
            permutation_pvalue(*bad)
        with pytest.raises(RwasymError, match="non-empty"):
            bootstrap_ci(*bad)
    for level in (0.0, 1.0, 1.5):
        with pytest.raises(RwasymError, match="level"):
            bootstrap_ci([1.0, 2.0], [3.0], level=level)
    x, y = [0.3, 1.2], [0.1, -0.4]  # C(4, 2) = 6 splits: exact when n_permutations >= 6
    assert permutation_pvalue(x, y, n_permutations=6) * 6 == pytest.approx(round(permutation_pvalue(x, y) * 6))
    mc = [permutation_pvalue(x + [0.5], y + [0.7], n_permutations=5, seed=None if i < 0 else 4) for i in range(2)]
    assert mc[0] == mc[1] and (mc[0] * 6) == pytest.approx(round(mc[0] * 6))  # seeded Monte Carlo: (1 + k)/6
    assert bootstrap_ci([1.0, 2.0, 4.0], [0.0, 1.0]) == bootstrap_ci([1.0, 2.0, 4.0], [0.0, 1.0], seed=0)


@pytest.mark.parametrize("center", [True, False])
def test_covariance_consume_forms_c_in_the_sums_storage(center):
    """covariance(consume=True) returns the bits of covariance() in S's own storage (no second d × d matrix);
    afterwards the count and mean remain and everything that needs S raises an RwasymError that says why."""
    g = torch.Generator().manual_seed(0)
    acc = RunningCovariance(40)
    for _ in range(3):
        acc.add(torch.randn(7, 5, 40, generator=g))
    want, mu, n = acc.covariance(center=center), acc.mean().clone(), acc.count
    storage = acc.scatter.data_ptr()
    got = acc.covariance(center=center, consume=True)
    assert torch.equal(got, want) and got.data_ptr() == storage
    assert acc.count == n and torch.equal(acc.mean(), mu)
    for use in (
        lambda: acc.scatter,
        acc.second_moment,
        acc.covariance,
        acc.state_dict,
        lambda: acc.add(torch.ones(2, 40)),
    ):
        with pytest.raises(RwasymError, match="consume=True"):
            use()


def test_finiteness_is_checked_in_chunks_and_still_finds_every_bad_entry(monkeypatch):
    """`require_finite` checks large contiguous tensors in chunks (no temporary the size of the input); a NaN or
    Inf in the last chunk, or in a non-contiguous view, is still found and counted."""
    from rwasym.math import checks

    monkeypatch.setattr(checks, "_FINITE_CHUNK", 7)
    x = torch.zeros(10, 9, dtype=torch.float64)
    assert checks.require_finite(x, "x") is x
    x[9, 8] = float("nan")
    with pytest.raises(RwasymError, match="1 non-finite value.*1 NaN and 0 Inf"):
        checks.require_finite(x, "x")
    y = torch.zeros(10, 9, dtype=torch.float64)
    y[3, 0] = float("inf")
    with pytest.raises(RwasymError, match="0 NaN and 1 Inf"):
        checks.require_finite(y.T, "y")  # a transposed view: checked whole


# ------------------------------------------------ t tests of per-seed values (issue #30's endpoints)
def test_t_sf_one_sample_t_and_tost_equal_scipy():
    import numpy as np

    stats = pytest.importorskip("scipy.stats")
    from rwasym.math.inference import one_sample_t, t_sf, tost

    for df in (1, 2, 3, 4, 7.5, 30, 200):
        for t in (-5.0, -1.3, 0.0, 0.2, 1.0, 2.13, 3.0, 8.0, 40.0):
            want = float(stats.t.sf(t, df))
            assert t_sf(t, df) == pytest.approx(want, rel=1e-12, abs=1e-300), (t, df)
    x = [0.3, 0.5, 0.1, 0.45, 0.2]
    for alt in ("greater", "less"):
        got = one_sample_t(x, 0.1, alt)
        want = stats.ttest_1samp(x, 0.1, alternative=alt)
        assert got["p"] == pytest.approx(float(want.pvalue), rel=1e-12) and got["t"] == pytest.approx(want.statistic)
    eq = tost(x, 0.6)
    p_low = stats.ttest_1samp(x, -0.6, alternative="greater").pvalue
    p_high = stats.ttest_1samp(x, 0.6, alternative="less").pvalue
    assert eq["p"] == pytest.approx(max(p_low, p_high), rel=1e-12)
    half = stats.t.ppf(0.95, 4) * np.std(x, ddof=1) / np.sqrt(5)
    assert eq["ci90"] == pytest.approx((np.mean(x) - half, np.mean(x) + half), rel=1e-9)
    assert tost(x, 0.2)["p"] > 0.05  # the interval reaches past a narrow margin: no equivalence
    with pytest.raises(RwasymError, match="every value is the same"):
        one_sample_t([1.0, 1.0, 1.0])
    with pytest.raises(RwasymError, match="at least two values"):
        one_sample_t([1.0])


def _weighted_by_hand(rows: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """μ̃ = Σ w a / Σ w, second moment Σ w a aᵀ / Σ w and Σ w (a − μ̃)(a − μ̃)ᵀ / Σ w, row by row in float64."""
    total = w.sum()
    mu = sum(wi * a for wi, a in zip(w, rows)) / total
    second = sum(wi * torch.outer(a, a) for wi, a in zip(w, rows)) / total
    cov = sum(wi * torch.outer(a - mu, a - mu) for wi, a in zip(w, rows)) / total
    return mu, second, cov


@pytest.mark.parametrize("gram_dtype", [None, torch.float64], ids=["fp32-products", "float64-products"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weighted_add_equals_the_weighted_sums_by_hand(dtype, gram_dtype):
    """add(x, mask, weights=w) over four masked batches: N = rows kept, W = Σ w, μ̃, S / W and
    Σ w (a − μ̃)(a − μ̃)ᵀ / W (unbiased=False), · W / (W − 1) (unbiased=True) equal a row-by-row loop."""
    batches, masks = make_batches(dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    weights = [torch.rand(m.shape, generator=g, dtype=torch.float64) * 2 for m in masks]
    acc = RunningCovariance(D, gram_dtype=gram_dtype)
    for x, m, w in zip(batches, masks, weights):
        acc.add(x, m, weights=w)
    rows, w = selected_rows(batches, masks), torch.cat([w[m] for w, m in zip(weights, masks)])
    mu, second, cov = _weighted_by_hand(rows, w)
    tol = 1e-12 if dtype == torch.float64 or gram_dtype == torch.float64 else 1e-6
    assert acc.count == rows.shape[0] and acc.weight_sum == pytest.approx(float(w.sum()), rel=1e-14)
    assert rel_err(acc.mean(), mu) < 1e-13
    assert rel_err(acc.second_moment(), second) < tol
    assert rel_err(acc.covariance(unbiased=False), cov) < tol
    W = float(w.sum())
    assert rel_err(acc.covariance(), cov * W / (W - 1)) < tol
    assert rel_err(acc.covariance(unbiased=False), torch.cov(rows.T, correction=0)) > 1e-3  # the weights matter


def test_integer_weights_equal_repeated_rows():
    """Frequency weights: integer w_t (zeros included) give the unweighted statistics of each row repeated
    w_t times (torch.cov of the repeated rows, and an unweighted accumulator fed them), mean and covariance."""
    batches, masks = make_batches(torch.float64, seed=5)
    g = torch.Generator().manual_seed(6)
    weights = [torch.randint(0, 4, m.shape, generator=g) for m in masks]
    weighted, repeated = RunningCovariance(D), RunningCovariance(D)
    for x, m, w in zip(batches, masks, weights):
        weighted.add(x, m, weights=w.double())
        repeated.add(x.double()[m].repeat_interleave(w[m], dim=0))
    rows = selected_rows(batches, masks).repeat_interleave(torch.cat([w[m] for w, m in zip(weights, masks)]), dim=0)
    assert weighted.weight_sum == rows.shape[0] == repeated.count and weighted.count == int(
        sum(int(m.sum()) for m in masks)
    )
    assert rel_err(weighted.covariance(), torch.cov(rows.T)) < 1e-12
    assert rel_err(weighted.covariance(), repeated.covariance()) < 1e-12
    assert rel_err(weighted.mean(), rows.mean(0)) < 1e-13


def test_weighted_merge_state_dict_and_unweighted_state_unchanged(tmp_path):
    """W is merged and saved (a ``weight_sum`` key only for a weighted accumulator: unweighted states keep
    their four keys); unit weights give the unweighted covariance; bad weights are refused."""
    batches, masks = make_batches(torch.float64, seed=7)
    g = torch.Generator().manual_seed(8)
    weights = [torch.rand(m.shape, generator=g, dtype=torch.float64) for m in masks]
    whole, left, right = RunningCovariance(D), RunningCovariance(D), RunningCovariance(D)
    for i, (x, m, w) in enumerate(zip(batches, masks, weights)):
        whole.add(x, m, weights=w)
        (left if i < 2 else right).add(x, m, weights=w)
    left.merge(right)
    assert left.weight_sum == pytest.approx(whole.weight_sum, rel=1e-14)
    assert rel_err(left.covariance(), whole.covariance()) < 1e-12
    state = whole.state_dict()
    assert set(state) == {"dim", "count", "sum", "sum_outer", "weight_sum"}
    torch.save(state, tmp_path / "w.pt")
    back = RunningCovariance.from_state_dict(torch.load(tmp_path / "w.pt"))
    assert back.weight_sum == whole.weight_sum and torch.equal(back.covariance(), whole.covariance())
    plain, ones = RunningCovariance(D), RunningCovariance(D)
    for x, m in zip(batches, masks):
        plain.add(x, m)
        ones.add(x, m, weights=torch.ones(m.shape, dtype=torch.float64))
    assert set(plain.state_dict()) == {"dim", "count", "sum", "sum_outer"} and plain.weight_sum == plain.count
    assert rel_err(ones.covariance(), plain.covariance()) < 1e-14
    x = torch.randn(3, D, dtype=torch.float64)
    with pytest.raises(RwasymError, match="non-negative"):
        RunningCovariance(D).add(x, weights=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(RwasymError, match="leading shape"):
        unchecked(RunningCovariance.add)(RunningCovariance(D), x, weights=torch.ones(4))
    small = RunningCovariance(D)
    small.add(x, weights=torch.full((3,), 0.2))
    with pytest.raises(RwasymError, match="W > 1"):
        small.covariance()
    assert small.covariance(unbiased=False).shape == (D, D)
