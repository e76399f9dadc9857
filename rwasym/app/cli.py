"""`rwasym demo | probe | train | ...` — the command line only calls the public API."""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _cmd_info(args: argparse.Namespace) -> int:
    import rwasym

    model = rwasym.load(args.model)
    print(model)
    for spec in model.matrices():
        print(
            f"  {spec.name:28s} {spec.side:5s} {spec.n_out:5d} x {spec.n_in:<5d} heads={spec.n_heads} in={spec.hook_in}"
        )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..studies.demo import run_demo

    data = pairs = None
    if args.model or args.tuned or args.tuned_adapter:
        if args.real:
            from ..errors import RwasymError

            raise RwasymError(
                "--real runs the demo on the real pair; --model/--tuned run it on yours: pass one of them"
            )
        if not (args.model and (args.tuned or args.tuned_adapter) and args.data):
            from ..errors import RwasymError

            raise RwasymError(
                "--model, --tuned (or --tuned-adapter) and --data go together: pass all three to run "
                "the demo on your pair"
            )
        from ..models import load_pair

        base, tuned = load_pair(args.model, args.tuned, args.tuned_adapter, "demo")
        data = _read_tokens(args.data, None)
        data = data["input_ids"] if isinstance(data, dict) else data
        if args.pairs:
            pairs = _load_pairs(args.pairs, base, args)
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


def _read_tokens(path: str, model):
    """Token data for a command: a .safetensors file with ``input_ids`` (and optional
    ``attention_mask``), or a plain-text file tokenised by `rwasym.data.load_text`."""
    from ..errors import RwasymError

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        tensors = load_file(path)
        if "input_ids" not in tensors:
            raise RwasymError(f"{path!r} has no 'input_ids' tensor; found {sorted(tensors)}")
        return {k: v for k, v in tensors.items() if k in ("input_ids", "attention_mask")}
    return path  # rwasym.capture reads text files itself


def _cmd_probe(args: argparse.Namespace) -> int:
    import rwasym

    from ..models import load_pair

    base, tuned = load_pair(args.base, args.tuned, args.tuned_adapter, "probe", stream=True)
    from ..analyses.probe import ProbeConfig

    config = config_from_args(args, ProbeConfig)
    result = rwasym.probe(base, tuned, _read_tokens(args.data, base), config, progress=False if args.quiet else None)
    result.to_json(args.out)
    print(result.summary())
    print(f"wrote {len(result.rows)} rows to {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import rwasym

    from ..errors import RwasymError
    from ..studies.language import LanguageConfig, PairConfig, corpus, make_pairs
    from ..train.loops import AlignConfig, TrainConfig, align, pretrain

    progress = not args.quiet
    if args.backend != "builtin" and args.stage != "align":
        raise RwasymError(f"--backend {args.backend} applies to train align only; pretrain uses the built-in loop")
    if args.stage == "pretrain":
        lang = LanguageConfig()
        model = rwasym.load(rwasym.native_config(d_vocab=lang.d_vocab, seed=args.seed))
        tokens = corpus(args.n_seqs, int(model.cfg.n_ctx), seed=args.seed, config=lang)
        cfg = replace(TrainConfig(), steps=args.steps, seed=args.seed)
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
            pairs = _load_pairs(args.pairs, base, args)
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
        )
        if args.lora_rank is not None and args.backend != "trl":
            raise RwasymError(
                "--lora-rank trains a peft LoRA adapter through TRL: add --backend trl (the built-in "
                "loop trains the full weights)"
            )
        if args.backend == "trl":  # TRL's DPOTrainer on the same pairs, settings and output layout
            from ..train.trl_backend import align_trl

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


def _load_pairs(path: str, model: Any, args: argparse.Namespace):
    """Pairs for a command: .safetensors token ids, or TRL-format JSONL (token ids, strings or chat
    messages) tokenized with ``model``'s own tokenizer (`Model.load_pairs`; --chat-template, --max-length)."""
    return model.load_pairs(path, chat_template=args.chat_template, max_length=args.max_length)


def _token_tensor(path: str, model):
    """Token rows (n_seqs, pos) from a .safetensors ``input_ids`` file or a text file."""
    from ..data.pairs import load_text

    data = _read_tokens(path, model)
    if isinstance(data, dict):
        return data["input_ids"]
    return load_text(data, tokenizer=model.tokenizer, d_vocab=model.d_vocab)


def _seeds(text: str) -> list[int]:
    from ..errors import RwasymError

    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RwasymError(f"--seeds must be comma-separated integers such as 0,1,2; got {text!r}") from None


