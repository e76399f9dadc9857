"""`rwasym experiment real` (rwasym.studies.real) on the quick real pair (2 real SmolLM2 blocks, 3 DPO
steps): units are written and reused, the report's pooled statistics equal the same statistics
recomputed from the sweep files, the λ = 1 reuse is the graded objective's own run bit for bit."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from rwasym.analyses.sweep import read_sweep
from rwasym.studies import real


@pytest.fixture(scope="module")
def run(shared_gguf_cache, quick_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    cfg = real.RealConfig.smoke(joint_modes=("transplant",))  # one mode: the default suite's time
    real.real_experiment(
        out, cfg, parts=("asymmetry", "joint", "graded"), cache_dir=quick_cache, progress=False, log=lambda m: None
    )
    return out, cfg


def test_units_are_written_and_a_rerun_computes_nothing(run, monkeypatch, quick_cache):
    out, cfg = run
    names = sorted(p.stem for p in (out / "units").glob("*.json"))
    assert names == ["alpha_scan_s0", "asymmetry_s0", "graded_s0_l0", "graded_s0_l1", "joint_s0_transplant_output"]
    for fn in ("_asymmetry", "_joint", "_graded"):
        monkeypatch.setattr(real, fn, lambda *a, **k: pytest.fail("recomputed a finished unit"))
    before = json.loads((out / "results.json").read_text())
    after = real.real_experiment(
        out, cfg, parts=("asymmetry", "joint", "graded"), cache_dir=quick_cache, progress=False, log=lambda m: None
    )
    assert after["joint"]["table"] == before["joint"]["table"]
    text = (out / "report.md").read_text()
    for heading in ("## Asymmetry", "## Contrast and graded control", "## Causal test", "### α scan"):
        assert heading in text
    assert (out / "depth_activation.png").stat().st_size > 0 and (out / "graded.png").exists()


def test_pooled_joint_statistics_recomputed_from_the_sweep_files(run):
    out, _ = run
    table = json.loads((out / "results.json").read_text())["joint"]["table"]
    assert table
    for row in table:
        _, rows = read_sweep(out / "sweeps" / f"joint_s0_{row['mode']}_{row['match']}.jsonl")
        sel = [
            r for r in rows if r["matrix"] == row["set"] and r["rank"] == row["rank"] and r[row["metric"]] is not None
        ]
        t = [r[row["metric"]] for r in sel if r["direction"] == r["target"]]
        c = [r[row["metric"]] for r in sel if r["direction"] in ("random", "orthogonal")]
        assert len(t) == 1 and len(c) == 3  # quick: 1 target, random:2 + orthogonal:1
        assert row["target"] == pytest.approx(np.mean(t), rel=1e-12)
        assert row["control"] == pytest.approx(np.mean(c), rel=1e-12)
        # one seed: the stratified rank test is the target's rank among its controls, (1 + #c ≥ t) / (n + 1)
        assert row["p"] == pytest.approx((1 + sum(v >= t[0] - 1e-12 for v in c)) / (len(c) + 1), rel=1e-12)
        assert row["p_floor"] == pytest.approx(1 / (len(c) + 1)) and row["at_floor"] == (row["p"] == row["p_floor"])
        assert "ci_low" not in row  # no pooled bootstrap over a seed's rows
    for match in {r["match"] for r in table}:  # Holm over each matching mode's rows, by hand
        fam = sorted((r["p"], i) for i, r in enumerate(table) if r["match"] == match)
        m, running = len(fam), 0.0
        for j, (p, i) in enumerate(fam):
            running = max(running, min(1.0, (m - j) * p))
            assert table[i]["p_holm"] == pytest.approx(running, rel=1e-12)


def test_asymmetry_cells_equal_the_probe_summary(run):
    """The report's side × subspace cells against `asymmetry_summary` (experiments.py's own
    reduction) over the unit's probe rows."""
    from rwasym.analyses.probe import ProbeResult
    from rwasym.studies.experiments import asymmetry_summary

    out, _ = run
    rows = json.loads((out / "units" / "asymmetry_s0.json").read_text())["by_k"]["4"]
    want = asymmetry_summary(ProbeResult(rows=[dict(r, head=None, stream="residual") for r in rows]))
    assert set(want) == set(real.CELLS)
    table = {r["cell"]: r["k=4"] for r in json.loads((out / "results.json").read_text())["asymmetry"]["table"]}
    for cell, value in want.items():
        assert float(table[cell]) == pytest.approx(value, rel=5e-3)  # the table prints 3 digits


