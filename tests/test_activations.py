"""Capture oracle: streaming float64 statistics equal torch.cov over explicitly cached activations."""

import pytest
import torch

import rwasym
from rwasym import RwasymError
from rwasym.hooks.activations import capture, default_sites
from rwasym.models import flatten_site


@pytest.fixture(scope="module")
def model(native_cfg):
    return rwasym.load(native_cfg)


def _data(model, n=6, pos=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.d_vocab, (n, pos), generator=g)
    mask = torch.ones(n, pos, dtype=torch.long)
    mask[1, 7:] = 0  # right padding on two rows
    mask[n - 2, 3:] = 0
    return tokens, mask


def _cached_rows(model, tokens, mask, hook, width):
    _, cache = model.bridge.run_with_cache(tokens, attention_mask=mask)
    return flatten_site(cache[hook], width)[mask.bool()].double()


def test_default_sites_dedupe_and_cover(model):
    sites = default_sites(model)
    assert "blocks.0.attn.q.hook_in" in sites and "blocks.0.attn.k.hook_in" not in sites
    assert sites["blocks.1.mlp.out.hook_in"] == 48
    assert {"blocks.0.hook_in", "blocks.0.ln2.hook_in", "blocks.1.hook_out"} <= set(sites)


@pytest.mark.parametrize("gram_dtype, tol", [(None, 1e-6), (torch.float64, 1e-10)], ids=["fp32-products", "float64"])
def test_capture_matches_torch_cov_with_padding_and_batches(model, gram_dtype, tol):
    tokens, mask = _data(model)
    acts = capture(
        model, {"input_ids": tokens, "attention_mask": mask}, batch_size=4, gram_dtype=gram_dtype
    )  # 2 batches
    assert acts.n_tokens == int(mask.sum())
    for hook, stat in acts.stats.items():
        rows = _cached_rows(model, tokens, mask, hook, stat.dim)
        expected = torch.cov(rows.T)
        rel = (stat.covariance() - expected).norm() / expected.norm()
        assert rel < tol, hook  # float32 products: measured ~8e-8
        assert torch.allclose(stat.mean(), rows.mean(0), atol=1e-12)
    # TL aliases and matrix views resolve to the same accumulators
    assert acts["blocks.1.hook_resid_pre"] is acts.stats["blocks.1.hook_in"]
    # resid_post of block 0 is resid_pre of block 1: one statistic (seen equal on the first batch)
    assert acts.stats["blocks.0.hook_out"] is acts.stats["blocks.1.hook_in"]
    assert acts.for_matrix("blocks.0.attn.W_V") is acts.stats["blocks.0.attn.q.hook_in"]


def test_capture_iterable_of_batches_and_max_tokens(model):
    tokens, _ = _data(model, n=4)
    batches = [tokens[:2], (tokens[2:], torch.ones(2, 10, dtype=torch.long))]
    a = capture(model, batches, sites=["blocks.0.hook_resid_pre"])
    b = capture(model, tokens, sites=["blocks.0.hook_resid_pre"], batch_size=3)
    # other batchings: other float32 batch products (covariance entries ~0.03, rounding ~1e-9)
    assert torch.allclose(
        a["blocks.0.hook_resid_pre"].covariance(), b["blocks.0.hook_resid_pre"].covariance(), atol=1e-8
    )
    c = capture(model, tokens, sites=["blocks.0.hook_resid_pre"], max_tokens=15, batch_size=1)
    assert c.n_tokens == 15
    rows = _cached_rows(model, tokens, torch.ones_like(tokens), "blocks.0.hook_in", 32)[:15]
    assert torch.allclose(c["blocks.0.hook_resid_pre"].covariance(), torch.cov(rows.T), atol=1e-8)


def test_capture_bad_inputs(model):
    tokens, _ = _data(model)
    with pytest.raises(RwasymError, match=r"token ids must lie in \[0, 64\)"):
        capture(model, tokens + 64)
    with pytest.raises(RwasymError, match="no tokens were captured"):
        capture(model, {"input_ids": tokens, "attention_mask": torch.zeros_like(tokens)})
    with pytest.raises(RwasymError, match="no tokens were captured"):
        capture(model, tokens[:0])
    with pytest.raises(RwasymError, match="unknown hook name 'blocks.0.hook_nope'"):
        capture(model, tokens, sites=["blocks.0.hook_nope"])
    with pytest.raises(RwasymError, match="no sites to capture"):
        capture(model, tokens, sites={})
    with pytest.raises(RwasymError, match="integer tensors"):
        capture(model, tokens.float())
