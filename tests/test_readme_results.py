"""The README's result tables against the JSON they were made from (docs/results/): every number
the README states for the default pair's probe, graded control and slopes is recomputed from the
committed results.json, so a rerun that changes a result cannot leave a stale README behind.
The real pair's tables are generated from docs/results/real/results.json (`rwasym.studies.real.readme_tables`)."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _load(name):
    return json.loads((ROOT / "docs" / "results" / name / "results.json").read_text())


def _pm(mean, high, digits=2):
    return f"{mean:.{digits}f} ± {high - mean:.{digits}f}"


def test_default_pair_probe_table_matches_the_trajectory_json():
    from rwasym.math.inference import seed_interval

    rows = _load("trajectory")["rows"]
    last = max(r["step"] for r in rows)
    for kind, side in (("W_Q", "read"), ("W_K", "read"), ("W_V", "read"), ("W_in", "read"), ("W_O", "write"),
                       ("W_out", "write")):
        cells = []
        for key in ("r_activation", "r_prediction"):
            s = seed_interval([r[key] for r in rows if r["step"] == last and r["kind"] == kind])
            cells.append(_pm(s["mean"], s["ci_high"]))
        line = f"| {kind} | {side} | {cells[0]} | {cells[1]} |"
        assert line in README, f"README probe row is stale; expected {line!r}"


def test_default_pair_graded_table_and_slopes_match_the_graded_json():
    d = _load("graded")
    by = {(r["lam"], r["cell"]): r for r in d["by_lam"]}
    for lam in d["lams"]:
        ra, wp, acc = by[(lam, "read_activation")], by[(lam, "write_prediction")], by[(lam, "heldout_accuracy")]
        line = f"| {lam:g} | {_pm(ra['mean'], ra['ci_high'])} | {_pm(wp['mean'], wp['ci_high'])} | {acc['mean']:.3f} |"
        assert line in README, f"README graded row is stale; expected {line!r}"
    contrast = {r["cell"]: r for r in d["pretraining_contrast_summary"]}
    assert f"| {contrast['read_activation']['mean']:.2f} ± " in README
    slopes = {s["cell"]: s for s in d["slopes"]}
    for cell, label in (("read_activation", "read/activation"), ("write_prediction", "write/prediction")):
        s = slopes[cell]
        pattern = rf"{re.escape(label)} \+?{s['mean']:.2f} \[{s['ci_low']:.2f}, {s['ci_high']:.2f}\]"
        lo3 = f"{s['ci_low']:.3f}"  # the README gives a near-zero bound to 3 decimals
        ok = re.search(pattern, README) or re.search(
            rf"{re.escape(label)} \+?{s['mean']:.2f} \[{lo3.rstrip('0')}, {s['ci_high']:.2f}\]", README)
        assert ok, f"README slope of {cell} is stale: {s['mean']:.2f} [{s['ci_low']:.3f}, {s['ci_high']:.2f}]"


def test_real_pair_tables_are_generated_from_the_real_json():
    path = ROOT / "docs" / "results" / "real" / "results.json"
    if not path.exists():
        pytest.skip("docs/results/real has not been produced")
    from rwasym.studies.real import readme_tables

    tables = readme_tables(json.loads(path.read_text()))
    assert tables and tables in README, ("README's real-pair tables are stale: paste "
                                         "rwasym.studies.real.readme_tables(results.json of docs/results/real)")
