"""Gradient capture oracle: G = Σ δ aᵀ from hooks equals autograd's .grad on the host parameter."""

import pytest
import torch
import torch.nn.functional as F

import rwasym
from rwasym import RwasymError
from rwasym.analyses.anisotropy import anisotropy_report
from rwasym.hooks.gradients import capture_gradients
from rwasym.models.layouts import host_linear, is_transposed


def ce_loss(model, tokens):
    logits = model.bridge(tokens)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def dpo_like_loss(model, batch):
    """A DPO-shaped loss (policy on chosen and rejected, frozen no-grad reference)."""
    chosen, rejected, ref = batch
    def logp(m, t):
        lp = m.bridge(t)[:, :-1].log_softmax(-1)
        return lp.gather(-1, t[:, 1:, None]).squeeze(-1).sum(-1)
    with torch.no_grad():
        ref_c, ref_r = logp(ref, chosen), logp(ref, rejected)
    margin = (logp(model, chosen) - ref_c) - (logp(model, rejected) - ref_r)
    return -F.logsigmoid(0.1 * margin).mean()


def _autograd_grads(model, loss_fn, batch):
    model.bridge.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    out = {}
    for spec in model.matrices():
        host = host_linear(model.bridge, spec.component)
        g = host.weight.grad.double()
        out[spec.name] = g.T if is_transposed(host) else g
    model.bridge.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("arch", ["native", "gpt2"])
@pytest.mark.parametrize("objective", ["ce", "dpo"])
def test_hook_gradient_equals_autograd(arch, objective, native_cfg, hf_folder):
    model = rwasym.load(native_cfg if arch == "native" else hf_folder[arch][0])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.d_vocab, (3, 10), generator=g)
    if objective == "ce":
        loss_fn, batch = ce_loss, tokens
    else:
        ref = rwasym.load(native_cfg if arch == "native" else hf_folder[arch][0])
        with torch.no_grad():  # make policy differ from reference
            for p in model.bridge.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        loss_fn, batch = dpo_like_loss, (tokens, torch.randint(3, model.d_vocab, (3, 10), generator=g), ref)
    expected = _autograd_grads(model, loss_fn, batch)
    stats = capture_gradients(model, loss_fn, [batch])
    for name, G in stats.G.items():
        scale = expected[name].abs().max()
        assert scale > 0, name
        assert torch.allclose(G, expected[name], atol=1e-5 * float(scale) + 1e-9), name
    assert all(p.grad is None for p in model.bridge.parameters())
    # C_a counts only grad-enabled forwards (the no-grad reference is ignored)
    n_fwd = 1 if objective == "ce" else 2
    assert stats.inputs["blocks.0.attn.W_Q"].count == n_fwd * tokens.numel()


def test_covariances_match_brute_force(native_cfg):
    model = rwasym.load(native_cfg)
    tokens = torch.randint(0, model.d_vocab, (2, 8))
    name = "blocks.1.mlp.W_out"
    spec = model.matrix(name)
    saved = {}

    def fwd(x, hook):
        saved["a"] = x
        return x

    def out(y, hook):
        y.retain_grad()
        saved["y"] = y
        return y

    with model.bridge.hooks(fwd_hooks=[(spec.hook_in, fwd), (spec.hook_out, out)]):
        ce_loss(model, tokens).backward()
    a = saved["a"].detach().reshape(-1, spec.n_in).double()
    d = saved["y"].grad.reshape(-1, spec.n_out).double()
    model.bridge.zero_grad(set_to_none=True)
    stats = capture_gradients(model, ce_loss, [tokens], matrices=name)
    C_a, C_d = stats.second_moments(name)
    assert torch.allclose(C_a, a.T @ a, atol=1e-8)
    assert torch.allclose(C_d, d.T @ d, atol=1e-12)
    rows = anisotropy_report(model, stats, k=4)
    assert rows[0]["matrix"] == name and rows[0]["G_prediction_side"] == "output"
    lam = torch.linalg.eigvalsh(C_a)
    assert rows[0]["a_top1_share"] == pytest.approx(float(lam[-1] / lam.sum()), rel=1e-9)


def test_gradient_errors(native_cfg):
    model = rwasym.load(native_cfg)
    with pytest.raises(RwasymError, match="matches no matrix"):
        capture_gradients(model, ce_loss, [], matrices="blocks.7.*.*")
    with pytest.raises(RwasymError, match="no batches"):
        capture_gradients(model, ce_loss, [])
    with pytest.raises(RwasymError, match="the loss is nan"):
        capture_gradients(model, lambda m, b: ce_loss(m, b) * float("nan"), [torch.zeros(1, 4, dtype=torch.long)])
