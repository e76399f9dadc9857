"""The real pair's causal test at equal collateral KL (docs/design/causal_rerun.md, pre-registered).

`causal_experiment(out)` runs, per alignment seed, mode and matrix set, one resumable effect-matched
joint sweep (`rwasym.sweep`, ``match="kl"``) into ``out/sweeps/causal_s{seed}_{mode}_{set}.jsonl``, in
the pre-registered order (seed 0 first); a run cut short keeps every finished row. `causal_report(out)`
reads whatever has finished and writes ``out/results.json`` and ``out/report.md``: per (set, rank,
budget, mode, control family) the target's within-seed rank p, the stratified test over the finished
seeds, Holm over the primary family, and the descriptive pairs flipped, ceiling fractions and costs.
"""

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import RwasymError

__all__ = ["CausalConfig", "causal_experiment", "causal_report"]

SET_NAMES = {"blocks.*.attn.W_Q": "W_Q", "read": "read", "write": "write"}


@dataclass(frozen=True)
class CausalConfig:
    """The pre-registered design (docs/design/causal_rerun.md); every default is what it fixes."""

    seeds: Sequence[int] = (0, 1, 2)
    modes: Sequence[str] = ("transplant", "ablate")
    sets: Sequence[str] = ("blocks.*.attn.W_Q", "read", "write")
    ranks: Sequence[int] = (1, 8)
    kl_budgets: Sequence[float] = (0.003, 0.01, 0.03)
    directions: str = "pca:1,prediction:1,random:19,orthogonal:19"
    collateral_rows: int = 8
    collateral_len: int = 64
    max_pairs: int = 64
    edits_per_pass: int = 4
    primary: str = "gap_margin"
    quick: bool = False  # a 2-block smoke run of the code path (not the study)


def _name(seed: int, mode: str, matrix_set: str) -> str:
    return f"causal_s{seed}_{mode}_{SET_NAMES.get(matrix_set, matrix_set.replace('*', 'x'))}"


def causal_experiment(
    out: str | Path, config: CausalConfig | None = None, *, cache_dir: Any = None, progress: bool | None = None
) -> list[Path]:
    """Run (or resume) every sweep of the design in order; returns the sweep files."""
    from ..analyses.sweep import sweep
    from .collateral import generic_text
    from .real_pair import load_real_pairs, real_corpus, real_pair

    cfg = config or CausalConfig()
    out = Path(out)
    (out / "sweeps").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=list))
    files = []
    for seed in cfg.seeds:
        base, tuned, info = real_pair(cache_dir, quick=cfg.quick, progress=progress is not False, seed=seed)
        _, held = load_real_pairs(info)
        data = real_corpus(info, base.tokenizer)
        collateral, col_info = generic_text(base.tokenizer, cfg.collateral_rows, cfg.collateral_len)
        (out / f"collateral_s{seed}.json").write_text(json.dumps(col_info, indent=1))
        for mode in cfg.modes:
            for matrix_set in cfg.sets:
                path = out / "sweeps" / f"{_name(seed, mode, matrix_set)}.jsonl"
                sweep(
                    base,
                    tuned,
                    held,
                    out=path,
                    joint=True,
                    matrices=(matrix_set,),
                    ranks=tuple(cfg.ranks),
                    directions=cfg.directions,
                    match="kl",
                    kl_budgets=tuple(cfg.kl_budgets),
                    mode=mode,
                    seed=seed,
                    max_pairs=cfg.max_pairs,
                    edits_per_pass=cfg.edits_per_pass,
                    data=data,
                    collateral=collateral,
                    progress=progress,
                )
                files.append(path)
    return files


def causal_report(out: str | Path, config: CausalConfig | None = None) -> dict:
    """Summaries of every finished sweep row under ``out/sweeps`` (module docstring)."""
    from ..analyses.sweep import read_sweep, summarize
    from ..math.inference import holm

    cfg = config or CausalConfig()
    out = Path(out)
    rows, refs = [], {}
    for path in sorted((out / "sweeps").glob("causal_s*.jsonl")):
        header, part = read_sweep(path)
        if header is None:
            continue  # created, nothing written yet
        refs[path.stem] = header["reference"]
        n_pairs = header["config"].get("max_pairs") or cfg.max_pairs
        for r in part:
            r["n_pairs"] = n_pairs
        rows += part
    if not rows:
        raise RwasymError(f"no finished causal sweep rows under {out / 'sweeps'}; run causal_experiment first")
    ceilings = {(r["matrix"], r["mode"], r["seed"]): r for r in rows if r["direction"] == "ceiling"}
    for r in rows:  # descriptive: pairs flipped, and the edit's fraction of its set's ceiling
        ref = refs.get(_name(r["seed"], r["mode"], r["matrix"]))
        if ref is not None and r.get("accuracy") is not None:
            host = ref["base"] if r["mode"] == "transplant" else ref["tuned"]
            r["pairs_flipped"] = round((r["accuracy"] - host["accuracy"]) * r["n_pairs"])
        c = ceilings.get((r["matrix"], r["mode"], r["seed"]))
        if c is not None and r["direction"] != "ceiling" and c.get(cfg.primary):
            r["of_ceiling"] = r[cfg.primary] / c[cfg.primary] if r.get(cfg.primary) is not None else None
    edits = [r for r in rows if r["direction"] != "ceiling"]
    metrics = [cfg.primary, "gap_accuracy", "pairs_flipped", "of_ceiling", "collateral_kl", "collateral_dce"]
    summary = summarize(edits, metrics=metrics, primary=cfg.primary)
    table = [r for r in summary.rows if r["control"] in ("random", "orthogonal")]
    # Holm over the pre-registered family (sets × ranks × budgets × modes × 2 control families), the tests
    # not run yet counted as p = 1: an upper bound on the adjusted p the full run can give these tests
    family = len(cfg.sets) * len(cfg.ranks) * len(cfg.kl_budgets) * len(cfg.modes) * 2
    primary = [r for r in table if r["metric"] == cfg.primary and r.get("p_value") is not None]
    adjusted = holm([r["p_value"] for r in primary] + [1.0] * max(family - len(primary), 0))
    for r, p in zip(primary, adjusted):
        r["p_holm_family"] = p
    results = dict(
        design="docs/design/causal_rerun.md",
        seeds=sorted({r["seed"] for r in rows}),
        sweeps=sorted(refs),
        config=summary.config,
        family=dict(metric=cfg.primary, n_tests=family, reported=len(primary)),
        table=table,
        ceilings=sorted(ceilings.values(), key=lambda c: (c["seed"], c["mode"], c["matrix"])),
        calibration=dict(
            edits=len(edits),
            mean_evaluations=sum(r["calibration_evals"] for r in edits) / len(edits),
            reached=sum(bool(r["budget_reached"]) for r in edits),
            saturated=sum(bool(r["saturated"]) for r in edits),
        ),
    )
    from ..report import dose_response

    for mode in sorted({r["mode"] for r in edits}):
        dose_response(
            [r for r in edits if r["mode"] == mode],
            cfg.primary,
            out / f"dose_response_{mode}.png",
            title=f"{cfg.primary} against collateral KL ({mode}; seeds {results['seeds']})",
        )
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "report.md").write_text(_markdown(results, cfg))
    return results


