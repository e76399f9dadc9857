"""Mixture-of-experts matrices (issue #33, phase 1) on the random-init Mixtral, OLMoE and Qwen2-MoE of the
family table: every expert's W_gate / W_in / W_out, the router and Qwen2-MoE's shared expert read through
`Model.weight` equal the Hugging Face parameters sliced by hand; an edit through rwasym gives the logits of
the same ΔW written into the fused parameters of a deep copy of the Hugging Face model; `edit` restores
every parameter bit for bit, also when its body raises."""

import copy
import warnings

import pytest
import torch

import rwasym
from rwasym import RwasymError
from rwasym.testing.families import build_family

MOE = ("mixtral", "olmoe", "qwen2_moe")


@pytest.fixture(scope="module", params=MOE)
def moe(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = build_family(request.param, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = rwasym.load(folder)
    return request.param, hf, model


def _block(hf, layer):
    return hf.model.layers[layer].mlp


def _by_hand(hf, name):
    """The Hugging Face tensor of registry matrix ``name`` (nn.Linear layout), sliced by hand."""
    parts = name.split(".")
    layer, kind = int(parts[1]), parts[-1]
    block = _block(hf, layer)
    if parts[3] == "experts":
        e, d_mlp = int(parts[4]), block.experts.down_proj.shape[2]
        gate_up = block.experts.gate_up_proj[e]
        return {"W_gate": gate_up[:d_mlp], "W_in": gate_up[d_mlp:], "W_out": block.experts.down_proj[e]}[kind]
    if parts[3] == "shared":
        return getattr(
            block.shared_expert, {"W_gate": "gate_proj", "W_in": "up_proj", "W_out": "down_proj"}[kind]
        ).weight
    assert kind == "W_router"
    return block.gate.weight


def test_registry_names_sides_and_globs(moe):
    fam, hf, model = moe
    n_experts, d = _block(hf, 0).gate.weight.shape
    d_mlp = _block(hf, 0).experts.down_proj.shape[2]
    experts = model.matrices("blocks.*.mlp.experts.*.*")
    assert len(experts) == 2 * n_experts * 3 and len(model.matrices("blocks.*.mlp.experts.*.W_out")) == 2 * n_experts
    for spec in experts:
        assert spec.expert == int(spec.name.split(".")[4]) and spec.component == f"blocks.{spec.layer}.mlp"
        assert (spec.hook_in, spec.hook_out) == (
            f"blocks.{spec.layer}.mlp.hook_in",
            f"blocks.{spec.layer}.mlp.hook_out",
        )
        assert spec.shape == ((d, d_mlp) if spec.kind == "W_out" else (d_mlp, d))
        assert spec.side == ("write" if spec.kind == "W_out" else "read") and spec.to_dict()["expert"] == spec.expert
    router = model.matrix("blocks.0.mlp.W_router")
    assert router.shape == (n_experts, d) and router.side == "read" and router.expert is None
    assert model.input_hook(router.name) == "blocks.0.mlp.hook_in"
    assert "expert" not in model.matrix("blocks.0.attn.W_Q").to_dict()  # dense dicts (and their hashes) unchanged
    assert len(model.matrices("blocks.*.mlp.shared.*")) == (6 if fam == "qwen2_moe" else 0)
    with pytest.raises(RwasymError, match="routed to it"):
        model.input_hook("blocks.0.mlp.experts.1.W_in")
    with pytest.raises(RwasymError, match="mechanism='weight'"):
        rwasym.rank1_edit(model, "blocks.0.mlp.experts.0.W_out", torch.ones(d), torch.ones(d_mlp)).__enter__()


def test_weights_equal_the_hugging_face_slices(moe):
    """Oracle 1: `Model.weight` of every MoE matrix = the HF parameter sliced by hand (gate_up_proj[e] rows
    0 … d_mlp − 1 / d_mlp … 2·d_mlp − 1, down_proj[e], gate.weight, the shared expert's linears), bit for bit."""
    fam, hf, model = moe
    names = [s.name for s in model.matrices() if ".mlp." in s.name]
    assert len(names) == 2 * (1 + 3 * 4) + (2 * 3 if fam == "qwen2_moe" else 0)
    for name in names:
        expected = _by_hand(hf, name).detach().double()
        assert torch.equal(model.weight(name), expected), name
    assert rwasym.weight_deltas(model, model, "blocks.*.mlp.experts.*.*").keys() == {
        s.name for s in model.matrices("blocks.*.mlp.experts.*.*")
    }


def test_edit_equals_the_same_edit_of_the_fused_parameter(moe):
    """Oracle 2: an edit of two experts' matrices, the router and (Qwen2-MoE) the shared expert through
    `Model.edit` gives the logits of the same ΔW added to the HF parameters of a deep copy by hand; after the
    edit, and after an edit whose body raises, every parameter is bit-identical to before; `weights_hash` and
    `state_fingerprint` see the edit and its restore."""
    fam, hf, model = moe
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 96, (2, 10), generator=g)
    names = [
        "blocks.0.mlp.experts.1.W_gate",
        "blocks.0.mlp.experts.1.W_in",
        "blocks.0.mlp.experts.2.W_out",
        "blocks.1.mlp.experts.3.W_in",
        "blocks.1.mlp.W_router",
    ] + (["blocks.0.mlp.shared.W_out"] if fam == "qwen2_moe" else [])
    deltas = {n: 0.3 * torch.randn(model.matrix(n).shape, generator=g, dtype=torch.float64) for n in names}
    before_params = {k: v.detach().clone() for k, v in model.bridge.original_model.state_dict().items()}
    before_hash, before_print = model.weights_hash(), model.state_fingerprint()
    with torch.no_grad():
        plain = model.bridge(tokens)
    with model.edit({n: model.weight(n) + d for n, d in deltas.items()}), torch.no_grad():
        edited = model.bridge(tokens)
        assert model.weights_hash() != before_hash
    by_hand = copy.deepcopy(hf)
    with torch.no_grad():
        for n, d in deltas.items():
            t = _by_hand(by_hand, n)
            t.add_(d.to(t.dtype))
        expected = by_hand(tokens).logits
    scale = float(expected.abs().max())
    assert float((edited - plain).abs().max()) >= 1e-3 * scale  # the edit is visible
    assert float((edited - expected).abs().max()) <= 1e-6 * scale
    with pytest.raises(ValueError, match="inside"):
        with model.edit({n: model.weight(n) * 2 for n in names}):
            raise ValueError("inside the edit")
    after = model.bridge.original_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before_params.items())
    assert model.weights_hash() == before_hash
    assert all(torch.equal(v, model.state_fingerprint()[k]) for k, v in before_print.items())
    with torch.no_grad():
        assert torch.equal(model.bridge(tokens), plain)


