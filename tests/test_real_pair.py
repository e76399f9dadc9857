"""The real aligned pair's code path (quick: 2 real blocks, 3 DPO steps): task records, cache, reuse."""

import json

import pytest
import torch

from rwasym.substrate import real_pair as rp


def test_quick_real_pair_builds_caches_and_reloads(real_folder, tmp_path, monkeypatch):
    base, tuned, info = rp.real_pair(tmp_path, quick=True, progress=False, base_folder=real_folder(2))
    folder = tmp_path / info["folder"].split("/")[-1]
    train = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (folder / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == 32 and len(held) == 16
    words = lambda recs: {r["chosen"].strip() for r in recs} | {r["rejected"].strip() for r in recs}
    assert not words(train) & words(held)  # disjoint words: held-out accuracy measures the rule
    for r in train + held:  # the rule: the second option is chosen
        first, second = r["prompt"][len("Pick one: "):-len("? Answer:")].split(" or ")
        assert (r["chosen"], r["rejected"]) == (f" {second}", f" {first}")
    assert 0.0 <= info["heldout_accuracy"]["base"] <= 1.0 and info["spec"]["align"]["steps"] == 3
    assert sorted(p.name for p in (folder / "align").glob("step_*")) == ["step_000000", "step_000003"]
    assert float((tuned.weight("blocks.1.attn.W_Q") - base.weight("blocks.1.attn.W_Q")).abs().max()) > 0
    monkeypatch.setattr(rp, "align", lambda *a, **k: pytest.fail("rebuilt a cached pair"))
    _, tuned2, info2 = rp.real_pair(tmp_path, quick=True, progress=False, base_folder=real_folder(2))
    assert info2["folder"] == info["folder"] and torch.equal(tuned2.weight("blocks.1.attn.W_Q"), tuned.weight("blocks.1.attn.W_Q"))
    train_pairs, held_pairs = rp.load_real_pairs(info2)
    assert len(train_pairs) == 32 and len(held_pairs) == 16


def test_cli_pair_real_prints_the_cached_pair(real_folder, tmp_path, monkeypatch, capsys):
    from rwasym.app.cli import main

    built = rp.real_pair(tmp_path, quick=True, progress=False, base_folder=real_folder(2))[2]
    monkeypatch.setattr(rp, "real_pair", lambda **kw: (None, None, built) if kw["quick"] else pytest.fail("not quick"))
    assert main(["pair", "real", "--quick", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tuned"] == built["tuned"] and printed["heldout_accuracy"] == built["heldout_accuracy"]
