"""Resumable sweeps (kill a subprocess mid-sweep, resume, compare), CLI (summaries: test_sweep_summary.py)."""

import argparse
import itertools
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import rwasym
from rwasym import RwasymError
from rwasym.analyses import behaviour
from rwasym.analyses.sweep import SweepConfig, parse_directions, read_sweep, sweep
from rwasym.app.cli import add_intervene_parser
from rwasym.data.pairs import PreferencePairs
from rwasym.math.inference import bootstrap_ci, permutation_pvalue

SWEEP = dict(
    matrices=["blocks.1.attn.W_Q"],
    match="norm",  # the resume / store mechanics at fixed α (effect-matched sweeps: test_kl_matched_*)
    directions="pca:2,random:3,orthogonal:3",
    alphas=(1.0, 2.0),
    edits_per_pass=3,
    progress=False,
)


CALLS = []  # one entry per evaluation of the metric (a measured edit, or a reference model)


def slow(logits, batch):  # the subprocess defines a sleeping metric of the same name
    CALLS.append(1)
    return float(logits.double().mean())


@pytest.fixture(scope="module")
def files(save_perturbed_pair, tmp_path_factory):
    """A saved base / tuned native pair and held-out pairs on disk (the subprocess loads them too)."""
    root = tmp_path_factory.mktemp("sweep")
    g = save_perturbed_pair(root)
    PreferencePairs(
        prompt=torch.randint(3, 64, (6, 8), generator=g),
        chosen=torch.randint(3, 64, (6, 2), generator=g),
        rejected=torch.randint(3, 64, (6, 2), generator=g),
    ).save(root / "pairs.safetensors")
    save_file({"input_ids": torch.randint(3, 64, (4, 24), generator=g)}, root / "collateral.safetensors")
    return root


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """Same kernels as the subprocess (so floats agree bit for bit), and fast on a shared box."""
    yield


def _run(files, out, **kw):
    return sweep(
        str(files / "base"),
        str(files / "tuned"),
        str(files / "pairs.safetensors"),
        out=out,
        metrics={"slow": slow},
        **{**SWEEP, **kw},
    )


def _same_rows(a, b, rel=0.0, atol=1e-9):
    a, b = sorted(a, key=lambda r: r["id"]), sorted(b, key=lambda r: r["id"])
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], abs=atol, rel=rel), k
            else:
                assert x[k] == y[k], k


