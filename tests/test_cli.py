"""The command line on saved native checkpoints (it only calls the public API)."""

import json

import pytest
import torch
from safetensors.torch import save_file

import rwasym
from rwasym.app.cli import main


def test_probe_cli_writes_json(tmp_path, native_cfg, capsys):
    base = rwasym.load(native_cfg)
    rwasym.save_model(base, tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    name = "blocks.0.attn.W_K"
    base.set_weight(name, base.weight(name) + torch.randn(16, 32, generator=g, dtype=torch.float64))
    rwasym.save_model(base, tmp_path / "tuned")
    save_file({"input_ids": torch.randint(0, 64, (8, 16), generator=g)}, str(tmp_path / "tokens.safetensors"))
    out = tmp_path / "probe.json"
    code = main(
        [
            "probe",
            "--base",
            str(tmp_path / "base"),
            "--tuned",
            str(tmp_path / "tuned"),
            "--data",
            str(tmp_path / "tokens.safetensors"),
            "--k",
            "4",
            "--null-samples",
            "10",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["matrix"] for r in rows} == {name}
    assert {r["head"] for r in rows} == {None, 0, 1}
    assert "W_K" in capsys.readouterr().out
    # the reference rows of W_base itself: no --tuned, every matrix (W_base is nonzero everywhere)
    ref = tmp_path / "reference.json"
    argv = ["probe", "--base", str(tmp_path / "base"), "--data", str(tmp_path / "tokens.safetensors"), "--k", "4"]
    assert main([*argv, "--delta", "base_weight", "--no-heads", "--quiet", "--out", str(ref)]) == 0
    ref_rows = json.loads(ref.read_text())["rows"]
    assert {r["delta"] for r in ref_rows} == {"base_weight"}
    assert {r["matrix"] for r in ref_rows} == {s.name for s in rwasym.load(tmp_path / "base").matrices()}
    # the gradient-shaped null and the seed-to-seed noise floor (W_replicate − W_tuned), same axes
    null = tmp_path / "null.json"
    assert main([*argv, "--delta", "random_delta", "--no-heads", "--quiet", "--out", str(null)]) == 0
    null_rows = json.loads(null.read_text())["rows"]
    assert {r["delta"] for r in null_rows} == {"random_delta"} and len(null_rows) == len(ref_rows)
    floor = tmp_path / "floor.json"
    floor_argv = ["--delta", "noise_floor", "--tuned", str(tmp_path / "tuned"), "--no-heads", "--quiet"]
    assert main([*argv, *floor_argv, "--replicate", str(tmp_path / "base"), "--out", str(floor)]) == 0
    floor_rows = json.loads(floor.read_text())
    assert floor_rows["config"]["replicate"] == str(tmp_path / "base")
    assert {r["matrix"] for r in floor_rows["rows"]} == {name}  # the tuned model differs from base at one matrix
    assert main([*argv, *floor_argv, "--out", str(floor)]) == 2  # no --replicate: an error naming the fix
    assert "--replicate" in capsys.readouterr().err
    reference = {(r["matrix"], r["subspace"], r["stream"]): r["delta_norm"] for r in ref_rows}
    assert reference[(name, "activation", "residual")] == pytest.approx(
        float(rwasym.load(tmp_path / "base").weight(name).norm())
    )


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    code = main(["info", "--model", str(tmp_path)])
    assert code == 2
    assert "neither an rwasym checkpoint" in capsys.readouterr().err


@pytest.mark.integration
def test_demo_quick_writes_report(tmp_path, quick_cache):
    code = main(["demo", "--quick", "--quiet", "--out", str(tmp_path / "demo")])
    assert code == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["probe"]["summary"]) == {
        "read_activation",
        "read_prediction",
        "write_activation",
        "write_prediction",
    }
    assert (tmp_path / "demo" / "figures" / "asymmetry_heatmap.png").exists()
    assert "Probe" in (tmp_path / "demo" / "report.md").read_text()


def test_train_cli_pretrain_then_align(tmp_path):
    assert main(["train", "pretrain", "--out", str(tmp_path / "pre"), "--steps", "4", "--n-seqs", "64", "--quiet"]) == 0
    base = tmp_path / "pre" / "step_000004"
    assert (base / "rwasym.json").exists()
    assert (
        main(
            [
                "train",
                "align",
                "--base",
                str(base),
                "--objective",
                "graded",
                "--lam",
                "0.5",
                "--steps",
                "3",
                "--out",
                str(tmp_path / "ali"),
                "--quiet",
            ]
        )
        == 0
    )
    base_m, tuned = rwasym.load(base), rwasym.load(tmp_path / "ali" / "step_000003")
    assert sum(float(d.norm()) for d in rwasym.weight_deltas(base_m, tuned).values()) > 0
    # plain SGD with the update tracked: the log carries cos per kind, the checkpoint the update sum
    argv = ["train", "align", "--base", str(base), "--steps", "2", "--optimizer", "sgd", "--track-updates"]
    assert main([*argv, "--out", str(tmp_path / "sgd"), "--quiet"]) == 0
    log = [json.loads(line) for line in (tmp_path / "sgd" / "log.jsonl").read_text().splitlines()]
    assert any(key.startswith("update_cos/") for key in log[-1])
    assert (tmp_path / "sgd" / "step_000002" / "update_sum.safetensors").exists()


@pytest.mark.parametrize(
    "command",
    [["demo"], ["info"], ["probe"], ["gradients"], ["intervene"], ["spectra"], ["train"], ["experiment"], ["pair"]],
)
def test_every_command_prints_its_help(command, capsys):
    """`--help` of every command prints and exits 0 (a '%' in a field's help once reached the user as argparse's
    raw ValueError)."""
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out
