"""`rwasym demo | probe | train | ...` — the command line only calls the public API."""

import argparse
import json
import sys
from typing import Optional, Sequence

import torch


def _cmd_info(args: argparse.Namespace) -> int:
    import rwasym

    model = rwasym.load(args.model)
    print(model)
    for spec in model.matrices():
        print(f"  {spec.name:28s} {spec.side:5s} {spec.n_out:5d} x {spec.n_in:<5d} heads={spec.n_heads} in={spec.hook_in}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import rwasym

    print("rwasym demo: native tiny base model, a planted rank-1 delta along the top input PC of one")
    print("matrix, and the registry/weight-delta path end to end.")
    base = rwasym.load(rwasym.native_config(seed=args.seed))
    tuned = rwasym.load(rwasym.native_config(seed=args.seed))
    print(base)
    name = "blocks.0.attn.W_Q"
    g = torch.Generator().manual_seed(args.seed)
    u = torch.randn(base.matrix(name).n_out, generator=g, dtype=torch.float64)
    v = torch.randn(base.matrix(name).n_in, generator=g, dtype=torch.float64)
    v /= v.norm()
    with tuned.edit({name: tuned.weight(name) + torch.outer(u, v)}):
        deltas = rwasym.weight_deltas(base, tuned)
    norms = {n: float(d.norm()) for n, d in deltas.items()}
    print(json.dumps({"planted_matrix": name, "delta_fro_norms": norms}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwasym", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print a model's matrix registry")
    p.add_argument("--model", required=True, help="hub name, HF folder or rwasym checkpoint folder")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("demo", help="run the end-to-end demo")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:  # RwasymError: print the message, not a traceback
        from .errors import RwasymError

        if isinstance(err, RwasymError):
            print(f"rwasym: error: {err}", file=sys.stderr)
            return 2
        raise