@pytest.mark.integration
def test_killed_sweep_resumes_to_the_uninterrupted_result(files, tmp_path):
    out = tmp_path / "killed.jsonl"
    script = tmp_path / "run_sweep.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time, torch
        torch.set_num_threads(1)
        from rwasym.analyses.sweep import sweep
        def slow(logits, batch):
            time.sleep(0.3)
            return float(logits.double().mean())
        sweep({str(files / "base")!r}, {str(files / "tuned")!r}, {str(files / "pairs.safetensors")!r},
              out={str(out)!r}, metrics={{"slow": slow}}, **{dict(SWEEP, edits_per_pass=1)!r})
    """)
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:  # header + 2 rows
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.kill()
    finally:
        proc.wait()
    header, partial = read_sweep(out)
    assert 2 <= len(partial) < 16 and header["config"]["metrics"] == ["slow"]
    CALLS.clear()
    resumed = _run(files, out, edits_per_pass=1)
    # the kill lost at most the row in flight: every flushed row is kept, only the rest is measured
    # (plus the two reference models, base and tuned)
    assert len(CALLS) == 16 - len(partial) + 2
    full = _run(files, tmp_path / "full.jsonl", edits_per_pass=1)
    assert len(full) == 16 and len({r["id"] for r in full}) == 16
    _same_rows(read_sweep(out)[1], full)
    _same_rows(resumed, full)


def test_half_written_line_rerun_and_config_mismatch(files, tmp_path, monkeypatch):
    out = tmp_path / "s.jsonl"
    full = _run(files, out)
    raw = out.read_bytes()
    cut = raw[: raw.rstrip(b"\n").rfind(b"\n") + 1]  # drop the last row ...
    out.write_bytes(cut + raw[len(cut) : len(cut) + 40])  # ... and leave half of it behind
    with pytest.warns(UserWarning, match="half-written last line"):
        resumed = _run(files, out)
    _same_rows(resumed, full)
    _same_rows(read_sweep(out)[1], full)
    # a finished file is not recomputed
    monkeypatch.setattr(behaviour.Evaluator, "iter_edits", lambda *a, **k: pytest.fail("recomputed a row"))
    assert _run(files, out) == resumed
    monkeypatch.undo()
    with pytest.raises(
        RwasymError, match=r"different configuration \(alphas: file has \[1.0, 2.0\], this run has \[1.0\]"
    ):
        _run(files, out, alphas=(1.0,))
    # rows: controls carry the edit norm of their matched target, energies are recorded
    by_key = {(r["direction"], r["index"], r["alpha"]): r for r in full}
    for r in full:
        if r["direction"] in ("random", "orthogonal"):
            assert r["edit_norm"] == pytest.approx(by_key[("pca", r["matched_to"], r["alpha"])]["edit_norm"], rel=1e-12)
        assert r["input_energy"] > 0 and r["edit_norm"] == pytest.approx(r["alpha"] * r["u_norm"])
    assert by_key[("pca", 0, 1.0)]["input_energy"] > by_key[("pca", 1, 1.0)]["input_energy"]
    assert {"margin", "accuracy", "ce", "kl_base", "kl_tuned", "gap_margin", "slow"} <= set(full[0])


def test_per_head_sweep_and_nothing_to_sweep(files, tmp_path):
    base, tuned = str(files / "base"), str(files / "tuned")
    rows = sweep(
        base,
        tuned,
        str(files / "pairs.safetensors"),
        matrices="blocks.0.attn.W_O",
        heads=True,
        directions="pca:1,prediction:1,orthogonal:1",
        out=tmp_path / "h.jsonl",
        progress=False,
    )
    assert sorted({r["head"] for r in rows}, key=str) == [0, 1, 2, 3, None]
    ceiling = [r for r in rows if r["direction"] == "ceiling"]  # the whole matrix's ΔW, once (not per head)
    assert [(c["matrix"], c["head"]) for c in ceiling] == [("blocks.0.attn.W_O", None)]
    rows = [r for r in rows if r["direction"] != "ceiling"]
    assert len(rows) == 5 * 4 and {r["side"] for r in rows if r["head"] == 2} == {"input", "output"}
    head_pca = [r for r in rows if r["head"] is not None and r["direction"] == "pca"]
    assert all(r["input_energy"] > 0 for r in head_pca) and len({r["input_energy"] for r in head_pca}) == 4
    with pytest.warns(UserWarning, match="W_Q is a read matrix"):
        with pytest.raises(RwasymError, match="nothing to sweep"):
            sweep(
                base,
                tuned,
                str(files / "pairs.safetensors"),
                matrices="blocks.*.attn.W_Q",
                directions="prediction:2,random:2",
                out=tmp_path / "q.jsonl",
                progress=False,
            )


def test_parse_directions_errors():
    assert parse_directions("pca:4, random:32") == [("pca", 4), ("random", 32)]
    for bad, match in (
        ("pca:0", "bad direction spec"),
        ("pca:2,pca:3", "bad direction spec"),
        ("random:4", "no target kind"),
        ("svd:2", "bad direction spec"),
    ):
        with pytest.raises(RwasymError, match=match):
            parse_directions(bad)


# ---------------------------------------------------------------------------------- statistics
def test_exact_permutation_p_matches_brute_force():
    x, y = [0.3, 1.2, 0.9, 2.0], [0.1, -0.4, 0.5, 0.2, 0.0]
    pooled = np.array(x + y)
    observed = abs(np.mean(x) - np.mean(y))
    count = total = 0
    for idx in itertools.combinations(range(9), 4):  # every relabelling, by hand
        rest = [i for i in range(9) if i not in idx]
        count += abs(pooled[list(idx)].mean() - pooled[rest].mean()) >= observed - 1e-12
        total += 1
    assert permutation_pvalue(x, y, n_permutations=1000) == pytest.approx(count / total, abs=1e-15)
    mc = permutation_pvalue(x, y, n_permutations=50, seed=3)  # C(9, 4) = 126 > 50: Monte Carlo
    assert abs(mc - count / total) < 0.2 and mc >= 1 / 51


def test_permutation_and_bootstrap_calibration():
    rng = np.random.default_rng(0)
    ps, covered = [], 0
    for trial in range(150):
        x, y = rng.normal(size=10), rng.normal(size=30)
        ps.append(permutation_pvalue(x, y, n_permutations=300, seed=trial))
        lo, hi = bootstrap_ci(x, y, n_boot=400, seed=trial)
        covered += lo <= 0 <= hi
    ps = np.array(ps)
    assert 0.02 <= np.mean(ps < 0.1) <= 0.2 and 0.4 <= np.mean(ps < 0.5) <= 0.6  # ≈ uniform under the null
    assert 0.88 <= covered / 150 <= 0.99  # ≈ 95% coverage
    x, y = rng.normal(3.0, 1.0, size=10), rng.normal(size=30)
    assert permutation_pvalue(x, y, n_permutations=999) == pytest.approx(1 / 1000)
    assert bootstrap_ci(x, y)[0] > 1.5


def test_bootstrap_ci_matches_a_loop_reference():
    x, y = [1.0, 2.5, 0.3, 4.0], [0.5, 0.7, -1.0]
    rng = np.random.default_rng(7)
    diffs = []
    xi = rng.integers(0, 4, (500, 4))
    yi = rng.integers(0, 3, (500, 3))
    for b in range(500):
        diffs.append(sum(x[i] for i in xi[b]) / 4 - sum(y[i] for i in yi[b]) / 3)
    diffs.sort()
    lo, hi = bootstrap_ci(x, y, n_boot=500, seed=7)
    assert lo == pytest.approx(np.quantile(diffs, 0.025)) and hi == pytest.approx(np.quantile(diffs, 0.975))
    assert lo == pytest.approx(diffs[12] + 0.475 * (diffs[13] - diffs[12]))  # linear interpolation, by hand


def test_cli_intervene(files, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="rwasym")
    add_intervene_parser(parser.add_subparsers(dest="command"))
    out, md = tmp_path / "cli.jsonl", tmp_path / "summary.md"
    args = parser.parse_args(
        [
            "intervene",
            "--base",
            str(files / "base"),
            "--tuned",
            str(files / "tuned"),
            "--pairs",
            str(files / "pairs.safetensors"),
            "--matrices",
            "blocks.*.mlp.W_out",
            "--directions",
            "prediction:2,random:2",
            "--kl-budgets",
            "0.01,0.003",
            "--collateral",
            str(files / "collateral.safetensors"),
            "--mode",
            "ablate",
            "--out",
            str(out),
            "--summary",
            str(md),
            "--quiet",
        ]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| blocks.1.mlp.W_out |  | ablate | KL 0.003 | prediction | random | gap_margin |" in printed
    assert "| collateral_kl |" in printed  # the cost every row was matched on
    assert "18 rows in" in printed and md.read_text().startswith("| matrix |")  # 16 edits + 2 ceilings
    header, rows = read_sweep(out)
    assert header["config"]["mode"] == "ablate" and {r["side"] for r in rows} == {"output", "full"}
    assert header["config"]["kl_budgets"] == [0.003, 0.01] and "alphas" not in header["config"]
    for r in (r for r in rows if r["direction"] != "ceiling"):
        assert r["budget_reached"] and abs(r["collateral_kl"] - r["kl_budget"]) <= 0.05 * r["kl_budget"]
    bad = parser.parse_args(
        [
            "intervene",
            "--base",
            str(files / "base"),
            "--tuned",
            str(files / "tuned"),
            "--pairs",
            str(files / "pairs.safetensors"),
            "--alphas",
            "1,x",
        ]
    )
    with pytest.raises(RwasymError, match="--alphas must be comma-separated numbers"):
        args.func(bad)


def test_output_matched_controls_equalise_mean_square_output_change(files, tmp_path):
    """match="output": each control row's ‖u‖² · vᵀ M v (its mean-square output change) equals its
    target's; with the default norm matching the Frobenius norms agree instead. The config records it."""
    rows = _run(files, tmp_path / "out.jsonl", match="output", alphas=(1.0,))
    targets = {(r["matrix"], r["index"]): r for r in rows if r["direction"] == "pca"}
    controls = [r for r in rows if r["direction"] in ("random", "orthogonal")]
    assert controls
    for r in controls:
        t = targets[(r["matrix"], r["matched_to"])]
        assert r["u_norm"] ** 2 * r["input_second_moment"] == pytest.approx(
            t["u_norm"] ** 2 * t["input_second_moment"], rel=1e-9
        )
        assert r["u_norm"] != pytest.approx(t["u_norm"], rel=1e-3)
    header, _ = read_sweep(tmp_path / "out.jsonl")
    assert header["config"]["match"] == "output"
    with pytest.raises(RwasymError, match="match must be one of"):
        _run(files, tmp_path / "bad.jsonl", match="energy")


