"""Model-level probe: planted deltas, an independent recomputation, the result formats."""

import json

import pytest
import torch

import rwasym
from rwasym import RwasymError
from rwasym.analyses.probe import probe
from rwasym.models import flatten_site


@pytest.fixture(scope="module")
def pair_data(native_cfg):
    base = rwasym.load(native_cfg)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, base.d_vocab, (16, 24), generator=g)
    return base, tokens


def _cached_cov(model, tokens, hook, width):
    _, cache = model.bridge.run_with_cache(tokens)
    rows = flatten_site(cache[hook], width).reshape(-1, width).double()
    return torch.cov(rows.T)


def _planted(base, name, u, v):
    tuned = rwasym.load(
        rwasym.native_config(
            **{
                k: getattr(base.cfg, k)
                for k in (
                    "d_model",
                    "d_head",
                    "n_heads",
                    "n_layers",
                    "n_ctx",
                    "d_vocab",
                    "n_key_value_heads",
                    "d_mlp",
                    "seed",
                )
            }
        )
    )
    tuned.set_weight(name, base.weight(name) + torch.outer(u, v))
    return tuned


def _planted_and_noise(base, name, seed):
    """`_planted` with a random rank-1 u vᵀ in ``name``, then 0.01·N(0, 1) added to every matrix."""
    g = torch.Generator().manual_seed(seed)
    n_out, n_in = base.matrix(name).shape
    tuned = _planted(
        base,
        name,
        torch.randn(n_out, generator=g, dtype=torch.float64),
        torch.randn(n_in, generator=g, dtype=torch.float64),
    )
    for spec in tuned.matrices():
        tuned.set_weight(
            spec.name, tuned.weight(spec.name) + 0.01 * torch.randn(spec.shape, generator=g, dtype=torch.float64)
        )
    return tuned


def _row(result, **match):
    rows = [r for r in result.rows if all(r[k] == v for k, v in match.items())]
    assert len(rows) == 1, (match, len(rows))
    return rows[0]


def test_planted_top_pc_delta_is_concentrated_random_is_not(pair_data):
    base, tokens = pair_data
    name = "blocks.1.attn.W_Q"
    cov = _cached_cov(base, tokens, base.matrix(name).hook_in, 32)
    evals, evecs = torch.linalg.eigh(cov)
    v_top = evecs[:, -1]
    g = torch.Generator().manual_seed(1)
    u = torch.randn(32, generator=g, dtype=torch.float64)
    tuned = _planted(base, name, u, v_top)
    res = probe(base, tuned, tokens, k=4, null_samples=300, matrices=name, heads=False)
    row = _row(res, matrix=name, head=None, subspace="activation", stream="residual")
    assert row["relative"] > 7.0  # ≈ n/k = 8 for a delta entirely inside the top PC
    assert row["fraction"] == pytest.approx(1.0, abs=1e-3)
    assert row["null_percentile"] == 100.0
    # a random planted delta on the same matrix sits inside its null band (r ≈ 1)
    D = torch.randn(32, 32, generator=g, dtype=torch.float64)
    with tuned.edit({name: base.weight(name) + D}):
        res = probe(base, tuned, tokens, k=4, null_samples=300, matrices=name, heads=False)
    row = _row(res, matrix=name, head=None, subspace="activation", stream="residual")
    assert abs(row["fraction"] - row["null_mean"]) < 3 * row["null_std"]
    assert row["null_mean"] == pytest.approx(4 / 32, abs=0.01)


