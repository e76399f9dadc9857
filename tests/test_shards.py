"""Streaming weight deltas from safetensors checkpoints (`rwasym.models.checkpoint`).

The oracle is the in-memory path: ``rwasym.weight_deltas(rwasym.load(base), rwasym.load(tuned))``
must equal the streamed ΔW bit for bit (names, order, layout, values) on GPT-2 (Conv1D, fused
``c_attn`` concatenated), Llama (GQA, gated MLP) and GPT-NeoX (``query_key_value`` interleaved per
head), for sharded and single-file checkpoints, in float32 and bfloat16.
"""

import importlib
import json
import os
import shutil

import pytest
import torch

import rwasym
from rwasym import RwasymError
from rwasym.models.checkpoint import checkpoint_matrices, stream_weight_deltas, weight_delta_norms
from rwasym.testing import HF_ARCHS

_SHARD = "20KB"  # the tiny models are ~100 KB: several shards each


def _tuned_copy(hf_model, src, folder, *, shard=_SHARD, dtype=torch.float32, seed=1):
    """Perturb every parameter of a copy of ``hf_model`` and save it (config + safetensors), with
    the tokenizer of ``src`` (rwasym.load needs one; streaming does not)."""
    model = type(hf_model)(hf_model.config)
    model.load_state_dict(hf_model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.to(dtype).save_pretrained(folder, max_shard_size=shard)
    for file in src.glob("*token*"):
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def pairs(hf_folder, tmp_path_factory):
    """arch -> (base folder, sharded fp32 tuned folder); the base folders are single-file."""
    root = tmp_path_factory.mktemp("shards")
    return {arch: (folder, _tuned_copy(hf, folder, root / arch)) for arch, (folder, hf) in hf_folder.items()}


def _assert_equal_to_load(base, tuned, pattern=None):
    streamed = list(stream_weight_deltas(base, tuned, pattern))
    expected = rwasym.weight_deltas(rwasym.load(base), rwasym.load(tuned), pattern)
    assert [name for name, _ in streamed] == list(expected)
    for name, delta in streamed:
        assert delta.dtype == torch.float64 and delta.shape == expected[name].shape, name
        assert torch.equal(delta, expected[name]), (name, float((delta - expected[name]).abs().max()))
    return streamed


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_streamed_deltas_equal_weight_deltas_sharded(pairs, arch):
    base, tuned = pairs[arch]
    assert len(list(tuned.glob("*.safetensors"))) > 2 and (tuned / "model.safetensors.index.json").exists()
    streamed = _assert_equal_to_load(base, tuned)
    assert all(float(d.abs().max()) > 0 for _, d in streamed)  # every matrix really changed


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_streamed_deltas_single_file_and_bfloat16(hf_folder, tmp_path, arch):
    """bf16 → float64 is exact, and so is bf16 → float32 (rwasym.load) → float64: bit-equal."""
    folder, hf = hf_folder[arch]
    tuned = _tuned_copy(hf, folder, tmp_path / "bf16", shard="10GB", dtype=torch.bfloat16, seed=2)
    assert (tuned / "model.safetensors").exists() and not (tuned / "model.safetensors.index.json").exists()
    config = json.loads((tuned / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    _assert_equal_to_load(folder, tuned)
    _assert_equal_to_load(tuned, folder, "blocks.1.*.*")  # bf16 base, fp32 tuned; a pattern


def test_checkpoint_matrices_keys_and_layouts(pairs):
    """The layouts the docstring states: Conv1D transposed, fused rows concat / interleaved."""
    gpt2 = {e.name: e for e in checkpoint_matrices(pairs["gpt2"][1])}
    q, k, v = (gpt2[f"blocks.0.attn.{x}"] for x in ("W_Q", "W_K", "W_V"))
    assert q.key == k.key == v.key == "transformer.h.0.attn.c_attn.weight"
    assert q.layout == "fused-conv1d" and q.host_shape == (32, 96)
    assert (q.rows, k.rows, v.rows) == (tuple(range(32)), tuple(range(32, 64)), tuple(range(64, 96)))
    assert gpt2["blocks.0.mlp.W_in"].layout == "conv1d" and gpt2["blocks.0.mlp.W_in"].host_shape == (32, 128)
    neox = {e.name: e for e in checkpoint_matrices(pairs["neox"][1])}
    d_head = 8  # rows grouped per head as [h, (q, k, v), d_head]
    expected_k = tuple(h * 3 * d_head + d_head + i for h in range(4) for i in range(d_head))
    assert neox["blocks.1.attn.W_K"].rows == expected_k
    assert neox["blocks.1.attn.W_K"].key == "gpt_neox.layers.1.attention.query_key_value.weight"
    llama = checkpoint_matrices(pairs["llama"][1], "blocks.0.attn.*")
    assert [(e.key, e.layout, e.spec.shape) for e in llama][1] == (
        "model.layers.0.self_attn.k_proj.weight",
        "linear",
        (16, 32),
    )  # GQA: 2 KV heads × 8
    files = {e.file for e in checkpoint_matrices(pairs["llama"][1])}
    assert len(files) > 1  # really spread over shards


def test_weight_delta_norms(pairs):
    base, tuned = pairs["llama"]
    norms = weight_delta_norms(base, tuned)
    expected = rwasym.weight_deltas(rwasym.load(base), rwasym.load(tuned))
    assert list(norms) == list(expected)
    for name, d in expected.items():
        assert norms[name] == pytest.approx(float(d.square().sum().sqrt()), rel=1e-12)


def test_phi3_fused_gate_up_streams(tmp_path):
    """Phi-3 stores W_gate and W_in as the halves [gate | up] of one ``mlp.gate_up_proj`` tensor (and
    W_Q, W_K, W_V as rows of ``self_attn.qkv_proj``): streaming reads each matrix's rows of it."""
    from rwasym.testing.families import build_family

    hf = build_family("phi3", tmp_path / "base")
    tuned = _tuned_copy(hf, tmp_path / "base", tmp_path / "tuned")
    _assert_equal_to_load(tmp_path / "base", tuned)
    entries = {e.name: e for e in checkpoint_matrices(tuned, "blocks.1.mlp.*")}
    gate, up = entries["blocks.1.mlp.W_gate"], entries["blocks.1.mlp.W_in"]
    assert gate.key == up.key == "model.layers.1.mlp.gate_up_proj.weight" and gate.host_shape == (96, 32)
    assert (gate.rows, up.rows) == (tuple(range(48)), tuple(range(48, 96)))


# -- errors --------------------------------------------------------------------------------------
def test_missing_and_corrupt_folders(pairs, tmp_path):
    base, tuned = pairs["llama"]
    with pytest.raises(RwasymError, match="does not exist"):
        list(stream_weight_deltas(tmp_path / "nope", tuned))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RwasymError, match="no config.json"):
        list(stream_weight_deltas(base, empty))
    # config but no weights
    shutil.copy(base / "config.json", empty / "config.json")
    with pytest.raises(RwasymError, match="neither model.safetensors nor"):
        list(stream_weight_deltas(base, empty))
    # a truncated shard
    broken = tmp_path / "broken"
    shutil.copytree(tuned, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    shard = broken / index["model.layers.1.mlp.down_proj.weight"]  # one holding a studied matrix
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(RwasymError, match="truncated or corrupt"):
        list(stream_weight_deltas(base, broken))
    # a shard listed in the index but missing
    shard.unlink()
    with pytest.raises(RwasymError, match="is missing"):
        list(stream_weight_deltas(base, broken))
    # a corrupt single file
    single = tmp_path / "single"
    shutil.copytree(base, single)
    (single / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(RwasymError, match="truncated or corrupt"):
        list(stream_weight_deltas(single, tuned))


def test_architecture_mismatch_names_the_matrix(pairs, tmp_path):
    with pytest.raises(
        RwasymError, match=r"differ at blocks.0.attn.W_K: base has .* \(16, 32\) with 2 heads.*one architecture"
    ):
        stream_weight_deltas(pairs["llama"][0], pairs["gpt2"][1])  # raised at the call, nothing read
    # same architecture, but the config promises a wider MLP than the weights hold
    lying = tmp_path / "lying"
    shutil.copytree(pairs["llama"][1], lying)
    config = json.loads((lying / "config.json").read_text())
    config["intermediate_size"] = 64
    (lying / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        RwasymError, match=r"blocks.0.mlp.W_in: tensor model.layers.0.mlp.up_proj.weight .* shape \(48, 32\)"
    ):
        list(stream_weight_deltas(pairs["llama"][0], lying))


def test_missing_key_names_the_matrix(pairs, tmp_path):
    from safetensors.torch import load_file, save_file

    base, _ = pairs["neox"]
    holed = tmp_path / "holed"
    shutil.copytree(base, holed)
    state = load_file(str(holed / "model.safetensors"))
    del state["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
    save_file(state, str(holed / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        RwasymError,
        match=r"blocks.1.mlp.W_out: the tuned checkpoint .* no tensor "
        r"gpt_neox.layers.1.mlp.dense_4h_to_h.weight",
    ):
        list(stream_weight_deltas(base, holed))


def test_non_finite_delta(pairs, tmp_path):
    from safetensors.torch import load_file, save_file

    base, _ = pairs["gpt2"]
    bad = tmp_path / "nan"
    shutil.copytree(base, bad)
    state = load_file(str(bad / "model.safetensors"))
    state["transformer.h.0.mlp.c_proj.weight"][3, 4] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RwasymError, match="ΔW of blocks.0.mlp.W_out contains NaN"):
        list(stream_weight_deltas(base, bad))


def test_float16_checkpoint(hf_folder, tmp_path):
    folder, hf = hf_folder["llama"]
    tuned = _tuned_copy(hf, folder, tmp_path / "fp16", dtype=torch.float16, seed=3)
    _assert_equal_to_load(folder, tuned)


def test_checkpoint_without_base_model_prefix(pairs, tmp_path):
    """Older GPT-2 checkpoints store ``h.0.attn.c_attn.weight`` (no ``transformer.``)."""
    from safetensors.torch import load_file, save_file

    base, tuned = pairs["gpt2"]
    bare = tmp_path / "bare"
    shutil.copytree(base, bare)
    state = load_file(str(bare / "model.safetensors"))
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    save_file(state, str(bare / "model.safetensors"), metadata={"format": "pt"})
    assert checkpoint_matrices(bare)[0].key == "h.0.attn.c_attn.weight"
    _assert_equal_to_load(bare, tuned)


# -- the analyses take the streaming path for a tuned checkpoint folder ----------------------
def _refuse_loading(monkeypatch, folder):
    """Make ``rwasym.load(folder)`` raise, wherever it is called from: the tuned side must be streamed."""
    import rwasym.models.loading as loading

    real = loading.load

    def guarded(source, *args, **kwargs):
        if isinstance(source, (str, os.PathLike)) and os.path.realpath(source) == os.path.realpath(folder):
            raise AssertionError(f"{folder} was loaded; it should have been streamed")
        return real(source, *args, **kwargs)

    for module in (
        "rwasym.models.loading",
        "rwasym.models",
        "rwasym.analyses.probe",
        "rwasym.analyses.companion",
        "rwasym.app.spectra",
    ):
        monkeypatch.setattr(importlib.import_module(module), "load", guarded)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_checkpoint_deltas_equal_loaded_deltas(pairs, arch):
    """CheckpointDeltas (tuned read from its files, base loaded) = the in-memory ΔW, bit for bit,
    in any lookup order (a fused qkv host re-read when the order jumps)."""
    from rwasym.models.checkpoint import CheckpointDeltas, CheckpointWeights, is_checkpoint_folder

    base_folder, tuned_folder = pairs[arch]
    assert is_checkpoint_folder(tuned_folder) and is_checkpoint_folder(str(base_folder))
    assert not is_checkpoint_folder(tuned_folder / "config.json") and not is_checkpoint_folder(object())
    base, tuned = rwasym.load(base_folder), rwasym.load(tuned_folder)
    streamed = CheckpointDeltas(base, tuned_folder)
    expected = rwasym.weight_deltas(base, tuned)
    names = list(expected)
    assert list(streamed) == names
    for name in names + names[::-1]:
        assert torch.equal(streamed[name], expected[name]), name
    weights = CheckpointWeights(tuned_folder)
    assert list(weights) == names
    assert all(torch.equal(weights[n], tuned.weight(n)) for n in names[::3])
    with pytest.raises(RwasymError, match="no weight delta"):
        streamed["blocks.9.attn.W_Q"]
    with pytest.raises(RwasymError, match="does not exist"):
        CheckpointDeltas(base, str(tuned_folder / "missing"))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_probe_streams_a_tuned_folder(pairs, arch, monkeypatch):
    """probe(base, tuned_folder) never loads the tuned model and gives the rows of the loaded path."""
    base_folder, tuned_folder = pairs[arch]
    base = rwasym.load(base_folder)
    tokens = torch.randint(0, base.d_vocab, (8, 16), generator=torch.Generator().manual_seed(0))
    acts = rwasym.capture(base, tokens)
    loaded = rwasym.probe(base, rwasym.load(tuned_folder), activations=acts, null_samples=8, k=4)
    _refuse_loading(monkeypatch, tuned_folder)
    streamed = rwasym.probe(base, tuned_folder, activations=acts, null_samples=8, k=4)
    assert streamed.config["tuned_streamed"] is True and loaded.config["tuned_streamed"] is False
    assert len(streamed.rows) == len(loaded.rows) > 20
    _assert_rows_close(streamed.rows, loaded.rows)
    _assert_rows_close(streamed.curves, loaded.curves)


def _assert_rows_close(got, want):
    """Equal rows up to float rounding: ΔW is bit-equal, but a Conv1D ΔW read from a file has
    another memory layout than Model.weight's, so BLAS sums in another order (measured ≤ 4e-16)."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            x, y = a[key], b[key]
            if isinstance(x, float) or (isinstance(x, list) and x and isinstance(x[0], float)):
                assert x == pytest.approx(y, rel=1e-12, abs=1e-15), (a["matrix"], key)
            else:
                assert x == y, (a["matrix"], key)


def test_post_training_report_streams_a_tuned_folder(pairs, monkeypatch):
    from rwasym.analyses.companion import post_training_report

    base_folder, tuned_folder = pairs["llama"]
    base = rwasym.load(base_folder)
    loaded = post_training_report(base, rwasym.load(tuned_folder), k=4)
    _refuse_loading(monkeypatch, tuned_folder)
    streamed = post_training_report(base, tuned_folder, k=4)
    assert len(streamed["rows"]) == len(base.matrices()) > 0
    _assert_rows_close(streamed["rows"], loaded["rows"])
    assert streamed["by_kind"].keys() == loaded["by_kind"].keys()


def test_cli_probe_streams_a_tuned_folder(pairs, tmp_path, monkeypatch):
    from rwasym.app.cli import main

    base_folder, tuned_folder = pairs["llama"]
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    from safetensors.torch import save_file

    save_file({"input_ids": tokens}, str(tmp_path / "tokens.safetensors"))
    _refuse_loading(monkeypatch, tuned_folder)
    assert (
        main(
            [
                "probe",
                "--base",
                str(base_folder),
                "--tuned",
                str(tuned_folder),
                "--data",
                str(tmp_path / "tokens.safetensors"),
                "--out",
                str(tmp_path / "p.json"),
                "--null-samples",
                "4",
                "--post-norm",
                "raw",
                "--quiet",
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["config"]["tuned_streamed"] is True and result["rows"] and result["config"]["post_norm"] == "raw"


# -- the old module paths (their aliases are tested with every moved path in tests/test_moved.py) ---------
def test_nothing_in_models_imports_the_old_paths():
    import ast
    from pathlib import Path

    folder = Path(rwasym.models.__file__).parent
    for path in sorted(folder.glob("*.py")):
        if path.stem in ("shards", "layouts"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                targets = [("." * node.level) + (node.module or "")] + [
                    ("." * node.level) + a.name for a in node.names if not node.module
                ]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                assert target.rsplit(".", 1)[-1] not in ("shards", "layouts"), (path.name, target)
