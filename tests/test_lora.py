"""PEFT LoRA adapters as the tuned side (`rwasym.models.lora`), against independent oracles:

1. factored deltas == peft's own ``get_delta_weight`` (float64), split by hand with the HF layouts
   (GPT-2 c_attn concat [q; k; v], NeoX query_key_value interleaved per head);
2. every factored computation == the same computation on ``materialize()``, and the whole probe on
   base + adapter == the probe on an explicitly materialised dense pair;
3. the tuned Model's logits == peft's PeftModel logits.
"""

import copy
import json
import math
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model

import rwasym
from rwasym.analyses.probe import probe_sites
from rwasym.app.cli import main
from rwasym.errors import RwasymError
from rwasym.math.fraction import fraction_curve, random_null, relative_fraction
from rwasym.math.lowrank import LowRankDelta
from rwasym.math.rank1 import closed_form_u
from rwasym.math.subspaces import random_basis
from rwasym.models.heads import head_slice
from rwasym.models.lora import lora_deltas, read_adapter
from rwasym.testing import build_hf_model

# PEFT module name pattern → rwasym kinds, written from the HF modeling code (not from rwasym).
HF_NAMES = {
    "gpt2": {
        "transformer.h.{L}.attn.c_attn": ("W_Q", "W_K", "W_V"),
        "transformer.h.{L}.attn.c_proj": ("W_O",),
        "transformer.h.{L}.mlp.c_fc": ("W_in",),
        "transformer.h.{L}.mlp.c_proj": ("W_out",),
    },
    "llama": {
        f"model.layers.{{L}}.{g}.{m}": (k,)
        for g, m, k in [
            ("self_attn", "q_proj", "W_Q"),
            ("self_attn", "k_proj", "W_K"),
            ("self_attn", "v_proj", "W_V"),
            ("self_attn", "o_proj", "W_O"),
            ("mlp", "up_proj", "W_in"),
            ("mlp", "gate_proj", "W_gate"),
            ("mlp", "down_proj", "W_out"),
        ]
    },
    "neox": {
        "gpt_neox.layers.{L}.attention.query_key_value": ("W_Q", "W_K", "W_V"),
        "gpt_neox.layers.{L}.attention.dense": ("W_O",),
        "gpt_neox.layers.{L}.mlp.dense_h_to_4h": ("W_in",),
        "gpt_neox.layers.{L}.mlp.dense_4h_to_h": ("W_out",),
    },
}
LORA_CONFIGS = {  # ranks 1, 4, 8; rank/alpha patterns, rsLoRA, a layer left untouched
    "gpt2": dict(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        rank_pattern={"mlp.c_fc": 8},
        alpha_pattern={"attn.c_proj": 3.0},
    ),
    "llama": dict(
        r=8,
        lora_alpha=4,
        use_rslora=True,
        rank_pattern={"k_proj": 1},
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"],
    ),
    "neox": dict(
        r=1,
        lora_alpha=2,
        layers_to_transform=[1],
        target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    ),
}


