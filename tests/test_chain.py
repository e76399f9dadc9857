"""Stage chains (`rwasym.chain`, `rwasym chain`). Oracles: a chain built offline from a tiny Llama with planted
stage deltas (two stages orthogonal in the Frobenius inner product, a third that reads where the first read),
explicit subtraction of the saved weights, the single-pair probe on the same data, SciPy's `subspace_angles`, and
a Monte-Carlo Haar null."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import rwasym
from rwasym import RwasymError
from rwasym.analyses.chain import chain, principal_overlap
from rwasym.app.cli import main
from rwasym.math.subspaces import haar_frames
from rwasym.testing import build_hf_model

Q0 = "model.layers.0.self_attn.q_proj.weight"
D1 = "model.layers.1.mlp.down_proj.weight"


def _planted(shape, gen, rows=None, basis=None, rank=3):
    """A rank-`rank` delta; `rows` restricts its support (orthogonality), `basis` fixes its row space."""
    n_out, n_in = shape
    V = basis if basis is not None else torch.linalg.qr(torch.randn(n_in, rank, generator=gen))[0]
    U = torch.randn(n_out, rank, generator=gen)
    if rows is not None:
        mask = torch.zeros(n_out, 1)
        mask[rows] = 1
        U = U * mask
    return 0.05 * U @ V.T, V


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A0 → A1 → A2 → A3: stage 1 and 2 touch disjoint rows of Q0 and D1 (Frobenius-orthogonal); stage 3 writes
    Q0 with stage 1's row space (so it reads where stage 1 read) and leaves D1 alone."""
    root = tmp_path_factory.mktemp("chain")
    build_hf_model("llama", root / "A0")
    state = load_file(str(root / "A0" / "model.safetensors"))
    g = torch.Generator().manual_seed(7)
    planted = {}
    d1q, V1 = _planted(state[Q0].shape, g, rows=slice(0, 16))
    d2q, _ = _planted(state[Q0].shape, g, rows=slice(16, 32))
    d3q, _ = _planted(state[Q0].shape, g, basis=V1)
    d1d, _ = _planted(state[D1].shape, g, rows=slice(0, 16))
    d2d, _ = _planted(state[D1].shape, g, rows=slice(16, 32))
    planted[1], planted[2], planted[3] = {Q0: d1q, D1: d1d}, {Q0: d2q, D1: d2d}, {Q0: d3q}
    current = dict(state)
    for s in (1, 2, 3):
        shutil.copytree(root / "A0", root / f"A{s}")
        current = {k: (v + planted[s][k] if k in planted[s] else v) for k, v in current.items()}
        save_file(current, str(root / f"A{s}" / "model.safetensors"), metadata={"format": "pt"})
    return root, planted


def _data():
    return torch.randint(3, 96, (6, 16), generator=torch.Generator().manual_seed(1))


def test_shares_decompose_the_total_exactly(stages):
    root, planted = stages
    res = chain([root / f"A{s}" for s in range(4)], _data(), k=2, null_samples=0, progress=False)
    assert len(res.stages) == 3 and res.stages[0].endswith("A1")
    w = {s: load_file(str(root / f"A{s}" / "model.safetensors")) for s in range(4)}
    names = {"blocks.0.attn.W_Q": Q0, "blocks.1.mlp.W_out": D1}
    for name, key in names.items():
        rows = [r for r in res.shares if r["matrix"] == name]
        total = w[3][key].double() - w[0][key].double()
        for r, s in zip(rows, (1, 2, 3)):
            d = w[s][key].double() - w[s - 1][key].double()
            assert r["norm2"] == pytest.approx(float((d * d).sum()), rel=1e-12)
            assert r["projection"] == pytest.approx(float((d * total).sum() / (total * total).sum()), rel=1e-10)
        assert sum(r["projection"] for r in rows) == pytest.approx(1.0, abs=1e-12)  # always: Σ ΔW_s = T
    d1 = [r for r in res.shares if r["matrix"] == "blocks.1.mlp.W_out"]
    assert sum(r["share"] for r in d1) == pytest.approx(1.0, abs=1e-6)  # orthogonal stages (stage 3: zero)
    q = [r for r in res.shares if r["matrix"] == "blocks.0.attn.W_Q"]
    assert abs(sum(r["share"] for r in q) - 1.0) > 1e-3  # stage 3 is not orthogonal to stage 1 there
    untouched = [r for r in res.shares if r["matrix"] not in names]
    assert untouched and all(r["norm2"] == 0.0 for r in untouched)


