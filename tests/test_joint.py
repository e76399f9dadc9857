"""Joint sweeps (`rwasym.analyses.joint`): rank-r edits of matrix sets at once, each row checked
against the same edit written by hand into the Hugging Face modules (PCA from HF forward hooks and
a float64 eigh, the prediction subspace from the HF final norm and lm_head, metrics from plain HF
forwards), per-matrix matched controls, the rank-r algebra against brute force, resume, errors."""

import copy
import shutil

import pytest
import torch

import rwasym
from rwasym import RwasymError
from rwasym.analyses.joint import joint_edits, matrix_set
from rwasym.analyses.sweep import SweepConfig, read_sweep, summarize, sweep
from rwasym.data.pairs import PreferencePairs
from rwasym.hooks.activations import capture
from rwasym.math.rank1 import directions, edit_energy, edit_norm, frame_edit, random_frame
from rwasym.testing import build_hf_model

BETA = 0.1


@pytest.fixture(scope="module")
def pair(tmp_path_factory, one_thread):
    """A tiny HF Llama (GQA) base and a tuned copy with ΔW planted in both layers' q_proj and o_proj
    (down_proj untouched: the write set must leave it out), saved; held-out pairs and a corpus."""
    root = tmp_path_factory.mktemp("joint")
    hf = build_hf_model("llama", root / "base")
    tuned = copy.deepcopy(hf)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in tuned.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.o_proj):
                lin.weight.add_(0.3 * torch.randn(lin.weight.shape, generator=g))
    shutil.copytree(root / "base", root / "tuned")  # the tokenizer files
    tuned.save_pretrained(root / "tuned")
    pairs = PreferencePairs(
        prompt=torch.randint(3, 96, (12, 6), generator=g),
        chosen=torch.randint(3, 96, (12, 2), generator=g),
        rejected=torch.randint(3, 96, (12, 2), generator=g),
    )
    data = torch.randint(3, 96, (8, 16), generator=g)
    return dict(root=root, hf=hf, tuned=tuned.eval(), pairs=pairs, data=data)


def _inputs(hf, module, tokens):
    box = []
    handle = module.register_forward_hook(lambda m, args, out: box.append(args[0].detach()))
    try:
        with torch.no_grad():
            hf(tokens)
    finally:
        handle.remove()
    return box[0].reshape(-1, box[0].shape[-1]).double()


def _top(rows, k):
    vals, vecs = torch.linalg.eigh(torch.cov(rows.T))
    return vecs[:, torch.argsort(vals, descending=True)[:k]]  # (n, k)


def _logp(hf, prompt, completion):
    """Σ log p(completion | prompt) per pair under the HF model (no padding)."""
    seq = torch.cat([prompt, completion], 1)
    with torch.no_grad():
        lp = hf(seq).logits.double().log_softmax(-1)
    n = prompt.shape[1]
    return lp[:, n - 1 : -1].gather(-1, completion.unsqueeze(-1)).squeeze(-1).sum(-1)


def _hand_metrics(edited, base, pairs):
    lc, lr = _logp(edited, pairs.prompt, pairs.chosen), _logp(edited, pairs.prompt, pairs.rejected)
    bc, br = _logp(base, pairs.prompt, pairs.chosen), _logp(base, pairs.prompt, pairs.rejected)
    margins = BETA * ((lc - bc) - (lr - br))
    text = torch.cat([pairs.prompt, pairs.chosen], 1)
    with torch.no_grad():
        lp = edited(text).logits.double().log_softmax(-1)[:, :-1]
        lb = base(text).logits.double().log_softmax(-1)[:, :-1]
    ce = -lp.gather(-1, text[:, 1:].unsqueeze(-1)).mean()
    kl = (lp.exp() * (lp - lb)).sum(-1).mean()
    return dict(
        margin=float(margins.mean()), accuracy=float((lc > lr).double().mean()), ce=float(ce), kl_base=float(kl)
    )


def _run(pair, out, **kw):
    cfg = dict(
        joint=True,
        matrices=("blocks.*.attn.W_Q", "write"),
        ranks=(1, 2),
        directions="pca:1,prediction:1,random:3,orthogonal:3",
        alphas=(1.5,),
        match="norm",
        edits_per_pass=4,
        beta=BETA,
        progress=False,
    )
    return sweep(
        str(pair["root"] / "base"),
        str(pair["root"] / "tuned"),
        pair["pairs"],
        out=out,
        **{"data": pair["data"], **cfg, **kw},
    )


