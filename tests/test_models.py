"""The adapter's oracles: HF logits, the hook identity, writes mirrored on the HF module."""

import json

import pytest
import torch

import rwasym
from rwasym import RwasymError
from rwasym.models import flatten_site

ARCHS = ("native", "gpt2", "llama", "neox")


def _tokens(model, batch=2, pos=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.d_vocab, (batch, pos), generator=g)


# -- HF module names, written independently of the adapter (the oracle for writes) -------------
def _hf_apply(arch, hf, layer, kind, delta):
    """Add `delta` (nn.Linear layout) to the HF module that holds `kind` of `layer`."""
    with torch.no_grad():
        if arch == "gpt2":
            blk = hf.transformer.h[layer]
            d = hf.config.n_embd
            if kind in ("W_Q", "W_K", "W_V"):
                i = "QKV".index(kind[-1])
                blk.attn.c_attn.weight[:, i * d : (i + 1) * d] += delta.T.float()  # Conv1D (in, out)
            else:
                mod = {"W_O": blk.attn.c_proj, "W_in": blk.mlp.c_fc, "W_out": blk.mlp.c_proj}[kind]
                mod.weight += delta.T.float()
        elif arch == "llama":
            blk = hf.model.layers[layer]
            mod = {
                "W_Q": blk.self_attn.q_proj,
                "W_K": blk.self_attn.k_proj,
                "W_V": blk.self_attn.v_proj,
                "W_O": blk.self_attn.o_proj,
                "W_in": blk.mlp.up_proj,
                "W_gate": blk.mlp.gate_proj,
                "W_out": blk.mlp.down_proj,
            }[kind]
            mod.weight += delta.float()
        elif arch == "neox":
            blk = hf.gpt_neox.layers[layer]
            if kind in ("W_Q", "W_K", "W_V"):
                n_h = hf.config.num_attention_heads
                dh = hf.config.hidden_size // n_h
                i = "QKV".index(kind[-1])
                w = blk.attention.query_key_value.weight  # rows: head-major [h, (q, k, v), d_head]
                for h in range(n_h):
                    w[h * 3 * dh + i * dh : h * 3 * dh + (i + 1) * dh] += delta[h * dh : (h + 1) * dh].float()
            else:
                mod = {"W_O": blk.attention.dense, "W_in": blk.mlp.dense_h_to_4h, "W_out": blk.mlp.dense_4h_to_h}[kind]
                mod.weight += delta.float()


