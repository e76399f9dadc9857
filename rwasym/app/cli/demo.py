"""`rwasym demo`: the end-to-end demo."""

import argparse
from typing import Any

from .common import chat_template_flag, load_pairs_for, read_tokens


def add_demo_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="run the end-to-end demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test, not the real pair)")
    p.add_argument(
        "--real",
        action="store_true",
        help="the real pair: SmolLM2-135M + DPO (`rwasym pair real`; built on first use, ~3.5 min)",
    )
    p.add_argument("--out", default="rwasym_out/demo")
    p.add_argument("--model", default=None, help="run on your own base model instead of the default pair")
    p.add_argument("--tuned", default=None)
    p.add_argument("--tuned-adapter", default=None, help="PEFT LoRA adapter folder on --model (instead of --tuned)")
    p.add_argument("--data", default=None, help="text file or .safetensors with input_ids")
    p.add_argument("--pairs", default=None, help="held-out pairs (.jsonl or .safetensors)")
    chat_template_flag(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_demo)
    return p


def run_demo(args: argparse.Namespace) -> int:
    from ...studies.demo import run_demo

    data = pairs = None
    if args.model or args.tuned or args.tuned_adapter:
        if args.real:
            from ...errors import RwasymError

            raise RwasymError(
                "--real runs the demo on the real pair; --model/--tuned run it on yours: pass one of them"
            )
        if not (args.model and (args.tuned or args.tuned_adapter) and args.data):
            from ...errors import RwasymError

            raise RwasymError(
                "--model, --tuned (or --tuned-adapter) and --data go together: pass all three to run "
                "the demo on your pair"
            )
        from ...models import load_pair

        base, tuned = load_pair(args.model, args.tuned, args.tuned_adapter, "demo")
        data = read_tokens(args.data, None)
        data = data["input_ids"] if isinstance(data, dict) else data
        if args.pairs:
            pairs = load_pairs_for(args.pairs, base, args)
        run_demo(
            args.out,
            quick=args.quick,
            base=base,
            tuned=tuned,
            data=data,
            pairs=pairs,
            seed=args.seed,
            k=args.k,
            progress=False if args.quiet else None,
        )
    else:
        run_demo(
            args.out, quick=args.quick, seed=args.seed, k=args.k, real=args.real, progress=False if args.quiet else None
        )
    return 0