def test_probe_rows_equal_independent_recomputation(pair_data):
    """Every number recomputed from run_with_cache + torch.linalg, independently of the probe path."""
    base, tokens = pair_data
    g = torch.Generator().manual_seed(2)
    tuned = _planted(
        base,
        "blocks.0.attn.W_O",
        torch.randn(32, generator=g, dtype=torch.float64),
        torch.randn(32, generator=g, dtype=torch.float64),
    )
    with tuned.edit(
        {
            "blocks.0.mlp.W_out": base.weight("blocks.0.mlp.W_out")
            + 0.1 * torch.randn(32, 48, generator=g, dtype=torch.float64)
        }
    ):
        res = probe(base, tuned, tokens, k=3, null_samples=50, matrices="blocks.0.*.*")
        deltas = rwasym.weight_deltas(base, tuned)
    k = 3
    # write side of W_O against the prediction subspace
    d = deltas["blocks.0.attn.W_O"]
    U = torch.linalg.svd(base.unembedding(), full_matrices=False).U[:, :k]
    expected = (U.T @ d).square().sum() / d.square().sum()
    assert _row(res, matrix="blocks.0.attn.W_O", head=None, subspace="prediction")["fraction"] == pytest.approx(
        float(expected), rel=1e-9
    )
    # write side of W_out against the resid_post PCA
    d = deltas["blocks.0.mlp.W_out"]
    cov = _cached_cov(base, tokens, "blocks.0.hook_out", 32)
    U = torch.linalg.eigh(cov).eigenvectors.flip(-1)[:, :k]
    expected = (U.T @ d).square().sum() / d.square().sum()
    row = _row(res, matrix="blocks.0.mlp.W_out", head=None, stream="residual", subspace="activation")
    # activation subspaces come from capture's float32 batch products (measured here: 5.5e-8 relative)
    assert row["fraction"] == pytest.approx(float(expected), rel=1e-6)
    assert row["relative"] == pytest.approx(float(expected) * 32 / k, rel=1e-6)
    # inner side of W_O, head 1: PCA of that head's block of the z covariance
    d = deltas["blocks.0.attn.W_O"][:, 8:16]
    cov = _cached_cov(base, tokens, "blocks.0.attn.o.hook_in", 32)[8:16, 8:16]
    U = torch.linalg.eigh(cov).eigenvectors.flip(-1)[:, :k]
    expected = (d @ U).square().sum() / d.square().sum()
    assert _row(res, matrix="blocks.0.attn.W_O", head=1, stream="inner")["fraction"] == pytest.approx(
        float(expected), rel=1e-6
    )
    # untouched matrices produce no rows; k used and n are recorded
    assert not [r for r in res.rows if r["matrix"] == "blocks.0.attn.W_Q"]
    assert {
        r["n"]
        for r in res.rows
        if r["matrix"] == "blocks.0.attn.W_O" and r["head"] is not None and r["stream"] == "inner"
    } == {8}


def test_probe_outputs_and_errors(pair_data, tmp_path):
    base, tokens = pair_data
    g = torch.Generator().manual_seed(3)
    tuned = _planted(
        base,
        "blocks.1.mlp.W_in",
        torch.randn(48, generator=g, dtype=torch.float64),
        torch.randn(32, generator=g, dtype=torch.float64),
    )
    res = probe(base, tuned, tokens, k=2, null_samples=20)
    again = probe(base, tuned, tokens, k=2, null_samples=20)
    assert res.rows == again.rows  # seeded: identical
    data = json.loads(res.to_json(str(tmp_path / "p.json")))
    assert data["config"]["k"] == 2 and len(data["rows"]) == len(res.rows)
    assert res.curves and res.curves[0]["ks"][-1] == res.curves[0]["n"]
    df = res.to_dataframe()
    assert set(df["kind"]) == {"W_in"}
    assert "W_in" in res.summary()
    with pytest.raises(RwasymError, match=r"k=33 exceeds the dimension n=32 of the residual stream \(d_model\)"):
        probe(base, tuned, tokens, k=33)
    with pytest.raises(RwasymError, match="k=0 must be a positive integer subspace dimension, at most d_model"):
        probe(base, tuned, tokens, k=0)
    with pytest.raises(RwasymError, match="matches no matrix"):
        probe(base, tuned, tokens, matrices="blocks.9.*.*")
    with pytest.raises(RwasymError, match="needs data"):
        probe(base, tuned)


def test_probe_holds_one_weight_delta_at_a_time(pair_data, monkeypatch):
    """The probe forms each float64 ΔW when it reaches the matrix and drops it with the next one:
    at most two are ever alive (the current one while the next is formed), not one per matrix."""
    import weakref

    from rwasym.models import deltas as deltas_module

    base, tokens = pair_data
    tuned = _planted_and_noise(base, "blocks.0.attn.W_Q", 7)
    alive, peak, formed = set(), [0], [0]
    original = deltas_module.WeightDeltas.__getitem__

    def tracked(self, name):
        delta = original(self, name)
        formed[0] += 1
        alive.add(id(delta))
        weakref.finalize(delta, alive.discard, id(delta))
        peak[0] = max(peak[0], len(alive))
        return delta

    monkeypatch.setattr(deltas_module.WeightDeltas, "__getitem__", tracked)
    res = probe(base, tuned, tokens, k=3, null_samples=20, progress=False)
    assert formed[0] == len(base.matrices()) == 12 and {r["matrix"] for r in res.rows} == {
        s.name for s in base.matrices()
    }
    assert peak[0] <= 2