@pytest.mark.parametrize("match", ["norm", "output"])
def test_sweep_file_written_by_rwasym_0_1_resumes(files, tmp_path, monkeypatch, match):
    """tests/data/legacy_sweep_*.jsonl: header + the first 6 of 16 rows of this module's sweep, written by
    rwasym 0.1.0 before SweepConfig existed (tests/data/make_legacy_sweep.py). The config hash must
    still match, the 6 rows must be kept as they are, and the 10 missing ones computed."""
    import shutil
    from pathlib import Path

    legacy = Path(__file__).parent / "data" / f"legacy_sweep_{match}.jsonl"
    old_header, old_rows = read_sweep(legacy)
    out = tmp_path / "legacy.jsonl"
    shutil.copy(legacy, out)
    iter_edits, calls = behaviour.Evaluator.iter_edits, []

    def counted(self, host, name, U, V):
        calls.append(U.shape[0])
        return iter_edits(self, host, name, U, V)

    monkeypatch.setattr(behaviour.Evaluator, "iter_edits", counted)
    resumed = _run(files, out, match=match)
    monkeypatch.undo()
    header, rows = read_sweep(out)
    assert header == old_header and len(old_rows) == 6 and len(rows) == 16
    assert rows[:6] == old_rows  # kept verbatim, not recomputed
    assert sum(calls) == 10  # only the missing rows were measured
    fresh = _run(files, tmp_path / "fresh.jsonl", match=match)
    kept = {r["id"] for r in old_rows}
    _same_rows([r for r in resumed if r["id"] not in kept], [r for r in fresh if r["id"] not in kept])
    # the kept rows were computed on another machine, whose float32 kernels round differently
    # (measured here: u_norm 3e-8 relative, margins 2.3e-8 absolute), so they agree with this
    # machine's to float32 precision: 1e-6 relative, 1e-6 absolute on log-probability differences
    _same_rows([r for r in resumed if r["id"] in kept], [r for r in fresh if r["id"] in kept], rel=1e-6, atol=1e-6)