def test_stage_rows_equal_the_pair_probe_in_the_first_checkpoints_subspaces(stages):
    root, _ = stages
    data = _data()
    kw = dict(k=2, null_samples=8, matrices=["blocks.0.attn.W_Q", "blocks.1.mlp.W_out"])
    res = chain([root / f"A{s}" for s in range(3)], data, progress=False, **kw)
    base = rwasym.load(root / "A0")
    pair = rwasym.probe(base, rwasym.load(root / "A1"), data, heads=False, curves=False, **kw)

    def rows_of(stage):
        return [
            {k: v for k, v in r.items() if k not in ("stage", "frame", "delta")}
            for r in res.probe_rows
            if r["stage"] == stage
        ]

    def plain(rows):
        return [{k: v for k, v in r.items() if k != "delta"} for r in rows]

    assert rows_of(res.stages[0]) == plain(pair.rows) and len(pair.rows) == 5  # W_Q: 2 rows, W_out: 3
    a1, a2 = rwasym.load(root / "A1"), rwasym.load(root / "A2")
    given = {n: a2.weight(n) - a1.weight(n) for n in kw["matrices"]}
    second = rwasym.probe(base, None, data, heads=False, curves=False, delta="given", deltas=given, **kw)
    assert rows_of(res.stages[1]) == plain(second.rows)
    assert {r["stage"] for r in res.probe_rows} == {*res.stages, "total"}


def test_principal_angles_match_scipy_and_find_the_shared_row_space(stages):
    from scipy.linalg import subspace_angles

    root, planted = stages
    res = chain([root / f"A{s}" for s in range(4)], _data(), k=2, null_samples=0, angle_rank=3, progress=False)
    rows = {(r["matrix"], r["side"], r["stage_a"], r["stage_b"]): r for r in res.angles}
    s1, s2, s3 = res.stages
    d1, d3 = planted[1][Q0].double(), planted[3][Q0].double()
    for side, (A, B) in (
        ("input", (torch.linalg.svd(d1)[2][:3].T, torch.linalg.svd(d3)[2][:3].T)),
        ("output", (torch.linalg.svd(d1)[0][:, :3], torch.linalg.svd(d3)[0][:, :3])),
    ):
        row = rows[("blocks.0.attn.W_Q", side, s1, s3)]
        expected = np.sort(np.cos(subspace_angles(A.numpy(), B.numpy())))[::-1]
        assert np.allclose(row["cosines"], expected, atol=1e-9) and row["r"] == 3
    assert rows[("blocks.0.attn.W_Q", "input", s1, s3)]["overlap"] == pytest.approx(1.0, abs=1e-9)  # same V
    assert rows[("blocks.0.attn.W_Q", "output", s1, s2)]["overlap"] == pytest.approx(0.0, abs=1e-9)  # disjoint rows
    assert ("blocks.1.mlp.W_out", "input", s1, s3) not in rows  # stage 3 left it alone: no subspace to compare
    assert rows[("blocks.0.attn.W_Q", "input", s1, s3)]["z"] > 5


def test_overlap_null_is_exact_against_haar_draws():
    n, r = 24, 3
    g = torch.Generator().manual_seed(0)
    U = haar_frames(1, n, r, generator=g)[0]
    draws = [principal_overlap(U, V)["overlap"] for V in haar_frames(4000, n, r, generator=g)]
    ref = principal_overlap(U, haar_frames(1, n, r, generator=g)[0])
    assert ref["null_mean"] == pytest.approx(r / n, rel=1e-12)
    assert ref["null_std"] ** 2 == pytest.approx(2 * (n - r) ** 2 / (n**2 * (n + 2) * (n - 1)), rel=1e-12)
    assert np.mean(draws) == pytest.approx(r / n, rel=0.03)
    assert np.std(draws) == pytest.approx(ref["null_std"], rel=0.05)


def test_identical_stage_and_too_short_chains_are_refused(stages, tmp_path):
    root, _ = stages
    shutil.copytree(root / "A1", tmp_path / "A1copy")
    with pytest.raises(RwasymError, match="are identical"):
        chain([root / "A0", root / "A1", tmp_path / "A1copy"], _data(), progress=False)
    with pytest.raises(RwasymError, match="at least two checkpoints"):
        chain([root / "A0"], _data(), progress=False)


