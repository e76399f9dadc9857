"""`rwasym gradients`: gradient anisotropy: C_a versus C_δ and G = Σ δ aᵀ per matrix."""

import argparse
from typing import Any

from .common import chat_template_flag, load_pairs_for, token_tensor


def add_gradients_parser(sub: Any) -> argparse.ArgumentParser:
    from ...objectives import OBJECTIVES as GRADIENT_OBJECTIVES

    p = sub.add_parser("gradients", help="gradient anisotropy: C_a versus C_δ and G = Σ δ aᵀ per matrix")
    p.add_argument("--model", required=True, help="hub name, HF folder or rwasym checkpoint folder")
    p.add_argument("--objective", choices=list(GRADIENT_OBJECTIVES), default="ce")
    p.add_argument(
        "--data", required=True, help="ce: text file or .safetensors input_ids; else pairs .jsonl/.safetensors"
    )
    chat_template_flag(p)
    p.add_argument("--reference", default=None, help="dpo/graded: frozen reference (default: --model itself)")
    p.add_argument("--matrices", default=None, help="glob such as 'blocks.*.attn.W_Q'")
    p.add_argument("--k", type=int, default=8)
    p.add_argument(
        "--uncentered",
        action="store_true",
        help="spikiness and PCA basis of the uncentred Σ a aᵀ, Σ δ δᵀ (default: centred, as the probe); "
        "rows carry both",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=4, help="number of batches (backward passes)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a .safetensors file: the sums are saved there every "
        "--checkpoint-every batches, and a rerun after a crash resumes from it",
    )
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default="grads.json")
    p.set_defaults(func=run_gradients)
    return p


def run_gradients(args: argparse.Namespace) -> int:
    import rwasym

    from ... import report

    model = rwasym.load(args.model)
    if args.objective == "ce":
        data, reference = token_tensor(args.data, model), None
    else:
        data = load_pairs_for(args.data, model, args)
        reference = rwasym.load(args.reference or args.model) if args.objective != "sft" else None
    loss_fn, batches = rwasym.objective_batches(
        args.objective,
        data,
        reference=reference,
        batch_size=args.batch_size,
        n_batches=args.batches,
        beta=args.beta,
        lam=args.lam,
    )
    key = dict(objective=args.objective, beta=args.beta, lam=args.lam, reference=args.reference)
    stats = rwasym.capture_gradients(
        model,
        loss_fn,
        batches,
        matrices=args.matrices,
        progress=False if args.quiet else None,
        checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
        checkpoint_key=key,
    )
    rows = rwasym.anisotropy_report(model, stats, k=args.k, center=not args.uncentered)
    config = dict(
        model=args.model,
        objective=args.objective,
        data=args.data,
        k=args.k,
        center=not args.uncentered,
        batch_size=args.batch_size,
        n_batches=stats.n_batches,
        beta=args.beta,
        lam=args.lam,
        version=rwasym.__version__,
    )
    report.write_json({"config": config, "rows": rows}, args.out)
    print(
        report.markdown_table(
            rows,
            [
                "matrix",
                "a_top1_share",
                "delta_top1_share",
                "a_effective_rank",
                "delta_effective_rank",
                "G_input_pca_relative",
                "G_prediction_relative",
            ],
        )
    )
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0