def test_set_weight_writes_one_expert_slice_only(moe):
    """`set_weight` of W_in of one expert changes exactly rows d_mlp … 2·d_mlp − 1 of gate_up_proj[e] and
    nothing else; a wrong shape is refused."""
    _, _, model = moe
    name = "blocks.1.mlp.experts.2.W_in"
    block = model.bridge.original_model.model.layers[1].mlp  # the loaded model's own HF block (bridge-wrapped)
    experts = getattr(block, "original_component", block).experts
    fused = getattr(experts, "original_component", experts).gate_up_proj
    d_mlp = fused.shape[1] // 2
    old, w = fused.detach().clone(), model.weight(name)
    try:
        model.set_weight(name, w + 1)
        changed = (fused.detach() != old).nonzero()
        assert changed[:, 0].unique().tolist() == [2] and changed[:, 1].min() >= d_mlp
        assert torch.equal(fused.detach()[2, d_mlp:], (old[2, d_mlp:].double() + 1).to(fused.dtype))
        with pytest.raises(RwasymError, match="nn.Linear layout"):
            model.set_weight(name, w.T)
    finally:
        with torch.no_grad():
            fused.copy_(old)


def test_router_and_shared_expert_read_the_tensor_their_linears_get(moe):
    """`Model.input_hook` of the router (and Qwen2-MoE's shared W_gate / W_in) is the MoE block's input: the
    tensor the Hugging Face ``mlp.gate`` (and ``shared_expert.gate_proj``) is called with, token by token, in
    a plain forward of the HF model (a forward pre-hook)."""
    fam, hf, model = moe
    tokens = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    names = ["blocks.1.mlp.W_router"] + (
        ["blocks.1.mlp.shared.W_gate", "blocks.1.mlp.shared.W_in"] if fam == "qwen2_moe" else []
    )
    seen = {}
    paths = {"W_router": "gate", "W_gate": "shared_expert.gate_proj", "W_in": "shared_expert.up_proj"}
    handles = [
        _block(hf, 1)
        .get_submodule(paths[n.rsplit(".", 1)[1]])
        .register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach().reshape(-1, a[0].shape[-1])))
        for n in names
    ]
    try:
        with torch.no_grad():
            hf(tokens)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(tokens)
    for n in names:
        ours = cache[model.input_hook(n)].reshape(-1, model.d_model)
        assert ours.shape == seen[n].shape and torch.allclose(ours, seen[n], rtol=1e-5, atol=1e-6), n