@pytest.mark.parametrize("mode", ["transplant", "ablate"])
def test_joint_target_rows_equal_the_edit_written_into_the_hf_modules(pair, tmp_path, mode):
    rows = _run(pair, tmp_path / "j.jsonl", mode=mode)
    assert len(rows) == 2 * 2 * 7  # sets × ranks × (1 target + 6 controls)
    hf, tuned = pair["hf"], pair["tuned"]
    layers = range(len(hf.model.layers))
    norm = hf.model.norm.weight.detach().double()
    P_all = torch.linalg.svd(norm[:, None] * hf.lm_head.weight.detach().double().T, full_matrices=False)[0]
    host = hf if mode == "transplant" else tuned
    sign = 1.0 if mode == "transplant" else -1.0
    for label, module in (("blocks.*.attn.W_Q", "q_proj"), ("write", "o_proj")):
        for r in (1, 2):
            row = next(
                x
                for x in rows
                if x["matrix"] == label and x["rank"] == r and x["index"] == 0 and x["direction"] == x["target"]
            )
            assert row["target"] == ("pca" if module == "q_proj" else "prediction")
            assert row["n_matrices"] == 2  # the write set leaves the untouched down_proj out
            edited = copy.deepcopy(host)
            total = 0.0
            for i in layers:
                lin_b = getattr(hf.model.layers[i].self_attn, module)
                lin_t = getattr(tuned.model.layers[i].self_attn, module)
                delta = lin_t.weight.detach().double() - lin_b.weight.detach().double()
                if module == "q_proj":  # top-r PCA of the base's input over the corpus
                    V = _top(_inputs(hf, lin_b, pair["data"]), r)
                    E = delta @ V @ V.T
                else:  # top-r prediction subspace of diag(γ_final)·W_U
                    P = P_all[:, :r]
                    E = P @ P.T @ delta
                total += float(E.square().sum())
                with torch.no_grad():
                    getattr(edited.model.layers[i].self_attn, module).weight.add_((sign * 1.5 * E).float())
            want = _hand_metrics(edited, hf, pair["pairs"])
            # γ_final is measured on the norm module in float32 (rwasym.models.registry.norm_scale): ~1e-7
            assert row["u_norm"] == pytest.approx(total**0.5, rel=1e-9 if module == "q_proj" else 1e-6)
            for key, value in want.items():
                assert row[key] == pytest.approx(value, abs=1e-5 * max(1.0, abs(value))), (label, r, key)
            gap = row["margin"]  # the gap fraction of the row's own margin
            ref = read_sweep(tmp_path / "j.jsonl")[0]["reference"]
            b, t = ref["base"]["margin"], ref["tuned"]["margin"]
            expect = (gap - b) / (t - b) if mode == "transplant" else (t - gap) / (t - b)
            assert row["gap_margin"] == pytest.approx(expect, rel=1e-9)


def _w_q_set(pair):
    """(base, the W_Q set's specs, the base's input statistics of the set, ΔW per matrix)."""
    base, tuned = rwasym.load(str(pair["root"] / "base")), rwasym.load(str(pair["root"] / "tuned"))
    specs = matrix_set(base, "blocks.*.attn.W_Q")
    stats = capture(
        base,
        pair["data"],
        sites={base.input_hook(s.name): s.n_in for s in specs},
        progress=False,
        gram_dtype=torch.float64,
    )
    return base, specs, stats, {s.name: tuned.weight(s.name) - base.weight(s.name) for s in specs}


def _replayable(first):
    """(seeds, gen): gen(*parts) seeds a fresh generator per (matrix, rank, target, kind) and records the
    seed in ``seeds``, so a test can replay that generator's draws."""
    seeds = {}

    def gen(*parts):
        return torch.Generator().manual_seed(seeds.setdefault(parts, first + len(seeds)))

    return seeds, gen


def test_joint_controls_are_matched_per_matrix_and_orthogonal(pair):
    base, specs, stats, deltas = _w_q_set(pair)
    gens = {}

    def gen(*parts):
        return gens.setdefault(parts, torch.Generator().manual_seed(len(gens) + 1))

    for match in ("norm", "output"):
        edits = joint_edits(
            base, specs, deltas.__getitem__, stats, [("pca", 2), ("random", 4), ("orthogonal", 4)], 3, gen, match
        )
        assert [d["direction"] for d, _ in edits] == ["pca"] * 2 + ["random"] * 4 + ["orthogonal"] * 4
        for name in deltas:
            C = stats.for_matrix(name).covariance()
            M = stats.for_matrix(name).second_moment()
            top = _top_from(C, 6)
            for desc, edit in edits[2:]:
                U, V = edit[name]
                U_t, V_t = edits[desc["matched_to"]][1][name]
                E, E_t = U.T @ V, U_t.T @ V_t
                if match == "norm":
                    assert float(E.norm()) == pytest.approx(float(E_t.norm()), rel=1e-10)
                else:
                    assert float((E @ M @ E.T).trace()) == pytest.approx(float((E_t @ M @ E_t.T).trace()), rel=1e-9)
                # the row space of a control edit is an r-frame; orthogonal ones avoid the top c·r PCs
                assert torch.linalg.matrix_rank(V).item() == 3
                if desc["direction"] == "orthogonal":
                    assert float((V @ top).abs().max()) < 1e-10
            U0, V0 = edits[0][1][name]
            assert torch.allclose(U0.T @ V0, deltas[name] @ top[:, :3] @ top[:, :3].T, atol=1e-12)
            U1, V1 = edits[1][1][name]  # target 1: the next block of r PCs
            assert torch.allclose(U1.T @ V1, deltas[name] @ top[:, 3:6] @ top[:, 3:6].T, atol=1e-12)


def _top_from(C, k):
    vals, vecs = torch.linalg.eigh(C.double())
    return vecs[:, torch.argsort(vals, descending=True)[:k]]


