"""`rwasym.analyses.cost.estimate_probe`: the probe's cost before it runs (issue #31). The oracle is the formula's
own structure on a tiny model (each part scales as its FLOP count says; memory holders are the shapes' byte
counts); benchmarks/RESULTS.md compares estimates with measured runs."""

import pytest

import rwasym
from rwasym.analyses.cost import estimate_probe
from rwasym.analyses.probe import ProbeConfig, probe_sites


def test_estimate_parts_follow_their_work(native_cfg):
    model = rwasym.load(native_cfg)
    one = estimate_probe(model, 1000)
    two = estimate_probe(model, 2000)
    assert one.peak_bytes > 0 and one.seconds > 0 and one.disk_bytes == 0
    assert set(one.parts) == {"forward", "statistics", "subspaces", "spectra", "rows", "prediction"}
    for part in ("forward", "statistics"):  # linear in the tokens
        assert two.parts[part] == pytest.approx(2 * one.parts[part], rel=1e-12)
    for part in ("subspaces", "spectra", "rows", "prediction"):  # independent of them
        assert two.parts[part] == pytest.approx(one.parts[part], rel=1e-12)
    sites = probe_sites(model, model.matrices())
    widest = max(sites.values())
    params = sum(p.numel() * p.element_size() for p in model.bridge.parameters())
    assert one.memory["parameters"] == params and one.memory["covariance"] == 8 * widest**2
    assert one.memory["deltas"] == 3 * 8 * max(s.n_out * s.n_in for s in model.matrices())
    capped = estimate_probe(model, 2000, ProbeConfig(max_tokens=1000))
    assert capped.parts["forward"] == pytest.approx(one.parts["forward"], rel=1e-12)
    topk = estimate_probe(model, 1000, ProbeConfig(spectral="topk", spectral_k=4, k=2))
    assert topk.memory["basis"] == 8 * widest * (4 + 16) < one.memory["basis"] == 2 * 8 * widest**2
    assert "peak memory ≈" in one.summary() and "wall time ≈" in one.summary()


def test_cli_probe_prints_its_estimate_first(tmp_path, native_cfg, capsys):
    import torch
    from safetensors.torch import save_file

    from rwasym.app.cli import main

    base = rwasym.load(native_cfg)
    rwasym.save_model(base, tmp_path / "base")
    base.set_weight("blocks.0.attn.W_Q", base.weight("blocks.0.attn.W_Q") + 0.1)
    rwasym.save_model(base, tmp_path / "tuned")
    save_file(
        {"input_ids": torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))},
        str(tmp_path / "t.safetensors"),
    )
    args = [
        "probe",
        "--base",
        str(tmp_path / "base"),
        "--tuned",
        str(tmp_path / "tuned"),
        "--data",
        str(tmp_path / "t.safetensors"),
    ]
    args += ["--k", "2", "--null-samples", "0", "--out", str(tmp_path / "p.json")]
    assert main(args) == 0
    assert "estimate: peak memory ≈" in capsys.readouterr().err
    assert main([*args, "--quiet"]) == 0
    assert "estimate:" not in capsys.readouterr().err