def test_capture_passes_by_layer_group_give_the_same_rows(pair_data, monkeypatch):
    """A stats budget below the model's sums captures layer groups in several passes; each pass
    holds only its layers' sums, and every row and curve equals the one-pass probe's bit for bit."""
    from rwasym.analyses import probe as probe_module
    from rwasym.analyses.probe import layer_groups, probe_sites

    base, tokens = pair_data
    tuned = _planted_and_noise(base, "blocks.1.mlp.W_out", 8)
    specs = base.matrices()
    sites = probe_sites(base, specs)
    per_layer = [sum(8 * w * w for h, w in sites.items() if h.startswith(f"blocks.{L}.")) for L in (0, 1)]
    assert [len(grp) for grp in layer_groups(specs, sites, float("inf"))] == [12]
    assert [{s.layer for s in grp} for grp in layer_groups(specs, sites, max(per_layer))] == [{0}, {1}]
    assert len(layer_groups(specs, sites, sum(per_layer))) == 1
    assert len(layer_groups(specs, sites, 1)) == 2  # a layer above the budget is a group of its own

    captured = []
    real_capture = probe_module.capture

    def recording(model, data, **kw):
        captured.append(sorted(kw["sites"]))
        return real_capture(model, data, **kw)

    monkeypatch.setattr(probe_module, "capture", recording)
    one = probe(base, tuned, tokens, k=3, null_samples=20, progress=False, stats_budget=float("inf"))
    two = probe(base, tuned, tokens, k=3, null_samples=20, progress=False, stats_budget=max(per_layer))
    assert one.config["capture_passes"] == 1 and two.config["capture_passes"] == 2
    assert len(captured) == 3 and captured[0] == sorted(sites) and sorted(captured[1] + captured[2]) == sorted(sites)
    assert all(h.startswith("blocks.0.") for h in captured[1]) and all(h.startswith("blocks.1.") for h in captured[2])
    assert one.rows == two.rows and one.curves == two.curves and len(one.rows) > 50
    # the default budget is half the memory available (issue #31: from the machine, not the model)
    monkeypatch.setattr(probe_module, "available_memory", lambda: 2 * max(per_layer))
    default = probe(base, tuned, tokens, k=3, null_samples=20, progress=False)
    assert default.config["capture_passes"] == 2 and default.rows == one.rows
    monkeypatch.setattr(probe_module, "available_memory", lambda: 2 * sum(per_layer))
    assert probe(base, tuned, tokens, k=3, null_samples=20, progress=False).config["capture_passes"] == 1
    with pytest.raises(RwasymError, match="stats_budget"):
        probe(base, tuned, tokens, stats_budget=0)
    with pytest.raises(RwasymError, match="post_norm='x'"):
        probe(base, tuned, tokens, post_norm="x")
    # a one-shot iterator of batches is read once, whatever the budget
    captured.clear()
    it = probe(base, tuned, iter([tokens[:8], tokens[8:]]), k=3, null_samples=20, progress=False, stats_budget=1)
    assert it.config["capture_passes"] == 1 and len(captured) == 1


