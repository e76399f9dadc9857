"""`rwasym info`: the matrix registry of a model."""

import argparse
from typing import Any


def add_info_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("info", help="print a model's matrix registry")
    p.add_argument("--model", required=True, help="hub name, HF folder or rwasym checkpoint folder")
    p.set_defaults(func=run_info)
    return p


def run_info(args: argparse.Namespace) -> int:
    import rwasym

    model = rwasym.load(args.model)
    print(model)
    for spec in model.matrices():
        print(
            f"  {spec.name:28s} {spec.side:5s} {spec.n_out:5d} x {spec.n_in:<5d} heads={spec.n_heads} in={spec.hook_in}"
        )
    return 0
