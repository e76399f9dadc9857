"""Block-streamed execution (`rwasym.models.streaming`, `capture_blocks`, ``probe(stream=True)``) on a tiny
Llama saved as a sharded checkpoint: the oracle is the same computation on the model loaded whole
(`rwasym.load`), which must agree bit for bit. Every family is covered by tests/test_families.py."""

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import rwasym
from rwasym import RwasymError
from rwasym.hooks.activations import capture, capture_blocks
from rwasym.models.streaming import BlockStream
from rwasym.testing import save_perturbed_copy
from rwasym.testing.families import build_family


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(base folder, tuned folder, replicate folder) of a tiny random Llama, sharded safetensors."""
    root = tmp_path_factory.mktemp("stream")
    hf = build_family("llama", root / "base")
    hf.save_pretrained(root / "base", max_shard_size="40KB")
    for name, seed in (("tuned", 1), ("replicate", 2)):
        save_perturbed_copy(hf, root / name, seed, tokenizer_from=root / "base")
    return root / "base", root / "tuned", root / "replicate"


def _data(seed=0, rows=7, length=12):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 96, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, :3] = 0
    mask[4, :6] = 0
    return {"input_ids": tokens, "attention_mask": mask}


def test_capture_blocks_equals_capture(pair):
    """Each block's statistics equal those of one resident capture pass (same batches), bit for bit, with
    padding, a token budget that ends mid-batch and an excluded sink position; blocks after the last site
    are not read."""
    base_folder, _, _ = pair
    base = rwasym.load(base_folder)
    kw = dict(batch_size=3, max_tokens=50, exclude_positions=(0,))
    ref = capture(base, _data(), **kw)
    in0 = [base.input_hook(f"blocks.0.{m}") for m in ("mlp.W_out", "attn.W_Q")]
    sites = ["blocks.0.hook_resid_pre", *in0, base.input_hook("blocks.1.attn.W_O")]  # a TL alias among them
    ref_sites = capture(base, _data(), sites=sites, **kw)
    stream = BlockStream(base_folder)
    seen = {}
    for layer, acts in capture_blocks(stream, _data(), **kw):
        # yielded while the block is read: its parameters are real, the others' are not
        assert all(p.device.type == "cpu" for p in stream.model.bridge.blocks[layer].parameters())
        other = stream.model.bridge.blocks[1 - layer]
        assert all(p.device.type == "meta" for p in other.parameters())
        for site, stats in acts.stats.items():
            seen[site] = stats
    assert set(seen) == set(ref.stats) and len(seen) == 14
    for site, stats in seen.items():
        assert stats.count == ref[site].count == 50
        assert torch.equal(stats.covariance(), ref[site].covariance()) and torch.equal(stats.mean(), ref[site].mean())
    layers = [layer for layer, _ in capture_blocks(stream, _data(), sites=sites[:3], **kw)]
    assert layers == [0]  # block 1 is never read
    got = {s: st for _, acts in capture_blocks(stream, _data(), sites=sites, **kw) for s, st in acts.stats.items()}
    for site in sites:
        hook = base.residual_hooks().get(site, site)
        assert torch.equal(got[hook].covariance(), ref_sites[site].covariance()), site
    with pytest.raises(RwasymError, match="inside blocks only"):
        next(capture_blocks(stream, _data(), sites={"ln_final.hook_normalized": 32}))
    with pytest.raises(RwasymError, match="no tokens were captured"):
        next(
            capture_blocks(
                stream, {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4)}
            )
        )


def test_a_failure_inside_a_block_frees_it(pair):
    stream = BlockStream(pair[0])
    with pytest.raises(ZeroDivisionError):
        with stream.block(1) as block:
            assert all(p.device.type == "cpu" for p in block.parameters())
            _ = 1 / 0
    assert all(p.device.type == "meta" for p in stream.model.bridge.parameters())
    with stream.outside() as model:  # embeddings, final norm, unembedding read for the call
        assert model.unembedding().shape == (model.d_model, model.d_vocab)
    assert all(p.device.type == "meta" for p in stream.model.bridge.parameters())


@pytest.mark.parametrize("delta", ["tuned", "base_weight", "random_delta", "noise_floor"])
def test_streamed_probe_rows_equal_the_resident_probe(pair, delta):
    base_folder, tuned_folder, replicate_folder = pair
    kw = dict(k=3, null_samples=8, batch_size=3, delta=delta, subspaces="activation,prediction,prediction_centered")
    extra = {"replicate": replicate_folder} if delta == "noise_floor" else {}
    tuned_loaded = rwasym.load(tuned_folder) if delta == "noise_floor" else tuned_folder
    resident = rwasym.probe(rwasym.load(base_folder), tuned_loaded, _data(), **kw, **extra)
    streamed = rwasym.probe(base_folder, tuned_folder, _data(), stream=True, **kw, **extra)
    assert len(resident.rows) > 0 and streamed.rows == resident.rows and streamed.curves == resident.curves
    assert streamed.config["capture_passes"] == 1 and streamed.config["stream"] is True


def test_streamed_probe_refuses_what_it_cannot_serve(pair, native_cfg):
    base_folder, tuned_folder, _ = pair
    data = _data()
    with pytest.raises(RwasymError, match="stream=True reads every model from a Hugging Face checkpoint folder"):
        rwasym.probe(native_cfg, tuned_folder, data, stream=True)
    with pytest.raises(RwasymError, match="the tuned is"):
        rwasym.probe(base_folder, rwasym.load(tuned_folder), data, stream=True)
    acts = capture(rwasym.load(base_folder), data)
    with pytest.raises(RwasymError, match="pass data=, not activations="):
        rwasym.probe(base_folder, tuned_folder, activations=acts, stream=True)
    with pytest.raises(RwasymError, match="prediction_fisher subspace"):
        rwasym.probe(base_folder, tuned_folder, data, stream=True, subspaces="activation,prediction_fisher")


def test_cli_probe_streams(pair, tmp_path):
    from rwasym.app.cli import main

    base_folder, tuned_folder, _ = pair
    save_file({"input_ids": _data()["input_ids"]}, str(tmp_path / "tokens.safetensors"))
    args = [
        "probe",
        "--base",
        str(base_folder),
        "--tuned",
        str(tuned_folder),
        "--data",
        str(tmp_path / "tokens.safetensors"),
    ]
    args += ["--k", "2", "--null-samples", "0", "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*args, "--stream", "--out", str(tmp_path / "s.json")]) == 0
        assert main([*args, "--out", str(tmp_path / "r.json")]) == 0
    streamed, resident = (json.loads((tmp_path / f).read_text()) for f in ("s.json", "r.json"))
    assert streamed["rows"] == resident["rows"] and streamed["config"]["stream"] is True


def test_hub_names_stream_from_the_hub_cache_offline(pair, tmp_path, monkeypatch):
    """A hub name (and NAME@REVISION) is read from its snapshot in huggingface_hub's cache layout
    (models--org--name/snapshots/<commit>, refs/<revision>) with the hub unreachable; its rows equal the
    folders'. A name in no cache is refused with an RwasymError, not a hub traceback."""
    import shutil

    import huggingface_hub.constants as hub

    from rwasym.models.loading import checkpoint_folder

    base_folder, tuned_folder, _ = pair
    cache = tmp_path / "hub"
    for repo, folder, ref, commit in (
        ("tiny", base_folder, "main", "a" * 40),
        ("tiny-dpo", tuned_folder, "v1", "b" * 40),
    ):
        root = cache / f"models--org--{repo}"
        shutil.copytree(folder, root / "snapshots" / commit)
        (root / "refs").mkdir()
        (root / "refs" / ref).write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    assert checkpoint_folder("org/tiny") == cache / "models--org--tiny" / "snapshots" / ("a" * 40)
    assert checkpoint_folder("org/tiny-dpo@v1") == cache / "models--org--tiny-dpo" / "snapshots" / ("b" * 40)
    assert checkpoint_folder("org/absent") is None and checkpoint_folder("org/tiny-dpo@v2") is None
    kw = dict(k=3, null_samples=4, batch_size=3)
    from_hub = rwasym.probe("org/tiny", "org/tiny-dpo@v1", _data(), stream=True, **kw)
    from_folders = rwasym.probe(base_folder, tuned_folder, _data(), stream=True, **kw)
    assert from_hub.rows == from_folders.rows and len(from_hub.rows) > 0
    with pytest.raises(RwasymError, match="no hub name with a safetensors snapshot"):
        BlockStream("org/absent")
    with pytest.raises(RwasymError, match="a hub name's safetensors snapshot"):
        rwasym.probe("org/tiny", "org/absent", _data(), stream=True, **kw)


