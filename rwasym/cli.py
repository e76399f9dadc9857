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
            pairs = _load_pairs(args.pairs)
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


def _cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import rwasym
    from .data import LanguageConfig, PairConfig, corpus, make_pairs
    from .train import AlignConfig, TrainConfig, align, pretrain

    progress = not args.quiet
    if args.stage == "pretrain":
        lang = LanguageConfig()
        model = rwasym.load(rwasym.native_config(d_vocab=lang.d_vocab, seed=args.seed))
        tokens = corpus(args.n_seqs, int(model.cfg.n_ctx), seed=args.seed, config=lang)
        cfg = replace(TrainConfig(), steps=args.steps, seed=args.seed)
        result = pretrain(model, tokens, cfg, out=args.out, progress=progress)
    else:
        model, reference = rwasym.load(args.base), rwasym.load(args.base)
        pairs = make_pairs(replace(PairConfig(), seed=args.seed, n_per_rule=500)) if args.pairs is None else _load_pairs(args.pairs)
        cfg = replace(AlignConfig(), objective=args.objective, lam=args.lam, beta=args.beta, steps=args.steps,
                      seed=args.seed)
        result = align(model, reference, pairs, cfg, out=args.out, progress=progress)
    print(f"{args.stage}: final loss {result.final_loss:.4f} in {result.seconds:.1f} s; "
          f"{len(result.checkpoints)} checkpoints in {args.out}")
    return 0


def _load_pairs(path: str):
    from .pairs import PreferencePairs, load_pairs_jsonl

    return load_pairs_jsonl(path) if path.endswith(".jsonl") else PreferencePairs.load(path)


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
    p = sub.add_parser("train", help="train a native model (pretrain) or align a base (align)")
    p.add_argument("stage", choices=["pretrain", "align"])
    p.add_argument("--out", required=True, help="folder for step_* checkpoints and log.jsonl")
    p.add_argument("--base", help="align: the base checkpoint folder (also the frozen reference)")
    p.add_argument("--objective", choices=["dpo", "sft", "graded"], default="dpo")
    p.add_argument("--lam", type=float, default=0.5, help="graded: λ in λ·DPO + (1−λ)·CE(chosen)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--pairs", default=None, help="align: .jsonl or .safetensors pairs (default: procedural)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--n-seqs", type=int, default=4000, help="pretrain: corpus rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)
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