def test_cli_chain_writes_tables_report_and_figures(stages, tmp_path):
    root, _ = stages
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"tok{i % 90 + 3}" for i in range(300)))
    out = tmp_path / "out"
    args = ["chain", *[str(root / f"A{s}") for s in range(4)], "--data", str(text), "--out", str(out)]
    assert main([*args, "--k", "2", "--null-samples", "0", "--quiet"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["stages"]) == 3 and doc["shares"] and doc["angles"]
    assert (out / "report.md").exists() and (out / "figures" / "shares.png").exists()
    assert math.isfinite(doc["angles"][0]["overlap"])


def test_a_real_sft_then_dpo_chain(real_folder, tmp_path):
    """SmolLM2-135M's first two blocks, SFT then DPO with the training loops (3 steps each, saved as HF folders):
    the chain's stage norms and projections equal explicit subtraction of the loaded checkpoints, and the DPO run's
    step 0 (the SFT model again) makes a duplicated checkpoint that the chain refuses."""
    from rwasym.studies.real_pair import real_pair_records, real_spec
    from rwasym.train.loops import AlignConfig, align

    folder = real_folder(2)
    policy = rwasym.load(folder)
    train, _ = real_pair_records(real_spec(quick=True), policy.tokenizer)
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in train))
    pairs = policy.load_pairs(tmp_path / "pairs.jsonl")
    cfg = AlignConfig(lr=1e-4, steps=3, batch_size=8, warmup_steps=1, checkpoint_every=0)
    align(
        policy, None, pairs, AlignConfig(**{**cfg.__dict__, "objective": "sft"}), out=tmp_path / "sft", progress=False
    )
    reference = rwasym.load(tmp_path / "sft" / "step_000003")
    align(policy, reference, pairs, cfg, out=tmp_path / "dpo", progress=False)
    sources = [folder, tmp_path / "sft" / "step_000003", tmp_path / "dpo" / "step_000003"]
    data = torch.randint(0, 49152, (8, 32), generator=torch.Generator().manual_seed(2))
    res = chain(dict(zip(("base", "sft", "dpo"), sources)), data, k=4, null_samples=0, progress=False)
    models = [rwasym.load(s) for s in sources]
    for name in ("blocks.0.attn.W_Q", "blocks.1.mlp.W_out"):
        total = models[2].weight(name) - models[0].weight(name)
        rows = [r for r in res.shares if r["matrix"] == name]
        for r, (a, b) in zip(rows, ((0, 1), (1, 2))):
            d = models[b].weight(name) - models[a].weight(name)
            assert r["norm2"] == pytest.approx(float((d * d).sum()), rel=1e-12)
            assert r["projection"] == pytest.approx(float((d * total).sum() / (total * total).sum()), rel=1e-10)
        assert sum(r["projection"] for r in rows) == pytest.approx(1.0, abs=1e-12)
    assert {r["stage"] for r in res.probe_rows} == {"base → sft", "sft → dpo", "total"}
    with pytest.raises(RwasymError, match="are identical"):
        chain([folder, tmp_path / "sft" / "step_000003", tmp_path / "dpo" / "step_000000"], data, progress=False)


def test_each_stage_in_its_own_starting_frame_equals_the_pair_probe(stages):
    """frame="each": stage A1 → A2 is probed in A1's subspaces, exactly as rwasym.probe(A1, A2) on the same data."""
    root, _ = stages
    data = _data()
    kw = dict(k=2, null_samples=8, matrices=["blocks.0.attn.W_Q", "blocks.1.mlp.W_out"])
    res = chain([root / f"A{s}" for s in range(3)], data, frame="each", total=False, progress=False, **kw)
    pair = rwasym.probe(rwasym.load(root / "A1"), rwasym.load(root / "A2"), data, heads=False, curves=False, **kw)
    second = [r for r in res.probe_rows if r["stage"] == res.stages[1]]
    assert {r["frame"] for r in second} == {"A1"}
    drop = ("stage", "frame", "delta")
    assert [{k: v for k, v in r.items() if k not in drop} for r in second] == [
        {k: v for k, v in r.items() if k != "delta"} for r in pair.rows
    ]
    first = [r for r in res.probe_rows if r["stage"] == res.stages[0]]
    assert {r["frame"] for r in first} == {"A0"}


def test_a_training_folder_is_a_trajectory_and_its_step_0_is_left_out(stages, tmp_path):
    """A stage given as a folder of step_* checkpoints (rwasym-train.json) expands into its steps; step 0, the start
    again, is left out with a warning; the cumulative projection reaches exactly 1 at the end."""
    root, _ = stages
    run = tmp_path / "run"
    for step, src in ((0, "A1"), (5, "A2"), (9, "A3")):
        shutil.copytree(root / src, run / f"step_{step:06d}")
        (run / f"step_{step:06d}" / "rwasym-train.json").write_text(json.dumps({"step": step}))
    with pytest.warns(UserWarning, match="left out run step 0"):
        res = chain([root / "A0", root / "A1", run], _data(), k=2, null_samples=0, progress=False)
    assert res.stages == ["A0 → A1", "A1 → run step 5", "run step 5 → run step 9"]
    traj = res.trajectory()
    last = [r for r in traj if r["step"] == 3]
    assert last and all(r["reached"] == pytest.approx(1.0, abs=1e-12) for r in last)
    q = {r["step"]: r["reached"] for r in traj if r["kind"] == "W_Q"}
    w = load_file(str(root / "A0" / "model.safetensors"))
    total = load_file(str(root / "A3" / "model.safetensors"))[Q0].double() - w[Q0].double()
    first = load_file(str(root / "A1" / "model.safetensors"))[Q0].double() - w[Q0].double()
    assert q[1] == pytest.approx(float((first * total).sum() / (total * total).sum()), rel=1e-10)
