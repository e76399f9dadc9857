"""Rank-1 edits: closed form, hook ≡ weight on every architecture, bit-exact restore, directions."""

import pytest
import torch
from jaxtyping import TypeCheckError

from rwasym import RwasymError
from rwasym.hooks.edits import rank1_edit
from rwasym.math.rank1 import closed_form_u, directions
from rwasym.math.subspaces import pca_basis, prediction_basis
from rwasym.models.heads import embed_head, unit_shape

ARCHS = ("native", "gpt2", "llama", "neox")

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(model, batch=2, pos=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.d_vocab, (batch, pos), generator=g)


def test_closed_form_u_is_the_least_squares_rank1_component():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(7, 5, dtype=torch.float64, generator=g)
    v = torch.randn(5, dtype=torch.float64, generator=g)
    v /= v.norm()
    u = closed_form_u(delta, v)
    # oracle: min_u ‖ΔW − u vᵀ‖_F is a least-squares problem per row, v · u_i ≈ ΔW_i
    expected = torch.linalg.lstsq(v[:, None], delta.T).solution[0]  # (n_out,)
    assert torch.allclose(u, expected, atol=1e-12)
    assert torch.allclose(
        closed_form_u(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0.0, 1.0])),
        torch.tensor([2.0, 4.0], dtype=torch.float64),
    )
    with pytest.raises(RwasymError, match=r"unit vector.*‖v‖ = 2"):
        closed_form_u(delta, 2 * v)
    with pytest.raises((RwasymError, TypeCheckError)):  # jaxtyping catches it first when checking is on
        closed_form_u(delta, v[:4] / v[:4].norm())


def _edits(model):
    """(matrix, head) cases: a read and a write matrix, whole and per head (K is GQA on llama)."""
    return [
        ("blocks.1.attn.W_K", None),
        ("blocks.1.attn.W_K", 1),
        ("blocks.0.attn.W_O", None),
        ("blocks.0.attn.W_O", 2),
        ("blocks.1.mlp.W_out", None),
        ("blocks.0.mlp.W_in", None),
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_and_weight_mechanisms_give_the_same_logits(models, arch):
    model = models[arch]
    tokens = _tokens(model)
    before = model.state_fingerprint()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        clean = model.bridge(tokens)
    for name, head in _edits(model):
        n_out, n_in = unit_shape(model.matrix(name), head)
        u = torch.randn(n_out, dtype=torch.float64, generator=g)
        v = torch.randn(n_in, dtype=torch.float64, generator=g)
        with torch.no_grad():
            with rank1_edit(model, name, u, v, alpha=10.0, head=head, mechanism="hook"):
                hooked = model.bridge(tokens)
                inside = model.state_fingerprint()
            with rank1_edit(model, name, u, v, alpha=10.0, head=head, mechanism="weight"):
                written = model.bridge(tokens)
        effect = float((hooked - clean).abs().max())
        assert effect > 1e-4, (name, head)  # the edit reached the logits
        assert float((hooked - written).abs().max()) < 1e-2 * effect, (name, head)
        assert all(torch.equal(before[k], inside[k]) for k in before), "the hook mechanism mutated a parameter"
    after = model.state_fingerprint()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model.bridge(tokens), clean)  # every hook removed


def test_per_head_edit_touches_only_that_head(models):
    model = models["llama"]
    spec = model.matrix("blocks.0.attn.W_K")  # 2 KV heads under GQA
    u, v = embed_head(spec, torch.ones(spec.d_head, dtype=torch.float64), torch.ones(spec.n_in, dtype=torch.float64), 1)
    w = model.weight(spec.name)
    with rank1_edit(
        model, spec.name, torch.ones(spec.d_head), torch.ones(spec.n_in), alpha=2.0, head=1, mechanism="weight"
    ):
        changed = model.weight(spec.name) - w
    assert torch.allclose(changed, 2.0 * torch.outer(u, v), atol=1e-6)
    assert changed[: spec.d_head].abs().max() == 0 and changed[spec.d_head :].abs().min() > 1.9
    with pytest.raises(RwasymError, match="out of range.*2 heads"):
        rank1_edit(model, spec.name, torch.ones(spec.d_head), torch.ones(spec.n_in), head=2).__enter__()
    with pytest.raises(RwasymError, match="no heads"):
        rank1_edit(model, "blocks.0.mlp.W_in", torch.ones(48), torch.ones(32), head=0).__enter__()


@pytest.mark.parametrize("mechanism", ["weight", "hook"])
def test_restore_is_bit_exact_after_an_exception(models, mechanism):
    model = models["gpt2"]  # Conv1D host layout, fused QKV
    tokens = _tokens(model)
    before = model.state_fingerprint()
    with torch.no_grad():
        clean = model.bridge(tokens)
    spec = model.matrix("blocks.0.attn.W_V")
    with pytest.raises(RuntimeError, match="boom"):
        with rank1_edit(model, spec.name, 3 * torch.ones(spec.n_out), torch.ones(spec.n_in), mechanism=mechanism):
            with torch.no_grad():
                assert not torch.equal(model.bridge(tokens), clean)
            raise RuntimeError("boom")
    after = model.state_fingerprint()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model.bridge(tokens), clean)


def test_bad_mechanism_and_shapes(models):
    model = models["native"]
    with pytest.raises(RwasymError, match="mechanism must be one of"):
        rank1_edit(model, "blocks.0.attn.W_Q", torch.ones(32), torch.ones(32), mechanism="magic").__enter__()
    with pytest.raises(RwasymError, match=r"u must be a vector of shape \(32,\)"):
        rank1_edit(model, "blocks.0.attn.W_Q", torch.ones(16), torch.ones(32)).__enter__()


