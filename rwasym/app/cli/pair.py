"""`rwasym pair`: build (or reuse) the cached real aligned pair."""

import argparse
from typing import Any


def add_pair_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pair", help="build (or reuse) a cached aligned pair: `real` = SmolLM2-135M + DPO on a text task"
    )
    p.add_argument("which", choices=["real"])
    p.add_argument("--quick", action="store_true", help="2 real blocks, 3 steps (a smoke test, not an aligned pair)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_pair)
    return p


def run_pair(args: argparse.Namespace) -> int:
    """``rwasym pair real``: build (or reuse) the cached real aligned pair and print where it is."""
    import json

    from ...studies.real_pair import real_pair

    _, _, info = real_pair(quick=args.quick, seed=args.seed, progress=not args.quiet)
    print(json.dumps({k: info[k] for k in ("base", "tuned", "folder", "heldout_accuracy", "seconds")}, indent=1))
    return 0
