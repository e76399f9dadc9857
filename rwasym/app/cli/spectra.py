"""`rwasym spectra`: the companion spectral analyses: post-training SVD, geometry, lifecycle."""

import argparse
from pathlib import Path
from typing import Any

from .common import chat_template_flag, load_pairs_for, read_tokens, token_tensor


def add_spectra_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("spectra", help="companion spectral analyses: post-training SVD, geometry, lifecycle")
    p.add_argument("analysis", choices=["post-training", "geometry", "lifecycle"])
    p.add_argument("--out", required=True, help="folder for results.json, report.md and figures")
    p.add_argument("--base", help="post-training: base model")
    p.add_argument("--tuned", help="post-training: tuned model")
    p.add_argument(
        "--tuned-adapter", default=None, help="post-training: PEFT LoRA adapter on --base (instead of --tuned)"
    )
    p.add_argument(
        "--checkpoints", nargs="+", help="geometry/lifecycle: a folder of step_* checkpoints, or several models"
    )
    p.add_argument("--data", default=None, help="geometry (required) / post-training (CE of rebuilds): tokens")
    p.add_argument("--pairs", default=None, help="post-training: pairs for the preference accuracy of rebuilds")
    chat_template_flag(p)
    p.add_argument("--matrices", default=None)
    p.add_argument("--k", type=int, default=None, help="post-training: top-k directions; lifecycle: top-k energy (10)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_spectra)
    return p


def run_spectra(args: argparse.Namespace) -> int:
    from ...errors import RwasymError
    from .. import spectra as companion

    if args.analysis == "post-training":
        if not args.base:
            raise RwasymError("spectra post-training needs --base and --tuned (or --tuned-adapter)")
        from ...models import load_pair

        base, tuned = load_pair(
            args.base, args.tuned, args.tuned_adapter, "spectra post-training", stream=not (args.data or args.pairs)
        )
        data = token_tensor(args.data, base) if args.data else None
        pairs = load_pairs_for(args.pairs, base, args) if args.pairs else None
        companion.run_post_training(
            base, tuned, args.out, k=args.k, matrices=args.matrices, data=data, pairs=pairs, seed=args.seed
        )
    else:
        if not args.checkpoints:
            raise RwasymError(
                f"spectra {args.analysis} needs --checkpoints (a training folder with step_* "
                "checkpoints, or several model folders / names)"
            )
        if args.analysis == "geometry":
            if not args.data:
                raise RwasymError("spectra geometry needs --data (text file or .safetensors with input_ids)")
            companion.run_geometry(
                args.checkpoints,
                read_tokens(args.data, None),
                args.out,
                max_tokens=args.max_tokens,
                progress=False if args.quiet else None,
            )
        else:
            companion.run_lifecycle(args.checkpoints, args.out, top_k=args.k or 10, matrices=args.matrices)
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {args.out}/report.md, results.json and figures")
    return 0
