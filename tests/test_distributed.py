"""Data parallelism: 2 CPU ranks (gloo, torchrun standalone rendezvous on localhost) against one process.

Capture statistics, gradient statistics, the ``torchrun -m rwasym probe`` CLI and the sharded
``torchrun -m rwasym intervene`` sweep must equal the single-process results to 1e-10 (only
float64 summation order differs). Every process runs one intra-op thread.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import rwasym
from rwasym import RwasymError, distributed
from rwasym.analyses.sweep import merge_shards, rank_path, read_sweep, sweep
from rwasym.app.cli import main
from rwasym.data.pairs import PreferencePairs
from rwasym.hooks.activations import capture
from rwasym.hooks.gradients import capture_gradients
from rwasym.math.covariance import RunningCovariance

REPO = Path(__file__).resolve().parents[1]
TOL = dict(abs=1e-10, rel=0)
CAPTURE = dict(batch_size=3, max_tokens=70, progress=False)  # 4 batches; the budget ends inside batch 3
SWEEP_ARGS = [
    "--match",
    "norm",
    "--matrices",
    "blocks.1.attn.W_Q",
    "--directions",
    "pca:2,random:3,orthogonal:3",
    "--alphas",
    "1,2",
    "--edits-per-pass",
    "3",
    "--quiet",
]

WORKER = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import load_file
    import rwasym
    from rwasym import RwasymError, distributed
    from rwasym.hooks.activations import capture
    from rwasym.hooks.gradients import capture_gradients

    import rwasym.hooks.gradients as gradients_module
    from rwasym.analyses.sweep import sweep
    from rwasym.math.covariance import RunningCovariance

    root = sys.argv[1]
    assert distributed.init_from_env() and not distributed.init_from_env()  # idempotent
    rank, size = distributed.world()
    local = {"tokens": [], "batches": []}  # this rank's own counts, recorded just before each all-reduce
    reduce_cov, reduce_grads = RunningCovariance.all_reduce, gradients_module._all_reduce

    def recording_cov(self):
        local["tokens"].append(self.count)
        return reduce_cov(self)

    def recording_grads(stats):
        local["batches"].append(stats.n_batches)
        return reduce_grads(stats)

    RunningCovariance.all_reduce, gradients_module._all_reduce = recording_cov, recording_grads
    model = rwasym.load(root + "/base")
    data = load_file(root + "/tokens.safetensors")
    acts = capture(model, data, batch_size=3, max_tokens=70, progress=False)
    local["capture_tokens"] = sorted(set(local["tokens"]))
    loss_fn, batches = rwasym.objective_batches("ce", data["input_ids"], batch_size=3, n_batches=3)
    grads = capture_gradients(model, loss_fn, batches, progress=False)
    RunningCovariance.all_reduce, gradients_module._all_reduce = reduce_cov, reduce_grads
    # a sweep whose metric is the rank that measured the row: the merged file says who did what
    sweep(root + "/base", root + "/tuned", root + "/pairs.safetensors", matrices=["blocks.1.attn.W_Q"],
          directions="pca:2,random:3", alphas=(1.0,), match="norm", edits_per_pass=2, out=root + "/ranks.jsonl",
          metrics={"rank": lambda logits, batch: float(rank)}, progress=False)
    try:  # rank 1 gets one batch more than rank 0: both ranks must refuse
        capture(model, data["input_ids"][: 3 + 3 * rank], batch_size=3, progress=False)
        mismatch = ""
    except RwasymError as err:
        mismatch = str(err)
    torch.save(dict(world=size, acts=acts.state_dict()["stats"], mismatch=mismatch, n_batches=grads.n_batches,
                    local_tokens=local["capture_tokens"], local_batches=local["batches"],
                    inputs={k: v.state_dict() for k, v in grads.inputs.items()},
                    grads={k: v.state_dict() for k, v in grads.grads.items()}, G=grads.G),
               f"{root}/rank{rank}.pt")
    distributed.destroy()
""")


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """The subprocesses' kernels (one thread), and fast on a shared box."""
    yield


@pytest.fixture(scope="module")
def files(save_perturbed_pair, tmp_path_factory):
    """Saved base / tuned native models, padded tokens and held-out pairs the ranks load."""
    root = tmp_path_factory.mktemp("distributed")
    g = save_perturbed_pair(root)
    ids = torch.randint(0, 64, (10, 12), generator=g)
    mask = torch.ones(10, 12, dtype=torch.int64)
    mask[1, 9:] = mask[4, 5:] = mask[8, 11:] = 0  # right padding
    save_file({"input_ids": ids, "attention_mask": mask}, str(root / "tokens.safetensors"))
    save_file({"input_ids": torch.randint(0, 64, (40, 16), generator=g)}, str(root / "probe_tokens.safetensors"))
    PreferencePairs(
        prompt=torch.randint(3, 64, (6, 8), generator=g),
        chosen=torch.randint(3, 64, (6, 2), generator=g),
        rejected=torch.randint(3, 64, (6, 2), generator=g),
    ).save(root / "pairs.safetensors")
    return root


