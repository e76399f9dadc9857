"""Streaming weight deltas from safetensors checkpoints (`rwasym.models.shards`).

The oracle is the in-memory path: ``rwasym.weight_deltas(rwasym.load(base), rwasym.load(tuned))``
must equal the streamed ΔW bit for bit (names, order, layout, values) on GPT-2 (Conv1D, fused
``c_attn`` concatenated), Llama (GQA, gated MLP) and GPT-NeoX (``query_key_value`` interleaved per
head), for sharded and single-file checkpoints, in float32 and bfloat16.
"""

import json
import shutil

import pytest
import torch

import rwasym
from rwasym import RwasymError
from rwasym.models.shards import checkpoint_matrices, stream_weight_deltas, weight_delta_norms
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
        "model.layers.0.self_attn.k_proj.weight", "linear", (16, 32))  # GQA: 2 KV heads × 8
    files = {e.file for e in checkpoint_matrices(pairs["llama"][1])}
    assert len(files) > 1  # really spread over shards


def test_weight_delta_norms(pairs):
    base, tuned = pairs["llama"]
    norms = weight_delta_norms(base, tuned)
    expected = rwasym.weight_deltas(rwasym.load(base), rwasym.load(tuned))
    assert list(norms) == list(expected)
    for name, d in expected.items():
        assert norms[name] == pytest.approx(float(d.square().sum().sqrt()), rel=1e-12)


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
    with pytest.raises(RwasymError, match=r"differ at blocks.0.attn.W_K: base has .* \(16, 32\) with 2 heads.*one architecture"):
        stream_weight_deltas(pairs["llama"][0], pairs["gpt2"][1])  # raised at the call, nothing read
    # same architecture, but the config promises a wider MLP than the weights hold
    lying = tmp_path / "lying"
    shutil.copytree(pairs["llama"][1], lying)
    config = json.loads((lying / "config.json").read_text())
    config["intermediate_size"] = 64
    (lying / "config.json").write_text(json.dumps(config))
    with pytest.raises(RwasymError, match=r"blocks.0.mlp.W_in: tensor model.layers.0.mlp.up_proj.weight .* shape \(48, 32\)"):
        list(stream_weight_deltas(pairs["llama"][0], lying))


def test_missing_key_names_the_matrix(pairs, tmp_path):
    from safetensors.torch import load_file, save_file

    base, _ = pairs["neox"]
    holed = tmp_path / "holed"
    shutil.copytree(base, holed)
    state = load_file(str(holed / "model.safetensors"))
    del state["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
    save_file(state, str(holed / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RwasymError, match=r"blocks.1.mlp.W_out: the tuned checkpoint .* no tensor "
                                          r"gpt_neox.layers.1.mlp.dense_4h_to_h.weight"):
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