def _fmt(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _markdown(results: dict, cfg: CausalConfig) -> str:
    cal, fam = results["calibration"], results["family"]
    run = ", ".join(s.removeprefix("causal_") for s in results["sweeps"])
    lines = [
        "# The real pair's causal test at equal collateral KL",
        "",
        f"Design and endpoints: `{results['design']}` (pre-registered). Seeds with rows: {results['seeds']}; "
        f"the {len(results['sweeps'])} sweeps run so far: {run} "
        "(a test's seeds are in its 'rank p per seed' column). Every edit scaled to its collateral-KL budget: "
        f"{cal['reached']} of "
        f"{cal['edits']} within 5% ({cal['saturated']} saturated), {cal['mean_evaluations']:.2f} evaluations "
        "per edit and budget on average.",
        "",
        f"Primary endpoint `{cfg.primary}` (fraction of the base→tuned margin gap moved; one-sided, target "
        "above its controls). p: the exact stratified rank test over the finished seeds (one seed: the "
        "target's rank p among its 19 controls, floor 0.05); p_holm: Holm over the pre-registered family of "
        f"{fam['n_tests']} primary tests, the {fam['n_tests'] - fam['reported']} not finished yet counted as "
        "p = 1 (an upper bound on what the full run gives these tests).",
        "",
        "| mode | set | rank | KL budget | control | target | control mean | rank p per seed | p | p_holm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["table"]:
        if r["metric"] != cfg.primary:
            continue
        ranks = ", ".join(f"s{s['seed']}: {s['rank_p']:.3g}" for s in r["strata"])
        p = _fmt(r["p_value"]) + (" (floor)" if r.get("at_floor") else "")
        lines.append(
            f"| {r['mode']} | {r['matrix']} | {r.get('rank')} | {r.get('kl_budget')} | {r['control']} | "
            f"{_fmt(r['target_mean'])} | {_fmt(r['control_mean'])} | {ranks} | {p} | {_fmt(r.get('p_holm_family'))} |"
        )
    lines += [
        "",
        "## Descriptive: pairs flipped (of 64) and fraction of the set's ceiling, target vs control mean",
        "",
        "| mode | set | rank | KL budget | control | target flipped | controls flipped | target of ceiling "
        "| controls of ceiling | collateral ΔCE target / controls |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {
        (r["mode"], r["matrix"], r.get("rank"), r.get("kl_budget"), r["control"], r["metric"]): r
        for r in results["table"]
    }
    for r in results["table"]:
        if r["metric"] != cfg.primary:
            continue
        key = (r["mode"], r["matrix"], r.get("rank"), r.get("kl_budget"), r["control"])
        f, c, d = by.get((*key, "pairs_flipped")), by.get((*key, "of_ceiling")), by.get((*key, "collateral_dce"))
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {_fmt(f and f['target_mean'])} | "
            f"{_fmt(f and f['control_mean'])} | {_fmt(c and c['target_mean'])} | {_fmt(c and c['control_mean'])} | "
            f"{_fmt(d and d['target_mean'])} / {_fmt(d and d['control_mean'])} |"
        )
    lines += ["", "## Dose-response", ""]
    lines += [f"![{mode}](dose_response_{mode}.png)" for mode in sorted({r["mode"] for r in results["table"]})]
    lines += [
        "",
        "## Ceilings: the full ΔW of each set",
        "",
        "| seed | mode | set | gap_margin | gap_accuracy | collateral KL |",
        "|---|---|---|---|---|---|",
    ]
    for c in results["ceilings"]:
        lines.append(
            f"| {c['seed']} | {c['mode']} | {c['matrix']} | {_fmt(c.get('gap_margin'))} | "
            f"{_fmt(c.get('gap_accuracy'))} | {_fmt(c.get('collateral_kl'))} |"
        )
    return "\n".join(lines) + "\n"