def _peft(hf_model, arch, seed=0):
    """A PeftModel on a copy of ``hf_model`` with random non-zero lora_B (peft initialises B = 0)."""
    pm = get_peft_model(copy.deepcopy(hf_model), LoraConfig(**LORA_CONFIGS[arch]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return pm.eval()


@pytest.fixture(scope="module")
def adapters(hf_folder, tmp_path_factory):
    """arch -> (base folder, adapter folder, PeftModel) with float32 adapters saved by peft."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for arch, (folder, hf_model) in hf_folder.items():
        pm = _peft(hf_model, arch)
        pm.save_pretrained(root / arch)
        out[arch] = (folder, root / arch, pm)
    return out


@pytest.fixture(scope="module")
def bases(adapters):
    return {arch: rwasym.load(folder) for arch, (folder, _, _) in adapters.items()}


def _peft_oracle(pm, arch, n_heads):
    """rwasym name -> ΔW (float64, nn.Linear layout) from peft's get_delta_weight, split by hand."""
    pm = copy.deepcopy(pm).double()
    fan_in_fan_out = LORA_CONFIGS[arch].get("fan_in_fan_out", False)
    out = {}
    for qualified, module in pm.named_modules():
        if not hasattr(module, "get_delta_weight") or "default" not in getattr(module, "lora_A", {}):
            continue
        name = qualified.removeprefix("base_model.model.")
        layer = int(name.split(".")[2])  # transformer.h.L / model.layers.L / gpt_neox.layers.L
        kinds = HF_NAMES[arch][name.replace(f".{layer}.", ".{L}.", 1)]
        d = module.get_delta_weight("default")
        d = d.T if fan_in_fan_out else d  # peft returns the host's storage layout
        group = "attn" if kinds[0].startswith(("W_Q", "W_K", "W_V", "W_O")) else "mlp"
        if len(kinds) == 3 and arch == "gpt2":  # c_attn: output columns [q | k | v]
            parts = d.chunk(3, dim=0)
        elif len(kinds) == 3:  # NeoX: view(n_heads, 3 * d_head) per head, then chunk into q, k, v
            per_head = d.reshape(n_heads, 3, -1, d.shape[1])  # (h, qkv, d_head, n_in)
            parts = [per_head[:, i].reshape(-1, d.shape[1]) for i in range(3)]
        else:
            parts = [d]
        for kind, part in zip(kinds, parts):
            out[f"blocks.{layer}.{group}.{kind}"] = part
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_factored_deltas_equal_peft_delta_weights(adapters, bases, arch, one_thread):
    folder, adapter_folder, pm = adapters[arch]
    base = bases[arch]
    deltas = lora_deltas(base, adapter_folder)
    oracle = _peft_oracle(pm, arch, int(base.cfg.n_heads))
    assert set(deltas) == {s.name for s in base.matrices()}
    for name, delta in deltas.items():
        assert isinstance(delta, LowRankDelta) and delta.shape == base.matrix(name).shape
        if name not in oracle:  # untouched matrix (neox layer 0): the rank-0 zero
            assert delta.rank == 0 and delta.frobenius_sq() == 0.0
            assert torch.equal(delta.materialize(), torch.zeros(delta.shape, dtype=torch.float64))
            continue
        want = oracle[name]
        assert (delta.materialize() - want).norm() <= 1e-10 * want.norm(), name
    assert len(oracle) == (len(deltas) if arch != "neox" else len(deltas) // 2)
    ranks = {name: d.rank for name, d in deltas.items()}
    if arch == "llama":
        assert ranks["blocks.0.attn.W_K"] == 1 and ranks["blocks.0.attn.W_Q"] == 8
    if arch == "gpt2":
        assert ranks["blocks.1.mlp.W_in"] == 8 and ranks["blocks.1.mlp.W_out"] == 4


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_tuned_logits_equal_peft_model_logits(adapters, bases, arch, one_thread):
    folder, adapter_folder, pm = adapters[arch]
    tuned = rwasym.load(folder, adapter=adapter_folder)
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pm(tokens).logits
        got = tuned.bridge(tokens)
        base_logits = bases[arch].bridge(tokens)
    assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)  # measured ≤ 7.2e-7 of the largest
    assert (base_logits - want).abs().max() > 1e-2  # the adapter really changes the model
    # the bases stay untouched, whether loaded from a folder or passed as a Model
    again = rwasym.load(bases[arch], adapter=adapter_folder)
    assert torch.allclose(again.bridge(tokens), got, atol=1e-6)
    assert torch.equal(bases[arch].bridge(tokens), base_logits)


def _dense_pairs(bases, adapters):
    """(name, spec, factored, dense) for every adapted matrix of every architecture."""
    for arch, base in bases.items():
        for name, d in lora_deltas(base, adapters[arch][1]).items():
            if d.rank:
                yield name, base.matrix(name), d, d.materialize()


def test_factored_math_equals_dense_math(adapters, bases, one_thread):
    for _name, spec, d, dense in _dense_pairs(bases, adapters):
        close = lambda a, b: abs(a - b) <= 1e-10 * max(abs(b), 1e-300)  # noqa: E731
        assert close(d.frobenius_sq(), float(dense.square().sum())) and close(d.norm(), float(dense.norm()))
        s_dense = torch.linalg.svdvals(dense)
        s = d.svdvals()
        assert s.shape[0] == min(d.rank, *d.shape)
        assert torch.allclose(s, s_dense[: s.shape[0]], rtol=1e-10, atol=1e-12 * float(s_dense[0]))
        tail = s_dense[s.shape[0] :]  # dense ΔW has rank <= r: the rest vanish
        assert tail.numel() == 0 or float(tail.max()) <= 1e-12 * float(s_dense[0])
        U, S, Vh = d.svd()
        assert torch.allclose(U @ torch.diag(S) @ Vh, dense, atol=1e-12 * float(s_dense[0]))
        assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64), atol=1e-12)
        for side, n in (("input", spec.n_in), ("output", spec.n_out)):
            k = min(3, n)
            basis = random_basis(n, k, torch.Generator().manual_seed(2))
            a, b = relative_fraction(d, basis, side), relative_fraction(dense, basis, side)
            assert close(a.fraction, b.fraction) and close(a.relative, b.relative) and (a.k, a.n) == (b.k, b.n)
            full = random_basis(n, n, torch.Generator().manual_seed(3))
            ca, cb = fraction_curve(d, full, side, [1, 2, n]), fraction_curve(dense, full, side, [1, 2, n])
            assert torch.allclose(ca.fraction, cb.fraction, rtol=1e-10, atol=0)
            assert torch.allclose(ca.relative, cb.relative, rtol=1e-10, atol=0)
            assert abs(float(ca.fraction[-1]) - 1.0) < 1e-10  # a full basis holds all of ΔW
            na = random_null(d, side, k, 16, torch.Generator().manual_seed(4))
            nb = random_null(dense, side, k, 16, torch.Generator().manual_seed(4))
            assert torch.allclose(na.samples, nb.samples, rtol=1e-10, atol=1e-14)
        v = torch.randn(spec.n_in, dtype=torch.float64)
        v = v / v.norm()
        assert torch.allclose(closed_form_u(d, v), closed_form_u(dense, v), rtol=1e-10, atol=1e-14)
        w = torch.randn(spec.n_out, dtype=torch.float64)
        assert torch.allclose(d.rmatvec(w), dense.T @ w, rtol=1e-10, atol=1e-13)
        for h in range(spec.n_heads):
            assert torch.allclose(head_slice(spec, d, h).materialize(), head_slice(spec, dense, h), rtol=0, atol=1e-15)


