"""The issue #30 study pipeline (`rwasym.studies.study`) on two real SmolLM2 blocks: units resume, the heal and
the conditions move the matrices only, the stored measurements equal the same numbers computed another way."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import rwasym
from rwasym.studies import study as st


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, real_folder):
    real_folder(2)  # the slice exists before the study looks for it
    out = tmp_path_factory.mktemp("study")
    cfg = st.StudyConfig.smoke(conditions=("C1", "C4"), seeds=(0,), seeds_sft=(), model_dir=str(out / "models"))
    names = st.study_experiment(out, cfg, progress=False, log=lambda *_: None)
    return out, cfg, names


def _unit(out, name):
    return json.loads((out / "units" / f"{name}.json").read_text())


def test_units_run_in_order_and_resume_without_recomputing(smoke, monkeypatch):
    out, cfg, names = smoke
    assert names == [
        "corpora_smollm2",
        "heal_smollm2",
        "baseline_smollm2",
        "train_smollm2_C1_s0",
        "probe_smollm2_C1_s0",
        "train_smollm2_C4_s0",
        "probe_smollm2_C4_s0",
    ]
    for stage in ("_heal_unit", "_train_unit", "_probe_unit", "_corpora_unit", "_baseline_unit", "_noise_unit"):
        monkeypatch.setattr(st, stage, lambda *a, **k: pytest.fail("a finished unit ran again"))
    assert st.study_experiment(out, cfg, progress=False, log=lambda *_: None) == names
    corpora = _unit(out, "corpora_smollm2")
    assert corpora["probe_A"]["shape"] == [24, 64] and corpora["probe_B"]["shape"] == [24, 64]
    assert len(corpora["train"]["docstring"]["documents_sha256"]) == 64
    fam = st._Family("smollm2", cfg, out)
    collateral, probe_b = fam.rows["collateral"][0], fam.rows["probe_B"][0]
    assert collateral.shape == (cfg.collateral_rows, 64)
    assert not any(torch.equal(c, b) for c in collateral for b in probe_b)  # E4's cost text: never probed


def test_heal_and_conditions_move_the_matrices_only(smoke, real_folder):
    out, cfg, _ = smoke
    fam = st._Family("smollm2", cfg, out)
    base, healed, tuned = fam.base(), fam.load_with("heal"), fam.load_with("C1_s0")
    for (name, b), h, t in zip(
        base.bridge.named_parameters(), healed.bridge.parameters(), tuned.bridge.parameters(), strict=True
    ):
        matrix = name.endswith("_proj._original_component.weight")
        assert torch.equal(b, h) != matrix and torch.equal(h, t) != matrix, name
    record = _unit(out, "train_smollm2_C1_s0")
    assert record["config"]["train"] == "matrices" and record["config"]["pad_id"] == fam.pad
    norm = sum(float((tuned.weight(s.name) - healed.weight(s.name)).square().sum()) for s in tuned.matrices())
    assert sum(v**2 for v in record["delta_norm"].values()) == pytest.approx(norm, rel=1e-9)
    # the generic CE, by hand on the stored eval rows
    x = fam.rows["eval_A"][0]
    with torch.no_grad():
        logits = tuned.bridge(x)[:, :-1].double()
    valid = x[:, 1:] != fam.pad
    by_hand = float(F.cross_entropy(logits[valid], x[:, 1:][valid]))
    assert record["generic"]["A"]["ce"] == pytest.approx(by_hand, rel=1e-5)
    assert record["generic"]["A"]["tokens"] == int(valid.sum()) < x[:, 1:].numel()  # padding left out
    dpo = _unit(out, "train_smollm2_C4_s0")
    assert dpo["config"]["objective"] == "dpo" and dpo["pairs"]["pairs"] > 100
    assert dpo["history"][-1]["step"] == cfg.steps


def test_probe_unit_rows_equal_a_probe_of_the_two_models(smoke):
    out, cfg, _ = smoke
    fam = st._Family("smollm2", cfg, out)
    healed, tuned = fam.load_with("heal"), fam.load_with("C4_s0")
    stored = _unit(out, "probe_smollm2_C4_s0")
    for corpus in ("A", "B"):
        direct = rwasym.probe(
            healed,
            tuned,
            fam.rows[f"probe_{corpus}"][0],
            k=cfg.k,
            heads=False,
            null_samples=cfg.null_samples,
            subspaces=st.SUBSPACES,
            exclude_positions=[0],
            exclude_tokens=[fam.pad],
            progress=False,
        )
        rows = stored[corpus]["rows"]
        assert len(rows) == len(direct.rows) > 30
        assert {r["subspace"] for r in rows} == set(st.SUBSPACES.split(","))
        for a, b in zip(rows, direct.rows):
            assert (a["matrix"], a["side"], a["subspace"]) == (b["matrix"], b["side"], b["subspace"])
            assert a["fraction"] == pytest.approx(b["fraction"], rel=1e-9), (a["matrix"], a["subspace"])
        # BOS and padding left out of the statistics: fewer tokens than the rows hold
        assert stored[corpus]["n_tokens"] == direct.config["n_tokens"] < 24 * 64


def test_baseline_rows_locate_w_h_itself(smoke):
    """The W_H reference row of the last W_out against the prediction subspace, by hand: ‖Uᵀ W‖²/‖W‖² with U the
    top-k left singular vectors of the unembedding (diag(γ_final)·W_U, as `Model.unembedding` folds it)."""
    out, cfg, _ = smoke
    fam = st._Family("smollm2", cfg, out)
    healed = fam.load_with("heal")
    unit = _unit(out, "baseline_smollm2")
    row = next(
        r
        for r in unit["base_weight"]["A"]["rows"]
        if r["matrix"] == "blocks.1.mlp.W_out" and r["side"] == "output" and r["subspace"] == "prediction"
    )
    W, W_U = healed.weight("blocks.1.mlp.W_out"), healed.unembedding()
    U = torch.linalg.eigh(W_U @ W_U.T)[1].flip(1)[:, : cfg.k]
    assert row["fraction"] == pytest.approx(float((U.T @ W).square().sum() / W.square().sum()), rel=1e-8)
    assert unit["random_delta"]["A"]["delta"] == "random_delta" and len(unit["random_delta"]["B"]["rows"]) > 30
    report = st.study_report(out)
    refs = {(r["family"], r["reference"]) for r in report["baselines"]}
    assert refs == {("smollm2", "base_weight"), ("smollm2", "random_delta")}
    assert "References at H" in (out / "report.md").read_text()


def test_noise_floor_units_follow_the_second_seed():
    cfg = st.StudyConfig(families=("gemma",), seeds=(0, 1, 2), seeds_sft=(0, 1, 2))
    names = [st._name(*u) for u in st.study_units(cfg)]
    after = names.index("probe_gemma_C3_s1") + 1
    assert names[after : after + 4] == ["noise_gemma_C1", "noise_gemma_C2", "noise_gemma_C4", "noise_gemma_C3"]
    assert names[:3] == ["corpora_gemma", "heal_gemma", "baseline_gemma"]
    names = [st._name(*u) for u in st.study_units(replace(cfg, seeds_sft=(0,)))]
    assert "noise_gemma_C3" not in names and "noise_gemma_C4" in names


@pytest.mark.unit
def test_endpoints_are_the_preregistered_tests_on_per_seed_values():
    """Planted per-seed summaries: each component equals scipy's test on the paired differences by hand, an
    endpoint's p is its largest component's, and a missing condition leaves the endpoint pending."""
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    summ = []
    for seed in range(5):
        for cond, write, read in (("C1", 3.0, 2.0), ("C2", 2.2, 2.0), ("C4", 2.25, 2.05)):
            noise = (0.1 * torch.randn(3, generator=g, dtype=torch.float64)).tolist()
            rec = dict(family="gemma", condition=cond, seed=seed, write=write + noise[0])
            rec |= dict(read_A=read + noise[1], read_B=read + noise[2])
            rec["asymmetry"] = rec["read_A"] - rec["write"]
            summ.append(rec)
    e = st.endpoints(summ, "gemma")
    by = {(r["condition"], r["seed"]): r for r in summ}
    d14 = [by[("C1", s)]["write"] - by[("C4", s)]["write"] for s in range(5)]
    d42 = [by[("C4", s)]["write"] - by[("C2", s)]["write"] for s in range(5)]
    t1 = stats.ttest_1samp(d14, 0, alternative="greater").pvalue
    tost = max(
        stats.ttest_1samp(d42, -st.MARGIN, alternative="greater").pvalue,
        stats.ttest_1samp(d42, st.MARGIN, alternative="less").pvalue,
    )
    assert [t["p"] for t in e["E1"]["parts"]] == pytest.approx([t1, tost], rel=1e-10)
    assert e["E1"]["p"] == pytest.approx(max(t1, tost), rel=1e-10) and e["E1"]["p"] < 0.05
    assert len(e["E2"]["parts"]) == 10 and e["E2"]["p"] == max(t["p"] for t in e["E2"]["parts"])
    d_asym = [by[("C4", s)]["asymmetry"] - by[("C1", s)]["asymmetry"] for s in range(5)]
    want = stats.ttest_1samp(d_asym, 0, alternative="greater").pvalue
    assert e["E3"]["p"] == pytest.approx(want, rel=1e-10)
    assert e["E4"]["p"] is None
    no_c2 = st.endpoints([r for r in summ if r["condition"] != "C2"], "gemma")
    assert no_c2["E1"]["p"] is None and no_c2["E1"]["parts"][1]["n"] == 0  # C4 ≈ C2 cannot run: pending


@pytest.mark.unit
def test_log_r_is_the_mean_log_relative_fraction_of_the_chosen_rows():
    rows = [
        dict(kind="W_Q", side="input", subspace="activation", relative=4.0),
        dict(kind="W_K", side="input", subspace="activation", relative=0.25),
        dict(kind="W_K", side="input", subspace="prediction", relative=100.0),
        dict(kind="W_V", side="input", subspace="activation", relative=100.0),
        dict(kind="W_O", side="output", subspace="prediction", relative=8.0),
    ]
    assert st._log_r(rows, st.READ_KINDS, "input", "activation") == pytest.approx(0.0)
    assert st._log_r(rows, st.WRITE_KINDS, "output", "prediction") == pytest.approx(3 * 0.6931471805599453)
    assert st._log_r(rows, st.WRITE_KINDS, "output", "activation") is None


def test_cli_rebuilds_the_report_from_finished_units(smoke, capsys):
    from rwasym.app.cli import main

    out, _, names = smoke
    assert main(["experiment", "study", "--report-only", "--out", str(out)]) == 0
    assert f"({len(names)} units finished)" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["holm"] == dict(tests=8, missing=8, provisional=True)  # one seed: no endpoint can be tested yet
    assert {r["condition"] for r in results["seed_summaries"]} == {"C1", "C4"}
    heal = _unit(out, "heal_smollm2")["generic"]["A"]
    assert results["heal"]["smollm2"]["generic"]["A"] == heal
    assert f"| smollm2 | A | {heal['ce_reference']:.3g} | {heal['ce']:.3g} |" in (out / "report.md").read_text()