def test_probe_of_a_tuned_folder_leaves_the_moe_matrices_out_with_a_warning(moe, tmp_path):
    """A tuned checkpoint folder (read without loading) gives the attention rows and warns that its
    mixture-of-experts matrices are left out; the same tuned model loaded gives the router's rows too."""
    import shutil

    fam, hf, model = moe
    tuned = copy.deepcopy(hf)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    shutil.copytree(model.source, tmp_path / "tuned")
    tuned.save_pretrained(tmp_path / "tuned")
    tokens = torch.randint(3, 96, (4, 12), generator=torch.Generator().manual_seed(2))
    with pytest.warns(UserWarning, match="mixture-of-experts matrices .* are left out"):
        rows = rwasym.probe(model, tmp_path / "tuned", tokens, k=2, null_samples=0, progress=False).rows
    assert {r["kind"] for r in rows} == {"W_Q", "W_K", "W_V", "W_O"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = rwasym.load(tmp_path / "tuned")
        rows = rwasym.probe(model, loaded, tokens, k=2, null_samples=0, progress=False).rows
    assert {r["matrix"] for r in rows if r["kind"] == "W_router"} == {"blocks.0.mlp.W_router", "blocks.1.mlp.W_router"}


# ----------------------------------------------------------------------------- routed statistics (phase 2)
def _hf_blocks(model):
    """The loaded model's own HF MoE blocks (the bridge wraps them)."""
    layers = model.bridge.original_model.model.layers
    return [getattr(layer.mlp, "original_component", layer.mlp) for layer in layers]


def _routed_data():
    """Four sequences, two left-padded (every batch of two holds padding, so both forwards pass the mask)."""
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(3, 96, (4, 9), generator=g)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :3] = 0
    return tokens, mask


def _routed_by_hand(model, fam, tokens, mask):
    """Per (layer, expert): N_e, W_e and the float64 sums Σ w a, Σ w a aᵀ, Σ w h, Σ w h hᵀ for w = 1 and for
    w = w_{t,e}, from an explicit per-token loop over the router logits that a forward hook on the HF ``mlp.gate``
    records: softmax → top-k → renormalised when the config says so (Mixtral always; OLMoE / Qwen2-MoE when
    ``norm_topk_prob``); h = silu(W_gate,e a) ⊙ (W_in,e a) by hand. The kept tokens: unpadded, position 0 of each
    row (counted from its first unpadded token) excluded."""
    cfg = model.bridge.original_model.config
    assert cfg.hidden_act == "silu"
    k = cfg.num_experts_per_tok
    renorm = fam == "mixtral" or bool(cfg.norm_topk_prob)
    blocks = _hf_blocks(model)
    seen: dict[int, list] = {}
    gates = [getattr(b.gate, "original_component", b.gate) for b in blocks]
    handles = [
        g.register_forward_hook(lambda mod, inp, out, L=L: seen.setdefault(L, []).append((inp[0], out[0])))
        for L, g in enumerate(gates)
    ]
    try:
        with torch.no_grad():
            for start in (0, 2):
                model.bridge(tokens[start : start + 2], attention_mask=mask[start : start + 2])
    finally:
        for h in handles:
            h.remove()
    kept = mask.bool().clone()
    for row in range(4):
        kept[row, int((mask[row] == 0).sum())] = False  # exclude_positions=(0,)
    sums = {}
    for L, batches in seen.items():
        experts = blocks[L].experts
        experts = getattr(experts, "original_component", experts)
        d_mlp = experts.down_proj.shape[2]
        for b, (a_batch, logits) in enumerate(batches):
            keep = kept[2 * b : 2 * b + 2].reshape(-1)
            for t in range(a_batch.shape[0]):
                if not keep[t]:
                    continue
                probs = torch.softmax(logits[t].float(), dim=-1)
                top, idx = torch.topk(probs, k)
                if renorm:
                    top = top / top.sum()
                a = a_batch.reshape(-1, a_batch.shape[-1])[t].double()
                for j in range(k):
                    e, w = int(idx[j]), float(top[j])
                    fused = experts.gate_up_proj[e].detach().double()
                    g_, u_ = fused[:d_mlp] @ a, fused[d_mlp:] @ a
                    h = g_ * torch.sigmoid(g_) * u_
                    acc = sums.setdefault(
                        (L, e),
                        {"n": 0, "W": 0.0, **{f"{v}{wt}": 0.0 for v in ("s", "S", "hs", "hS") for wt in ("1", "w")}},
                    )
                    acc["n"] += 1
                    acc["W"] += w
                    for wt, c in (("1", 1.0), ("w", w)):
                        acc[f"s{wt}"] = acc[f"s{wt}"] + c * a
                        acc[f"S{wt}"] = acc[f"S{wt}"] + c * torch.outer(a, a)
                        acc[f"hs{wt}"] = acc[f"hs{wt}"] + c * h
                        acc[f"hS{wt}"] = acc[f"hS{wt}"] + c * torch.outer(h, h)
    return sums, int(kept.sum()), k