def test_zero_delta_is_rejected_like_a_dense_zero(bases):
    spec = bases["llama"].matrix("blocks.0.attn.W_Q")
    zero = LowRankDelta.zeros(*spec.shape)
    basis = random_basis(spec.n_in, 2)
    for delta in (zero, zero.materialize()):
        with pytest.raises(RwasymError, match="‖ΔW‖_F = 0"):
            relative_fraction(delta, basis, "input")
    with pytest.raises(RwasymError, match="MLP matrix"):
        head_slice(bases["llama"].matrix("blocks.0.mlp.W_in"), LowRankDelta.zeros(48, 32), 0)


def _dense_tuned(folder, factored: dict, dtype):
    """The base with ΔW materialised and added: the dense pair the factored one must reproduce."""
    dense = rwasym.load(folder, dtype=dtype)
    for name, d in factored.items():
        if d.rank:
            dense.set_weight(name, dense.weight(name) + d.materialize())
    return dense


def _assert_rows_match(rows_a, rows_b, tol=1e-8):
    assert len(rows_a) == len(rows_b) and len(rows_a) > 0
    for ra, rb in zip(rows_a, rows_b):
        assert ra.keys() == rb.keys()
        for key, va in ra.items():
            vb = rb[key]
            if isinstance(va, float) and key != "null_percentile":
                assert abs(va - vb) <= tol * max(1.0, abs(vb)), (ra["matrix"], ra["head"], key, va, vb)
            elif isinstance(va, list):
                assert all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(va, vb)), (key, va, vb)
            else:
                assert va == vb, (ra["matrix"], key, va, vb)


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_probe_on_adapter_equals_probe_on_dense_pair(adapters, arch, one_thread):
    folder, adapter_folder, _ = adapters[arch]
    base = rwasym.load(folder, dtype=torch.float64)  # float64: the dense delta is ΔW to ~1e-16
    tuned = rwasym.load(base, adapter=adapter_folder)
    dense = _dense_tuned(folder, tuned.adapter, torch.float64)
    data = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(5))
    stats = rwasym.capture(base, data, sites=probe_sites(base, base.matrices()), progress=False)
    kwargs = dict(activations=stats, k=4, null_samples=16, curve_null_samples=4, seed=3, progress=False)
    factored, reference = rwasym.probe(base, tuned, **kwargs), rwasym.probe(base, dense, **kwargs)
    _assert_rows_match(factored.rows, reference.rows)
    _assert_rows_match(factored.curves, reference.curves)
    assert any(r["head"] is not None for r in factored.rows)
    if arch == "neox":  # layer 0 is untouched: no rows, in both
        assert {r["layer"] for r in factored.rows} == {1}