def _cmd_gradients(args: argparse.Namespace) -> int:
    import rwasym

    from .. import report

    model = rwasym.load(args.model)
    if args.objective == "ce":
        data, reference = _token_tensor(args.data, model), None
    else:
        data = _load_pairs(args.data, model, args)
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
    rows = rwasym.anisotropy_report(model, stats, k=args.k)
    config = dict(
        model=args.model,
        objective=args.objective,
        data=args.data,
        k=args.k,
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


def _cmd_experiment(args: argparse.Namespace) -> int:
    from ..studies import experiments

    if args.name == "real":
        from ..studies.real import PARTS, RealConfig, real_experiment, real_report

        parts = [p.strip() for p in (args.parts or ",".join(PARTS)).split(",") if p.strip()]
        if args.report_only:
            res = real_report(args.out)
        else:
            seeds = tuple(_seeds(args.seeds))
            cfg = RealConfig.smoke(seeds=seeds) if args.quick else RealConfig(seeds=seeds)
            res = real_experiment(args.out, cfg, parts=parts, progress=False if args.quiet else None)
        assert res is not None  # report=True (the default) returns the report's results
        minutes = ", ".join(f"{k} {v / 60:.1f} min" for k, v in res["seconds"].items())
        print(f"wrote {args.out}/report.md and results.json ({minutes})")
        return 0
    kwargs: dict[str, Any] = dict(
        seeds=_seeds(args.seeds),
        k=args.k,
        null_samples=args.null_samples,
        quick=args.quick,
        progress=False if args.quiet else None,
    )
    if args.name == "graded":
        try:
            lams = [float(x) for x in args.lams.split(",") if x.strip()]
        except ValueError:
            from ..errors import RwasymError

            raise RwasymError(f"--lams must be comma-separated numbers in [0, 1]; got {args.lams!r}") from None
        res = experiments.graded_experiment(args.out, steps=args.steps, lams=lams, **kwargs)
    elif args.name == "sweep":
        kwargs.pop("k"), kwargs.pop("null_samples")
        res = experiments.sweep_experiment(args.out, match=args.match, **kwargs)
    else:
        res = experiments.trajectory_experiment(args.out, **kwargs)
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {args.out}/report.md, results.json and a figure in {res['seconds']:.0f} s")
    return 0


def _cmd_spectra(args: argparse.Namespace) -> int:
    from ..errors import RwasymError
    from . import spectra as companion

    if args.analysis == "post-training":
        if not args.base:
            raise RwasymError("spectra post-training needs --base and --tuned (or --tuned-adapter)")
        from ..models import load_pair

        base, tuned = load_pair(
            args.base, args.tuned, args.tuned_adapter, "spectra post-training", stream=not (args.data or args.pairs)
        )
        data = _token_tensor(args.data, base) if args.data else None
        pairs = _load_pairs(args.pairs, base, args) if args.pairs else None
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
                _read_tokens(args.data, None),
                args.out,
                max_tokens=args.max_tokens,
                progress=False if args.quiet else None,
            )
        else:
            companion.run_lifecycle(args.checkpoints, args.out, top_k=args.k or 10, matrices=args.matrices)
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {args.out}/report.md, results.json and figures")
    return 0


# -- rwasym intervene: flags derived from SweepConfig ----------------------------------------------
def _csv(kind: type, text: Any, flag: str) -> tuple:
    """``"0.5,1,2"`` → (0.5, 1.0, 2.0); a tuple (a field default) passes through."""
    if isinstance(text, tuple):
        return text
    try:
        return tuple(kind(x.strip()) for x in str(text).split(",") if x.strip())
    except ValueError:
        from ..errors import RwasymError

        raise RwasymError(
            f"{flag} must be comma-separated {'numbers' if kind is float else kind.__name__ + ' values'} "
            f"such as {'0.5,1,2' if kind is float else 'a,b'}; got {text!r}"
        ) from None


