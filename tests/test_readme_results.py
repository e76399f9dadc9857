"""The results pages of the docs site against the JSON they were made from (docs/results/).

The default pair's page (docs/results/default_pair.md): every number it states for the probe, the
graded control and the slopes is recomputed from the committed results.json, so a rerun that changes
a result cannot leave a stale page behind. The real pair's page (docs/results/real_pair.md) holds the
tables generated from docs/results/real/results.json (`rwasym.studies.real.readme_tables`) verbatim.
(The results lived in README.md before the docs site; the file keeps its name.)"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
DEFAULT_PAGE = (RESULTS / "default_pair.md").read_text()
REAL_PAGE = (RESULTS / "real_pair.md").read_text()


def _load(name):
    return json.loads((RESULTS / name / "results.json").read_text())


def _pm(mean, high, digits=2):
    return f"{mean:.{digits}f} ± {high - mean:.{digits}f}"


def test_default_pair_probe_table_matches_the_trajectory_json():
    from rwasym.math.inference import seed_interval

    rows = _load("trajectory")["rows"]
    last = max(r["step"] for r in rows)
    for kind, side in (
        ("W_Q", "read"),
        ("W_K", "read"),
        ("W_V", "read"),
        ("W_in", "read"),
        ("W_O", "write"),
        ("W_out", "write"),
    ):
        cells = []
        for key in ("r_activation", "r_prediction"):
            s = seed_interval([r[key] for r in rows if r["step"] == last and r["kind"] == kind])
            cells.append(_pm(s["mean"], s["ci_high"]))
        line = f"| {kind} | {side} | {cells[0]} | {cells[1]} |"
        assert line in DEFAULT_PAGE, f"docs/results/default_pair.md: probe row is stale; expected {line!r}"


def test_default_pair_graded_table_and_slopes_match_the_graded_json():
    d = _load("graded")
    by = {(r["lam"], r["cell"]): r for r in d["by_lam"]}
    for lam in d["lams"]:
        ra, wp, acc = by[(lam, "read_activation")], by[(lam, "write_prediction")], by[(lam, "heldout_accuracy")]
        line = f"| {lam:g} | {_pm(ra['mean'], ra['ci_high'])} | {_pm(wp['mean'], wp['ci_high'])} | {acc['mean']:.3f} |"
        assert line in DEFAULT_PAGE, f"docs/results/default_pair.md: graded row is stale; expected {line!r}"
    contrast = {r["cell"]: r for r in d["pretraining_contrast_summary"]}
    assert f"| {contrast['read_activation']['mean']:.2f} ± " in DEFAULT_PAGE
    slopes = {s["cell"]: s for s in d["slopes"]}
    for cell, label in (("read_activation", "read/activation"), ("write_prediction", "write/prediction")):
        s = slopes[cell]
        pattern = rf"{re.escape(label)} \+?{s['mean']:.2f} \[{s['ci_low']:.2f}, {s['ci_high']:.2f}\]"
        lo3 = f"{s['ci_low']:.3f}"  # the page gives a near-zero bound to 3 decimals
        ok = re.search(pattern, DEFAULT_PAGE) or re.search(
            rf"{re.escape(label)} \+?{s['mean']:.2f} \[{lo3.rstrip('0')}, {s['ci_high']:.2f}\]", DEFAULT_PAGE
        )
        assert ok, (
            f"docs/results/default_pair.md: slope of {cell} is stale: "
            f"{s['mean']:.2f} [{s['ci_low']:.3f}, {s['ci_high']:.2f}]"
        )


def test_real_pair_tables_are_generated_from_the_real_json():
    path = RESULTS / "real" / "results.json"
    if not path.exists():
        pytest.skip("docs/results/real has not been produced")
    from rwasym.studies.real import readme_tables

    tables = readme_tables(json.loads(path.read_text()))
    assert tables and tables in REAL_PAGE, (
        "docs/results/real_pair.md: the real-pair tables are stale: paste "
        "rwasym.studies.real.readme_tables(results.json of docs/results/real) "
        "between its real-tables markers"
    )
    begin, end = "<!-- real-tables:begin -->", "<!-- real-tables:end -->"
    inside = REAL_PAGE.split(begin, 1)[1].split(end, 1)[0]
    assert inside.strip() == tables.strip(), (
        "docs/results/real_pair.md: the text between the real-tables markers "
        "must be exactly rwasym.studies.real.readme_tables(...)"
    )


def test_results_pages_link_to_committed_files():
    """Every image and relative link of the two results pages points to a committed file."""
    for page, text in (("default_pair.md", DEFAULT_PAGE), ("real_pair.md", REAL_PAGE)):
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if "://" in target:
                continue
            assert (RESULTS / target).is_file(), f"docs/results/{page} links to a missing file: {target}"