def test_graded_lambda_one_on_the_real_model_is_the_dpo_run(quick_cache):
    """The real experiment reuses each seed's DPO run as its λ = 1 run: retrain it with the graded
    objective at λ = 1 on the real architecture and compare every parameter bit for bit."""
    from rwasym.studies.experiments import clone
    from rwasym.studies.real_pair import load_real_pairs, real_pair
    from rwasym.train import AlignConfig, align

    base, tuned, info = real_pair(quick_cache, quick=True, progress=False, seed=0)
    train, _ = load_real_pairs(info)
    spec = info["spec"]["align"]
    config = replace(
        AlignConfig(**{**spec, "betas": tuple(spec["betas"])}), objective="graded", lam=1.0, checkpoint_every=0
    )
    policy = clone(base)
    align(policy, base, train, config, progress=False)
    for s in base.matrices():
        assert torch.equal(policy.weight(s.name), tuned.weight(s.name)), s.name
    assert not torch.equal(base.weight("blocks.1.attn.W_Q"), tuned.weight("blocks.1.attn.W_Q"))


def test_unknown_part_and_bad_seeds(tmp_path):
    with pytest.raises(real.RwasymError, match="unknown part"):
        real.real_experiment(tmp_path, parts=("asymetry",))
    with pytest.raises(real.RwasymError, match="distinct integers"):
        real.real_experiment(tmp_path, real.RealConfig(seeds=(0, 0)))


def test_curves_part_reports_the_probe_curves(run, quick_cache):
    """The curves part (issue #29: r(k) curves in the real report): each unit holds the probe's whole-matrix residual
    curves, and the report's cells are their mean over a kind's matrices, recomputed here by hand."""
    from rwasym.analyses.probe import probe
    from rwasym.studies.experiments import base_activations
    from rwasym.studies.real_pair import real_corpus, real_pair

    out, cfg = run
    res = real.real_experiment(out, cfg, parts=("curves",), cache_dir=quick_cache, progress=False, log=lambda m: None)
    unit = json.loads((out / "units" / "curves_s0.json").read_text())
    base, tuned, info = real_pair(quick_cache, quick=True, progress=False, seed=0)
    want = probe(
        base,
        tuned,
        activations=base_activations(base, real_corpus(info, base.tokenizer)),
        k=cfg.ks[0],
        null_samples=0,
        heads=False,
        curve_null_samples=64,
        seed=0,
        progress=False,
    )
    mine = {(c["matrix"], c["subspace"]): c for c in unit["curves"]}
    assert len(mine) == len([c for c in want.curves if c["stream"] == "residual"]) > 0
    for c in want.curves:
        if c["stream"] == "residual":
            assert mine[(c["matrix"], c["subspace"])]["relative"] == pytest.approx(c["relative"], rel=1e-9)
    rows = {(r["subspace"], r["kind"], r["k"]): r for r in res["curves"]["rows"]}
    for (sub, kind, k), r in rows.items():
        vals = [c["relative"][c["ks"].index(k)] for c in unit["curves"] if (c["subspace"], c["kind"]) == (sub, kind)]
        assert r["mean"] == pytest.approx(sum(vals) / len(vals), rel=1e-12)
    assert (out / "rk_activation.png").stat().st_size > 0 and "## r(k) curves" in (out / "report.md").read_text()


def test_baselines_part_reports_the_probe_references(run, quick_cache):
    """The baselines part (issue #29: "compared with what?"): per kind and subspace, the unit's means equal the probe
    rows' means by hand for ΔW, W_base and the gradient-shaped null, and the report prints them per seed-interval."""
    from rwasym.analyses.probe import probe
    from rwasym.studies.experiments import base_activations
    from rwasym.studies.real_pair import real_corpus, real_pair

    out, cfg = run
    res = real.real_experiment(
        out, cfg, parts=("baselines",), cache_dir=quick_cache, progress=False, log=lambda m: None
    )
    unit = json.loads((out / "units" / "baselines_s0.json").read_text())
    base, tuned, info = real_pair(quick_cache, quick=True, progress=False, seed=0)
    acts = base_activations(base, real_corpus(info, base.tokenizer))
    for delta in ("tuned", "base_weight", "random_delta"):
        rows = probe(
            base,
            tuned if delta == "tuned" else None,
            activations=acts,
            k=cfg.ks[0],
            null_samples=0,
            heads=False,
            curves=False,
            delta=delta,
            seed=0,
            progress=False,
        ).rows
        for key, cell in unit[delta].items():
            kind, sub = key.split("/")
            sel = [r for r in rows if r["kind"] == kind and r["subspace"] == sub and r["stream"] == "residual"]
            assert cell["relative"] == pytest.approx(sum(r["relative"] for r in sel) / len(sel), rel=1e-12)
            assert cell["rho"] == pytest.approx(sum(r["rho"] for r in sel) / len(sel), rel=1e-12)
    # the null's realised draw sits near its expectation on the read side (many output rows average it)
    for key, cell in unit["random_delta"].items():
        if key.endswith("/activation") and key.split("/")[0] in ("W_Q", "W_in"):
            assert cell["relative"] == pytest.approx(cell["random_delta_relative"], rel=0.1)
    assert res["baselines"]["table"] and "## Compared with what?" in (out / "report.md").read_text()