def _cov_by_hand(n_or_w, s, S, unbiased):
    mu = s / n_or_w
    return (S - n_or_w * torch.outer(mu, mu)) / (n_or_w - 1 if unbiased else n_or_w)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_routed_capture_equals_a_loop_over_the_routers_own_decisions(moe):
    """Oracle 1 of the design: `capture_routed` (float64 products) against the per-token loop of
    `_routed_by_hand`, both weightings: N_e equal, Σ_e N_e = n_tokens · top_k, at least two experts per layer
    receive tokens, W_e, the routed input covariance (C_e unbiased, C̃_e = Σ w (a − μ̃)(a − μ̃)ᵀ / W) and the
    routed hidden-state covariance within 1e-10 relative."""
    from rwasym.hooks.routing import capture_routed

    fam, _, model = moe
    tokens, mask = _routed_data()
    sums, n_tokens, k = _routed_by_hand(model, fam, tokens, mask)
    worst = {}
    for weighting, wt in (("tokens", "1"), ("routing", "w")):
        got = capture_routed(
            model,
            {"input_ids": tokens, "attention_mask": mask},
            weighting=weighting,
            hidden=True,
            batch_size=2,
            gram_dtype=torch.float64,
            exclude_positions=(0,),
            progress=False,
        )
        assert got.n_tokens == n_tokens and got.top_k == {0: k, 1: k} and got.weighting == weighting
        for L in (0, 1):
            counts = [got.count(L, e) for e in range(got.n_experts[L])]
            assert counts == [sums.get((L, e), {"n": 0})["n"] for e in range(got.n_experts[L])]
            assert sum(counts) == n_tokens * k and sum(c >= 2 for c in counts) >= 2
        errs = []
        for (L, e), ref in sums.items():
            if ref["n"] < 2:
                continue
            assert got.routing_weight[(L, e)] == pytest.approx(ref["W"], rel=1e-12)
            total, unbiased = (ref["n"], True) if wt == "1" else (ref["W"], False)
            acc, hid = got.for_expert(L, e), got.for_expert(L, e, side="hidden")
            assert acc.weight_sum == pytest.approx(total, rel=1e-12) and acc.count == ref["n"]
            errs.append(
                _rel(acc.covariance(unbiased=unbiased), _cov_by_hand(total, ref[f"s{wt}"], ref[f"S{wt}"], unbiased))
            )
            errs.append(
                _rel(hid.covariance(unbiased=unbiased), _cov_by_hand(total, ref[f"hs{wt}"], ref[f"hS{wt}"], unbiased))
            )
            assert got.for_matrix(f"blocks.{L}.mlp.experts.{e}.W_in") is acc
            assert got.for_matrix(f"blocks.{L}.mlp.experts.{e}.W_out") is hid
        worst[weighting] = max(errs)
        assert worst[weighting] <= 1e-10, (fam, weighting, worst)
    print(f"{fam}: max relative difference {worst}")