def test_weight_deltas_returns_factored_and_checks_the_base(adapters, hf_folder, tmp_path, one_thread):
    folder, adapter_folder, _ = adapters["gpt2"]
    base = rwasym.load(folder)
    tuned = rwasym.load(folder, adapter=adapter_folder)
    deltas = rwasym.weight_deltas(base, tuned, "blocks.0.attn.*")
    assert set(deltas) == {s.name for s in base.matrices("blocks.0.attn.*")}
    assert all(isinstance(d, LowRankDelta) for d in deltas.values())
    dense = {s.name: tuned.weight(s.name) - base.weight(s.name) for s in base.matrices("blocks.0.attn.*")}
    for name, d in deltas.items():  # the merged float32 weights agree with the factors to rounding
        assert (d.materialize() - dense[name]).norm() <= 1e-5 * dense[name].norm()
    assert not isinstance(next(iter(rwasym.weight_deltas(base, base).values())), LowRankDelta)
    build_hf_model("gpt2", tmp_path / "other", seed=7)
    with pytest.raises(RwasymError, match=r"not the base the adapter was loaded on: at blocks\.0\.attn\.W_Q"):
        rwasym.weight_deltas(rwasym.load(tmp_path / "other"), tuned)
    with torch.no_grad():  # editing the tuned model after loading breaks the match too
        tuned.host_parameter("blocks.1.mlp.W_out").add_(1e-2)
    with pytest.raises(RwasymError, match=r"at blocks\.1\.mlp\.W_out"):
        rwasym.weight_deltas(base, tuned)