def _torchrun(*args, timeout=240):
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS`` on 2 single-thread CPU ranks."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def _same_state(a: dict, b: dict) -> None:
    assert a["count"] == b["count"]
    assert torch.allclose(a["sum"], b["sum"], atol=1e-10, rtol=0)
    assert torch.allclose(a["sum_outer"], b["sum_outer"], atol=1e-10, rtol=0)


def _same_rows(a: list, b: list) -> None:
    assert [r["id"] if "id" in r else r.get("matrix") for r in a] == [
        r["id"] if "id" in r else r.get("matrix") for r in b
    ]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], nan_ok=True, **TOL), key
            else:
                assert x[key] == y[key], key


def test_single_process_helpers_are_no_ops():
    assert distributed.world() == (0, 1) and not distributed.is_distributed()
    assert distributed.init_from_env() is False  # WORLD_SIZE unset
    t = torch.arange(3.0)
    assert distributed.all_reduce_sum_(t) is t and t.tolist() == [0.0, 1.0, 2.0]
    assert distributed.shard("abcde", 1, 2) == ["b", "d"]
    assert sum((distributed.shard(range(7), r, 3) for r in range(3)), []) == [0, 3, 6, 1, 4, 2, 5]
    with pytest.raises(RwasymError, match="0 <= rank < world_size"):
        distributed.shard([1], 2, 2)
    acc = RunningCovariance(2)
    acc.add(torch.ones(3, 2))
    assert acc.all_reduce() is acc and acc.count == 3
    distributed.barrier()