def test_few_tokens_lists_the_experts_without_enough_routed_tokens(moe):
    """`few_tokens(k)` lists exactly the experts with N_e < k + 1 and `for_expert(..., k=k)` refuses them: one
    token reaches exactly top_k experts per layer, so few_tokens(0) lists the other E − top_k of each layer and
    few_tokens(1) lists every expert; the arguments and a missing hidden side are refused with their fix."""
    from rwasym.hooks.routing import capture_routed

    _, _, model = moe
    got = capture_routed(model, torch.tensor([[5, 17]]), exclude_positions=(0,), progress=False)
    assert got.n_tokens == 1
    routed = {(L, e) for (L, e), acc in got.stats.items() if acc.count == 1}
    assert all(acc.count in (0, 1) for acc in got.stats.values())
    assert {L: sum(1 for key in routed if key[0] == L) for L in (0, 1)} == {0: got.top_k[0], 1: got.top_k[1]}
    unrouted = [f"blocks.{L}.mlp.experts.{e}" for (L, e) in sorted(got.stats) if (L, e) not in routed]
    assert got.few_tokens(0) == unrouted and len(unrouted) == 2 * (got.n_experts[0] - got.top_k[0])
    assert got.few_tokens(1) == [f"blocks.{L}.mlp.experts.{e}" for (L, e) in sorted(got.stats)]
    L, e = min(routed)
    assert got.for_expert(L, e, k=0).count == 1
    with pytest.raises(RwasymError, match=r"few_tokens\(1\)"):
        got.for_expert(L, e, k=1)
    with pytest.raises(RwasymError, match="hidden=True"):
        got.for_matrix(f"blocks.{L}.mlp.experts.{e}.W_out")
    with pytest.raises(RwasymError, match="weighting must be"):
        capture_routed(model, torch.tensor([[5, 17]]), weighting="probability")
    with pytest.raises(RwasymError, match="no mixture-of-experts MLP"):
        capture_routed(model, torch.tensor([[5, 17]]), layers=[7])


def test_routed_capture_in_float32_products_is_close_to_float64(moe):
    """The default path (float32 products about the batch mean, float32 hidden states) against
    ``gram_dtype=torch.float64``: the same counts and W_e, covariances within 1e-5 relative, both sides, routing
    weights (the weighted float32 product of `RunningCovariance.add`)."""
    from rwasym.hooks.routing import capture_routed

    _, _, model = moe
    tokens, mask = _routed_data()
    data = {"input_ids": tokens, "attention_mask": mask}
    fast, exact = (
        capture_routed(model, data, weighting="routing", hidden=True, gram_dtype=g, progress=False)
        for g in (None, torch.float64)
    )
    checked = 0
    for key, acc in exact.stats.items():
        assert fast.stats[key].count == acc.count and fast.routing_weight[key] == exact.routing_weight[key]
        if acc.count >= 2:
            for side in (fast.stats, fast.hidden):
                ref = (exact.stats if side is fast.stats else exact.hidden)[key].covariance(unbiased=False)
                assert _rel(side[key].covariance(unbiased=False), ref) <= 1e-5
                checked += 1
    assert checked >= 4