def test_directions_targets_and_matched_controls():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 10, dtype=torch.float64, generator=g)
    a = torch.randn(500, 10, dtype=torch.float64, generator=g) * torch.linspace(3, 0.2, 10, dtype=torch.float64)
    cov = torch.cov(a.T)
    targets = directions("pca", delta, 3, cov=cov)
    U = pca_basis(cov, 3).U
    for i, d in enumerate(targets):
        assert (d.kind, d.side, d.target, d.index) == ("pca", "input", "pca", i)
        assert torch.allclose(d.v, U[:, i]) and torch.allclose(d.u, delta @ U[:, i])
        assert d.energy(cov) == pytest.approx(float(U[:, i] @ cov @ U[:, i]))
    norms = [d.norm for d in targets]
    rand = directions("random", delta, 7, side="input", target_norms=norms, generator=torch.Generator().manual_seed(1))
    orth = directions(
        "orthogonal",
        delta,
        7,
        cov=cov,
        side="input",
        k=3,
        target_norms=norms,
        generator=torch.Generator().manual_seed(2),
    )
    for j, d in enumerate(rand + orth):
        assert d.matched_to == j % 7 % 3 if d.kind == "orthogonal" else d.matched_to == j % 3
        assert d.norm == pytest.approx(norms[d.matched_to], rel=1e-12)  # ‖u vᵀ‖_F matched
        assert float(d.v.norm()) == pytest.approx(1.0, abs=1e-12)
        u_dir = delta @ d.v  # the control keeps the closed-form direction
        assert torch.allclose(d.u / d.u.norm(), u_dir / u_dir.norm(), atol=1e-12)
    assert float((U.T @ torch.stack([d.v for d in orth]).T).abs().max()) < 1e-12  # ⟂ top-3 PCA
    again = directions("random", delta, 7, side="input", target_norms=norms, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x.v, y.v) for x, y in zip(rand, again))  # seeded


def test_prediction_directions_are_the_output_side_least_squares_component():
    g = torch.Generator().manual_seed(0)
    d_model, n_in, vocab = 16, 6, 40
    delta = torch.randn(d_model, n_in, dtype=torch.float64, generator=g)
    w_u = torch.randn(d_model, vocab, dtype=torch.float64, generator=g)
    preds = directions("prediction", delta, 2, unembedding=w_u)
    P = prediction_basis(w_u, 2).U
    for i, d in enumerate(preds):
        p = P[:, i]
        assert d.side == "output" and torch.allclose(d.direction, p)
        assert torch.allclose(torch.outer(d.u, d.v), torch.outer(p, p) @ delta, atol=1e-12)  # p pᵀ ΔW
    orth = directions("orthogonal", delta, 4, unembedding=w_u, side="output", k=2, target_norms=[d.norm for d in preds])
    assert float((P.T @ torch.stack([d.u for d in orth]).T).abs().max()) < 1e-10  # u ∝ p ⟂ prediction subspace
    with pytest.raises(RwasymError, match="write matrices .* only"):
        directions("prediction", delta[:10], 2, unembedding=w_u)
    with pytest.raises(RwasymError, match="need k="):
        directions("orthogonal", delta, 2, unembedding=w_u, side="output")
    with pytest.raises(RwasymError, match="unknown direction kind 'nope'"):
        directions("nope", delta, 2)


def test_output_energy_matching_equalises_the_edited_output_change(models):
    """match_output_energy: every control changes the linear's output, measured on real captured
    inputs with the edit actually applied (hook mechanism), by the same mean square as its target."""
    import rwasym
    from rwasym.math.rank1 import match_output_energy

    model = models["native"]
    name = "blocks.0.attn.W_Q"
    spec = model.matrix(name)
    tokens = torch.randint(0, model.d_vocab, (6, 16), generator=torch.Generator().manual_seed(3))
    stat = rwasym.capture(model, tokens, sites=[spec.hook_in], progress=False)[spec.hook_in]
    delta = torch.randn(spec.n_out, spec.n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    targets = directions("pca", delta, 2, cov=stat.covariance())
    controls = directions(
        "random",
        delta,
        4,
        side="input",
        target_norms=[d.norm for d in targets],
        generator=torch.Generator().manual_seed(5),
    )
    matched = match_output_energy(controls, targets, stat.second_moment())

    def mean_square_change(d):  # brute force: run the edited model, compare hook_out with the clean one
        _, clean = model.bridge.run_with_cache(tokens)
        with rank1_edit(model, name, d.u, d.v):
            _, edited = model.bridge.run_with_cache(tokens)
        diff = (edited[spec.hook_out] - clean[spec.hook_out]).double().reshape(-1, spec.n_out)
        return float(diff.square().sum(-1).mean())

    for c in matched:
        # float32 forward passes: measured ≤ 5.9e-8 relative
        assert mean_square_change(c) == pytest.approx(mean_square_change(targets[c.matched_to]), rel=1e-6)
        assert torch.allclose(c.u / c.u.norm(), controls[c.index].u / controls[c.index].u.norm())  # direction kept
    assert mean_square_change(controls[0]) < 0.5 * mean_square_change(targets[0])  # norm-matching leaves a gap
    with pytest.raises(RwasymError, match="at least one target"):
        match_output_energy(controls, [], stat.second_moment())