def add_config_flags(p: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per field of a config dataclass (``--edits-per-pass`` for ``edits_per_pass``): its
    default, its help (the field's comment) and its parser come from the field itself."""
    import dataclasses

    for f in dataclasses.fields(config_class):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        help = meta.get("help", "")
        if isinstance(f.default, bool):
            if f.default:
                p.add_argument(
                    "--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help="do not " + help
                )
            else:
                p.add_argument(flag, dest=f.name, action="store_true", help=help)
            continue
        default: Any = f.default  # every config field has a plain default
        if "list_of" in meta:  # parsed by config_from_args, so a bad value raises RwasymError
            p.add_argument(
                flag,
                dest=f.name,
                default=f.default,
                help=f"{help}; comma separated (default {','.join(map(str, default))})",
            )
            continue
        kind = meta.get("type", type(f.default))
        p.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=f.default,
            choices=meta.get("choices"),
            help=f"{help} (default {f.default})",
        )


def config_from_args(args: argparse.Namespace, config_class: type) -> Any:
    """The config dataclass of `add_config_flags`' flags (comma-separated lists parsed here)."""
    import dataclasses

    values = {}
    for f in dataclasses.fields(config_class):
        value = getattr(args, f.name)
        kind = f.metadata.get("list_of")
        values[f.name] = value if kind is None else _csv(kind, value, "--" + f.name.replace("_", "-"))
    return config_class(**values)


def _chat_template_flag(p: argparse.ArgumentParser) -> None:
    """The flags of commands that read text pairs: --chat-template and --max-length."""
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="render string prompts of text pairs through the tokenizer's chat template (instruct models)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncate prompt + completion of JSONL pairs to this many tokens, keeping the start "
        "(TRL's DPO truncation); default: none (pairs longer than the context are refused)",
    )