def test_frame_edit_norm_and_energy_against_brute_force():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(7, 5, dtype=torch.float64, generator=g)
    A = torch.randn(200, 5, dtype=torch.float64, generator=g) + 0.3
    M = A.T @ A / A.shape[0]
    for side, n in (("input", 5), ("output", 7)):
        F = random_frame(n, 3, g)
        assert torch.allclose(F @ F.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
        U, V = frame_edit(delta, F, side)
        E = U.T @ V
        want = delta @ F.T @ F if side == "input" else F.T @ F @ delta
        assert torch.allclose(E, want, atol=1e-12)
        assert edit_norm(U, V) == pytest.approx(float(E.norm()), rel=1e-12)
        assert edit_energy(U, V, M) == pytest.approx(float((A @ E.T).square().sum(1).mean()), rel=1e-10)
    # rank 1 on the input side is closed_form_u's u vᵀ
    d = directions("pca", delta, 1, cov=M)[0]
    U, V = frame_edit(delta, d.v[None], "input")
    assert torch.allclose(U.T @ V, torch.outer(d.u, d.v), atol=1e-12)
    with pytest.raises(RwasymError, match="orthonormal"):
        frame_edit(delta, 2 * F, "output")
    with pytest.raises(RwasymError, match="side"):
        frame_edit(delta, F, "output2")


def test_joint_sweep_resumes_and_summarises(pair, tmp_path):
    out = tmp_path / "r.jsonl"
    full = _run(pair, out)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:6]) + lines[6][:20])  # header + 5 rows + a half-written row
    with pytest.warns(UserWarning, match="half-written"):
        resumed = _run(pair, out)
    assert [r["id"] for r in resumed] == [r["id"] for r in full]
    for a, b in zip(resumed, full):
        assert a["margin"] == pytest.approx(b["margin"], abs=1e-12)
    summary = summarize(resumed, metrics=["gap_margin"])
    ranks = {(r["matrix"], r["rank"]) for r in summary.rows}
    assert ranks == {(m, k) for m in ("blocks.*.attn.W_Q", "write") for k in (1, 2)}
    one = next(r for r in summary.rows if r["matrix"] == "write" and r["rank"] == 2 and r["control"] == "control")
    members = [r for r in full if r["matrix"] == "write" and r["rank"] == 2]
    assert one["n_target"] == 1 and one["n_control"] == 6
    assert one["target_mean"] == pytest.approx(next(r["gap_margin"] for r in members if r["direction"] == "prediction"))
    # another rank list is another configuration
    with pytest.raises(RwasymError, match="ranks"):
        _run(pair, out, ranks=(1, 3))


def test_joint_config_errors(pair, tmp_path):
    with pytest.raises(RwasymError, match="needs joint"):
        SweepConfig(ranks=(2,))
    with pytest.raises(RwasymError, match="heads"):
        SweepConfig(joint=True, heads=True)
    with pytest.raises(RwasymError, match="distinct positive"):
        SweepConfig(joint=True, ranks=(0,))
    base = rwasym.load(str(pair["root"] / "base"))
    with pytest.raises(RwasymError, match="matches no matrix"):
        matrix_set(base, "blocks.*.attn.W_X")
    assert [s.name for s in matrix_set(base, "blocks.0.attn.W_Q+blocks.1.mlp.W_out")] == [
        "blocks.0.attn.W_Q",
        "blocks.1.mlp.W_out",
    ]
    with pytest.raises(RwasymError, match="c·r"):
        _run(pair, tmp_path / "e.jsonl", matrices=("blocks.*.attn.W_Q",), ranks=(32,), directions="pca:1,random:1")


