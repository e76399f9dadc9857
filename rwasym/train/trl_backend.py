"""TRL backend for alignment: `align_trl` runs TRL's ``DPOTrainer`` with rwasym's settings and output.

The losses coincide exactly (checked against TRL's own code in ``tests/test_trl.py``): TRL 1.16
scores a pair as Σ log π over the completion tokens (prompt unscored, summed, not averaged) and

- objective ``dpo``    ↔ ``loss_type=["sigmoid"]``: mean −log σ(β[(π_c − ref_c) − (π_r − ref_r)]);
- objective ``sft``    ↔ ``loss_type=["sft"]``: −Σ log π(chosen tokens) / #chosen tokens of the batch;
- objective ``graded`` ↔ ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[λ, 1 − λ]``:
  TRL's loss is Σ_k w_k · L_k, so this is λ·L_DPO + (1 − λ)·L_CE(chosen) = L_λ exactly. (TRL 1.16
  has no ``rpo_alpha`` option; this weighted multi-loss is how it mixes in the SFT term.)

The other `AlignConfig` settings carry over as well: the batches are rwasym's own seeded batches
(`rwasym.train.loops._batches`, fed in order with ``train_sampling_strategy="sequential"``), the optimizer
is AdamW with decay on ≥ 2-D parameters only, the schedule is `rwasym.train.loops.lr_at` (a ``LambdaLR``),
gradients are clipped at ``grad_clip``, dropout is off. The reference log-probs are computed before
training (``precompute_ref_log_probs``, one per training row), as the built-in loop scores the
reference up front (objective ``sft`` too: TRL logs reward metrics from them); with LoRA the
reference is the base with the adapter disabled. The model runs where ``Trainer`` puts it (a GPU
when one is visible); checkpoints are written from there.

Models: a Hugging Face folder is trained as is. A native rwasym checkpoint (a GPT-2-shaped model:
LayerNorm, plain MLP, learned positions, no GQA) is converted exactly into a ``GPT2LMHeadModel``
(`native_to_gpt2`) and each checkpoint is converted back (`gpt2_to_native_state`), so the trajectory
is native checkpoints, as the built-in backend writes them. Token ids are handed to TRL directly
(pre-tokenized ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``): no text tokenizer is involved and
TRL appends no EOS token.

Output (``out``), the layout of `rwasym.train.loops.align`: ``step_{N:06d}/`` at step 0, every
``checkpoint_every`` steps and the last step (meta: stage, step, loss, config), ``log.jsonl`` (step,
loss, lr, grad_norm, margin, reward_acc; graded also dpo, ce, recovered exactly from TRL's per-step
metrics, except dpo at λ = 0, NaN since TRL's loss then holds no DPO term) and, in addition,
``trl.json`` (TRL version and the loss settings used). With ``lora`` and a Hugging Face base each step folder is peft's
adapter folder (``adapter_config.json``, ``adapter_model.safetensors``, plus ``rwasym-train.json``):
load it with ``rwasym.load(base, adapter=step_folder)`` or ``peft.PeftModel.from_pretrained``. With
``lora`` and a native base the step folders hold the merged native weights (``rwasym.load(step)``);
its ``target_modules`` then name the GPT-2 modules of the conversion: ``c_attn`` (W_Q, W_K, W_V),
``attn.c_proj`` (W_O), ``c_fc`` (W_in), ``mlp.c_proj`` (W_out).
"""

import contextlib
import copy
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.pairs import PreferencePairs
from ..errors import RwasymError
from ..models import Model, load_native, save_model
from ..models.gpt2 import gpt2_to_native_state, native_to_gpt2
from ..models.host import clean_key
from ..objectives import ALIGN_OBJECTIVES
from .loops import AlignConfig, TrainResult, _bar, _batches, _write_log, lr_at

__all__ = ["align_trl", "gpt2_to_native_state", "native_to_gpt2", "pairs_to_examples", "trl_loss_settings"]

PathLike = str | os.PathLike


def trl_loss_settings(config: AlignConfig) -> dict:
    """The DPOConfig loss fields that make TRL's loss equal to ``config``'s objective (see module doc)."""
    if config.objective not in ALIGN_OBJECTIVES:
        raise RwasymError(f"objective must be one of {ALIGN_OBJECTIVES}; got {config.objective!r}.")
    if not 0.0 <= config.lam <= 1.0 or config.beta <= 0:
        raise RwasymError(f"the objectives need 0 <= lam <= 1 and beta > 0; got lam={config.lam}, beta={config.beta}.")
    if config.objective == "dpo":
        return {"loss_type": ["sigmoid"], "loss_weights": [1.0], "beta": config.beta}
    if config.objective == "sft":
        return {"loss_type": ["sft"], "loss_weights": [1.0], "beta": config.beta}
    return {"loss_type": ["sigmoid", "sft"], "loss_weights": [config.lam, 1.0 - config.lam], "beta": config.beta}