def test_read_adapter_errors(adapters, bases, hf_folder, tmp_path):
    _, good, _ = adapters["gpt2"]
    with pytest.raises(RwasymError, match="no such adapter folder"):
        read_adapter(tmp_path / "missing")
    with pytest.raises(RwasymError, match="no such adapter folder"):
        rwasym.load(bases["gpt2"], adapter=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RwasymError, match="has no adapter_config.json"):
        read_adapter(tmp_path / "empty")
    ia3 = tmp_path / "ia3"
    shutil.copytree(good, ia3)
    cfg = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps(dict(cfg, peft_type="IA3")))
    with pytest.raises(RwasymError, match="'IA3' adapter.*LoRA adapters.*merge_and_unload"):
        read_adapter(ia3)
    # DoRA, saved by peft itself
    pm = get_peft_model(copy.deepcopy(hf_folder["llama"][1]), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    pm.save_pretrained(tmp_path / "dora")
    with pytest.raises(RwasymError, match="use_dora=True.*DoRA.*merge_and_unload"):
        read_adapter(tmp_path / "dora")
    # an adapter for another architecture: its modules match no studied matrix; names are listed
    with pytest.raises(RwasymError, match="match no studied matrix.*model.layers.0.self_attn.q_proj"):
        lora_deltas(bases["llama"], good)
    # extra trained tensors (e.g. modules_to_save) are refused, not silently dropped
    from safetensors.torch import load_file, save_file

    extra = tmp_path / "extra"
    shutil.copytree(good, extra)
    state = load_file(str(extra / "adapter_model.safetensors"))
    state["base_model.model.lm_head.modules_to_save.weight"] = torch.zeros(96, 32)
    save_file(state, str(extra / "adapter_model.safetensors"))
    with pytest.raises(RwasymError, match="besides lora_A / lora_B.*modules_to_save"):
        read_adapter(extra)


def test_legacy_bin_adapter_reads_like_safetensors(adapters, tmp_path):
    from safetensors.torch import load_file

    _, good, _ = adapters["llama"]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(good / "adapter_config.json", legacy)
    torch.save(load_file(str(good / "adapter_model.safetensors")), legacy / "adapter_model.bin")
    a, b = read_adapter(good), read_adapter(legacy)
    assert a.modules.keys() == b.modules.keys()
    for key in a.modules:
        assert torch.equal(a.modules[key].materialize(), b.modules[key].materialize())
    # rsLoRA scale α/√r with the rank pattern: k_proj has r = 1, the rest r = 8 (α = 4)
    assert a.modules["model.layers.0.self_attn.k_proj"].scale == 4 / math.sqrt(1)
    assert a.modules["model.layers.0.self_attn.q_proj"].scale == 4 / math.sqrt(8)


def test_probe_cli_with_tuned_adapter(adapters, tmp_path, capsys, one_thread):
    from safetensors.torch import save_file

    folder, adapter_folder, _ = adapters["neox"]
    data = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(6))
    save_file({"input_ids": data}, str(tmp_path / "tokens.safetensors"))
    out = tmp_path / "probe.json"
    code = main(
        [
            "probe",
            "--base",
            str(folder),
            "--tuned-adapter",
            str(adapter_folder),
            "--data",
            str(tmp_path / "tokens.safetensors"),
            "--k",
            "4",
            "--null-samples",
            "8",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    written = json.loads(out.read_text())
    base = rwasym.load(folder)
    api = rwasym.probe(base, rwasym.load(base, adapter=adapter_folder), data, k=4, null_samples=8, progress=False)
    _assert_rows_match(written["rows"], api.rows, tol=1e-12)
    assert main(["probe", "--base", str(folder), "--data", str(tmp_path / "tokens.safetensors")]) == 2
    assert "--tuned-adapter" in capsys.readouterr().err


def test_adapter_trained_with_rwasym_dpo_on_the_demo_base(tmp_path, one_thread, quick_cache):
    """The demo's native base exported with Model.save_pretrained (an exact GPT-2: same logits), a
    LoRA adapter trained on it with rwasym's DPO loss through peft on the demo's own pairs, read back
    and probed: factored == dense."""
    from transformers import AutoModelForCausalLM

    from rwasym.objectives import dpo_loss, sequence_logprobs
    from rwasym.studies.default_pair import default_pair, load_default_pairs

    native, _, info = default_pair(quick=True, progress=False)
    native.save_pretrained(tmp_path / "base")
    train_pairs, _ = load_default_pairs(info)
    pairs = train_pairs.subset(torch.arange(32))
    chosen, chosen_mask = pairs.sequences("chosen")
    rejected, rejected_mask = pairs.sequences("rejected")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        want = native.bridge(chosen)  # the export: measured ≤ 3.7e-7 of the largest logit
        assert torch.allclose(hf(chosen).logits, want, atol=5e-6 * float(want.abs().max()), rtol=0)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    with torch.no_grad():  # B = 0 at init: the policy is the reference
        ref_c = sequence_logprobs(pm(chosen).logits, chosen, chosen_mask)
        ref_r = sequence_logprobs(pm(rejected).logits, rejected, rejected_mask)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        loss = dpo_loss(
            sequence_logprobs(pm(chosen).logits, chosen, chosen_mask),
            sequence_logprobs(pm(rejected).logits, rejected, rejected_mask),
            ref_c,
            ref_r,
            beta=0.5,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < math.log(2)  # training moved the margin (log 2 at zero margin)
    pm.save_pretrained(tmp_path / "adapter")
    base = rwasym.load(tmp_path / "base", dtype=torch.float64)
    tuned = rwasym.load(base, adapter=tmp_path / "adapter")
    adapted = base.matrices(["blocks.*.attn.*", "blocks.*.mlp.W_out"])
    assert all(tuned.adapter[s.name].norm() > 0 for s in adapted)
    assert all(tuned.adapter[s.name].rank == 0 for s in base.matrices("blocks.*.mlp.W_in"))
    dense = _dense_tuned(tmp_path / "base", tuned.adapter, torch.float64)
    kwargs = dict(k=4, null_samples=8, curves=False, seed=1, progress=False)
    _assert_rows_match(
        rwasym.probe(base, tuned, chosen, **kwargs).rows, rwasym.probe(base, dense, chosen, **kwargs).rows
    )


def test_intervene_and_spectra_cli_take_tuned_adapter(adapters, tmp_path, one_thread):
    """--tuned-adapter on `intervene` and `spectra post-training`: same numbers as the Python API on
    base + adapter."""
    from rwasym.analyses.companion import post_training_report
    from rwasym.studies.language import LanguageConfig, PairConfig, make_pairs

    folder, adapter_folder, _ = adapters["llama"]
    base = rwasym.load(folder)
    pairs = make_pairs(PairConfig(n_per_rule=6, prompt_len=6, cont_len=1), LanguageConfig(d_vocab=base.d_vocab))
    pairs.save(tmp_path / "pairs.safetensors")
    out = tmp_path / "sweep.jsonl"
    assert (
        main(
            [
                "intervene",
                "--base",
                str(folder),
                "--tuned-adapter",
                str(adapter_folder),
                "--pairs",
                str(tmp_path / "pairs.safetensors"),
                "--matrices",
                "blocks.0.attn.W_Q",
                "--directions",
                "pca:1,random:2",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    _, rows = rwasym.read_sweep(out)
    api = rwasym.run_sweep(
        base,
        rwasym.load(base, adapter=adapter_folder),
        pairs,
        matrices="blocks.0.attn.W_Q",
        directions="pca:1,random:2",
        out=tmp_path / "api.jsonl",
        progress=False,
    )
    assert [r["id"] for r in rows] == [r["id"] for r in api]
    assert [r["margin"] for r in rows] == pytest.approx([r["margin"] for r in api], rel=1e-9, abs=1e-12)
    assert (
        main(
            [
                "spectra",
                "post-training",
                "--base",
                str(folder),
                "--tuned-adapter",
                str(adapter_folder),
                "--k",
                "4",
                "--out",
                str(tmp_path / "pt"),
            ]
        )
        == 0
    )
    got = json.loads((tmp_path / "pt" / "results.json").read_text())["rows"]
    ref = post_training_report(base, rwasym.load(base, adapter=adapter_folder), k=4)["rows"]
    assert [r["consistency"] for r in got] == pytest.approx([r["consistency"] for r in ref])


def test_lora_probe_never_forms_a_dense_delta(adapters, monkeypatch, one_thread):
    """The README's claim: a LoRA probe works on the factors. Materialising ΔW (LowRankDelta.materialize)
    or forming W_tuned − W_base (WeightDeltas) inside it raises; the probe still runs and gives rows."""
    from rwasym.models import deltas as deltas_module

    folder, adapter_folder, _ = adapters["llama"]
    base = rwasym.load(folder)
    tuned = rwasym.load(base, adapter=adapter_folder)
    data = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(5))

    def refuse(*args, **kwargs):
        raise AssertionError("the LoRA probe formed a dense n_out × n_in ΔW")

    monkeypatch.setattr(LowRankDelta, "materialize", refuse)
    monkeypatch.setattr(deltas_module.WeightDeltas, "__getitem__", refuse)
    res = rwasym.probe(base, tuned, data, k=4, null_samples=8, progress=False)
    assert res.rows and res.curves and any(r["head"] is not None for r in res.rows)
    with pytest.raises(AssertionError, match="dense"):  # the trap is armed
        next(iter(tuned.adapter.values())).materialize()


def test_phi3_fused_gate_up_and_qkv_adapters(tmp_path, one_thread):
    """Phi-3 fuses q/k/v (qkv_proj) and the gated MLP's gate and up projections (gate_up_proj, its
    output chunked into [gate | up] by Phi3MLP): a peft adapter on both splits into W_Q/W_K/W_V and
    W_gate/W_in equal to peft's get_delta_weight split by hand, and the tuned model's logits are
    peft's."""
    from rwasym.testing.families import build_family

    hf = build_family("phi3", tmp_path / "base")
    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    pm.eval().save_pretrained(tmp_path / "adapter")
    base = rwasym.load(tmp_path / "base")
    names = base.host_module_names()
    assert names["blocks.0.mlp.W_in"] == names["blocks.0.mlp.W_gate"] == "model.layers.0.mlp.gate_up_proj"
    deltas = lora_deltas(base, tmp_path / "adapter")
    cfg = hf.config
    d_head = cfg.hidden_size // cfg.num_attention_heads
    sizes = [cfg.num_attention_heads * d_head, cfg.num_key_value_heads * d_head, cfg.num_key_value_heads * d_head]
    oracle = copy.deepcopy(pm).double()
    for layer in range(cfg.num_hidden_layers):
        mods = oracle.base_model.model.model.layers[layer]
        gate, up = mods.mlp.gate_up_proj.get_delta_weight("default").chunk(2, dim=0)
        q, k, v = mods.self_attn.qkv_proj.get_delta_weight("default").split(sizes, dim=0)
        for kind, want in (("mlp.W_gate", gate), ("mlp.W_in", up), ("attn.W_Q", q), ("attn.W_K", k), ("attn.W_V", v)):
            got = deltas[f"blocks.{layer}.{kind}"].materialize()
            assert (got - want).norm() <= 1e-10 * want.norm(), (layer, kind)
    tuned = rwasym.load(tmp_path / "base", adapter=tmp_path / "adapter")
    tokens = torch.randint(3, 90, (2, 10), generator=g)
    with torch.no_grad():
        want, got, plain = pm(tokens).logits, tuned.bridge(tokens), base.bridge(tokens)
    assert torch.allclose(got, want, atol=5e-6 * float(want.abs().max()), rtol=0)  # measured ≤ 4.7e-7 of the largest
    assert (plain - want).abs().max() > 1e-2
