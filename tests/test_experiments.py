"""Replicate statistics, the gradient objectives, and the `experiment` / `gradients` / `spectra`
commands (outputs checked against the Python API that computed them)."""

import json
import math

import pytest
import torch

import rwasym
from rwasym.app.cli import main
from rwasym.math import inference
from rwasym.studies import experiments


def _t_cdf(t: float, df: int, n: int = 20000) -> float:
    """Student-t CDF by trapezoid integration of the density from 0 (oracle for the table)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    xs = torch.linspace(0, t, n, dtype=torch.float64)
    pdf = c * (1 + xs**2 / df) ** (-(df + 1) / 2)
    return 0.5 + float(torch.trapezoid(pdf, xs))


@pytest.mark.parametrize("df", [1, 2, 4, 9, 29])
def test_t_quantile_table_matches_integrated_cdf(df):
    assert _t_cdf(inference._T975[df - 1], df) == pytest.approx(0.975, abs=2e-4)


def test_seed_interval_and_slope_match_brute_force():
    xs = [0.3, 1.7, 0.9, 1.1]
    got = inference.seed_interval(xs)
    t = torch.tensor(xs, dtype=torch.float64)
    half = inference._T975[len(xs) - 2] * float(t.std()) / math.sqrt(len(xs))
    assert got["mean"] == pytest.approx(float(t.mean()))
    assert got["std"] == pytest.approx(float(t.std()))
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((float(t.mean()) - half, float(t.mean()) + half))
    assert inference.seed_interval([2.0])["ci_low"] is None
    lam, y = [0.0, 0.25, 0.5, 1.0], [1.0, 1.4, 1.2, 2.0]
    X = torch.tensor([[1.0, v] for v in lam], dtype=torch.float64)
    ref = torch.linalg.lstsq(X, torch.tensor(y, dtype=torch.float64)[:, None]).solution[1, 0]
    assert inference.slope(lam, y) == pytest.approx(float(ref))
    with pytest.raises(rwasym.RwasymError, match="distinct"):
        inference.slope([1.0, 1.0], [0.0, 1.0])


def test_objective_batches_compute_the_package_losses(models):
    model = models["native"]
    tokens = torch.randint(0, model.d_vocab, (5, 12))
    loss_fn, batches = rwasym.objective_batches("ce", tokens, batch_size=2, n_batches=2)
    assert [len(b) for b in batches] == [2, 2]
    logits = model.bridge(batches[0])
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, model.d_vocab), batches[0][:, 1:].reshape(-1))
    assert float(loss_fn(model, batches[0])) == pytest.approx(float(ref), rel=1e-6)
    from rwasym.studies.language import LanguageConfig, PairConfig, make_pairs

    pairs = make_pairs(PairConfig(n_per_rule=4, prompt_len=6, cont_len=1), LanguageConfig(d_vocab=64))
    loss_fn, batches = rwasym.objective_batches("dpo", pairs, reference=model, batch_size=3, n_batches=10)
    assert sum(len(b) for b in batches) == len(pairs)
    assert float(loss_fn(model, batches[0])) == pytest.approx(math.log(2), rel=1e-6)  # policy = reference
    with pytest.raises(rwasym.RwasymError, match="reference"):
        rwasym.objective_batches("dpo", pairs)
    with pytest.raises(rwasym.RwasymError, match="ce, dpo, sft, graded"):
        rwasym.objective_batches("ppo", pairs)
    with pytest.raises(rwasym.RwasymError, match="token tensor"):
        rwasym.objective_batches("ce", pairs)


def test_gradients_cli_matches_the_api(tmp_path, native_cfg, capsys):
    from safetensors.torch import save_file

    model = rwasym.load(native_cfg)
    rwasym.save_model(model, tmp_path / "m")
    tokens = torch.randint(0, 64, (8, 16))
    save_file({"input_ids": tokens}, str(tmp_path / "t.safetensors"))
    assert (
        main(
            [
                "gradients",
                "--model",
                str(tmp_path / "m"),
                "--objective",
                "ce",
                "--data",
                str(tmp_path / "t.safetensors"),
                "--batch-size",
                "4",
                "--batches",
                "2",
                "--quiet",
                "--out",
                str(tmp_path / "g.json"),
            ]
        )
        == 0
    )
    got = json.loads((tmp_path / "g.json").read_text())["rows"]
    loss_fn, batches = rwasym.objective_batches("ce", tokens, batch_size=4, n_batches=2)
    ref = rwasym.anisotropy_report(model, rwasym.capture_gradients(model, loss_fn, batches, progress=False))
    assert [r["matrix"] for r in got] == [r["matrix"] for r in ref]
    for a, b in zip(got, ref):
        assert a["delta_top1_share"] == pytest.approx(b["delta_top1_share"], rel=1e-9)
        assert a["G_input_pca_relative"] == pytest.approx(b["G_input_pca_relative"], rel=1e-9)
        assert a["center"] is True
    # --uncentered: the plain fields are the uncentred ones
    argv = ["gradients", "--model", str(tmp_path / "m"), "--objective", "ce", "--data", str(tmp_path / "t.safetensors")]
    out = tmp_path / "u.json"
    assert main([*argv, "--batch-size", "4", "--batches", "2", "--quiet", "--uncentered", "--out", str(out)]) == 0
    unc = json.loads(out.read_text())
    assert unc["config"]["center"] is False
    for a, b in zip(unc["rows"], ref):
        assert a["a_top1_share"] == pytest.approx(b["a_top1_share_uncentered"], rel=1e-9)
    # --checkpoint: written, then a rerun is served from it (same rows); another objective is refused
    args = [
        "gradients",
        "--model",
        str(tmp_path / "m"),
        "--objective",
        "ce",
        "--data",
        str(tmp_path / "t.safetensors"),
        "--batch-size",
        "4",
        "--batches",
        "2",
        "--quiet",
        "--checkpoint",
        str(tmp_path / "g.safetensors"),
    ]
    assert main(args + ["--out", str(tmp_path / "g1.json")]) == 0 and (tmp_path / "g.safetensors").exists()
    assert main(args + ["--out", str(tmp_path / "g2.json")]) == 0
    rows1, rows2 = (json.loads((tmp_path / f).read_text())["rows"] for f in ("g1.json", "g2.json"))
    assert rows1 == rows2 and [r["matrix"] for r in rows1] == [r["matrix"] for r in ref]
    assert main(args + ["--beta", "0.2", "--out", str(tmp_path / "g3.json")]) != 0
    assert "belongs to another capture" in capsys.readouterr().err and not (tmp_path / "g3.json").exists()


@pytest.mark.integration
def test_graded_experiment_cli_aggregates_its_rows(tmp_path, quick_cache):
    out = tmp_path / "graded"
    assert (
        main(
            [
                "experiment",
                "graded",
                "--quick",
                "--quiet",
                "--seeds",
                "0",
                "--lams",
                "0,1",
                "--null-samples",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    rows = {r["lam"]: r for r in res["rows"]}
    assert set(rows) == {0.0, 1.0} and (out / "graded.png").exists()
    for cell in res["by_lam"]:
        if cell["cell"] in experiments.SUMMARY_KEYS:
            assert cell["mean"] == pytest.approx(rows[cell["lam"]][cell["cell"]])
    for s in res["slopes"]:
        assert s["per_seed"][0] == pytest.approx(rows[1.0][s["cell"]] - rows[0.0][s["cell"]])
    assert res["pretraining_contrast"] and all(r["read_activation"] > 0 for r in res["pretraining_contrast"])
    assert "Graded-objective control" in (out / "report.md").read_text()


@pytest.mark.integration
def test_spectra_cli_matches_the_api(tmp_path, quick_cache):
    from safetensors.torch import save_file

    from rwasym.analyses.companion import checkpoint_folders, geometry, post_training_report
    from rwasym.studies.default_pair import default_pair

    base, tuned, info = default_pair(quick=True, progress=False)
    tokens = torch.randint(0, base.d_vocab, (8, 32))
    save_file({"input_ids": tokens}, str(tmp_path / "t.safetensors"))
    assert (
        main(
            [
                "spectra",
                "post-training",
                "--base",
                info["base"],
                "--tuned",
                info["tuned"],
                "--k",
                "8",
                "--data",
                str(tmp_path / "t.safetensors"),
                "--out",
                str(tmp_path / "pt"),
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "pt" / "results.json").read_text())
    ref = post_training_report(base, tuned, k=8)
    assert [r["consistency"] for r in res["rows"]] == pytest.approx([r["consistency"] for r in ref["rows"]])
    modes = {r["mode"]: r["heldout_ce"] for r in res["reconstruction"]}
    assert modes["tuned"] == pytest.approx(modes["tuned_as_is"], rel=1e-4)  # full rebuild = the model
    assert list((tmp_path / "pt" / "figures").glob("rotations_*.png"))
    pre = f"{info['folder']}/pretrain"
    assert main(["spectra", "lifecycle", "--checkpoints", pre, "--out", str(tmp_path / "lc")]) == 0
    lc = json.loads((tmp_path / "lc" / "results.json").read_text())
    assert len(lc["rows"]) == len(checkpoint_folders(pre)) * len(base.matrices())
    assert (
        main(
            [
                "spectra",
                "geometry",
                "--checkpoints",
                pre,
                "--data",
                str(tmp_path / "t.safetensors"),
                "--quiet",
                "--out",
                str(tmp_path / "geo"),
            ]
        )
        == 0
    )
    geo = json.loads((tmp_path / "geo" / "results.json").read_text())["rows"]
    ref_geo = geometry(checkpoint_folders(pre), tokens, progress=False)
    assert [r["rankme"] for r in geo] == pytest.approx([r["rankme"] for r in ref_geo], rel=1e-9)
    assert (tmp_path / "geo" / "figures" / "rankme.png").exists()


@pytest.mark.integration
def test_sweep_experiment_aggregates_per_seed_summaries(tmp_path, quick_cache):
    res = experiments.sweep_experiment(
        tmp_path / "sw",
        seeds=(0,),
        matrices="blocks.1.mlp.W_out",
        directions="pca:1,random:2,orthogonal:2",
        quick=True,
        progress=False,
        log=lambda *a: None,
    )
    from rwasym.analyses.sweep import read_sweep, summarize

    _, rows = read_sweep(tmp_path / "sw" / "sweep_seed0.jsonl")
    assert {r["direction"] for r in rows} == {"pca", "random", "orthogonal"}
    ref = {
        (r["matrix"], r["target"], r["metric"]): r["diff"]
        for r in summarize(rows, metrics=res["metrics"]).rows
        if r["control"] == "control" and r["head"] is None
    }
    assert ref and len(res["across_seeds"]) == len(ref)
    for r in res["across_seeds"]:
        assert r["diff_mean"] == pytest.approx(ref[(r["matrix"], r["target"], r["metric"])])
    assert (tmp_path / "sw" / "sweep.png").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seeds=()), "non-empty list of distinct integers"),
        (dict(seeds=(0, 0)), "distinct integers"),
        (dict(seeds=(0,), lams=(0.5, 1.5)), r"values in \[0, 1\]"),
    ],
)
def test_graded_experiment_rejects_bad_seeds_and_lams(kwargs, message):
    with pytest.raises(rwasym.RwasymError, match=message):
        experiments.graded_experiment(None, **kwargs)


def test_asymmetry_summary_paper_grouping_by_hand():
    """The paper's cells (read: W_Q, W_K; write: W_O, W_out) beside the pooled ones (read also W_V, W_in, W_gate)."""
    from rwasym.analyses.probe import ProbeResult
    from rwasym.studies.experiments import asymmetry_summary

    r = {"W_Q": 4.0, "W_K": 2.0, "W_V": 10.0, "W_in": 20.0, "W_gate": 30.0, "W_O": 1.0, "W_out": 3.0}
    side = {k: "write" if k in ("W_O", "W_out") else "read" for k in r}
    rows = [
        dict(head=h, stream=st, kind=k, matrix_side=side[k], subspace="activation", relative=v + (h or 0) * 100)
        for k, v in r.items()
        for h, st in ((None, "residual"), (0, "residual"), (None, "inner"))  # only whole, residual rows count
    ]
    res = ProbeResult(rows=rows)
    assert asymmetry_summary(res) == {"read_activation": 66.0 / 5, "write_activation": 2.0}
    assert asymmetry_summary(res, grouping="paper") == {"paper_read_activation": 3.0, "paper_write_activation": 2.0}
    with pytest.raises(rwasym.RwasymError, match="grouping"):
        asymmetry_summary(res, grouping="mine")