def test_overlapped_eigendecompositions_give_the_same_rows(pair_data, monkeypatch):
    """With ≥ 2 threads the next layer's covariances and eigenbases are computed on a worker thread
    while the current layer's rows are computed; the rows equal the in-place computation's exactly."""
    import threading

    from rwasym.analyses.probe import _Covariances

    workers = []
    compute = _Covariances._compute
    monkeypatch.setattr(
        _Covariances, "_compute", lambda self, site: (workers.append(threading.get_ident()), compute(self, site))[1]
    )
    base, tokens = pair_data
    tuned = _planted_and_noise(base, "blocks.0.attn.W_Q", 9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = probe(base, tuned, tokens, k=3, null_samples=20, progress=False, stats_budget=float("inf"))
        torch.set_num_threads(2)
        overlapped = probe(base, tuned, tokens, k=3, null_samples=20, progress=False, stats_budget=float("inf"))
        assert workers and threading.get_ident() not in workers  # the overlapped run did use the worker
        workers.clear()
        torch.set_num_threads(3)  # more threads: in place again (large eigendecompositions on all of them)
        in_place = probe(base, tuned, tokens, k=3, null_samples=20, progress=False, stats_budget=float("inf"))
        assert not workers
    finally:
        torch.set_num_threads(threads)
    assert overlapped.rows == alone.rows and overlapped.curves == alone.curves and len(alone.rows) > 50
    assert in_place.rows == alone.rows


def test_top_k_spectral_rows_agree_with_the_exact_rows_on_their_range(pair_data):
    """spectral="topk" (issue #31): each site's leading spectral_k eigenvectors only. On that range every number
    equals the full-eigh probe's (f, r, the nulls, the gradient-shaped expectation; ρ and its null spread
    computed from C itself instead of the full spectrum); the variance-reaching k is reported where it lies in
    range and None (not guessed) beyond it; curves stop at spectral_k; rows carry the solver's certificate."""
    base, tokens = pair_data
    tuned = _planted_and_noise(base, "blocks.1.mlp.W_out", 4)
    kw = dict(k=3, null_samples=20, progress=False, heads=False)
    exact = probe(base, tuned, tokens, spectral="exact", **kw)
    top = probe(base, tuned, tokens, spectral="topk", spectral_k=6, **kw)
    assert probe(base, tuned, tokens, **kw).rows == exact.rows  # auto: these widths (≤ 2,048) are exact
    assert len(top.rows) == len(exact.rows) > 20
    beyond = 0
    for t, e in zip(top.rows, exact.rows):
        same = ("fraction", "relative", "null_mean", "null_std", "null_percentile", "random_delta_fraction", "rho")
        for key in same + ("mean_fraction",):
            if e.get(key) is not None:
                assert t[key] == pytest.approx(e[key], rel=1e-9, abs=1e-12), (e["matrix"], e["subspace"], key)
        # c₂ from tr(C²)/tr(C)² against Σ ℓ² of eigenvalues clamped at 0: (n c₂ − 1) magnifies their rounding
        assert t["rho_null_std"] == pytest.approx(e["rho_null_std"], rel=1e-6)
        if e["subspace"] != "activation":
            assert "spectral_k" not in t and t == e  # prediction bases stay exact
            continue
        assert t["spectral_k"] == 6 and t["spectral_converged"] and t["spectral_residual"] < 1e-8
        if e["k_variance"] <= 6:
            assert t["k_variance"] == e["k_variance"]
            assert t["fraction_k_variance"] == pytest.approx(e["fraction_k_variance"], rel=1e-9)
        else:
            beyond += 1
            assert t["k_variance"] is None and t["fraction_k_variance"] is None
    assert beyond > 0  # some sites need more than 6 directions for 90% of their variance
    for t, e in zip(top.curves, exact.curves):
        if e["subspace"] == "activation":
            assert t["ks"] == [k for k in e["ks"] if k <= 6]
            assert t["fraction"] == pytest.approx(e["fraction"][: len(t["ks"])], rel=1e-9, abs=1e-12)
        else:
            assert t == e


def test_probe_config_is_the_one_source_of_options(native_cfg, tmp_path):
    """ProbeConfig (the SweepConfig pattern): a config object and keyword overrides give the same rows;
    the result records every field but the memory budget; the CLI's flags are the fields; bad options
    name the problem."""
    import argparse
    import dataclasses

    from rwasym.analyses.probe import ProbeConfig
    from rwasym.app.cli import add_config_flags, config_from_args
    from rwasym.testing import perturb

    base = rwasym.load(native_cfg)
    tuned = perturb(rwasym.load(native_cfg), 0.05, seed=3)
    tokens = torch.randint(0, base.d_vocab, (4, 16), generator=torch.Generator().manual_seed(2))
    cfg = ProbeConfig(k=3, null_samples=8, matrices="blocks.0.attn.*", heads=False, curves=False, seed=5)
    by_config = probe(base, tuned, tokens, cfg)
    by_keywords = probe(
        base, tuned, tokens, k=3, null_samples=8, matrices="blocks.0.attn.*", heads=False, curves=False, seed=5
    )
    assert by_config.rows == by_keywords.rows and by_config.rows
    assert {r["k"] for r in by_config.rows} == {3}
    recorded = {f.name for f in dataclasses.fields(ProbeConfig)} - {"stats_budget"}
    assert {name: by_config.config[name] for name in recorded} == {  # recorded JSON-equal: sequences as lists
        name: list(value) if isinstance(value, tuple) else value
        for name, value in cfg.to_dict().items()
        if name in recorded
    }
    overridden = probe(base, tuned, tokens, cfg, k=2)
    assert {r["k"] for r in overridden.rows} == {2} and cfg.k == 3  # the config object is left as it was

    parser = argparse.ArgumentParser()
    add_config_flags(parser, ProbeConfig)
    args = parser.parse_args(
        ["--k", "3", "--null-samples", "8", "--matrices", "blocks.0.attn.*", "--no-heads", "--no-curves", "--seed", "5"]
    )
    assert config_from_args(args, ProbeConfig) == cfg
    assert config_from_args(parser.parse_args([]), ProbeConfig) == ProbeConfig()

    with pytest.raises(RwasymError, match=r"unknown options \['kk'\]"):
        probe(base, tuned, tokens, kk=3)
    with pytest.raises(RwasymError, match="post_norm='both'"):
        ProbeConfig(post_norm="both")
    with pytest.raises(RwasymError, match="variance must satisfy 0 < variance <= 1"):
        ProbeConfig(variance=1.5)
    with pytest.raises(RwasymError, match="k=True must be a positive integer"):
        ProbeConfig(k=True)


def test_available_memory_reads_the_machine(monkeypatch, tmp_path):
    """`available_memory` is /proc/meminfo's MemAvailable (kB → bytes); without it, the free physical pages."""
    import builtins

    from rwasym.math import checks

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   16000000 kB\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(meminfo if f == "/proc/meminfo" else f, *a, **k))
    assert checks.available_memory() == 16000000 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\n")
    import os

    assert checks.available_memory() == os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("spectral", ["exact", "topk"])