def test_registry_names_sides_heads(models):
    llama = models["llama"]
    kinds = [s.kind for s in llama.matrices("blocks.0.*.*")]
    assert sorted(kinds) == sorted(["W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out"])
    k = llama.matrix("blocks.1.attn.W_K")
    assert (k.n_heads, k.d_head, k.shape, k.side) == (2, 8, (16, 32), "read")
    assert llama.matrix("blocks.0.attn.W_O").side == "write"
    assert llama.matrix("blocks.0.mlp.W_out").shape == (32, 48)  # non-square: layout is pinned
    assert models["gpt2"].matrix("blocks.0.mlp.W_in").shape == (128, 32)
    native = models["native"]
    assert [s.name for s in native.matrices("blocks.*.attn.W_Q")] == ["blocks.0.attn.W_Q", "blocks.1.attn.W_Q"]
    assert native.matrix("blocks.0.attn.W_V").n_heads == 2
    assert native.matrix("blocks.0.attn.W_Q").hook_in == "blocks.0.attn.q.hook_in"


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_bridge_logits_equal_hf(models, hf_folder, arch):
    model, hf = models[arch], hf_folder[arch][1]
    tokens = _tokens(model)
    with torch.no_grad():
        assert torch.allclose(model.bridge(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_identity_every_matrix(models, arch):
    """(tensor at hook_in) @ Wᵀ (+ b) == tensor at hook_out, for every registry matrix."""
    model = models[arch]
    _, cache = model.bridge.run_with_cache(_tokens(model))
    for spec in model.matrices():
        a = flatten_site(cache[spec.hook_in], spec.n_in).double()
        y = flatten_site(cache[spec.hook_out], spec.n_out).double()
        b = model.bias(spec.name)
        pred = a @ model.weight(spec.name).T + (0 if b is None else b)
        # float32 forward against the float64 product: measured ≤ 3.1e-7 of the largest output
        assert torch.allclose(pred, y, atol=3e-6 * float(y.abs().max()), rtol=0), spec.name


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_write_matches_same_change_on_hf_module(models, hf_folder, arch):
    model, hf = models[arch], hf_folder[arch][1]
    tokens = _tokens(model, seed=3)
    before = model.state_fingerprint()
    with torch.no_grad():
        clean = model.bridge(tokens)
    for spec in model.matrices("blocks.1.*.*"):
        delta = 4.0 * torch.randn(spec.shape, dtype=torch.float64)
        with model.edit({spec.name: model.weight(spec.name) + delta}), torch.no_grad():
            edited = model.bridge(tokens)
        _hf_apply(arch, hf, spec.layer, spec.kind, delta)
        with torch.no_grad():
            expected = hf(tokens).logits
        _hf_apply(arch, hf, spec.layer, spec.kind, -delta)
        effect = (edited - clean).abs().max().item()
        error = (edited - expected).abs().max().item()
        assert effect > 1e-4, spec.name  # the write reached the forward pass
        assert error < 1e-3 * effect, (spec.name, error, effect)
    after = model.state_fingerprint()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_edit_restores_bit_exactly_on_exception(models):
    model = models["native"]
    name = "blocks.0.attn.W_Q"
    before = model.host_parameter(name).detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with model.edit({name: torch.zeros(model.matrix(name).shape, dtype=torch.float64)}):
            assert model.weight(name).abs().max() == 0
            raise RuntimeError("boom")
    assert torch.equal(model.host_parameter(name), before)


def test_head_weight_views(models):
    model = models["llama"]
    for name in ("blocks.0.attn.W_Q", "blocks.0.attn.W_K", "blocks.0.attn.W_O"):
        spec = model.matrix(name)
        heads = [model.head_weight(name, h) for h in range(spec.n_heads)]
        dim = 0 if spec.head_axis == "out" else 1
        assert torch.equal(torch.cat(heads, dim=dim), model.weight(name))
    with pytest.raises(RwasymError, match="out of range.*2 heads"):
        model.head_weight("blocks.0.attn.W_K", 2)
    with pytest.raises(RwasymError, match="no heads"):
        model.head_weight("blocks.0.mlp.W_in", 0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_unembedding_folds_final_norm(models, hf_folder, arch):
    model, hf = models[arch], hf_folder[arch][1]
    final_norm = {
        "gpt2": lambda m: m.transformer.ln_f,
        "llama": lambda m: m.model.norm,
        "neox": lambda m: m.gpt_neox.final_layer_norm,
    }[arch](hf)
    # the oracle: the finite-difference map of the HF final norm + lm_head, (L(x) − L(−x)) / 2, at
    # zero-mean unit-RMS residuals x (the norm's and the head's biases cancel)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, model.d_model, generator=g, dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)
    x = x / x.square().mean(-1, keepdim=True).sqrt()
    with torch.no_grad():
        logits = lambda v: hf.lm_head(final_norm(v.float())).double()
        expected = (logits(x) - logits(-x)) / 2
    got = x @ model.unembedding()
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 1e-6 * float(expected.abs().max())
    assert model.unembedding().shape == (model.d_model, model.d_vocab)
    # and it is diag(γ/√(1+ε)) · W_U for these norms (γ read from the parameter)
    eps = getattr(final_norm, "eps", getattr(final_norm, "variance_epsilon", None))
    scaled = final_norm.weight.double()[:, None] / (1 + eps) ** 0.5 * hf.lm_head.weight.double().T
    assert torch.allclose(model.unembedding(), scaled, rtol=1e-6, atol=0)


def test_weight_deltas_and_mismatch_errors(native_cfg):
    base = rwasym.load(native_cfg)
    tuned = rwasym.load(native_cfg)
    planted = torch.randn(32, 32, dtype=torch.float64)
    with tuned.edit({"blocks.1.attn.W_Q": tuned.weight("blocks.1.attn.W_Q") + planted}):
        deltas = rwasym.weight_deltas(base, tuned)
    assert torch.allclose(deltas["blocks.1.attn.W_Q"], planted, atol=1e-5)
    assert all(d.abs().max() == 0 for n, d in deltas.items() if n != "blocks.1.attn.W_Q")
    deeper = rwasym.load(rwasym.native_config(**{**_fields(native_cfg), "n_layers": 3}))
    with pytest.raises(RwasymError, match="first unmatched one is blocks.2.attn.W_Q"):
        rwasym.weight_deltas(base, deeper)
    wider = rwasym.load(rwasym.native_config(**{**_fields(native_cfg), "d_model": 48, "d_head": 12}))
    with pytest.raises(RwasymError, match=r"differ at blocks.0.attn.W_Q"):
        rwasym.weight_deltas(base, wider)
    mha = rwasym.load(rwasym.native_config(**{**_fields(native_cfg), "n_key_value_heads": 4}))
    with pytest.raises(RwasymError, match=r"differ at blocks.0.attn.W_K.*2 heads.*4 heads"):
        rwasym.weight_deltas(base, mha)


def _fields(cfg):
    keys = ("d_model", "d_head", "n_heads", "n_layers", "n_ctx", "d_vocab", "n_key_value_heads", "d_mlp", "seed")
    return {k: getattr(cfg, k) for k in keys}


def test_save_load_round_trip(native_cfg, tmp_path):
    model = rwasym.load(native_cfg)
    rwasym.save_model(model, tmp_path / "ckpt", meta={"step": 7})
    again = rwasym.load(tmp_path / "ckpt")
    tokens = _tokens(model)
    with torch.no_grad():
        assert torch.equal(model.bridge(tokens), again.bridge(tokens))
    assert again.meta == {"step": 7}


def test_bad_inputs_are_named(models, tmp_path):
    model = models["native"]
    with pytest.raises(RwasymError, match=r"unknown matrix name 'blocks.0.attn.W_X'.*blocks.0.attn.W_Q"):
        model.weight("blocks.0.attn.W_X")
    with pytest.raises(RwasymError, match="unsupported dtype torch.int64"):
        rwasym.load("whatever", dtype=torch.int64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RwasymError, match="neither an rwasym checkpoint"):
        rwasym.load(tmp_path / "empty")
    with pytest.raises(RwasymError, match=r"shape \(n_out, n_in\) = \(32, 32\)"):
        model.set_weight("blocks.0.attn.W_Q", torch.zeros(16, 32))
    with pytest.raises(RwasymError, match=r"contains \d+ non-finite value.*NaN"):
        model.set_weight("blocks.0.attn.W_Q", torch.full((32, 32), float("nan")))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "rwasym.json").write_text("{not json")
    with pytest.raises(RwasymError, match="corrupt"):
        rwasym.load(tmp_path / "corrupt")
    with pytest.raises(RwasymError, match="cannot load a model from a int"):
        rwasym.load(3)


@pytest.mark.parametrize("arch", ["native", "gpt2", "neox"])
def test_shared_input_and_residual_hooks(models, arch):
    """K/V/gate share their twin's input tensor; resid hooks satisfy the residual identity."""
    model = models[arch]
    _, cache = model.bridge.run_with_cache(_tokens(model))
    for spec in model.matrices():
        assert torch.equal(
            flatten_site(cache[spec.hook_in], spec.n_in), flatten_site(cache[model.input_hook(spec.name)], spec.n_in)
        ), spec.name
    resid = model.residual_hooks()
    for layer in range(model.n_layers):
        pre = cache[resid[f"blocks.{layer}.hook_resid_pre"]]
        post = cache[resid[f"blocks.{layer}.hook_resid_post"]]
        attn = cache[f"blocks.{layer}.attn.o.hook_out"]
        mlp = cache[f"blocks.{layer}.mlp.out.hook_out"]
        assert torch.allclose(pre + attn + mlp, post, atol=1e-5)
        mid = resid.get(f"blocks.{layer}.hook_resid_mid")
        assert (mid is None) == (arch == "neox")  # NeoX blocks are parallel: no resid_mid
        if mid is not None:
            assert torch.allclose(pre + attn, cache[mid], atol=1e-5)
        if layer + 1 < model.n_layers:
            assert torch.equal(post, cache[resid[f"blocks.{layer + 1}.hook_resid_pre"]])


@pytest.mark.parametrize("arch", ARCHS)
def test_self_check_passes_and_catches_a_transpose(models, arch):
    model = models[arch]
    rows = model.self_check()
    assert len(rows) == len(model.matrices()) and max(r["relative_error"] for r in rows) < 1e-5
    if arch == "llama":  # simulate the TL #1554 bug: a square matrix read transposed
        from unittest import mock

        real = model.weight
        with mock.patch.object(model, "weight", lambda n: real(n).T if n == "blocks.0.attn.W_O" else real(n)):
            with pytest.raises(RwasymError, match=r"(?s)consistency check failed.*blocks.0.attn.W_O"):
                model.self_check()


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_fused_qkv_sync_makes_save_pretrained_faithful(hf_folder, arch, tmp_path):
    model = rwasym.load(hf_folder[arch][0])
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    d = n_heads * d_head
    if arch == "gpt2":  # c_attn rows: [q; k; v]
        expected = [torch.arange(i * d, (i + 1) * d) for i in range(3)]
    else:  # query_key_value rows: [h, (q, k, v), d_head]
        grid = torch.arange(3 * d).reshape(n_heads, 3, d_head)
        expected = [grid[:, i].reshape(-1) for i in range(3)]
    for layer in range(model.n_layers):
        layouts = [model.host_layout(f"blocks.{layer}.attn.{kind}") for kind in ("W_Q", "W_K", "W_V")]
        assert all(layout.fused == "qkv" and layout.module is layouts[0].module for layout in layouts)
        assert all(torch.equal(layout.rows, e) for layout, e in zip(layouts, expected))
    g = torch.Generator().manual_seed(9)
    for kind in ("W_Q", "W_K", "W_V"):
        name = f"blocks.1.attn.{kind}"
        model.set_weight(
            name, model.weight(name) + torch.randn(model.matrix(name).shape, generator=g, dtype=torch.float64)
        )
    tokens = _tokens(model)
    with torch.no_grad():
        edited = model.bridge(tokens)
    model.save_pretrained(tmp_path / "m")  # syncs the fused qkv from the split copies first
    again = rwasym.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(again.bridge(tokens), edited, atol=1e-5)
        assert not torch.allclose(rwasym.load(hf_folder[arch][0]).bridge(tokens), edited, atol=1e-3)


def test_head_split_must_fill_the_matrix(native_cfg):
    bridge = rwasym.load(native_cfg).bridge
    bridge.cfg.d_head = 16  # 4 heads × 16 = 64 ≠ 32 rows of W_Q
    with pytest.raises(RwasymError, match=r"blocks.0.attn.W_Q has 32 head-axis units.*4 heads × d_head 16 = 64"):
        rwasym.load(bridge)


def test_native_save_pretrained_exports_gpt2_or_refuses_clearly(models, tmp_path):
    """A GPT-2-shaped native model saves as an HF GPT-2 with the same logits; a GQA one is refused."""
    native = rwasym.load(
        rwasym.native_config(d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=32, d_vocab=64, d_mlp=48, seed=2)
    )
    native.save_pretrained(tmp_path / "gpt2")
    exported = rwasym.load(tmp_path / "gpt2")
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = native.bridge(tokens)  # measured ≤ 3.1e-7 of the largest logit
        assert torch.allclose(exported.bridge(tokens), want, atol=3e-6 * float(want.abs().max()), rtol=0)
    for spec in native.matrices():
        assert torch.allclose(exported.weight(spec.name), native.weight(spec.name))
    exported.self_check()
    with pytest.raises(rwasym.RwasymError, match="cannot express.*grouped-query"):
        models["native"].save_pretrained(tmp_path / "gqa")  # n_key_value_heads = 2


@pytest.mark.integration
def test_name_at_revision_loads_that_revision_from_an_offline_hub_cache(tmp_path):
    """NAME@REVISION → boot_transformers(NAME, revision=REVISION), checked offline on a folder laid out
    like the Hugging Face hub cache (refs/<revision> → snapshots/<commit>), two revisions with
    different weights. A subprocess, because huggingface_hub reads HF_HUB_CACHE at import."""
    import subprocess
    import sys
    import textwrap

    from rwasym.testing import build_hf_model

    repo = tmp_path / "hub" / "models--org--tiny"
    commits = {"step1000": "a" * 40, "step2000": "b" * 40}
    for seed, (rev, sha) in enumerate(commits.items()):
        build_hf_model("llama", repo / "snapshots" / sha, seed=seed)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / rev).write_text(sha)
    script = textwrap.dedent(f"""
        import json, torch, rwasym
        out = {{}}
        for rev, sha in {commits!r}.items():
            m = rwasym.load("org/tiny@" + rev)
            ref = rwasym.load({str(repo / "snapshots")!r} + "/" + sha)
            out[rev] = dict(same=torch.equal(m.weight("blocks.0.attn.W_Q"), ref.weight("blocks.0.attn.W_Q")),
                            provenance=m.provenance, source=m.source, norm=float(m.weight("blocks.0.attn.W_Q").norm()))
        try:
            rwasym.load("org/tiny@step3000")
        except rwasym.RwasymError as err:
            out["missing"] = str(err)
        print(json.dumps(out))
    """)
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for rev in commits:
        assert (
            out[rev]["same"] and out[rev]["provenance"] == {"revision": rev} and out[rev]["source"] == f"org/tiny@{rev}"
        )
    assert out["step1000"]["norm"] != out["step2000"]["norm"]
    assert "cannot load 'org/tiny@step3000'" in out["missing"]


def test_save_model_warns_about_config_values_it_cannot_write(tmp_path, native_cfg):
    """A config field that is not JSON is dropped with a warning naming it; a plain config saves silently."""
    import warnings

    model = rwasym.load(native_cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rwasym.save_model(model, tmp_path / "plain")
    model.cfg.custom_field = object()  # what a user might attach
    with pytest.warns(UserWarning, match="leaves out custom_field \\(object\\)"):
        rwasym.save_model(model, tmp_path / "odd")
    from rwasym.models import read_meta

    assert "custom_field" not in read_meta(tmp_path / "odd")["config"]