def test_capture_and_gradients_on_two_ranks_equal_one_process(files):
    (files / "worker.py").write_text(WORKER)
    _torchrun(files / "worker.py", files)
    model = rwasym.load(files / "base")
    data = load_file(str(files / "tokens.safetensors"))
    acts = capture(model, data, **CAPTURE)
    loss_fn, batches = rwasym.objective_batches("ce", data["input_ids"], batch_size=3, n_batches=3)
    grads = capture_gradients(model, loss_fn, batches, progress=False)
    assert acts.n_tokens == 70
    for rank in (0, 1):
        got = torch.load(files / f"rank{rank}.pt")
        assert got["world"] == 2
        assert set(got["acts"]) == set(acts.stats)
        for hook, acc in acts.stats.items():
            _same_state(got["acts"][hook], acc.state_dict())
            mine = RunningCovariance.from_state_dict(got["acts"][hook])
            assert torch.allclose(mine.mean(), acc.mean(), atol=1e-10, rtol=0)
            assert torch.allclose(mine.covariance(), acc.covariance(), atol=1e-10, rtol=0)
        assert got["n_batches"] == grads.n_batches == 3
        for name in grads.G:
            _same_state(got["inputs"][name], grads.inputs[name].state_dict())  # C_a
            _same_state(got["grads"][name], grads.grads[name].state_dict())  # C_δ
            assert torch.allclose(got["G"][name], grads.G[name], atol=1e-10, rtol=0)
            assert float(grads.G[name].norm()) > 0
        assert "ranks disagree" in got["mismatch"] and "same data" in got["mismatch"]
    # each rank handled only its share before the all-reduce: batches i ≡ rank (mod 2), under the global
    # token budget (the tokens a single process keeps, in batch order)
    mask = data["attention_mask"].bool()
    kept, budget = [], 70
    for i in range(0, len(mask), 3):
        n = min(int(mask[i : i + 3].sum()), max(budget, 0))
        kept.append(n)
        budget -= n
    for rank in (0, 1):
        got = torch.load(files / f"rank{rank}.pt")
        assert got["local_tokens"] == [sum(kept[rank::2])], rank
        assert got["local_batches"] == [len(range(rank, 3, 2))], rank  # of the 3 gradient batches
    _, rows = read_sweep(files / "ranks.jsonl")
    assert len(rows) == 5 and [r["rank"] for r in rows] == [float((j // 2) % 2) for j in range(5)]  # odd passes: rank 1


def test_probe_cli_under_torchrun_equals_one_process(files, tmp_path):
    args = [
        "probe",
        "--base",
        files / "base",
        "--tuned",
        files / "tuned",
        "--data",
        files / "probe_tokens.safetensors",
        "--k",
        "4",
        "--null-samples",
        "8",
        "--quiet",
    ]
    proc = _torchrun("-m", "rwasym", *args, "--out", tmp_path / "dist.json")
    assert proc.stdout.count("wrote ") == 1  # rank 0 prints; rank 1 is silent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist.json"]
    assert main([str(a) for a in args] + ["--out", str(tmp_path / "single.json")]) == 0
    dist, single = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("dist", "single"))
    assert len(single["rows"]) > 0
    _same_rows(dist["rows"], single["rows"])


def test_sharded_sweep_merges_to_the_single_process_file(files, tmp_path):
    rows = sweep(
        files / "base",
        files / "tuned",
        files / "pairs.safetensors",
        matrices=["blocks.1.attn.W_Q"],
        directions="pca:2,random:3,orthogonal:3",
        alphas=(1.0, 2.0),
        match="norm",
        edits_per_pass=3,
        out=tmp_path / "single.jsonl",
        progress=False,
    )
    header, r_single = read_sweep(tmp_path / "single.jsonl")
    assert r_single == rows and len(rows) > 6  # more passes than ranks
    # A rank file left by an earlier run (another world size: rank 1's file holds a row of pass 0, which
    # is rank 0's now) is resumed: its row is reused, not recomputed (the planted value survives).
    planted = {**rows[0], "margin": 12345.0}
    (tmp_path / "dist.jsonl.rank1.jsonl").write_text(json.dumps(header) + "\n" + json.dumps(planted) + "\n")
    common = ["--base", files / "base", "--tuned", files / "tuned", "--pairs", files / "pairs.safetensors"]
    proc = _torchrun("-m", "rwasym", "intervene", *common, *SWEEP_ARGS, "--out", tmp_path / "dist.jsonl")
    assert proc.stdout.count(" rows in ") == 1  # rank 0 prints the table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist.jsonl", "single.jsonl"]  # rank files merged, removed
    h_dist, r_dist = read_sweep(tmp_path / "dist.jsonl")
    assert h_dist["config_hash"] == header["config_hash"] and h_dist["config"] == header["config"]
    assert r_dist[0] == planted
    _same_rows(r_dist[1:], r_single[1:])


def test_merge_needs_every_row_and_keeps_plan_order(files, tmp_path):
    """Rank files (possibly from another world size) merge into plan order; a missing row is an error."""
    sweep(
        files / "base",
        files / "tuned",
        files / "pairs.safetensors",
        matrices=["blocks.1.attn.W_Q"],
        directions="pca:2,random:3",
        alphas=(1.0,),
        match="norm",
        edits_per_pass=2,
        out=tmp_path / "single.jsonl",
        progress=False,
    )
    header, rows = read_sweep(tmp_path / "single.jsonl")
    out = tmp_path / "out.jsonl"
    for rank in range(3):
        lines = [header] + rows[rank::3][: -1 if rank == 2 else None]  # rank 2 lost its last row
        rank_path(out, rank).write_text("".join(json.dumps(r) + "\n" for r in lines))
    ids = [r["id"] for r in rows]
    with pytest.raises(RwasymError, match="in no rank file"):
        merge_shards(out, header["config"], header["reference"], ids)
    with open(rank_path(out, 2), "a") as fh:
        fh.write(json.dumps(rows[2::3][-1]) + "\n")
    merge_shards(out, header["config"], header["reference"], ids)
    assert out.read_text() == (tmp_path / "single.jsonl").read_text()
    assert not any(rank_path(out, r).exists() for r in range(3))


def test_sharded_kl_matched_sweep_equals_the_single_process_file(files, tmp_path):
    """An effect-matched sweep under torchrun: each matrix's calibration and rows run on one rank (unit
    j on rank j mod 2), and the merged file equals the single-process one (α, KL and metrics to 1e-10)."""
    collateral = tmp_path / "collateral.safetensors"
    save_file({"input_ids": torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(5))}, str(collateral))
    args = [
        "--matrices", "blocks.*.mlp.W_out", "--directions", "pca:1,random:3", "--kl-budgets", "0.003,0.01",
        "--collateral", collateral, "--edits-per-pass", "3",
    ]  # fmt: skip
    common = ["--base", files / "base", "--tuned", files / "tuned", "--pairs", files / "pairs.safetensors", *args]
    from rwasym.app.cli import main

    assert main(["intervene", *map(str, common), "--out", str(tmp_path / "single.jsonl"), "--quiet"]) == 0
    _torchrun("-m", "rwasym", "intervene", *common, "--out", tmp_path / "dist.jsonl", "--quiet")
    h_single, single = read_sweep(tmp_path / "single.jsonl")
    h_dist, dist = read_sweep(tmp_path / "dist.jsonl")
    assert h_dist["config"] == h_single["config"] and h_single["config"]["match"] == "kl"
    assert len(single) == 2 + 2 * 4 * 2  # ceilings + matrices × edits × budgets
    _same_rows(dist, single)