def add_intervene_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``rwasym intervene``: the sweep's data flags, then one flag per `SweepConfig` field."""
    from ..analyses.sweep import SweepConfig

    p = subparsers.add_parser("intervene", help="rank-1 intervention sweep with matched controls")
    p.add_argument("--base", required=True, help="hub name, HF folder or rwasym checkpoint folder")
    p.add_argument("--tuned", default=None, help="tuned checkpoint (hub name or folder)")
    p.add_argument("--tuned-adapter", default=None, help="PEFT LoRA adapter folder on --base (instead of --tuned)")
    p.add_argument("--pairs", required=True, help="held-out pairs: .safetensors (prompt/chosen/rejected) or .jsonl")
    p.add_argument("--text", default=None, help="held-out text (.safetensors with input_ids); default prompt+chosen")
    _chat_template_flag(p)
    add_config_flags(p, SweepConfig)
    p.add_argument("--out", default="sweep.jsonl")
    p.add_argument("--summary", default=None, help="also write the summary (.json or .md)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_intervene, rank_aware=True)  # shards itself; rank 0 writes (main)
    return p


def _cmd_intervene(args: argparse.Namespace) -> int:
    """``rwasym intervene``: run or resume the sweep, print the target-versus-control table."""
    from .. import distributed
    from ..analyses.sweep import SweepConfig, summarize, sweep
    from ..models import load_pair

    config = config_from_args(args, SweepConfig)
    base, tuned = load_pair(args.base, args.tuned, args.tuned_adapter, "intervene")
    pairs = _load_pairs(args.pairs, base, args)
    rows = sweep(base, tuned, pairs, config, out=args.out, text=args.text, progress=False if args.quiet else None)
    if distributed.world()[0] != 0:
        return 0  # rank 0 summarises, writes the summary and prints the table
    summary = summarize(rows, metrics=["gap_margin", "margin", "accuracy", "ce", "kl_base", "kl_tuned", "input_energy"])
    if args.summary:
        Path(args.summary).write_text(summary.to_json() if args.summary.endswith(".json") else summary.to_markdown())
    print(summary.to_markdown(["gap_margin", "kl_base" if config.mode == "transplant" else "kl_tuned", "input_energy"]))
    print(f"{len(rows)} rows in {args.out}")
    return 0


def _cmd_pair(args: argparse.Namespace) -> int:
    """``rwasym pair real``: build (or reuse) the cached real aligned pair and print where it is."""
    import json

    from ..studies.real_pair import real_pair

    _, _, info = real_pair(quick=args.quick, seed=args.seed, progress=not args.quiet)
    print(json.dumps({k: info[k] for k in ("base", "tuned", "folder", "heldout_accuracy", "seconds")}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwasym", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print a model's matrix registry")
    p.add_argument("--model", required=True, help="hub name, HF folder or rwasym checkpoint folder")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("probe", help="relative-subspace-fraction probe of ΔW = tuned − base")
    p.add_argument("--base", required=True, help="hub name, HF folder or rwasym checkpoint folder")
    p.add_argument("--tuned", default=None, help="tuned checkpoint (hub name or folder)")
    p.add_argument(
        "--tuned-adapter",
        default=None,
        help="PEFT LoRA adapter folder on --base: the tuned model is base + adapter (instead of --tuned)",
    )
    p.add_argument("--data", required=True, help="text file, or .safetensors with input_ids")
    from ..analyses.probe import ProbeConfig

    add_config_flags(p, ProbeConfig)  # --k, --null-samples, --matrices, --no-heads, ... from its fields
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", default="probe.json")
    p.set_defaults(func=_cmd_probe)
    from ..objectives import OBJECTIVES as GRADIENT_OBJECTIVES

    add_intervene_parser(sub)
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
    _chat_template_flag(p)
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("gradients", help="gradient anisotropy: C_a versus C_δ and G = Σ δ aᵀ per matrix")
    p.add_argument("--model", required=True, help="hub name, HF folder or rwasym checkpoint folder")
    p.add_argument("--objective", choices=list(GRADIENT_OBJECTIVES), default="ce")
    p.add_argument(
        "--data", required=True, help="ce: text file or .safetensors input_ids; else pairs .jsonl/.safetensors"
    )
    _chat_template_flag(p)
    p.add_argument("--reference", default=None, help="dpo/graded: frozen reference (default: --model itself)")
    p.add_argument("--matrices", default=None, help="glob such as 'blocks.*.attn.W_Q'")
    p.add_argument("--k", type=int, default=8)
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
    p.set_defaults(func=_cmd_gradients)
    p = sub.add_parser(
        "experiment", help="the paper's experiments on the default pair (real: on the real pair), over seeds"
    )
    p.add_argument(
        "name",
        choices=["graded", "trajectory", "sweep", "real"],
        help="real: every experiment on SmolLM2-135M + DPO (rwasym.studies.real; resumable units)",
    )
    p.add_argument(
        "--parts",
        default=None,
        help="real: comma-separated parts (asymmetry, trajectory, mechanism, joint, companion, graded; default all)",
    )
    p.add_argument("--report-only", action="store_true", help="real: rebuild the report from the finished units")
    p.add_argument("--out", required=True, help="folder for results.json, report.md and the figure")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated default-pair seeds (each trained once, cached)")
    p.add_argument("--steps", type=int, default=400, help="graded: alignment steps per λ")
    p.add_argument("--lams", default="0,0.25,0.5,0.75,1", help="graded: comma-separated λ values")
    p.add_argument(
        "--match",
        choices=["norm", "output"],
        default="norm",
        help="sweep: controls matched in Frobenius norm or in mean-square output change",
    )
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--null-samples", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_experiment)
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
    _chat_template_flag(p)
    p.add_argument("--matrices", default=None)
    p.add_argument("--k", type=int, default=None, help="post-training: top-k directions; lifecycle: top-k energy (10)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_spectra)
    p = sub.add_parser(
        "pair", help="build (or reuse) a cached aligned pair: `real` = SmolLM2-135M + DPO on a text task"
    )
    p.add_argument("which", choices=["real"])
    p.add_argument("--quick", action="store_true", help="2 real blocks, 3 steps (a smoke test, not an aligned pair)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_pair)
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
    _chat_template_flag(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)
    return parser


# Commands whose work splits across torchrun ranks (statistics sharded by batch, then all-reduced);
# under torchrun any other command would only repeat the same work in every process.
_DATA_PARALLEL = ("probe", "gradients", "intervene")


def _run_on_this_rank(args: argparse.Namespace) -> int:
    """Run the command; under torchrun, ranks > 0 compute their shard but write and print nothing."""
    import contextlib
    import os
    import tempfile

    from .. import distributed
    from ..errors import RwasymError

    rank, size = distributed.world()
    if size == 1 or getattr(args, "rank_aware", False):  # rank-aware commands write from rank 0 themselves
        return args.func(args)
    if args.command not in _DATA_PARALLEL:
        raise RwasymError(
            f"`rwasym {args.command}` does not split its work across processes, so each of the "
            f"{size} torchrun ranks would repeat it; run it as one process (python -m rwasym "
            f"{args.command} ...). Commands that run data-parallel: {', '.join(_DATA_PARALLEL)}"
        )
    if rank == 0:
        return args.func(args)
    with (
        tempfile.TemporaryDirectory(prefix=f"rwasym-rank{rank}-") as scratch,
        open(os.devnull, "w") as null,
        contextlib.redirect_stdout(null),
    ):
        args.out = str(Path(scratch) / Path(args.out).name)  # rank 0 writes the real file
        return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .. import distributed

        started = distributed.init_from_env()  # torchrun: join the process group (no-op otherwise)
        try:
            return _run_on_this_rank(args)
        finally:
            if started:
                distributed.destroy()
    except Exception as err:  # RwasymError: print the message, not a traceback
        from ..errors import RwasymError

        if isinstance(err, RwasymError):
            print(f"rwasym: error: {err}", file=sys.stderr)
            return 2
        raise
