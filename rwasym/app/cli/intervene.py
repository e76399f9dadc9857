"""`rwasym intervene`: rank-1 / joint edit sweeps; its flags are `SweepConfig`'s fields."""

import argparse
from pathlib import Path
from typing import Any

from .common import add_config_flags, chat_template_flag, config_from_args, load_pairs_for, read_tokens


def add_intervene_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``rwasym intervene``: the sweep's data flags, then one flag per `SweepConfig` field."""
    from ...analyses.sweep import SweepConfig

    p = subparsers.add_parser("intervene", help="rank-1 intervention sweep with matched controls")
    p.add_argument("--base", required=True, help="hub name, HF folder or rwasym checkpoint folder")
    p.add_argument("--tuned", default=None, help="tuned checkpoint (hub name or folder)")
    p.add_argument("--tuned-adapter", default=None, help="PEFT LoRA adapter folder on --base (instead of --tuned)")
    p.add_argument("--pairs", required=True, help="held-out pairs: .safetensors (prompt/chosen/rejected) or .jsonl")
    p.add_argument("--text", default=None, help="held-out text (.safetensors with input_ids); default prompt+chosen")
    p.add_argument(
        "--collateral",
        default=None,
        help="match=kl: generic text, disjoint from the pairs, on which every edit's collateral KL is matched to "
        "each budget (.safetensors with input_ids, or a text file); also the covariance data of the frames. "
        "Default: the held-out prompts, answer positions excluded (with a warning)",
    )
    chat_template_flag(p)
    add_config_flags(p, SweepConfig)
    p.add_argument("--out", default="sweep.jsonl")
    p.add_argument("--summary", default=None, help="also write the summary (.json or .md)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_intervene, rank_aware=True)  # shards itself; rank 0 writes (main)
    return p


def run_intervene(args: argparse.Namespace) -> int:
    """``rwasym intervene``: run or resume the sweep, print the target-versus-control table."""
    from ... import distributed
    from ...analyses.sweep import SweepConfig, summarize, sweep
    from ...models import load_pair

    config = config_from_args(args, SweepConfig)
    base, tuned = load_pair(args.base, args.tuned, args.tuned_adapter, "intervene")
    pairs = load_pairs_for(args.pairs, base, args)
    collateral = None if args.collateral is None else read_tokens(args.collateral, base)
    rows = sweep(
        base,
        tuned,
        pairs,
        config,
        out=args.out,
        text=args.text,
        collateral=collateral,
        progress=False if args.quiet else None,
    )
    if distributed.world()[0] != 0:
        return 0  # rank 0 summarises, writes the summary and prints the table
    metrics = ["gap_margin", "margin", "accuracy", "ce", "kl_base", "kl_tuned", "input_energy"]
    cost = "collateral_kl" if config.match == "kl" else "kl_base" if config.mode == "transplant" else "kl_tuned"
    summary = summarize(rows, metrics=metrics + (["collateral_kl", "collateral_dce"] if config.match == "kl" else []))
    if args.summary:
        Path(args.summary).write_text(summary.to_json() if args.summary.endswith(".json") else summary.to_markdown())
    print(summary.to_markdown(["gap_margin", cost, "input_energy"]))
    print(f"{len(rows)} rows in {args.out}")
    return 0