def test_large_tensors_are_read_in_row_blocks_with_the_same_values(pair, monkeypatch):
    """Tensors above `_DIRECT_BYTES` (an 8B model's embedding) are copied into their result in row blocks;
    the values are those of a whole read, so the hidden states are too."""
    import rwasym.models.streaming as streaming

    tokens = _data()["input_ids"][:2]
    whole = BlockStream(pair[0]).record(tokens).hidden
    monkeypatch.setattr(streaming, "_DIRECT_BYTES", 200)  # every matrix in blocks of a few rows
    stream = BlockStream(pair[0])
    assert torch.equal(stream.record(tokens).hidden, whole)
    with stream.block(0) as block:
        loaded = rwasym.load(pair[0])
        assert all(torch.equal(p, q) for p, q in zip(block.parameters(), loaded.bridge.blocks[0].parameters()))


def test_two_folders_give_their_delta_read_together(pair, monkeypatch):
    """`CheckpointWeights.delta_to` (the streamed probe's ΔW of two folders, read jointly in row blocks) equals the
    difference of the two matrices read separately, bit for bit, for every studied matrix; `WeightDeltas` of two
    folders uses it."""
    from rwasym.models.checkpoint import CheckpointWeights
    from rwasym.models.deltas import WeightDeltas

    base, tuned, _ = pair
    b, t = CheckpointWeights(base), CheckpointWeights(tuned)
    names = list(b)
    assert names and all(torch.equal(b.delta_to(t, n), t[n] - b[n]) for n in names)
    calls = []
    real = CheckpointWeights.delta_to
    deltas = WeightDeltas(b, t, names)
    monkeypatch.setattr(
        CheckpointWeights, "delta_to", lambda self, other, name: (calls.append(name), real(self, other, name))[1]
    )
    assert torch.equal(deltas[names[0]], t[names[0]] - b[names[0]]) and calls == [names[0]]
