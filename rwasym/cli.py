"""`rwasym demo | probe | train | ...` — the command line only calls the public API."""

import argparse
import sys
from typing import Optional, Sequence



def _cmd_info(args: argparse.Namespace) -> int:
    import rwasym

    model = rwasym.load(args.model)
    print(model)
    for spec in model.matrices():
        print(f"  {spec.name:28s} {spec.side:5s} {spec.n_out:5d} x {spec.n_in:<5d} heads={spec.n_heads} in={spec.hook_in}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    data = pairs = None
    if args.model or args.tuned:
        if not (args.model and args.tuned and args.data):
            from .errors import RwasymError

            raise RwasymError("--model, --tuned and --data go together: pass all three to run the demo on your pair")
        import rwasym

        data = _read_tokens(args.data, None)
        data = data["input_ids"] if isinstance(data, dict) else data
        if args.pairs:
            from .pairs import PreferencePairs, load_pairs_jsonl

            pairs = load_pairs_jsonl(args.pairs) if args.pairs.endswith(".jsonl") else PreferencePairs.load(args.pairs)
        run_demo(args.out, quick=args.quick, base=rwasym.load(args.model), tuned=rwasym.load(args.tuned),
                 data=data, pairs=pairs, seed=args.seed, k=args.k, progress=False if args.quiet else None)
    else:
        run_demo(args.out, quick=args.quick, seed=args.seed, k=args.k, progress=False if args.quiet else None)
    return 0


def _read_tokens(path: str, model):
    """Token data for a command: a .safetensors file with ``input_ids`` (and optional
    ``attention_mask``), or a plain-text file tokenised by `rwasym.data.load_text`."""
    from .errors import RwasymError

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        tensors = load_file(path)
        if "input_ids" not in tensors:
            raise RwasymError(f"{path!r} has no 'input_ids' tensor; found {sorted(tensors)}")
        return {k: v for k, v in tensors.items() if k in ("input_ids", "attention_mask")}
    return path  # rwasym.capture reads text files itself


def _cmd_probe(args: argparse.Namespace) -> int:
    import rwasym

    base, tuned = rwasym.load(args.base), rwasym.load(args.tuned)
    result = rwasym.probe(base, tuned, _read_tokens(args.data, base), k=args.k, null_samples=args.null_samples,
                          matrices=args.matrices, heads=not args.no_heads, seed=args.seed,
                          max_tokens=args.max_tokens, progress=False if args.quiet else None)
    result.to_json(args.out)
    print(result.summary())
    print(f"wrote {len(result.rows)} rows to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwasym", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print a model's matrix registry")
    p.add_argument("--model", required=True, help="hub name, HF folder or rwasym checkpoint folder")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("probe", help="relative-subspace-fraction probe of ΔW = tuned − base")
    p.add_argument("--base", required=True, help="hub name, HF folder or rwasym checkpoint folder")
    p.add_argument("--tuned", required=True)
    p.add_argument("--data", required=True, help="text file, or .safetensors with input_ids")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--null-samples", type=int, default=200)
    p.add_argument("--matrices", default=None, help="glob such as 'blocks.*.attn.W_Q'")
    p.add_argument("--no-heads", action="store_true", help="whole matrices only")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", default="probe.json")
    p.set_defaults(func=_cmd_probe)
    from .sweep import add_intervene_parser

    add_intervene_parser(sub)
    p = sub.add_parser("demo", help="run the end-to-end demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test, not the real pair)")
    p.add_argument("--out", default="rwasym_out/demo")
    p.add_argument("--model", default=None, help="run on your own base model instead of the default pair")
    p.add_argument("--tuned", default=None)
    p.add_argument("--data", default=None, help="text file or .safetensors with input_ids")
    p.add_argument("--pairs", default=None, help="held-out pairs (.jsonl or .safetensors)")
    p.add_argument("--quiet", action="store_true")
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