def test_sweep_config_defaults_hash_and_cli_flags(files, tmp_path):
    """One SweepConfig feeds the header (so the hash), sweep()'s keyword overrides and the CLI flags."""
    cfg = SweepConfig(matrices="blocks.1.attn.W_Q", alphas=[1, 2], match="norm")
    assert cfg.matrices == ("blocks.1.attn.W_Q",) and cfg.alphas == (1.0, 2.0)
    ctx = dict(
        base="b",
        tuned="t",
        pairs="p",
        cov_data="c",
        matrices=["m"],
        metrics={"z": None, "a": None},
        edits_per_pass=4,
        dtype="torch.float32",
    )
    h = cfg.header(**ctx)
    assert h["metrics"] == ["a", "z"] and "match" not in h and h["alphas"] == [1.0, 2.0]
    assert SweepConfig(match="output").header(**ctx)["match"] == "output"
    # the default compares edits at equal collateral KL: budgets (sorted), tolerance and the text's hash, no α
    kl = SweepConfig(kl_budgets=(0.03, 0.003)).header(**ctx, collateral="abc")
    assert SweepConfig().match == "kl" and kl["match"] == "kl" and "alphas" not in kl
    assert kl["kl_budgets"] == [0.003, 0.03] and kl["kl_rtol"] == 0.05 and kl["collateral"] == "abc"
    # the frames' covariance exclusions key the file only when set (older files keep their hash)
    assert "exclude_positions" not in kl and "exclude_tokens" not in kl
    ex = SweepConfig(exclude_positions=[0], exclude_tokens=[0, 2]).header(**ctx, collateral="abc")
    assert ex["exclude_positions"] == [0] and ex["exclude_tokens"] == [0, 2]
    assert "text_metrics" not in kl and SweepConfig(text_metrics=False).header(**ctx)["text_metrics"] is False
    with pytest.raises(RwasymError, match="with match='kl'.*kl_budgets"):
        SweepConfig(alphas=(1.0, 2.0))
    with pytest.raises(RwasymError, match="kl_budgets must be distinct positive"):
        SweepConfig(kl_budgets=(0.01, -1.0))
    with pytest.raises(RwasymError, match="kl_rtol must be in"):
        SweepConfig(kl_rtol=1.5)
    with pytest.raises(RwasymError, match="mode must be one of"):
        SweepConfig(mode="bogus")
    with pytest.raises(RwasymError, match="alphas must be distinct"):
        SweepConfig(alphas=(1.0, 1.0), match="norm")
    with pytest.raises(RwasymError, match="unknown options \\['alpha'\\]"):
        sweep(str(files / "base"), str(files / "tuned"), str(files / "pairs.safetensors"), alpha=2.0)
    parser = argparse.ArgumentParser()
    add_intervene_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "intervene",
            "--base",
            "b",
            "--tuned",
            "t",
            "--pairs",
            "p",
            "--alphas",
            "0.5,1",
            "--edits-per-pass",
            "2",
            "--no-reuse-prefix",
            "--heads",
            "--match",
            "output",
        ]
    )
    from rwasym.app.cli import config_from_args

    got = config_from_args(args, SweepConfig)
    assert got == SweepConfig(alphas=(0.5, 1.0), edits_per_pass=2, reuse_prefix=False, heads=True, match="output")
    assert (
        config_from_args(parser.parse_args(["intervene", "--base", "b", "--tuned", "t", "--pairs", "p"]), SweepConfig)
        == SweepConfig()
    )


