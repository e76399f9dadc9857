"""Gradient capture oracle: G = Σ δ aᵀ from hooks equals autograd's .grad on the host parameter."""

import pytest
import torch
import torch.nn.functional as F

import rwasym
from rwasym import RwasymError
from rwasym.analyses.anisotropy import anisotropy_report
from rwasym.hooks.gradients import capture_gradients
from rwasym.models.host import clean_key, host_linear, is_transposed


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


@pytest.mark.parametrize("arch", ["native", "gpt2", "llama", "neox"])
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
        # float32 autograd accumulation against float64 sums: measured ≤ 3.1e-7 of the largest entry
        assert torch.allclose(G, expected[name], atol=3e-6 * float(scale), rtol=0), name
    assert all(p.grad is None for p in model.bridge.parameters())
    # C_a counts only grad-enabled forwards (the no-grad reference is ignored)
    n_fwd = 1 if objective == "ce" else 2
    assert stats.inputs["blocks.0.attn.W_Q"].count == n_fwd * tokens.numel()


# The final norm and the unembedding of each test model, by its own module names.
_FINAL = {
    "native": ("ln_out", "head"),
    "gpt2": ("transformer.ln_f", "lm_head"),
    "llama": ("model.norm", "lm_head"),
    "neox": ("gpt_neox.final_layer_norm", "lm_head"),
}


def _modules(model):
    """Module name (without the bridge's ``_original_component`` levels) -> the innermost torch module."""
    return {clean_key(name): module for name, module in model.bridge.original_model.named_modules()}


def _spiky(C):
    """top-1 share λ₁/Σλ, participation ratio (Σλ)²/Σλ², effective rank exp(−Σ p log p), p = λ/Σλ."""
    lam = torch.linalg.eigvalsh(C).clamp_min(0)
    p = lam / lam.sum()
    return (
        float(lam.max() / lam.sum()),
        float(lam.sum() ** 2 / lam.square().sum()),
        float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())),
    )


@pytest.mark.parametrize("arch", ["native", "gpt2", "llama", "neox"])
def test_anisotropy_fields_recomputed_by_hand(arch, native_cfg, hf_folder):
    """δ_t = ∂loss/∂(W a_t) from autograd (retain_grad on each host module's output), a_t from a forward
    pre-hook on it; C_a = Σ a aᵀ, C_δ = Σ δ δᵀ, G = Σ δ aᵀ and every anisotropy_report field from
    the formulas: spikiness of C_a and C_δ; f of G against the top-k eigenvectors of C_a (input
    side) and against the top-k left singular vectors of diag(γ_final)·W_U on the residual side."""
    model = rwasym.load(native_cfg if arch == "native" else hf_folder[arch][0])
    tokens = torch.randint(3, model.d_vocab, (4, 12), generator=torch.Generator().manual_seed(3))
    k = 4
    saved, handles = {}, []
    for spec in model.matrices():
        host = host_linear(model.bridge, spec.component)

        def pre(module, args, name=spec.name):
            saved.setdefault(name, {})["a"] = args[0].detach()

        def post(module, args, out, name=spec.name):
            out.retain_grad()
            saved[name]["y"] = out

        handles += [host.register_forward_pre_hook(pre), host.register_forward_hook(post)]
    try:
        ce_loss(model, tokens).backward()
    finally:
        for h in handles:
            h.remove()
    model.bridge.zero_grad(set_to_none=True)
    stats = capture_gradients(model, ce_loss, [tokens])
    rows = {r["matrix"]: r for r in anisotropy_report(model, stats, k=k)}
    mods = _modules(model)
    norm, unembed = (mods[n] for n in _FINAL[arch])
    M = norm.weight.detach().double()[:, None] * unembed.weight.detach().double().T  # (d_model, vocab)
    pred = torch.linalg.svd(M, full_matrices=False).U[:, :k]
    assert set(rows) == {s.name for s in model.matrices()}
    for spec in model.matrices():
        a = saved[spec.name]["a"].reshape(-1, spec.n_in).double()
        d = saved[spec.name]["y"].grad.reshape(-1, spec.n_out).double()
        C_a, C_d, G = a.T @ a, d.T @ d, d.T @ a
        got_Ca, got_Cd = stats.second_moments(spec.name)
        # the same float32 a and δ summed in float64 both ways: measured ≤ 1.5e-16 of the largest entry
        assert (got_Ca - C_a).abs().max() <= 1e-12 * C_a.abs().max(), spec.name
        assert (got_Cd - C_d).abs().max() <= 1e-12 * C_d.abs().max(), spec.name
        assert (stats.G[spec.name] - G).abs().max() <= 1e-12 * G.abs().max(), spec.name
        row = rows[spec.name]
        # the default centring (center=True, as the probe's): the centred covariances of a_t and δ_t
        ac, dc = a - a.mean(0), d - d.mean(0)
        Cc_a, Cc_d = ac.T @ ac / (len(a) - 1), dc.T @ dc / (len(d) - 1)
        want = dict(zip(("a_top1_share", "a_participation_ratio", "a_effective_rank"), _spiky(Cc_a)))
        want.update(zip(("delta_top1_share", "delta_participation_ratio", "delta_effective_rank"), _spiky(Cc_d)))
        want.update(
            a_top1_share_centered=_spiky(Cc_a)[0],
            a_top1_share_uncentered=_spiky(C_a)[0],
            delta_top1_share_centered=_spiky(Cc_d)[0],
            delta_top1_share_uncentered=_spiky(C_d)[0],
        )

        def f_of(C, G=G):
            evecs = torch.linalg.eigh(C).eigenvectors.flip(-1)[:, :k]  # top-k eigenvectors
            return float((G @ evecs).square().sum() / G.square().sum())

        f_in, f_un = f_of(Cc_a), f_of(C_a)
        want.update(G_input_pca_fraction=f_in, G_input_pca_relative=f_in * spec.n_in / k, grad_norm=float(G.norm()))
        want.update(
            G_input_pca_relative_centered=f_in * spec.n_in / k, G_input_pca_relative_uncentered=f_un * spec.n_in / k
        )
        mu = a.mean(0) / a.mean(0).norm()
        want.update(G_mean_fraction=float((G @ mu).square().sum() / G.square().sum()))
        read = spec.kind in ("W_Q", "W_K", "W_V", "W_in", "W_gate")
        if (spec.n_in if read else spec.n_out) == model.d_model:
            f_p = float(((G @ pred) if read else (pred.T @ G)).square().sum() / G.square().sum())
            want.update(G_prediction_fraction=f_p, G_prediction_relative=f_p * model.d_model / k)
            assert row["G_prediction_side"] == ("input" if read else "output")
        else:
            assert "G_prediction_fraction" not in row
        assert (row["a_dim"], row["delta_dim"]) == (spec.n_in, spec.n_out)
        for field, value in want.items():
            # measured: ≤ 5e-15 relative; the prediction fields ≤ 1.7e-7 (γ_final is measured by
            # running the float32 norm, here read off its weight)
            rel = 2e-6 if field.startswith("G_prediction") else 1e-12 if "centered" not in field else 1e-9
            assert row[field] == pytest.approx(value, rel=rel), (spec.name, field)
    # center=False: the plain fields are the uncentred ones
    plain = {r["matrix"]: r for r in anisotropy_report(model, stats, k=k, center=False)}
    for name, row in plain.items():
        assert row["a_top1_share"] == rows[name]["a_top1_share_uncentered"]
        assert row["G_input_pca_relative"] == rows[name]["G_input_pca_relative_uncentered"]
        assert row["center"] is False and rows[name]["center"] is True


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
    assert rows[0]["a_top1_share_uncentered"] == pytest.approx(float(lam[-1] / lam.sum()), rel=1e-9)