def test_cli_intervene_joint(pair, tmp_path, capsys):
    from rwasym.app.cli import main

    pairs = tmp_path / "pairs.safetensors"
    pair["pairs"].save(pairs)
    out = tmp_path / "cli.jsonl"
    code = main(
        [
            "intervene",
            "--base",
            str(pair["root"] / "base"),
            "--tuned",
            str(pair["root"] / "tuned"),
            "--pairs",
            str(pairs),
            "--joint",
            "--matrices",
            "read,blocks.0.attn.W_Q+blocks.1.attn.W_O",
            "--ranks",
            "1,2",
            "--directions",
            "pca:1,random:2",
            "--match",
            "norm",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| read |  | transplant | 1 | pca (rank 2) | random | gap_margin |" in printed
    header, rows = read_sweep(out)
    assert header["config"]["joint"] is True and header["config"]["ranks"] == [1, 2]
    assert len(rows) == 2 * 2 * 3
    # the read set: q_proj of both layers (the only read matrices with a ΔW); the mixed set: W_Q and W_O by pca
    assert {(r["matrix"], r["n_matrices"]) for r in rows} == {("read", 2), ("blocks.0.attn.W_Q+blocks.1.attn.W_O", 2)}


@pytest.fixture(scope="module")
def olmo2_pair(tmp_path_factory, one_thread):
    """A tiny OLMo 2 (post-sublayer norms, perturbed) and a tuned copy with ΔW in both o_proj."""
    from rwasym.testing.families import build_family

    root = tmp_path_factory.mktemp("olmo2")
    hf = build_family("olmo2", root / "base")
    tuned = copy.deepcopy(hf)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in tuned.model.layers:
            layer.self_attn.o_proj.weight.add_(0.3 * torch.randn(layer.self_attn.o_proj.weight.shape, generator=g))
    shutil.copytree(root / "base", root / "tuned")
    tuned.save_pretrained(root / "tuned")
    pairs = PreferencePairs(
        prompt=torch.randint(3, 96, (12, 6), generator=g),
        chosen=torch.randint(3, 96, (12, 2), generator=g),
        rejected=torch.randint(3, 96, (12, 2), generator=g),
    )
    return dict(root=root, hf=hf, tuned=tuned.eval(), pairs=pairs)


@pytest.mark.parametrize("joint", [False, True])
def test_post_norm_write_edits_follow_the_residual_convention(olmo2_pair, tmp_path, joint):
    """OLMo 2 normalises the attention output before the residual add, so the residual stream sees
    diag(γ_post)·ΔW: the prediction edit is p pᵀ diag(γ)ΔW there, written as the raw diag(γ)⁻¹ p pᵀ diag(γ)ΔW,
    with norms (and hence control matching) in the residual convention; post_norm='raw' edits p pᵀ ΔW."""
    hf, tuned, pairs = olmo2_pair["hf"], olmo2_pair["tuned"], olmo2_pair["pairs"]
    final = hf.model.norm.weight.detach().double()
    p = torch.linalg.svd(final[:, None] * hf.lm_head.weight.detach().double().T, full_matrices=False)[0][:, 0]
    layers = [0, 1] if joint else [0]
    for post_norm in ("residual", "raw"):
        rows = sweep(
            str(olmo2_pair["root"] / "base"),
            str(olmo2_pair["root"] / "tuned"),
            pairs,
            out=tmp_path / f"{post_norm}.jsonl",
            matrices="blocks.*.attn.W_O" if joint else "blocks.0.attn.W_O",
            joint=joint,
            directions="prediction:1,random:2",
            alphas=(2.0,),
            match="norm",
            beta=BETA,
            post_norm=post_norm,
            progress=False,
        )
        row = next(r for r in rows if r["direction"] == "prediction")
        controls = [r for r in rows if r["direction"] == "random"]
        edited, total = copy.deepcopy(hf), 0.0
        for i in layers:
            o_b, o_t = hf.model.layers[i].self_attn.o_proj, tuned.model.layers[i].self_attn.o_proj
            delta = o_t.weight.detach().double() - o_b.weight.detach().double()
            norm = hf.model.layers[i].post_attention_layernorm
            gamma = norm.weight.detach().double() / (1 + norm.variance_epsilon) ** 0.5
            if post_norm == "raw":
                gamma = torch.ones_like(gamma)
            E_res = torch.outer(p, p @ (gamma[:, None] * delta))  # p pᵀ diag(γ) ΔW
            total += float(E_res.square().sum())
            with torch.no_grad():
                o = edited.model.layers[i].self_attn.o_proj
                o.weight.add_((2.0 * E_res / gamma[:, None]).float())
        assert row["u_norm"] == pytest.approx(total**0.5, rel=1e-6), post_norm
        assert all(c["u_norm"] == pytest.approx(row["u_norm"], rel=1e-9) for c in controls)  # matched, same convention
        want = _hand_metrics(edited, hf, pairs)
        for key, value in want.items():
            assert row[key] == pytest.approx(value, abs=1e-5 * max(1.0, abs(value))), (post_norm, key)
    header = read_sweep(tmp_path / "raw.jsonl")[0]
    assert header["config"]["post_norm"] == "raw"


@pytest.mark.parametrize("joint", [False, True])
def test_zero_post_norm_scales_drop_the_unreachable_part(olmo2_pair, tmp_path, joint):
    """Where a post-norm scale is exactly zero (gemma-3-270m has such dimensions), the residual stream cannot
    see the weight's output there: the raw edit is the pseudo-inverse diag(γ)⁺ p pᵀ diag(γ)ΔW (zero rows at
    γ = 0), and each row records the fraction of ‖p pᵀ diag(γ)ΔW‖² dropped, both recomputed by hand."""
    hf, tuned, pairs = copy.deepcopy(olmo2_pair["hf"]), copy.deepcopy(olmo2_pair["tuned"]), olmo2_pair["pairs"]
    dead = torch.tensor([1, 5, 6])  # the post-attention norm's zero scales, in both layers, in both models
    for m in (hf, tuned):
        with torch.no_grad():
            for layer in m.model.layers:
                layer.post_attention_layernorm.weight[dead] = 0.0
    for name, m in (("base", hf), ("tuned", tuned)):
        shutil.copytree(olmo2_pair["root"] / "base", tmp_path / name)
        m.save_pretrained(tmp_path / name)
    final = hf.model.norm.weight.detach().double()
    p = torch.linalg.svd(final[:, None] * hf.lm_head.weight.detach().double().T, full_matrices=False)[0][:, 0]
    layers = [0, 1] if joint else [0]
    rows = sweep(
        str(tmp_path / "base"),
        str(tmp_path / "tuned"),
        pairs,
        out=tmp_path / "zero.jsonl",
        matrices="blocks.*.attn.W_O" if joint else "blocks.0.attn.W_O",
        joint=joint,
        directions="prediction:1,random:2",
        alphas=(2.0,),
        match="norm",
        beta=BETA,
        progress=False,
    )
    row = next(r for r in rows if r["direction"] == "prediction")
    edited, total, lost = copy.deepcopy(hf), 0.0, 0.0
    for i in layers:
        o_b, o_t = hf.model.layers[i].self_attn.o_proj, tuned.model.layers[i].self_attn.o_proj
        delta = o_t.weight.detach().double() - o_b.weight.detach().double()
        norm = hf.model.layers[i].post_attention_layernorm
        gamma = norm.weight.detach().double() / (1 + norm.variance_epsilon) ** 0.5
        E_res = torch.outer(p, p @ (gamma[:, None] * delta))
        total += float(E_res.square().sum())
        lost += float(E_res[dead].square().sum())
        raw = torch.zeros_like(E_res)
        alive = gamma != 0
        raw[alive] = E_res[alive] / gamma[alive, None]
        with torch.no_grad():
            edited.model.layers[i].self_attn.o_proj.weight.add_((2.0 * raw).float())
    assert lost > 1e-4 * total  # p has weight on the dead dimensions: the case is not vacuous
    assert row["post_norm_unreachable"] == pytest.approx(lost / total, rel=1e-6)
    assert row["u_norm"] == pytest.approx(total**0.5, rel=1e-6)
    want = _hand_metrics(edited, hf, pairs)
    for key, value in want.items():
        assert row[key] == pytest.approx(value, abs=1e-5 * max(1.0, abs(value))), key
    controls = [r for r in rows if r["direction"] == "random"]
    assert len(controls) == 2 and all(0.0 < c["post_norm_unreachable"] < 1.0 for c in controls)


# -- written to kill surviving mutants of rwasym.math.rank1 (tests/MUTATION.md) ----------------------
def test_rank1_algebra_edge_cases():
    from dataclasses import replace

    from rwasym.math.covariance import RunningCovariance
    from rwasym.math.lowrank import LowRankDelta
    from rwasym.math.rank1 import Direction, closed_form_u, match_output_energy

    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(6, 2, dtype=torch.float64, generator=g), torch.randn(2, 5, dtype=torch.float64, generator=g)
    low, v = LowRankDelta(B, A, scale=0.5), torch.randn(5, dtype=torch.float64, generator=g)
    v = v / v.norm()
    assert torch.allclose(closed_form_u(low, v), 0.5 * B @ (A @ v), atol=1e-14)
    assert torch.allclose(closed_form_u(low, v), closed_form_u(low.materialize(), v), atol=1e-14)
    with pytest.raises(RwasymError, match="unit vector"):
        closed_form_u(low, 2 * v)
    with pytest.raises(RwasymError, match="unit vector"):
        closed_form_u(low.materialize(), 1.01 * v)
    # energy with a RunningCovariance: centred (the default) and uncentred
    acc = RunningCovariance(5)
    X = torch.randn(50, 5, dtype=torch.float64, generator=g) + 2.0
    acc.add(X)
    d = Direction("random", 0, "input", "pca", u=torch.ones(6, dtype=torch.float64), v=v, direction=v)
    assert d.energy(acc) == pytest.approx(float(v @ torch.cov(X.T) @ v), rel=1e-12)
    assert d.energy(acc, center=False) == pytest.approx(float(v @ (X.T @ X / 50) @ v), rel=1e-12)
    # output matching: each control to the target it names (not its position), energies equal, the
    # name kept; a zero-energy control cannot be matched
    M = X.T @ X / 50
    e = torch.eye(5, dtype=torch.float64)
    targets = [
        Direction("pca", i, "input", "pca", u=(i + 1.0) * torch.ones(6, dtype=torch.float64), v=e[i], direction=e[i])
        for i in range(2)
    ]
    controls = [
        replace(targets[0], kind="random", index=j, u=torch.ones(6, dtype=torch.float64), v=e[2 + j], matched_to=m)
        for j, m in enumerate((1, 1, 0))
    ]
    out = match_output_energy(controls, targets, M)
    energy = lambda x: float(x.u.square().sum()) * float(x.v @ M @ x.v)
    assert [c.matched_to for c in out] == [1, 1, 0]
    for c in out:
        assert energy(c) == pytest.approx(energy(targets[c.matched_to]), rel=1e-12)
    unnamed = match_output_energy([replace(c, matched_to=None) for c in controls], targets, M)
    assert [c.matched_to for c in unnamed] == [0, 1, 0]  # position modulo the number of targets
    with pytest.raises(RwasymError, match="zero output energy"):
        match_output_energy([replace(controls[0], u=torch.zeros(6, dtype=torch.float64))], targets, M)
    with pytest.raises(RwasymError, match="at least one target"):
        match_output_energy(controls, [], M)


def test_rank1_direction_edge_cases():
    """Edge cases of `directions`, `random_frame`, `frame_edit`, `edit_norm` / `edit_energy` that the
    mutation run (tests/MUTATION.md) found untested: count and k validation at their boundaries,
    seeded reproducibility, zero components (a rank-1 ΔW along the top PC has no component on an
    orthogonal control: u = 0, not nan), controls rescaled below unit norm, targets never rescaled."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(300, 6, dtype=torch.float64, generator=g) * torch.tensor(
        [5.0, 3, 2, 1, 0.5, 0.2], dtype=torch.float64
    )
    cov = torch.cov(X.T)
    top = torch.linalg.eigh(cov).eigenvectors[:, -1]
    p = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=g)).Q
    delta = 0.3 * torch.outer(torch.randn(4, dtype=torch.float64, generator=g), top)  # rank 1 along the top PC
    for count in (0, -1, True):
        with pytest.raises(RwasymError, match="count must be a positive integer"):
            directions("random", delta, count, side="input")
    # orthogonal: k = n - 1 leaves a 1-dim complement; k = n leaves none
    last = directions("orthogonal", delta, 2, cov=cov, k=5, side="input", generator=torch.Generator().manual_seed(0))
    assert all(abs(float(d.v @ top)) < 1e-12 for d in last)
    with pytest.raises(RwasymError, match="orthogonal complement of a 6-dim subspace of R\\^6 is empty"):
        directions("orthogonal", delta, 1, cov=cov, k=6, side="input")
    # seeded: the same generator seed gives the same draws (orthogonal, random, random_frame)
    for kind, kw in (("orthogonal", dict(cov=cov, k=2, side="input")), ("random", dict(side="input"))):
        a, b = (directions(kind, delta, 3, generator=torch.Generator().manual_seed(7), **kw) for _ in range(2))
        assert all(torch.equal(x.v, y.v) for x, y in zip(a, b))
        c = directions(kind, delta, 3, generator=torch.Generator().manual_seed(8), **kw)
        assert not torch.equal(a[0].v, c[0].v)
    assert torch.equal(
        random_frame(6, 2, torch.Generator().manual_seed(3)), random_frame(6, 2, torch.Generator().manual_seed(3))
    )
    # ΔW has no component on the complement of its top PC: every orthogonal control is a zero edit
    zero = directions("orthogonal", delta, 3, cov=cov, k=1, side="input", target_norms=[2.0], generator=g)
    assert all(torch.equal(d.u, torch.zeros(4, dtype=torch.float64)) and d.matched_to == 0 for d in zero)
    # the threshold is relative to ‖ΔW‖: the same holds for a ΔW a million times larger
    big = directions("orthogonal", 1e6 * delta, 3, cov=cov, k=1, side="input", target_norms=[2.0], generator=g)
    assert all(torch.equal(d.u, torch.zeros(4, dtype=torch.float64)) for d in big)
    # output side, p ⟂ the column space of ΔW (or ΔW = 0): u = 0 and v = e₀, not nan
    e0 = torch.eye(6, dtype=torch.float64)[0]
    for dw in (torch.outer(p[:, 0], top), torch.zeros(4, 6, dtype=torch.float64)):
        (d,) = directions("prediction", dw, 1, unembedding=p[:, 1:])
        assert torch.equal(d.u, torch.zeros(4, dtype=torch.float64)) and torch.equal(d.v, e0)
    # Direction.energy computes in float64 whatever the covariance's dtype
    d32 = directions("pca", delta, 1, cov=cov)[0]
    c32 = cov.float()
    assert d32.energy(c32) == pytest.approx(float(d32.v @ c32.double() @ d32.v), rel=1e-13)
    # rescaling to a target norm works below 1 too; without target_norms nothing is rescaled or matched
    small = directions(
        "random",
        1e-3 * torch.randn(4, 6, dtype=torch.float64, generator=g),
        2,
        side="input",
        target_norms=[0.5, 0.25],
        generator=g,
    )
    assert [float(d.u.norm()) for d in small] == pytest.approx([0.5, 0.25], rel=1e-12)
    plain = directions("random", delta, 2, side="input", generator=torch.Generator().manual_seed(5))
    assert all(d.matched_to is None and torch.allclose(d.u, delta @ d.v, atol=1e-15) for d in plain)
    targets = directions("pca", delta, 2, cov=cov, target_norms=[9.0])
    assert all(d.matched_to is None and torch.allclose(d.u, delta @ d.v, atol=1e-15) for d in targets)
    # random_frame accepts 1 <= r <= n only
    for r in (1, 6):
        F = random_frame(6, r, g)
        assert torch.allclose(F @ F.T, torch.eye(r, dtype=torch.float64), atol=1e-12)
    for r in (0, 7):
        with pytest.raises(RwasymError, match=f"a frame of {r} orthonormal vectors needs 1 <= r <= n = 6"):
            random_frame(6, r, g)
    # frame_edit: a frame 10% off orthonormal is refused; norms and energies of small edits are exact
    F = random_frame(6, 2, g)
    with pytest.raises(RwasymError, match="orthonormal"):
        frame_edit(delta, 1.1 * F, "input")
    U, V = frame_edit(delta, F, "input")
    E = U.T @ V
    assert edit_norm(U, V) == pytest.approx(float(E.norm()), rel=1e-12) and float(E.norm()) < 1
    M = X.T @ X / len(X) * 1e-4
    assert edit_energy(U, V, M) == pytest.approx(float((E @ M @ E.T).trace()), rel=1e-12) and edit_energy(U, V, M) < 1


_HF_MODULE = {"W_Q": "q_proj", "W_K": "k_proj", "W_V": "v_proj", "W_O": "o_proj"}


def _hf_linear(hf, name):
    """The HF nn.Linear of a registry name blocks.{i}.attn.W_*."""
    _, layer, _, kind = name.split(".")
    return getattr(hf.model.layers[int(layer)].self_attn, _HF_MODULE[kind])


def _hand_collateral(edited, host, tokens):
    """Mean per-token KL(edited ‖ host) and the CE change on ``tokens``, every position but the last."""
    with torch.no_grad():
        lp = edited(tokens).logits.double().log_softmax(-1)[:, :-1]
        lh = host(tokens).logits.double().log_softmax(-1)[:, :-1]
    kl = float((lp.exp() * (lp - lh)).sum(-1).mean())
    nll = lambda logp: -logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).mean()  # noqa: E731
    return kl, float(nll(lp) - nll(lh))


@pytest.mark.parametrize("mode", ["transplant", "ablate"])
def test_kl_matched_rows_sit_at_their_budget_when_written_into_the_hf_weights(pair, tmp_path, monkeypatch, mode):
    """match="kl" (the default): every row — targets and controls, both sets, both ranks, each budget —
    is the edit at the α its calibration found; written by hand into the HF modules' weights, its
    collateral KL on the collateral text (computed there by hand) equals the row's and sits within
    5% of the budget; the collateral CE change too. The frames' covariance defaults to the collateral."""
    from rwasym.analyses import behaviour

    measured = []
    iter_joint = behaviour.Evaluator.iter_joint

    def spy(self, host, edits):  # the edits each row's metrics were measured under, in plan order
        measured.extend(edits)
        return iter_joint(self, host, edits)

    monkeypatch.setattr(behaviour.Evaluator, "iter_joint", spy)
    g = torch.Generator().manual_seed(11)
    collateral = torch.randint(3, 96, (4, 20), generator=g)
    rows = _run(
        pair,
        tmp_path / "kl.jsonl",
        match="kl",
        alphas=(1.0,),
        kl_budgets=(0.01, 0.003),
        mode=mode,
        data=None,
        collateral=collateral,
    )
    monkeypatch.undo()
    ceilings = [r for r in rows if r["direction"] == "ceiling"]
    rows = [r for r in rows if r["direction"] != "ceiling"]
    assert len(rows) == len(measured) == 2 * 2 * 7 * 2  # sets × ranks × edits × budgets
    assert [c["matrix"] for c in ceilings] == ["blocks.*.attn.W_Q", "write"]
    header, _ = read_sweep(tmp_path / "kl.jsonl")
    assert header["config"]["cov_data"] == rwasym.hooks.activations.data_hash(collateral)
    hf, tuned = pair["hf"], pair["tuned"]
    host = hf if mode == "transplant" else tuned
    evals = []
    for row, edit in zip(rows, measured):
        assert row["kl_budget"] in (0.003, 0.01)
        if row["saturated"]:  # a W_Q-only edit can stall below the budget (attention saturates): flagged, kept
            assert not row["budget_reached"] and row["matrix"] == "blocks.*.attn.W_Q"
            assert row["collateral_kl"] < row["kl_budget"]
            continue
        assert row["budget_reached"], row
        edited = copy.deepcopy(host)
        with torch.no_grad():
            for name, (U, V) in edit.items():  # E = Σ_j U_j V_jᵀ with α (and the ablate sign) folded into U
                _hf_linear(edited, name).weight.add_((U.T @ V).to(torch.float32))
        kl, dce = _hand_collateral(edited, host, collateral)
        assert kl == pytest.approx(row["collateral_kl"], rel=1e-4), row["id"]
        assert abs(kl - row["kl_budget"]) <= 0.05 * row["kl_budget"] * (1 + 1e-3)
        assert dce == pytest.approx(row["collateral_dce"], abs=1e-5)
        evals.append(row["calibration_evals"])
    assert len(evals) >= len(rows) // 2  # most rows reach their budget
    # the ceiling: the set's full ΔW, i.e. the host carrying the donor's weights of the set; by hand in HF
    donor = tuned if mode == "transplant" else hf
    for c, module in zip(ceilings, ("q_proj", "o_proj")):
        edited = copy.deepcopy(host)
        for i in range(len(hf.model.layers)):
            getattr(edited.model.layers[i].self_attn, module).load_state_dict(
                getattr(donor.model.layers[i].self_attn, module).state_dict()
            )
        want = _hand_metrics(edited, hf, pair["pairs"])
        for key, value in want.items():
            assert c[key] == pytest.approx(value, abs=1e-5 * max(1.0, abs(value))), (c["matrix"], key)
        kl, dce = _hand_collateral(edited, host, collateral)
        assert c["collateral_kl"] == pytest.approx(kl, rel=1e-4) and c["collateral_dce"] == pytest.approx(dce, abs=1e-5)
        assert c["kl_budget"] is None and c["alpha"] == 1.0 and c["calibration_evals"] == 0
    # ... and bit-equal to the rwasym model loaded with those weights, measured by a fresh Evaluator
    base_m, tuned_m = rwasym.load(str(pair["root"] / "base")), rwasym.load(str(pair["root"] / "tuned"))
    host_m = rwasym.load(str(pair["root"] / ("base" if mode == "transplant" else "tuned")))
    donor_m = tuned_m if mode == "transplant" else base_m
    for spec in matrix_set(host_m, "write"):
        host_m.set_weight(spec.name, donor_m.weight(spec.name))
    fresh = behaviour.Evaluator(base_m, tuned_m, pair["pairs"], beta=BETA).measure(host_m)
    assert all(ceilings[1][k] == v for k, v in fresh.items()), fresh
    # the α that reached the budget scales the unit edit: targets and controls differ in α, not in KL
    by_set = [r for r in rows if r["matrix"] == "write" and r["rank"] == 1 and r["kl_budget"] == 0.01]
    assert len({round(r["alpha"], 6) for r in by_set}) == len(by_set)


def test_joint_spectrum_controls_and_a_sweep_with_them(pair, tmp_path):
    """Joint spectrum control j of a matrix = the least-squares edit on target j mod c's own frame of the
    j-th spectrum-matched random delta (replayed from the same generator), norm-matched per matrix; a
    sweep accepts the kind (per-matrix and joint) and summarizes it as its own control family."""
    from rwasym.math.rank1 import spectrum_matched_delta

    base, specs, stats, deltas = _w_q_set(pair)
    seeds, gen = _replayable(100)

    edits = joint_edits(base, specs, deltas.__getitem__, stats, [("pca", 2), ("spectrum", 3)], 2, gen, "norm")
    assert [d["direction"] for d, _ in edits] == ["pca"] * 2 + ["spectrum"] * 3
    for spec in specs:
        top = _top_from(stats.for_matrix(spec.name).covariance(), 4)
        replay = torch.Generator().manual_seed(seeds[(spec.name, 2, "pca", "spectrum")])
        for j, (desc, edit) in enumerate(edits[2:]):
            R = spectrum_matched_delta(deltas[spec.name], replay)
            F = top[:, (j % 2) * 2 : (j % 2) * 2 + 2]
            E = R @ F @ F.T
            U, V = edit[spec.name]
            U_t, V_t = edits[j % 2][1][spec.name]
            scale = float((U_t.T @ V_t).norm()) / float(E.norm())
            assert torch.allclose(U.T @ V, scale * E, atol=1e-10) and desc["matched_to"] == j % 2
    rows = _run(
        pair,
        tmp_path / "s.jsonl",
        directions="pca:1,spectrum:3",
        match="kl",
        alphas=(1.0,),
        kl_budgets=(0.003,),
        matrices=("write",),
        collateral=pair["data"],
    )
    assert sum(r["direction"] == "spectrum" for r in rows) == 2 * 3
    per_matrix = sweep(
        str(pair["root"] / "base"),
        str(pair["root"] / "tuned"),
        pair["pairs"],
        out=tmp_path / "m.jsonl",
        matrices="blocks.*.attn.W_O",
        directions="prediction:1,spectrum:2",
        kl_budgets=(0.003,),
        collateral=pair["data"],
        progress=False,
    )
    assert {r["direction"] for r in per_matrix} == {"ceiling", "prediction", "spectrum"}
    summary = summarize([r for r in per_matrix if r["direction"] != "ceiling"], metrics=["gap_margin"])
    assert {r["control"] for r in summary.rows} == {"spectrum", "control"}


def test_output_random_controls_edit_the_output_side_of_read_matrices(pair, tmp_path):
    """output_random: a Haar r-frame F on the matrix's output side, E = FᵀF ΔW (replayed from the same
    generator), whatever the target's side — for W_Q it keeps ΔW's input space (row space) and not its
    output structure; norm-matched to the pca target; rows record side "output" under target "pca"."""
    base, specs, stats, deltas = _w_q_set(pair)
    seeds, gen = _replayable(200)

    edits = joint_edits(base, specs, deltas.__getitem__, stats, [("pca", 1), ("output_random", 2)], 2, gen, "norm")
    for spec in specs:
        replay = torch.Generator().manual_seed(seeds[(spec.name, 2, "pca", "output_random")])
        U_t, V_t = edits[0][1][spec.name]
        for desc, edit in edits[1:]:
            F = random_frame(spec.n_out, 2, replay)
            E = F.T @ F @ deltas[spec.name]
            U, V = edit[spec.name]
            scale = float((U_t.T @ V_t).norm()) / float(E.norm())
            assert torch.allclose(U.T @ V, scale * E, atol=1e-10) and desc["direction"] == "output_random"
            row_space = torch.linalg.svd(deltas[spec.name], full_matrices=False)[2]  # ΔW's input (row) space
            assert torch.allclose((U.T @ V) @ row_space.T @ row_space, U.T @ V, atol=1e-9)
    rows = sweep(
        str(pair["root"] / "base"),
        str(pair["root"] / "tuned"),
        pair["pairs"],
        out=tmp_path / "o.jsonl",
        matrices="blocks.0.attn.W_Q",
        directions="pca:1,output_random:3",
        match="norm",
        data=pair["data"],
        progress=False,
    )
    ctl = [r for r in rows if r["direction"] == "output_random"]
    assert len(ctl) == 3 and {(r["side"], r["target"], r["matched_to"]) for r in ctl} == {("output", "pca", 0)}
    target = next(r for r in rows if r["direction"] == "pca")
    assert all(r["edit_norm"] == pytest.approx(target["edit_norm"], rel=1e-9) for r in ctl)


def test_donor_controls_apply_the_targets_frame_to_another_runs_delta(pair, tmp_path):
    """Joint donor control j of a matrix = the least-squares edit on target j mod c's own frame of the donor's ΔW,
    norm-matched per matrix (checked by hand); with the tuned model itself as the donor, every donor row's metrics
    equal its target's exactly; donor and control_delta go together, in joint sweeps."""
    base, specs, stats, deltas = _w_q_set(pair)
    g = torch.Generator().manual_seed(11)
    donor_deltas = {s.name: 0.2 * torch.randn(s.shape, generator=g, dtype=torch.float64) for s in specs}
    _, gen = _replayable(300)
    edits = joint_edits(
        base, specs, deltas.__getitem__, stats, [("pca", 2), ("donor", 2)], 2, gen, "norm", donor_of=donor_deltas.get
    )
    assert [d["direction"] for d, _ in edits] == ["pca"] * 2 + ["donor"] * 2
    for spec in specs:
        top = _top_from(stats.for_matrix(spec.name).covariance(), 4)
        for j, (desc, edit) in enumerate(edits[2:]):
            F = top[:, (j % 2) * 2 : (j % 2) * 2 + 2]
            E = donor_deltas[spec.name] @ F @ F.T
            U, V = edit[spec.name]
            U_t, V_t = edits[j % 2][1][spec.name]
            scale = float((U_t.T @ V_t).norm()) / float(E.norm())
            assert torch.allclose(U.T @ V, scale * E, atol=1e-10) and desc["matched_to"] == j % 2
    rows = _run(
        pair,
        tmp_path / "d.jsonl",
        matrices=("blocks.*.attn.W_Q",),
        ranks=(1,),
        directions="pca:1,donor:1",
        control_delta=str(pair["root"] / "tuned"),
    )
    target = next(r for r in rows if r["direction"] == "pca")
    donor = next(r for r in rows if r["direction"] == "donor")
    metrics = [k for k in target if k.startswith(("gap_", "kl_", "margin", "accuracy", "ce"))]
    assert metrics and all(donor[k] == target[k] for k in metrics)
    header, _ = read_sweep(tmp_path / "d.jsonl")
    assert header["config"]["control_delta"] == rwasym.load(str(pair["root"] / "tuned")).weights_hash()
    with pytest.raises(RwasymError, match="go together"):
        SweepConfig(joint=True, directions="pca:1,donor:1")
    with pytest.raises(RwasymError, match="go together"):
        SweepConfig(directions="pca:1,donor:1", control_delta="x")