def test_intervene_resolves_models_and_pairs_once(files, tmp_path, monkeypatch, capsys):
    """The `rwasym intervene` data path: the pair file is read once (CLI, with the base's tokenizer), turned
    into the evaluation set once (rwasym.sweep's boundary), and each model is loaded once; the Evaluator
    below takes the typed forms it is given."""
    import rwasym.analyses.behaviour as behaviour
    import rwasym.models.loading as loading
    from rwasym.app.cli import main
    from rwasym.models import Model

    calls = {"load_pairs": 0, "as_eval_set": 0, "loads": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    real_load = loading.load

    def load(source, *args, **kwargs):
        calls["loads"] += not isinstance(source, Model)  # a Model passed through is no load
        return real_load(source, *args, **kwargs)

    monkeypatch.setattr(Model, "load_pairs", counted("load_pairs", Model.load_pairs))
    monkeypatch.setattr(behaviour, "as_eval_set", counted("as_eval_set", behaviour.as_eval_set))
    for module in (
        "rwasym.models.loading",
        "rwasym.models",
        "rwasym.analyses.sweep.run",
        "rwasym.analyses.behaviour",
        "rwasym.hooks.activations",
    ):
        monkeypatch.setattr(f"{module}.load", load)
    assert (
        main(
            [
                "intervene",
                "--base",
                str(files / "base"),
                "--tuned",
                str(files / "tuned"),
                "--pairs",
                str(files / "pairs.safetensors"),
                "--matrices",
                "blocks.1.attn.W_Q",
                "--directions",
                "pca:1,random:1",
                "--alphas",
                "1",
                "--out",
                str(tmp_path / "s.jsonl"),
                "--quiet",
            ]
        )
        == 0
    )
    assert calls == {"load_pairs": 1, "as_eval_set": 1, "loads": 2}, calls


def test_kl_matched_sweep_resumes_bit_for_bit_and_records_its_calibration(files, tmp_path):
    """An effect-matched per-matrix sweep: rows keyed by budget, each row's collateral KL within 5% of its
    budget (or flagged), α calibrated per row; a half-written file resumes to the identical rows (the
    unit is recalibrated whole, so the α are bit-equal), a finished file is not recomputed."""
    out = tmp_path / "kl.jsonl"
    kw = dict(
        match="kl",
        alphas=(1.0,),
        matrices=["blocks.*.mlp.W_out"],
        directions="pca:1,prediction:1,random:2",
        kl_budgets=(0.002, 0.02),
        collateral=str(files / "collateral.safetensors"),
    )
    full = _run(files, out, **kw)
    ceilings = [r for r in full if r["direction"] == "ceiling"]  # the full ΔW of each matrix, α = 1
    assert [(c["matrix"], c["alpha"], c["kl_budget"]) for c in ceilings] == [
        (f"blocks.{i}.mlp.W_out", 1.0, None) for i in (0, 1)
    ]
    assert len(full) == 2 + 2 * 6 * 2  # ceilings + matrices × (pca and prediction, 2 random controls each) × budgets
    for r in (r for r in full if r["direction"] != "ceiling"):
        assert r["alpha"] > 0 and r["edit_norm"] == pytest.approx(r["alpha"] * r["u_norm"])
        assert r["calibration_evals"] >= 1 and isinstance(r["saturated"], bool)
        if r["budget_reached"]:
            assert abs(r["collateral_kl"] - r["kl_budget"]) <= 0.05 * r["kl_budget"]
        else:
            assert r["saturated"]
    assert sum(bool(r["budget_reached"]) for r in full) >= len(full) // 2
    raw = out.read_bytes()
    cut = raw[: raw.rstrip(b"\n").rfind(b"\n") + 1]
    cut = cut[: cut.rstrip(b"\n").rfind(b"\n") + 1]  # two rows lost
    out.write_bytes(cut + raw[len(cut) : len(cut) + 40])
    with pytest.warns(UserWarning, match="half-written last line"):
        resumed = _run(files, out, **kw)
    _same_rows(resumed, full)
    assert read_sweep(out)[1] == full  # bit for bit: the same α, KL and metrics


def test_collateral_text_defaults_warnings_and_errors(files):
    """Where the collateral KL is measured: a given text (every real position), or the held-out prompts
    with the positions that predict an answer token left out (and a warning that they are not disjoint
    from the pairs); a collateral text containing a held-out prompt is flagged; bad input named."""
    import rwasym
    from rwasym.analyses.behaviour import collateral_set, eval_set

    model = rwasym.load(str(files / "base"))
    data = eval_set(model, str(files / "pairs.safetensors"))
    with pytest.warns(UserWarning, match="held-out prompts"):
        col = collateral_set(model, None, data)
    assert col.source == "prompts" and col.counted.shape == (6, 9)  # 8 prompt + 2 answer tokens, minus 1
    assert col.counted[:, :7].all() and not col.counted[:, 7:].any()  # position 7 predicts the answer
    text = torch.randint(3, 64, (2, 12))
    given = collateral_set(model, {"input_ids": text, "attention_mask": torch.ones(2, 12).bool()}, data)
    assert given.source == "text" and given.counted.all() and given.attention_mask is None
    leaky = torch.cat([text, data.chosen[:2, :8].flip(0)], 1)  # held-out prompts 1 and 0 inside the text
    with pytest.warns(UserWarning, match="2 held-out prompt"):
        collateral_set(model, leaky, data)
    with pytest.raises(RwasymError, match="ids in \\[0, "):
        collateral_set(model, torch.full((2, 5), 10**6), data)
    with pytest.raises(RwasymError, match="integer token tensor"):
        collateral_set(model, torch.randn(2, 5), data)


def test_frames_covariance_leaves_out_excluded_positions(files, tmp_path):
    """exclude_positions: the pca target of W_Q is the top eigenvector of the input covariance without the
    left-out position (its input energy vᵀCv is that covariance's top eigenvalue, computed here by hand from
    hooked activations), not the one with every position."""
    base = rwasym.load(str(files / "base"))
    data = torch.randint(3, 64, (5, 12), generator=torch.Generator().manual_seed(8))
    name = "blocks.1.attn.W_Q"
    acts = {}

    def grab(x, hook=None):
        acts["a"] = x.detach().double()
        return x

    with torch.no_grad(), base.bridge.hooks(fwd_hooks=[(base.input_hook(name), grab)]):
        base.bridge(data)

    def top_eigenvalue(a):
        a = a.reshape(-1, a.shape[-1])
        return float(torch.linalg.eigvalsh(torch.cov(a.T)).max())

    energy = {}
    for excluded in ((), (0,)):
        rows = sweep(
            str(files / "base"),
            str(files / "tuned"),
            str(files / "pairs.safetensors"),
            out=tmp_path / f"ex{len(excluded)}.jsonl",
            data=data,
            exclude_positions=excluded,
            **{**SWEEP, "directions": "pca:1,random:1", "alphas": (1.0,)},
        )
        energy[excluded] = next(r["input_energy"] for r in rows if r["direction"] == "pca")
    assert energy[(0,)] == pytest.approx(top_eigenvalue(acts["a"][:, 1:]), rel=1e-6)
    assert energy[()] == pytest.approx(top_eigenvalue(acts["a"]), rel=1e-6)
    assert abs(energy[(0,)] - energy[()]) > 1e-3 * energy[()]
