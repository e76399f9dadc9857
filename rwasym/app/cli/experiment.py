"""`rwasym experiment`: the study's experiments (default pair over seeds; the real pair)."""

import argparse
from pathlib import Path
from typing import Any

from .common import parse_seeds


def add_experiment_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "experiment", help="the paper's experiments on the default pair (real: on the real pair), over seeds"
    )
    p.add_argument(
        "name",
        choices=["graded", "trajectory", "sweep", "real", "causal", "study"],
        help="real: every experiment on SmolLM2-135M + DPO (rwasym.studies.real; resumable units); causal: the "
        "pre-registered effect-matched causal test on that pair (rwasym.studies.causal; resumable sweeps); study: "
        "the pre-registered pretraining-contrast study on gemma-3-270m and SmolLM2 (rwasym.studies.study; "
        "resumable units, docs/design/study.md)",
    )
    p.add_argument(
        "--parts",
        default=None,
        help="real: comma-separated parts (asymmetry, trajectory, mechanism, joint, companion, graded; default all); "
        "study: comma-separated unit-name prefixes to run (e.g. heal_gemma,train_gemma_C1; default all)",
    )
    p.add_argument(
        "--report-only", action="store_true", help="real, causal: rebuild the report from the finished units / rows"
    )
    p.add_argument("--out", required=True, help="folder for results.json, report.md and the figure")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated default-pair seeds (each trained once, cached)")
    p.add_argument("--steps", type=int, default=400, help="graded: alignment steps per λ")
    p.add_argument("--lams", default="0,0.25,0.5,0.75,1", help="graded: comma-separated λ values")
    p.add_argument(
        "--match",
        choices=["norm", "output"],
        default="norm",
        help="sweep: controls matched in Frobenius norm or in mean-square output change",
    )
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--null-samples", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_experiment)
    return p


def run_experiment(args: argparse.Namespace) -> int:
    from ...studies import experiments

    if args.name == "causal":
        from ...studies.causal import CausalConfig, causal_experiment, causal_report

        if not args.report_only:
            cfg = CausalConfig(seeds=tuple(parse_seeds(args.seeds)), quick=bool(args.quick))
            causal_experiment(args.out, cfg, progress=False if args.quiet else None)
        res = causal_report(args.out)
        cal = res["calibration"]
        print(
            f"wrote {args.out}/report.md and results.json: seeds {res['seeds']}, {cal['edits']} edits, "
            f"{cal['reached']} at their budget, {cal['mean_evaluations']:.2f} evaluations each"
        )
        return 0
    if args.name == "study":
        from ...studies.study import StudyConfig, study_experiment, study_report

        if not args.report_only:
            cfg = StudyConfig.smoke() if args.quick else StudyConfig()
            only = [p.strip() for p in args.parts.split(",") if p.strip()] if args.parts else None
            study_experiment(args.out, cfg, only=only, progress=False if args.quiet else None)
        res = study_report(args.out)
        print(f"wrote {args.out}/report.md and results.json ({len(res['units'])} units finished)")
        return 0
    if args.name == "real":
        from ...studies.real import PARTS, RealConfig, real_experiment, real_report

        parts = [p.strip() for p in (args.parts or ",".join(PARTS)).split(",") if p.strip()]
        if args.report_only:
            res = real_report(args.out)
        else:
            seeds = tuple(parse_seeds(args.seeds))
            cfg = RealConfig.smoke(seeds=seeds) if args.quick else RealConfig(seeds=seeds)
            res = real_experiment(args.out, cfg, parts=parts, progress=False if args.quiet else None)
        assert res is not None  # report=True (the default) returns the report's results
        minutes = ", ".join(f"{k} {v / 60:.1f} min" for k, v in res["seconds"].items())
        print(f"wrote {args.out}/report.md and results.json ({minutes})")
        return 0
    kwargs: dict[str, Any] = dict(
        seeds=parse_seeds(args.seeds),
        k=args.k,
        null_samples=args.null_samples,
        quick=args.quick,
        progress=False if args.quiet else None,
    )
    if args.name == "graded":
        try:
            lams = [float(x) for x in args.lams.split(",") if x.strip()]
        except ValueError:
            from ...errors import RwasymError

            raise RwasymError(f"--lams must be comma-separated numbers in [0, 1]; got {args.lams!r}") from None
        res = experiments.graded_experiment(args.out, steps=args.steps, lams=lams, **kwargs)
    elif args.name == "sweep":
        kwargs.pop("k")
        kwargs.pop("null_samples")
        res = experiments.sweep_experiment(args.out, match=args.match, **kwargs)
    else:
        res = experiments.trajectory_experiment(args.out, **kwargs)
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {args.out}/report.md, results.json and a figure in {res['seconds']:.0f} s")
    return 0
