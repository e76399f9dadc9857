"""`rwasym chain`: a training chain's stages measured in the first checkpoint's subspaces; flags from `ChainConfig`."""

import argparse
from pathlib import Path
from typing import Any

from .common import add_config_flags, config_from_args, read_tokens


def add_chain_parser(sub: Any) -> argparse.ArgumentParser:
    from ...analyses.chain import ChainConfig

    p = sub.add_parser(
        "chain",
        help="stage chain A B C …: each stage's ΔW probed in A's subspaces, its share of the total, and the "
        "principal angles between stages",
    )
    p.add_argument("checkpoints", nargs="+", help="two or more checkpoints in training order (folders, hub names)")
    p.add_argument("--data", required=True, help="text file, or .safetensors with input_ids (A's activations)")
    add_config_flags(p, ChainConfig)
    p.add_argument("--out", required=True, help="folder for results.json, report.md and figures/")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_chain)
    return p


def run_chain(args: argparse.Namespace) -> int:
    from ... import report
    from ...analyses.chain import ChainConfig, chain

    config = config_from_args(args, ChainConfig)
    data = read_tokens(args.data, None)
    result = chain(args.checkpoints, data, config, progress=False if args.quiet else None)
    out = Path(args.out)
    kinds, angles = result.kind_shares(), result.kind_angles()
    report.stage_shares(kinds, out / "figures" / "shares.png")
    report.stage_trajectory(result.trajectory(), out / "figures" / "trajectory.png")
    if angles:
        report.stage_overlaps(angles, out / "figures" / "overlaps.png")
    doc = dict(
        stages=result.stages, config=result.config, shares=result.shares, angles=result.angles, probe=result.probe_rows
    )
    report.write_outputs(
        out,
        doc,
        [
            f"# Stage chain: {' → '.join(str(c) for c in args.checkpoints)}\n",
            "## Each stage's part of the total ‖T‖² (mean over layers)\n",
            report.markdown_table(kinds, ["kind", "stage", "projection", "share", "matrices"]),
            "\n![shares](figures/shares.png)\n![trajectory](figures/trajectory.png)\n",
            "## Overlap of stages' top-r ΔW subspaces (mean cos²; Haar mean r/n)\n",
            report.markdown_table(angles, ["kind", "side", "stage_a", "stage_b", "overlap", "null_mean", "z"]),
            "\n![overlaps](figures/overlaps.png)" if angles else "",
        ],
    )
    print(result.summary())
    print(f"wrote {out}/report.md, results.json and figures")
    return 0