def pairs_to_examples(pairs: PreferencePairs) -> list[dict[str, list[int]]]:
    """One ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` dict of token-id lists per pair (padding
    removed): the pre-tokenized input of TRL's ``DataCollatorForPreference``."""
    if not isinstance(pairs, PreferencePairs) or len(pairs) == 0:
        raise RwasymError(f"pairs must be a non-empty rwasym.data.PreferencePairs; got {type(pairs).__name__}.")
    parts = {}
    for part in ("prompt", "chosen", "rejected"):
        x, mask = getattr(pairs, part), getattr(pairs, f"{part}_mask")
        lengths = mask.sum(-1).tolist() if mask is not None else [x.shape[1]] * len(pairs)
        parts[part] = [row[:n] for row, n in zip(x.tolist(), lengths)]
    return [
        {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
        for p, c, r in zip(parts["prompt"], parts["chosen"], parts["rejected"])
    ]


@torch.no_grad()
def _write_native(shell: Model, state: dict[str, Tensor]) -> None:
    for key, param in shell.bridge.original_model.state_dict().items():
        clean = clean_key(key)
        if clean in state:
            param.copy_(state[clean])


def _id_tokenizer(vocab_size: int) -> Any:
    """A placeholder Hugging Face tokenizer (token i ↔ "<i>"): TRL requires one for the pad id, but
    rwasym hands it token ids, so it never tokenizes text."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<0>", pad_token="<0>", eos_token="<0>")


# ------------------------------------------------------------------------------------ trainer
def _trainer_class():
    from trl import DPOTrainer  # pyright: ignore[reportPrivateImportUsage]  (public; trl's lazy __init__ hides it)

    class RwasymDPOTrainer(DPOTrainer):
        """DPOTrainer fed pre-tokenized pairs, with rwasym's optimizer and lr schedule."""

        rw_config: AlignConfig
        rw_chosen_tokens = 0

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids: no EOS appended, no re-tokenizing

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                module = model or self.model
                assert module is not None  # Trainer.__init__ has set self.model
                params = [p for p in module.parameters() if p.requires_grad]
                groups = [
                    {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.rw_config.weight_decay},
                    {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
                ]
                beta1, beta2 = self.rw_config.betas
                self.optimizer = torch.optim.AdamW(groups, lr=self.rw_config.lr, betas=(beta1, beta2))
            return self.optimizer

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                cfg = self.rw_config
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lambda step: lr_at(step, cfg) / cfg.lr
                )
            return self.lr_scheduler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.rw_chosen_tokens = int(inputs["completion_mask"].chunk(2)[0][:, 1:].sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return RwasymDPOTrainer


def _callback_class():
    from transformers import TrainerCallback

    class RwasymLog(TrainerCallback):
        """Writes rwasym's log.jsonl records and step_* checkpoints from TRL's per-step logs."""

        def __init__(self, run: "_Run"):
            self.run = run

        def on_train_begin(self, args, state, control, **kwargs):
            self.run.checkpoint(0, float("nan"))

        def on_step_end(self, args, state, control, **kwargs):
            self.run.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and "rewards/margins" in logs:
                self.run.record(state.global_step, logs)

    return RwasymLog


class _Run:
    """State of one `align_trl` call: where and how to save, the log file, the result."""

    def __init__(self, config: AlignConfig, out: Path, saver: Any, fh: Any, bar: Any):
        self.config, self.out, self.saver, self.fh, self.bar = config, out, saver, fh, bar
        self.result = TrainResult()
        self.trainer: Any = None

    def checkpoint(self, step: int, loss: float) -> None:
        every = self.config.checkpoint_every
        if step == 0 or step == self.config.steps or (every > 0 and step % every == 0):
            meta = {"stage": "align", "step": step, "loss": loss, "config": asdict(self.config)}
            folder = self.out / f"step_{step:06d}"
            self.saver(self.trainer.accelerator.unwrap_model(self.trainer.model), folder, meta)
            self.result.checkpoints.append(folder)

    def record(self, step: int, logs: dict) -> None:
        cfg = self.config
        loss = float(logs["loss"])
        self.result.final_loss = loss
        if (step - 1) % cfg.log_every == 0 or step == cfg.steps:
            record = {
                "step": step,
                "loss": loss,
                "lr": float(logs["learning_rate"]),
                "grad_norm": float(logs.get("grad_norm", float("nan"))),
            }
            if cfg.objective != "sft":
                record.update(
                    margin=float(logs["rewards/margins"]) / cfg.beta, reward_acc=float(logs["rewards/accuracies"])
                )
            if cfg.objective == "graded":  # TRL logs the batch mean of Σ log π(chosen): recover both terms exactly
                n_pairs = self.trainer.args.per_device_train_batch_size
                ce = -float(logs["logps/chosen"]) * n_pairs / max(1, self.trainer.rw_chosen_tokens)
                dpo = (loss - (1 - cfg.lam) * ce) / cfg.lam if cfg.lam > 0 else float("nan")
                record.update(dpo=dpo, ce=ce)
            self.result.history.append(record)
            _write_log(self.fh, record)
        self.checkpoint(step, loss)
        self.bar.set_postfix(loss=f"{loss:.3f}")


def _hf_saver(tokenizer: Any):
    def save(model: Any, folder: Path, meta: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if hasattr(model, "peft_config"):
            model.save_pretrained(folder, selected_adapters=["default"])  # adapter_config.json, adapter_model.*
        else:
            model.save_pretrained(folder)
            if tokenizer is not None:  # the base folder's own tokenizer, as rwasym.train.loops.save_checkpoint keeps it
                tokenizer.save_pretrained(folder)
        (folder / "rwasym-train.json").write_text(json.dumps(meta, indent=1, sort_keys=True))

    return save


def _native_saver(shell: Model):
    def save(model: Any, folder: Path, meta: dict) -> None:
        if hasattr(model, "peft_config"):  # merge a copy: the trained model keeps its separate adapter
            model = copy.deepcopy(model).merge_and_unload()
        _write_native(shell, gpt2_to_native_state(model, int(shell.cfg.n_layers)))
        save_model(shell, folder, meta=meta)

    return save


@contextlib.contextmanager
def _quiet_libraries():
    """Silence the progress bars of transformers (loading weights), datasets (map) and TRL (reference
    log-probs, via ``TQDM_DISABLE``) for the call; rwasym shows its own bar."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_bars, ds_bars = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    env = os.environ.get("TQDM_DISABLE")
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if hf_bars:
            hf_logging.enable_progress_bar()
        if ds_bars:
            datasets.enable_progress_bars()
        if env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = env


def _load_base(base_folder: PathLike) -> tuple[Any, Any, Any, Any, int]:
    """(policy, reference, tokenizer, saver, n_ctx) for an HF folder or a native rwasym checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models.loading import META_FILE

    path = Path(base_folder).expanduser()
    if (path / META_FILE).exists():
        shell = load_native(path)
        return (
            native_to_gpt2(shell).train(),
            native_to_gpt2(shell),
            _id_tokenizer(shell.d_vocab),
            _native_saver(shell),
            int(shell.cfg.n_ctx),
        )
    if not (path / "config.json").exists():
        raise RwasymError(
            f"the TRL backend needs --base to be a Hugging Face model folder (config.json) or an "
            f"rwasym checkpoint folder ({META_FILE}); {str(base_folder)!r} is neither."
        )
    policy = AutoModelForCausalLM.from_pretrained(str(path.resolve()), dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(str(path.resolve()), dtype=torch.float32).eval()
    try:
        own = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError):
        own = None
    usable = own is not None and (own.pad_token is not None or own.eos_token is not None)
    tokenizer = own if usable else _id_tokenizer(int(policy.config.get_text_config().vocab_size))
    text_cfg = policy.config.get_text_config()
    n_ctx = int(getattr(text_cfg, "max_position_embeddings", 0) or getattr(text_cfg, "n_positions", 0) or 0)
    return policy, reference, tokenizer, _hf_saver(own), n_ctx


def _config_fields() -> set[str]:
    import dataclasses

    from trl import DPOConfig  # pyright: ignore[reportPrivateImportUsage]  (public; trl's lazy __init__ hides it)

    return {f.name for f in dataclasses.fields(DPOConfig)}


def _check_ids(examples: list[dict], vocab: int, n_ctx: int) -> None:
    longest = max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples)
    top = max(max(max(e[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")) for e in examples)
    if top >= vocab:
        raise RwasymError(
            f"pairs hold token ids up to {top} but the model's vocabulary is {vocab}; ids must lie in [0, {vocab})."
        )
    if n_ctx and longest > n_ctx:
        raise RwasymError(
            f"pairs have up to {longest} tokens (prompt + continuation) but the model's context is "
            f"{n_ctx}; use shorter prompts."
        )


def align_trl(
    base_folder: PathLike,
    pairs: PreferencePairs,
    config: AlignConfig,
    out: PathLike,
    *,
    lora: Any = None,
    progress: bool = True,
) -> TrainResult:
    """Align the model in ``base_folder`` on ``pairs`` with TRL's ``DPOTrainer`` (module doc: the loss
    mapping, what carries over, the output layout); the base is also the frozen reference.

    ``lora``: None (full fine-tuning), a ``peft.LoraConfig`` or a dict of its keyword arguments.
    Returns a `rwasym.train.loops.TrainResult` like `rwasym.train.loops.align`.
    """
    if config.optimizer != "adamw" or config.track_updates:
        raise RwasymError(
            "the TRL backend trains with AdamW and does not track updates; use the built-in backend "
            "(rwasym.train.align) for optimizer='sgd' or track_updates=True"
        )
    try:
        import datasets  # noqa: F401
        import transformers
        import trl
        from packaging.version import Version
    except ImportError as err:
        raise RwasymError(
            f"the TRL backend needs trl, datasets and transformers ({err}); install rwasym[hf] or use "
            "the built-in backend."
        ) from None
    if Version(trl.__version__) < Version("1.16") or "train_sampling_strategy" not in _config_fields():
        raise RwasymError(
            f"the TRL backend is written against trl >= 1.16 and a transformers whose TrainingArguments "
            f"has train_sampling_strategy (tested: trl 1.16.0, transformers 5.24.0); found trl "
            f"{trl.__version__}, transformers {transformers.__version__}. Upgrade them, or use the "
            "built-in backend."
        )
    settings = trl_loss_settings(config)
    if config.steps < 1 or config.batch_size < 1 or config.grad_accum < 1 or config.batch_size % config.grad_accum:
        raise RwasymError(
            f"steps and batch_size must be >= 1 and grad_accum must divide batch_size; got "
            f"steps={config.steps}, batch_size={config.batch_size}, grad_accum={config.grad_accum}."
        )
    examples = pairs_to_examples(pairs)
    peft_config = None
    if lora is not None:
        from peft import LoraConfig

        peft_config = lora if isinstance(lora, LoraConfig) else LoraConfig(task_type="CAUSAL_LM", **dict(lora))
    t0 = time.perf_counter()
    with _quiet_libraries():
        return _train(base_folder, examples, config, Path(out), settings, peft_config, progress, t0)


def _train(
    base_folder: PathLike,
    examples: list[dict],
    config: AlignConfig,
    out: Path,
    settings: dict,
    peft_config: Any,
    progress: bool,
    t0: float,
) -> TrainResult:
    import trl
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    policy, reference, tokenizer, saver, n_ctx = _load_base(base_folder)
    _check_ids(examples, int(policy.config.get_text_config().vocab_size), n_ctx)
    if peft_config is not None:
        reference = None  # TRL's reference for an adapter: the same model with the adapter disabled
    order = torch.cat(list(_batches(len(examples), config.batch_size, config.steps, config.seed))).tolist()
    dataset = Dataset.from_list([examples[i] for i in order])  # rwasym's batches, consumed in order
    out.mkdir(parents=True, exist_ok=True)
    (out / "trl.json").write_text(
        json.dumps(
            {"trl": trl.__version__, **settings, "lora": None if peft_config is None else peft_config.to_dict()},
            indent=1,
            sort_keys=True,
            default=str,
        )
    )
    no_checkpointing = {
        (
            "activation_checkpointing" if "activation_checkpointing" in _config_fields() else "gradient_checkpointing"
        ): False
    }  # the name changed in transformers 5
    with (
        tempfile.TemporaryDirectory(prefix="rwasym-trl-") as tmp,
        open(out / "log.jsonl", "w") as fh,
        _bar(config.steps, progress, f"align-trl[{config.objective}]") as bar,
    ):
        args = trl.DPOConfig(  # pyright: ignore[reportPrivateImportUsage]  (public; trl's lazy __init__ hides it)
            output_dir=tmp,
            max_steps=config.steps,
            per_device_train_batch_size=max(1, min(config.batch_size, len(examples)) // config.grad_accum),
            gradient_accumulation_steps=config.grad_accum,
            learning_rate=config.lr,
            max_grad_norm=config.grad_clip,
            seed=config.seed,
            data_seed=config.seed,
            train_sampling_strategy="sequential",
            precompute_ref_log_probs=True,
            max_length=None,
            precompute_ref_batch_size=256,
            bf16=False,
            fp16=False,
            report_to=[],
            save_strategy="no",
            logging_strategy="steps",
            logging_steps=1,
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            log_level="error",
            **no_checkpointing,
            **settings,
        )
        run = _Run(config, out, saver, fh, bar)
        trainer = _trainer_class()(
            model=policy,
            ref_model=reference,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[_callback_class()(run)],
        )
        trainer.rw_config, run.trainer = config, trainer
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        trainer.train()
    run.result.seconds = time.perf_counter() - t0
    return run.result
