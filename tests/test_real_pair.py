"""The real aligned pair's code path (quick: 2 real blocks, 3 DPO steps): task records, cache, reuse."""

import json

import pytest
import torch

from rwasym.studies import real_pair as rp


def test_quick_real_pair_builds_caches_and_reloads(real_folder, tmp_path, monkeypatch):
    base, tuned, info = rp.real_pair(tmp_path, quick=True, progress=False, base_folder=real_folder(2))
    folder = tmp_path / info["folder"].split("/")[-1]
    train = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (folder / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == 32 and len(held) == 16
    words = lambda recs: {r["chosen"].strip() for r in recs} | {r["rejected"].strip() for r in recs}
    assert not words(train) & words(held)  # disjoint words: held-out accuracy measures the rule
    for r in train + held:  # the rule: the second option is chosen
        first, second = r["prompt"][len("Pick one: ") : -len("? Answer:")].split(" or ")
        assert (r["chosen"], r["rejected"]) == (f" {second}", f" {first}")
    assert 0.0 <= info["heldout_accuracy"]["base"] <= 1.0 and info["spec"]["align"]["steps"] == 3
    assert sorted(p.name for p in (folder / "align").glob("step_*")) == ["step_000000", "step_000003"]
    assert float((tuned.weight("blocks.1.attn.W_Q") - base.weight("blocks.1.attn.W_Q")).abs().max()) > 0
    monkeypatch.setattr(rp, "align", lambda *a, **k: pytest.fail("rebuilt a cached pair"))
    _, tuned2, info2 = rp.real_pair(tmp_path, quick=True, progress=False, base_folder=real_folder(2))
    assert info2["folder"] == info["folder"] and torch.equal(
        tuned2.weight("blocks.1.attn.W_Q"), tuned.weight("blocks.1.attn.W_Q")
    )
    train_pairs, held_pairs = rp.load_real_pairs(info2)
    assert len(train_pairs) == 32 and len(held_pairs) == 16


def test_cli_pair_real_prints_the_cached_pair(real_folder, tmp_path, monkeypatch, capsys):
    from rwasym.app.cli import main

    built = rp.real_pair(tmp_path, quick=True, progress=False, base_folder=real_folder(2))[2]
    monkeypatch.setattr(rp, "real_pair", lambda **kw: (None, None, built) if kw["quick"] else pytest.fail("not quick"))
    assert main(["pair", "real", "--quick", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tuned"] == built["tuned"] and printed["heldout_accuracy"] == built["heldout_accuracy"]


def test_real_corpus_is_the_task_text(real_folder, tmp_path):
    base, _, info = rp.real_pair(tmp_path, quick=True, progress=False, base_folder=real_folder(2))
    rows = rp.real_corpus(info, base.tokenizer, seq_len=16)
    records = [
        json.loads(line) for line in (tmp_path / info["folder"].split("/")[-1] / "train.jsonl").read_text().splitlines()
    ]
    text = "\n".join(r["prompt"] + r["chosen"] for r in records)
    ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert rows.shape == (len(ids) // 16, 16) and rows.flatten().tolist() == ids[: rows.numel()]
    assert base.tokenizer.decode(rows[0]).startswith(records[0]["prompt"])


def test_demo_real_quick_runs_the_story_on_the_real_pair(real_folder, tmp_path, monkeypatch):
    import rwasym.testing
    from rwasym.app.cli import main
    from rwasym.hooks.activations import capture
    from rwasym.math.fraction import relative_fraction
    from rwasym.math.subspaces import pca_basis

    monkeypatch.setenv("RWASYM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(rwasym.testing, "real_model_folder", lambda n_layers=None, cache_dir=None: real_folder(2))
    assert main(["demo", "--real", "--quick", "--quiet", "--out", str(tmp_path / "demo")]) == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["real"] and results["real_pair"]["heldout_accuracy"]["tuned"] >= 0.0
    assert {r["step"] for r in results["trajectory"]} == {3}  # step 0 is the base itself: no ΔW to probe
    assert {r["lam"] for r in results["graded"]} == {0.0, 1.0}
    assert set(results["gradients"]) == {"ce", "dpo"}
    _, sweep_rows = rwasym.read_sweep(tmp_path / "demo" / "sweep.jsonl")
    assert {r["matrix"] for r in sweep_rows} == {"blocks.0.attn.W_Q", "blocks.1.mlp.W_out"}
    assert len(sweep_rows) == 2 * (2 + 4 + 4)  # pca:2, random:4, orthogonal:4 per matrix
    assert "The real pair" in (tmp_path / "demo" / "report.md").read_text()
    # one probe row recomputed by hand: W_Q of block 1 on its input side against the input PCA
    base, tuned, info = rp.real_pair(quick=True, progress=False)
    name = "blocks.1.attn.W_Q"
    data = rp.real_corpus(info, base.tokenizer, seq_len=64)
    acts = capture(base, data, sites=[base.input_hook(name)], progress=False)
    U = pca_basis(acts.for_matrix(name).covariance(), k=8, center=False).U
    want = relative_fraction(tuned.weight(name).double() - base.weight(name).double(), U, "input").relative
    row = next(
        r
        for r in results["probe"]["rows"]
        if r["matrix"] == name and r["head"] is None and r["subspace"] == "activation" and r["stream"] == "residual"
    )
    assert abs(row["relative"] - want) < 1e-6 * max(1.0, want)
