"""`rwasym.studies.causal` on the quick real pair (2 real SmolLM2 blocks, 3 DPO steps): the pre-registered
sweeps are written and resumed, and the report's numbers are the summary of those files recomputed here."""

import json

import pytest

from rwasym.analyses.sweep import read_sweep, summarize
from rwasym.math.inference import rank_pvalue
from rwasym.studies import causal

CFG = causal.CausalConfig(
    seeds=(0,),
    modes=("transplant",),
    sets=("blocks.*.attn.W_Q",),
    ranks=(1,),
    kl_budgets=(0.003, 0.01),
    directions="pca:1,random:3",
    collateral_rows=4,
    max_pairs=16,
    quick=True,
)


@pytest.fixture(scope="module")
def run(shared_gguf_cache, quick_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("causal")
    causal.causal_experiment(out, CFG, cache_dir=quick_cache, progress=False)
    return out


def test_causal_sweeps_and_report(run, quick_cache, monkeypatch):
    out = run
    path = out / "sweeps" / "causal_s0_transplant_W_Q.jsonl"
    header, rows = read_sweep(path)
    assert header["config"]["match"] == "kl" and header["config"]["kl_budgets"] == [0.003, 0.01]
    info = json.loads((out / "collateral_s0.json").read_text())
    assert len(info["sha256"]) == 64 and info["shape"] == [4, 64]
    assert [r["direction"] for r in rows].count("ceiling") == 1 and len(rows) == 1 + 2 * 4
    # a re-run measures nothing: every row is in the file
    from rwasym.analyses import behaviour

    monkeypatch.setattr(behaviour.Evaluator, "iter_joint", lambda *a, **k: pytest.fail("recomputed a row"))
    causal.causal_experiment(out, CFG, cache_dir=quick_cache, progress=False)
    monkeypatch.undo()
    results = causal.causal_report(out, CFG)
    edits = [r for r in rows if r["direction"] != "ceiling"]
    assert results["calibration"]["edits"] == len(edits) == 8
    table = [r for r in results["table"] if r["metric"] == "gap_margin" and r["control"] == "random"]
    assert [r["kl_budget"] for r in table] == [0.003, 0.01]
    for r in table:  # one seed: the stratified p is the target's rank p among its 3 controls
        sel = [e for e in edits if e["kl_budget"] == r["kl_budget"]]
        target = next(e["gap_margin"] for e in sel if e["direction"] == "pca")
        assert r["p_value"] == pytest.approx(
            rank_pvalue(target, [e["gap_margin"] for e in sel if e["direction"] == "random"])
        )
    # Holm over the pre-registered family (1 set × 1 rank × 2 budgets × 1 mode × 2 families = 4), the 2 tests
    # without rows (no orthogonal controls in this smoke design) counted as p = 1; by hand, step down
    ps = sorted(r["p_value"] for r in table) + [1.0, 1.0]
    steps = [min(1.0, (4 - i) * p) for i, p in enumerate(ps)]
    adjusted = [max(steps[: i + 1]) for i in range(4)]
    assert results["family"] == dict(metric="gap_margin", n_tests=4, reported=2)
    assert sorted(r["p_holm_family"] for r in table) == pytest.approx(adjusted[:2])
    again = summarize(edits, metrics=["gap_margin"], primary="gap_margin")
    assert [r["p_value"] for r in again.rows if r["control"] == "random"] == [r["p_value"] for r in table]
    ceiling = next(r for r in rows if r["direction"] == "ceiling")
    for r in results["table"]:
        if r["metric"] == "of_ceiling" and r["control"] == "random":
            target = next(e for e in edits if e["direction"] == "pca" and e["kl_budget"] == r["kl_budget"])
            assert r["target_mean"] == pytest.approx(target["gap_margin"] / ceiling["gap_margin"])
    text = (out / "report.md").read_text()
    assert "pre-registered" in text and "| transplant | blocks.*.attn.W_Q | 1 | 0.003 | random |" in text
    assert (out / "dose_response_transplant.png").stat().st_size > 0 and "dose_response_transplant.png" in text


def test_cli_report_only(run, capsys):
    from rwasym.app.cli import main

    assert main(["experiment", "causal", "--out", str(run), "--report-only"]) == 0
    assert "seeds [0], 8 edits" in capsys.readouterr().out