# ----------------------------------------------------------------------------- expert probe rows (phase 2)
def _probe_quiet(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rwasym.probe(*args, null_samples=0, curves=False, progress=False, **kw)


def _planted(model, deltas):
    """A loaded copy of ``model`` with ``deltas`` added through `Model.set_weight`, and the ΔW it really holds
    (the planted one rounded to the model's dtype), float64."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = rwasym.load(model.source)
    for name, d in deltas.items():
        tuned.set_weight(name, model.weight(name) + d)
    return tuned, {name: tuned.weight(name) - model.weight(name) for name in deltas}


def _top(c, k):
    """The top-k eigenvectors of a symmetric matrix (columns, by decreasing eigenvalue)."""
    vals, vecs = torch.linalg.eigh(c)
    return vecs[:, vals.argsort(descending=True)[:k]]


def _input_fraction(d, U):
    return float((d @ U).square().sum() / d.square().sum())


def _row(rows, matrix, stream, subspace):
    (row,) = [r for r in rows if r["matrix"] == matrix and r["stream"] == stream and r["subspace"] == subspace]
    return row


@pytest.mark.parametrize("routing", ["tokens", "routing"])
def test_expert_read_rows_equal_a_hand_computation_on_the_routed_covariance(moe, routing):
    """Oracle 2 of the design (read side): ΔW planted by `set_weight` in W_in and W_gate of the busiest expert of
    layer 1, ΔW_in = v u₁ᵀ + 0.5 v' x̂ᵀ (u₁ the top eigenvector of the expert's routed covariance computed by
    the per-token loop over the router's own decisions, `_routed_by_hand`; x̂ a random unit vector) and
    ΔW_gate = v u_⊥ᵀ (u_⊥ an eigenvector outside the top k): the activation row's fraction = ‖ΔW U_k‖²_F /
    ‖ΔW‖²_F with U_k the top-k eigenvectors of the hand covariance (centred; token-counted C_e or routing-weighted
    C̃_e), relative = f · d / k, ≈ 0 for ΔW_gate; the rows carry expert, N_e and the mean routing weight."""
    fam, _, model = moe
    tokens, mask = _routed_data()
    sums, _, _ = _routed_by_hand(model, fam, tokens, mask)
    L, e = max((key for key in sums if key[0] == 1), key=lambda key: sums[key]["n"])
    ref, k = sums[(L, e)], 2
    c = (
        _cov_by_hand(ref["n"], ref["s1"], ref["S1"], True)
        if routing == "tokens"
        else _cov_by_hand(ref["W"], ref["sw"], ref["Sw"], False)
    )
    vals, vecs = torch.linalg.eigh(c)
    order = vals.argsort(descending=True)
    u1, u_perp = vecs[:, order[0]], vecs[:, order[k + 1]]
    g = torch.Generator().manual_seed(3)
    d_mlp, d = model.matrix(f"blocks.{L}.mlp.experts.{e}.W_in").shape
    v, v2, x = (torch.randn(n, generator=g, dtype=torch.float64) for n in (d_mlp, d_mlp, d))
    w_in, w_gate = f"blocks.{L}.mlp.experts.{e}.W_in", f"blocks.{L}.mlp.experts.{e}.W_gate"
    tuned, deltas = _planted(
        model, {w_in: torch.outer(v, u1) + 0.5 * torch.outer(v2, x / x.norm()), w_gate: torch.outer(v, u_perp)}
    )
    rows = _probe_quiet(
        model,
        tuned,
        {"input_ids": tokens, "attention_mask": mask},
        k=k,
        matrices=[w_in, w_gate],
        batch_size=2,
        exclude_positions=(0,),
        routing=routing,
    ).rows
    U = vecs[:, order[:k]]
    expected = _input_fraction(deltas[w_in], U)
    got = _row(rows, w_in, "residual", "activation")
    assert got["site"] == f"blocks.{L}.mlp.experts.{e}.routed_in" and got["side"] == "input"
    assert (got["expert"], got["routed_tokens"], got["routing"]) == (e, ref["n"], routing)
    assert got["mean_routing_weight"] == pytest.approx(ref["W"] / ref["n"], rel=1e-6)
    assert 0.2 < expected < 0.95  # the planted mixture is neither all in nor all out of U_k
    assert got["fraction"] == pytest.approx(expected, abs=1e-7)
    assert got["relative"] == pytest.approx(expected * d / k, abs=1e-7 * d / k)
    gate = _row(rows, w_gate, "residual", "activation")
    assert _input_fraction(deltas[w_gate], U) < 1e-12 and gate["fraction"] < 1e-10
    print(f"{fam} {routing}: |f − f_hand| = {abs(got['fraction'] - expected):.2e}, f_gate = {gate['fraction']:.2e}")


def test_expert_write_rows_equal_the_dense_w_out_formula(moe):
    """Oracle 2 (write side): ΔW planted in one expert's W_out: its prediction row's fraction = ‖U_kᵀ ΔW‖²_F /
    ‖ΔW‖²_F with U_k the top-k left singular vectors of the library's prediction basis (diag(γ)·W_U, as a dense
    W_out's row), ΔW scaled by γ_post where the family has one; its inner row's fraction = ‖ΔW U_h‖²_F / ‖ΔW‖²_F
    with U_h the top-k eigenvectors of the expert's routed hidden-state covariance from the hand loop."""
    from rwasym.math.subspaces import prediction_basis

    fam, _, model = moe
    tokens, mask = _routed_data()
    sums, _, _ = _routed_by_hand(model, fam, tokens, mask)
    L, e = max((key for key in sums if key[0] == 0), key=lambda key: sums[key]["n"])
    ref, k = sums[(L, e)], 3
    name = f"blocks.{L}.mlp.experts.{e}.W_out"
    d, d_mlp = model.matrix(name).shape
    g = torch.Generator().manual_seed(4)
    tuned, deltas = _planted(model, {name: torch.randn(d, d_mlp, generator=g, dtype=torch.float64)})
    delta = deltas[name]
    gamma = model.post_norm_scale(name)
    if gamma is not None:
        delta = gamma[:, None] * delta
    rows = _probe_quiet(
        model,
        tuned,
        {"input_ids": tokens, "attention_mask": mask},
        k=k,
        matrices=name,
        batch_size=2,
        exclude_positions=(0,),
    ).rows
    w_raw, row_scale = model.unembedding_parts()
    U = prediction_basis(w_raw, d, row_scale=row_scale).U[:, :k]
    expected = float((U.T @ delta).square().sum() / delta.square().sum())
    pred = _row(rows, name, "residual", "prediction")
    assert pred["side"] == "output" and pred["expert"] == e and pred["routed_tokens"] == ref["n"]
    assert pred["fraction"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    resid = _row(rows, name, "residual", "activation")
    assert resid["site"] == model.residual_hooks()[f"blocks.{L}.hook_resid_post"]  # the stream it writes into
    inner = _row(rows, name, "inner", "activation")
    hidden = _cov_by_hand(ref["n"], ref["hs1"], ref["hS1"], True)
    expected_inner = _input_fraction(delta, _top(hidden, k))
    assert inner["site"] == f"blocks.{L}.mlp.experts.{e}.routed_hidden" and inner["side"] == "input"
    assert inner["fraction"] == pytest.approx(expected_inner, abs=1e-7)
    print(
        f"{fam}: |Δf| prediction {abs(pred['fraction'] - expected):.2e}, "
        f"inner {abs(inner['fraction'] - expected_inner):.2e}"
    )


def test_experts_with_too_few_routed_tokens_get_no_routed_rows_and_are_listed(moe):
    """With k = the smallest positive N_e of layer 0, the experts with N_e < k + 1 get no row read from routed
    statistics (no read-side activation row, no inner row, no gradient-shaped share of their input), keep their
    prediction rows, are listed in config['few_tokens'] with a warning and are not called unchanged; the others
    get their activation rows. Precomputed activations= leave experts out, and refuse them when selected."""
    from rwasym.hooks.routing import capture_routed

    _, _, model = moe
    tokens, mask = _routed_data()
    data = {"input_ids": tokens, "attention_mask": mask}
    routed = capture_routed(model, data, layers=[0], progress=False)
    counts = {e: routed.count(0, e) for e in range(routed.n_experts[0])}
    k = max(1, min(counts.values()))
    few = [f"blocks.0.mlp.experts.{e}" for e, n in counts.items() if n < k + 1]
    enough = [e for e, n in counts.items() if n >= k + 1]
    assert few and enough
    names = [f"blocks.0.mlp.experts.{e}.{kind}" for e in counts for kind in ("W_in", "W_out")]
    g = torch.Generator().manual_seed(5)
    tuned, _ = _planted(model, {n: torch.randn(model.matrix(n).shape, generator=g, dtype=torch.float64) for n in names})
    with pytest.warns(UserWarning, match="fewer than k"):
        result = rwasym.probe(model, tuned, data, k=k, matrices=names, null_samples=0, progress=False)
    assert result.config["few_tokens"] == few and result.config["unchanged"] == []
    for e, n in counts.items():
        own = [r for r in result.rows if r["expert"] == e]
        routed_rows = [r for r in own if r["site"].startswith(f"blocks.0.mlp.experts.{e}.routed_")]
        assert all(r["routed_tokens"] == n for r in own)
        assert {r["subspace"] for r in own if r["kind"] == "W_in"} >= {"prediction"}
        if n < k + 1:
            assert routed_rows == []
            assert all(r["random_delta_fraction"] is None for r in own if r["kind"] == "W_in")
        else:
            assert {(r["kind"], r["stream"]) for r in routed_rows} == {("W_in", "residual"), ("W_out", "inner")}
    acts = rwasym.capture(model, data, progress=False)
    with pytest.raises(RwasymError, match="cannot capture routed statistics"):
        rwasym.probe(model, tuned, activations=acts, k=k, matrices=names, progress=False)