def test_gram_route_gives_the_rows_of_the_direct_products(pair_data, monkeypatch, spectral):
    """At 8B widths (both sides ≥ `GRAM_FROM`) the probe forms each ΔW's smaller Gram once and takes from it
    the spectrum, ρ_C and the column energies on that side. Lowered here to every matrix and head slice of the
    small model, it must give the rows of the direct products (ΔW U, tr(ΔW C ΔWᵀ), the SVD) to rounding."""
    from rwasym.analyses import probe as probe_module
    from rwasym.math import fraction

    base, tokens = pair_data
    tuned = _planted_and_noise(base, "blocks.1.mlp.W_out", 4)
    kw = dict(k=3, null_samples=20, progress=False, spectral=spectral, spectral_k=6)
    direct = probe(base, tuned, tokens, **kw)
    monkeypatch.setattr(probe_module, "GRAM_FROM", 1)  # the probe's imported name and delta_spectrum's
    monkeypatch.setattr(fraction, "GRAM_FROM", 1)
    grams = []
    real = probe_module.delta_gram
    monkeypatch.setattr(probe_module, "delta_gram", lambda d, side: (grams.append(side), real(d, side))[1])
    via_gram = probe(base, tuned, tokens, **kw)
    assert {"input", "output"} <= set(grams)
    assert len(via_gram.rows) == len(direct.rows) > 50
    for g, d in zip(via_gram.rows, direct.rows):
        assert g.keys() == d.keys()
        for key, value in d.items():
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=1e-8, abs=1e-12), (d["matrix"], d["subspace"], key)
            else:
                assert g[key] == value


@pytest.mark.parametrize("center", [True, False])
def test_owned_sums_are_freed_once_c_exists_and_c_with_mu_give_the_gradient_share(pair_data, center):
    """The probe frees a site's float64 sum S once its covariance C exists (1.6 GB per 14,336-wide site at 8B);
    the gradient-shaped share tr(UᵀSU)/tr S then comes from C and μ. Oracle: `gradient_shaped_fraction` on the
    S read before it was freed, for the whole input and a W_O head's block."""
    from rwasym.analyses.probe import _Covariances, _head_block
    from rwasym.hooks.activations import capture
    from rwasym.math.fraction import gradient_shaped_fraction

    base, tokens = pair_data
    site = "blocks.0.attn.o.hook_in"
    acts = capture(base, tokens, sites={site: 32}, progress=False)
    S, mu = acts[site].scatter.clone(), acts[site].mean().clone()
    g = torch.Generator().manual_seed(1)
    spec = next(s for s in base.matrices() if s.name == "blocks.0.attn.W_O")
    covs = _Covariances(acts, center, owned=True)
    covs(site)
    assert site not in acts.stats  # freed
    torch.testing.assert_close(covs.mean(site), mu, rtol=0, atol=0)
    for head, n in ((None, 32), (1, 8)):
        U = torch.linalg.qr(torch.randn(n, 3, dtype=torch.float64, generator=g)).Q
        block = _head_block(spec, head)
        want = gradient_shaped_fraction(block(S), U)
        assert covs.gradient_share(site, block, U) == pytest.approx(want, rel=1e-10)
    kept = capture(base, tokens, sites={site: 32}, progress=False)
    _Covariances(kept, center, owned=True, keep_sums=True)(site)
    assert site in kept.stats  # random_delta draws from S: kept