def test_gradient_errors(native_cfg):
    model = rwasym.load(native_cfg)
    with pytest.raises(RwasymError, match="matches no matrix"):
        capture_gradients(model, ce_loss, [], matrices="blocks.7.*.*")
    with pytest.raises(RwasymError, match="no batches"):
        capture_gradients(model, ce_loss, [])
    with pytest.raises(RwasymError, match="the loss is nan"):
        capture_gradients(model, lambda m, b: ce_loss(m, b) * float("nan"), [torch.zeros(1, 4, dtype=torch.long)])


def last_token_ce(model, tokens):
    """CE of the last position only: in the last block, δ_t = 0 at every earlier position."""
    logits = model.bridge(tokens)
    return F.cross_entropy(logits[:, -2], tokens[:, -1])


@pytest.mark.parametrize("name", ["blocks.1.attn.W_Q", "blocks.1.mlp.W_in", "blocks.0.attn.W_O"])
def test_active_and_delta_weighted_inputs_by_autograd(name, native_cfg):
    """C_a over the δ_t ≠ 0 tokens and Σ_t ‖δ_t‖² a_t a_tᵀ (issue #29) against autograd's per-token δ_t = ∂L/∂y_t,
    read with torch hooks on the host nn.Linear (not rwasym's hooks); and C_a itself is loss-independent on
    identical token sets (bit-equal under two losses) while the active and weighted statistics are not."""
    model = rwasym.load(native_cfg, dtype=torch.float64)
    tokens = torch.randint(0, model.d_vocab, (3, 10), generator=torch.Generator().manual_seed(4))
    host = host_linear(model.bridge, model.matrix(name).component)
    seen = {}

    def hook(module, args, output):
        seen["a"] = args[0].detach().reshape(-1, args[0].shape[-1])
        output.retain_grad()
        seen["y"] = output

    handle = host.register_forward_hook(hook)
    try:
        last_token_ce(model, tokens).backward()
    finally:
        handle.remove()
    model.bridge.zero_grad(set_to_none=True)
    a, d = seen["a"].double(), seen["y"].grad.reshape(-1, seen["y"].shape[-1]).double()
    weight = d.square().sum(1)
    active = weight > 0
    stats = capture_gradients(model, last_token_ce, [tokens], matrices=name)
    assert stats.token_counts(name) == dict(a_tokens=a.shape[0], active_tokens=int(active.sum()))
    if name.startswith("blocks.1"):
        assert int(active.sum()) == tokens.shape[0]  # the last block: only the final positions get a gradient
    acc = stats.active_inputs[name]
    assert torch.allclose(acc.second_moment() * acc.count, a[active].T @ a[active], rtol=1e-12, atol=1e-12)
    assert torch.allclose(stats.weighted_inputs[name], (a * weight[:, None]).T @ a, rtol=1e-10, atol=1e-18)
    # the same tokens under another loss: C_a bit-equal, the tokens that made the gradient not
    other = capture_gradients(model, ce_loss, [tokens], matrices=name)
    assert torch.equal(other.second_moments(name)[0], stats.second_moments(name)[0])
    assert other.token_counts(name)["active_tokens"] > stats.token_counts(name)["active_tokens"] or not name.startswith(
        "blocks.1"
    )
    assert not torch.allclose(other.weighted_inputs[name], stats.weighted_inputs[name])
    row = anisotropy_report(model, stats, k=4)[0]
    lam = torch.linalg.eigvalsh((a * weight[:, None]).T @ a)
    assert row["a_weighted_top1_share"] == pytest.approx(float(lam[-1] / lam.sum()), rel=1e-9)
    assert row["active_tokens"] == int(active.sum())
