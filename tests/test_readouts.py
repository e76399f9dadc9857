"""Readouts (`rwasym.analyses.readouts`, ``probe(..., readouts=n)``, `rwasym.hooks.contexts`). Oracles: top
contexts against a brute-force pass over every token, token readouts against the unembedding assembled by hand from
the bridge's parameters, directions against torch's SVD of ΔW, and on the real SmolLM2 model a causal check:
transplanting a readout's rank-1 component moves the logits of its top tokens in the stated sign."""

import copy
import warnings

import pytest
import torch

import rwasym
from rwasym.analyses.readouts import delta_directions, token_readout
from rwasym.hooks.activations import capture, exclusion_mask
from rwasym.models import native_config
from rwasym.testing import perturb


@pytest.fixture(scope="module")
def native():
    base = rwasym.load(native_config(n_layers=2, d_model=32, d_head=8, n_heads=4, d_vocab=64))
    tuned = perturb(copy.deepcopy(base), pattern="blocks.1.*.*")
    return base, tuned


def _tokens():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (11, 14), generator=g)
    mask = torch.ones(11, 14, dtype=torch.long)
    mask[2, :5] = 0  # left padding
    mask[7, :3] = 0
    return {"input_ids": tokens, "attention_mask": mask}


def test_top_contexts_equal_a_brute_force_pass(native):
    """Streaming top-4 / bottom-4 over batches of 3 (padding, an excluded sink position) equals sorting every
    counted token's score from one hooked pass per batch."""
    base, _ = native
    data = _tokens()
    site = base.input_hook("blocks.1.attn.W_Q")
    V = torch.randn(32, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    acts = capture(
        base,
        data,
        sites=[site],
        batch_size=3,
        exclude_positions=(0,),
        contexts={"q": (site, V)},
        context_top=4,
        context_window=5,
    )
    kept = exclusion_mask(data["input_ids"], data["attention_mask"].bool(), (0,), ())
    seen = []
    for start in range(0, 11, 3):
        tok, m = data["input_ids"][start : start + 3], data["attention_mask"][start : start + 3]
        _, cache = base.bridge.run_with_cache(tok, attention_mask=m, names_filter=[site])
        seen.append(cache[site].reshape(tok.shape[0], tok.shape[1], -1))
    act = torch.cat(seen).to(torch.float64)  # (11, 14, 32)
    scores = act @ V  # (11, 14, 3)
    for j in range(3):
        s = scores[..., j][kept]
        where = kept.nonzero()
        for name, order in (("top", s.argsort(descending=True)), ("bottom", s.argsort())):
            got = acts.contexts["q"].to_dicts(j)[name]
            want = [(int(where[i, 0]), int(where[i, 1])) for i in order[:4]]
            assert [(c["seq"], c["pos"]) for c in got] == want
            assert [c["score"] for c in got] == pytest.approx([float(s[i]) for i in order[:4]], rel=1e-6)
    for c in acts.contexts["q"].to_dicts(0)["top"] + acts.contexts["q"].to_dicts(1)["bottom"]:
        win = slice(max(0, c["pos"] - 4), c["pos"] + 1)  # window 5 ending at the position, padding left out
        assert c["ids"] == data["input_ids"][c["seq"], win][data["attention_mask"][c["seq"], win].bool()].tolist()
    assert acts.n_tokens == int(kept.sum())  # the statistics of the same pass are untouched


def test_token_readout_equals_the_hand_assembled_unembedding(native):
    """l = W̃_Uᵀ u with W̃_U = diag(γ_ln_final)·W_U read off the bridge's parameters by hand."""
    base, _ = native
    u = torch.randn(32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w_u = base.bridge.unembed.W_U.detach().to(torch.float64)  # (d_model, vocab)
    gamma = base.final_norm_scale()
    logits = (w_u * (gamma[:, None] if gamma is not None else 1.0)).T @ u
    out = token_readout(base.unembedding(), u, top=5)
    assert [e["id"] for e in out["top"]] == logits.argsort(descending=True)[:5].tolist()
    assert [e["id"] for e in out["bottom"]] == logits.argsort()[:5].tolist()
    assert out["top"][0]["logit"] == pytest.approx(float(logits.max()), rel=1e-12)


@pytest.mark.parametrize("shape", [(300, 420), (420, 300), (330, 330)])
def test_wide_directions_from_the_gram_equal_the_svd(shape):
    """Both sides above GRAM_ABOVE: the Gram route's triplets equal torch's SVD (vectors up to their joint sign)."""
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(*shape, generator=g, dtype=torch.float64) @ torch.diag(
        torch.linspace(3, 0.1, shape[1], dtype=torch.float64)
    )
    sigma, U, V, energy = delta_directions(delta, 3)
    U0, s0, Vh0 = torch.linalg.svd(delta, full_matrices=False)
    assert sigma.tolist() == pytest.approx(s0[:3].tolist(), rel=1e-12)
    assert torch.allclose((U.T @ U0[:, :3]).abs().diagonal(), torch.ones(3, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(delta @ V, U * sigma, atol=1e-9) and energy == pytest.approx(float((s0**2).sum()), rel=1e-12)
    low = torch.randn(shape[0], 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, shape[1], generator=g, dtype=torch.float64
    )
    assert delta_directions(low, 5)[0].numel() == 2  # the rank, not n


def test_probe_readouts_are_the_svd_and_leave_the_rows_unchanged(native, tmp_path):
    base, tuned = native
    data = _tokens()
    kw = dict(k=2, null_samples=4, batch_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # blocks.0 is untouched: ΔW = 0 there, by design
        plain = rwasym.probe(base, tuned, data, **kw)
        read = rwasym.probe(base, tuned, data, readouts=2, readout_top=3, **kw)
    assert read.rows == [{**r} for r in plain.rows] and read.curves == plain.curves
    rows = [r for r in read.readouts if r["matrix"] == "blocks.1.mlp.W_out"]
    delta = tuned.weight("blocks.1.mlp.W_out") - base.weight("blocks.1.mlp.W_out")
    U, s, Vh = torch.linalg.svd(delta)
    assert [r["sigma"] for r in rows] == pytest.approx(s[:2].tolist(), rel=1e-12)
    assert rows[0]["energy_share"] == pytest.approx(float(s[0] ** 2 / (s**2).sum()), rel=1e-12)
    sigma, U2, V2, _ = delta_directions(delta, 2)
    assert torch.allclose((U2.T @ U[:, :2]).abs().diagonal(), torch.ones(2, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(delta @ V2, U2 * sigma, atol=1e-12)  # (u, v) flipped together: one rank-1 component
    assert rows[0]["tokens"]["top"][0]["id"] == token_readout(base.unembedding(), U2[:, 0], 3)["top"][0]["id"]
    q = next(r for r in read.readouts if r["matrix"] == "blocks.1.attn.W_Q")
    assert q["tokens"] is None and len(q["contexts"]["top"]) == 3  # read matrix: contexts only
    assert not [r for r in read.readouts if r["matrix"] and r["layer"] == 0]  # untouched: no readout
    assert [r["kind"] for r in read.readouts].count("prediction") == 2
    from rwasym import report

    report.readout_tokens(rows[0], tmp_path / "tokens.png")
    assert (tmp_path / "tokens.png").stat().st_size > 0
    frame = read.to_dataframe("readouts")
    assert len(frame) == len(read.readouts) and "contexts" in frame.columns
    with pytest.raises(rwasym.RwasymError, match="own capture pass"):
        rwasym.probe(base, tuned, None, activations=capture(base, data), readouts=1, **kw)


def test_a_readout_moves_its_top_tokens_in_the_stated_sign_on_the_real_model(real_folder):
    """SmolLM2-135M's first four blocks, a planted Gaussian ΔW on blocks.2.mlp.W_out. Transplanting the readout's
    rank-1 component σ u vᵀ into the base raises its top tokens' logits against its bottom tokens' where v·a > 0
    (the top contexts) and lowers them where v·a < 0 (the bottom contexts)."""
    folder = real_folder(4)
    base = rwasym.load(folder, dtype=torch.float32)
    name = "blocks.2.mlp.W_out"
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(3)
    tuned.set_weight(
        name, base.weight(name) + 0.02 * torch.randn(base.matrix(name).shape, generator=g, dtype=torch.float64)
    )
    text = " ".join((rwasym.probe.__doc__ or "").split())[:3000]
    ids = base.tokenizer(text, return_tensors="pt")["input_ids"][:, :384].reshape(6, 64)
    res = rwasym.probe(base, tuned, ids, k=2, null_samples=0, matrices=name, readouts=1, readout_top=10, heads=False)
    row = next(r for r in res.readouts if r["matrix"] == name)
    sigma, U, V, _ = delta_directions(tuned.weight(name) - base.weight(name), 1)
    top = [e["id"] for e in row["tokens"]["top"]]
    bottom = [e["id"] for e in row["tokens"]["bottom"]]
    for sign, contexts in ((1.0, row["contexts"]["top"][:3]), (-1.0, row["contexts"]["bottom"][:3])):
        for c in contexts:
            assert sign * c["score"] > 0
            tok = ids[c["seq"] : c["seq"] + 1, : c["pos"] + 1]
            with torch.no_grad():
                before = base.bridge(tok)[0, -1].double()
                with base.edit({name: base.weight(name) + sigma[0] * torch.outer(U[:, 0], V[:, 0])}):
                    after = base.bridge(tok)[0, -1].double()
            shift = after - before
            assert sign * (float(shift[top].mean()) - float(shift[bottom].mean())) > 0
    assert "text" in row["contexts"]["top"][0]  # decoded with the model's tokenizer
