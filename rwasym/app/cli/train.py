"""`rwasym train`: pretrain a native model or align a base (built-in loop or TRL)."""

import argparse
from typing import Any

from .common import chat_template_flag, load_pairs_for


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a native model (pretrain) or align a base (align)")
    p.add_argument("stage", choices=["pretrain", "align"])
    p.add_argument("--out", required=True, help="folder for step_* checkpoints and log.jsonl")
    p.add_argument("--base", help="align: the base checkpoint folder (also the frozen reference)")
    p.add_argument("--objective", choices=["dpo", "sft", "graded"], default="dpo")
    p.add_argument("--lam", type=float, default=0.5, help="graded: λ in λ·DPO + (1−λ)·CE(chosen)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument(
        "--pairs",
        default=None,
        help="align: .jsonl (TRL format: text, chat messages or token ids) or .safetensors pairs (default: procedural)",
    )
    chat_template_flag(p)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: 1e-3 for native substrate models; 5e-6 for Hugging Face / GGUF "
        "bases, a usual full-fine-tuning DPO rate for 100M–1B models; with --lora-rank 5e-5)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="align: pairs per optimizer step (default 64 native, 8 Hugging Face / GGUF)",
    )
    p.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="align: micro-batches each step's batch is split into (same update, less memory)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="align --backend trl: train a peft LoRA adapter of this rank (alpha = 2·rank, all linears) "
        "instead of the full weights; each step folder is the adapter",
    )
    p.add_argument("--n-seqs", type=int, default=4000, help="pretrain: corpus rows")
    p.add_argument(
        "--backend",
        choices=["builtin", "trl"],
        default="builtin",
        help="align: rwasym's own loop, or TRL's DPOTrainer (same losses, settings and step_* layout; "
        "--base must be a Hugging Face folder or a GPT-2-shaped native checkpoint)",
    )
    p.add_argument(
        "--optimizer",
        choices=["adamw", "sgd"],
        default="adamw",
        help="built-in loop: AdamW (default) or plain SGD (no momentum), whose update is its gradients' sum",
    )
    p.add_argument(
        "--track-updates",
        action="store_true",
        help="built-in loop: log cos(ΔW_t, −Σ η g) per matrix kind and save U_t = −Σ η g beside each checkpoint",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import rwasym

    from ...errors import RwasymError
    from ...studies.language import LanguageConfig, PairConfig, corpus, make_pairs
    from ...train.loops import AlignConfig, TrainConfig, align, pretrain

    progress = not args.quiet
    if args.backend != "builtin" and args.stage != "align":
        raise RwasymError(f"--backend {args.backend} applies to train align only; pretrain uses the built-in loop")
    if args.stage == "pretrain":
        lang = LanguageConfig()
        model = rwasym.load(rwasym.native_config(d_vocab=lang.d_vocab, seed=args.seed))
        tokens = corpus(args.n_seqs, int(model.cfg.n_ctx), seed=args.seed, config=lang)
        cfg = replace(
            TrainConfig(), steps=args.steps, seed=args.seed, optimizer=args.optimizer, track_updates=args.track_updates
        )
        result = pretrain(model, tokens, cfg, out=args.out, progress=progress)
    else:
        if not args.base:
            raise RwasymError("train align needs --base: a checkpoint folder (rwasym or Hugging Face)")
        model = reference = None
        if args.backend == "builtin":
            model, reference = rwasym.load(args.base), rwasym.load(args.base)
        base = model or rwasym.load(args.base)  # its tokenizer reads text pairs; its kind sets the defaults
        if args.pairs is None:
            pairs = make_pairs(replace(PairConfig(), seed=args.seed, n_per_rule=500))
        else:
            pairs = load_pairs_for(args.pairs, base, args)
        native = getattr(base.cfg, "architecture", None) in (None, "TransformerLensNative")
        lr = args.lr if args.lr is not None else (1e-3 if native else 5e-5 if args.lora_rank else 5e-6)
        batch = args.batch_size if args.batch_size is not None else (64 if native else 8)
        cfg = replace(
            AlignConfig(),
            objective=args.objective,
            lam=args.lam,
            beta=args.beta,
            steps=args.steps,
            seed=args.seed,
            lr=lr,
            batch_size=batch,
            grad_accum=args.grad_accum,
            optimizer=args.optimizer,
            track_updates=args.track_updates,
        )
        if args.lora_rank is not None and args.backend != "trl":
            raise RwasymError(
                "--lora-rank trains a peft LoRA adapter through TRL: add --backend trl (the built-in "
                "loop trains the full weights)"
            )
        if args.backend == "trl":  # TRL's DPOTrainer on the same pairs, settings and output layout
            from ...train.trl_backend import align_trl

            lora = (
                None
                if args.lora_rank is None
                else dict(
                    r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear", lora_dropout=0.0
                )
            )
            result = align_trl(args.base, pairs, cfg, args.out, lora=lora, progress=progress)
        else:
            assert model is not None  # the built-in backend loaded it above
            result = align(model, reference, pairs, cfg, out=args.out, progress=progress)
    print(
        f"{args.stage}: final loss {result.final_loss:.4f} in {result.seconds:.1f} s; "
        f"{len(result.checkpoints)} checkpoints in {args.out}"
    )
    return 0
