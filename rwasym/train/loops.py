"""Training loops over any `rwasym.Model`: CE pretraining, DPO / SFT / graded alignment.

Plain torch: logits come from ``model.bridge(tokens)`` (batch, pos, d_vocab) and the optimised
parameters are ``model.bridge.parameters()``, so the same loops train native bridges and Hugging
Face models loaded with `rwasym.load`. Runs are deterministic from ``config.seed`` on one machine:
`torch.manual_seed` at the start and a seeded `torch.Generator` for the data order. The model's
current train/eval mode is kept; `rwasym.load` returns eval mode, so dropout stays off (as TRL's
``disable_dropout``), which also keeps runs deterministic.

The losses and metrics themselves (DPO, SFT, graded, CE; preference accuracy, KL, held-out CE)
live in `rwasym.objectives`.

Checkpoints go to ``out/step_{N:06d}/`` (`rwasym.save_model` for native models, ``save_pretrained``
for Hugging Face ones) and the log to ``out/log.jsonl`` (one JSON object per logged step).
"""

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm import tqdm

from ..data.pairs import PreferencePairs
from ..errors import RwasymError
from ..models import Model, save_model
from ..objectives import all_scores, check_objective, check_tokens, next_token_ce, objective_value, pack_pairs

PathLike = str | os.PathLike

__all__ = [
    "AlignConfig",
    "TrainConfig",
    "TrainResult",
    "UpdateTracker",
    "read_update_sum",
    "align",
    "log_spaced_steps",
    "lr_at",
    "pretrain",
    "save_checkpoint",
    "trainable",
]


@dataclass(frozen=True)
class TrainConfig:
    """CE pretraining hyper-parameters (AdamW, linear warmup then cosine decay)."""

    steps: int = 1500  # optimizer steps
    batch_size: int = 32  # sequences per step
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 0.1  # AdamW decay, applied to matrices (≥ 2-D parameters) only
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moments (nanoGPT values)
    warmup_steps: int = 100  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio at the last step
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    n_checkpoints: int = 8  # log-spaced checkpoints between step 1 and the end (+ step 0 and final)
    log_every: int = 10  # steps between log.jsonl records
    seed: int = 0  # seeds torch and the data order
    optimizer: str = "adamw"  # adamw | sgd (plain SGD: no momentum; weight decay as above)
    track_updates: bool = False  # log cos(ΔW_t, −Σ_s η_s g_s) per matrix kind (`UpdateTracker`)
    train: str = "all"  # all | matrices (only the registry's matrices; embeddings, norms, biases frozen)
    pad_id: int | None = None  # targets equal to it are left out of the loss (right-padded rows)
    shuffle_targets: bool = False  # permute each batch's (non-pad) targets: same inputs, structureless δ


@dataclass(frozen=True)
class AlignConfig:
    """Alignment hyper-parameters: objective "dpo" | "sft" | "graded" (L_λ, λ = ``lam``)."""

    objective: str = "dpo"  # which loss: dpo | sft | graded (`rwasym.objectives`)
    beta: float = 0.1  # DPO temperature β
    lam: float = 0.5  # λ of the graded objective (ignored by dpo / sft)
    steps: int = 300  # optimizer steps
    batch_size: int = 64  # pairs per optimizer step
    grad_accum: int = 1  # micro-batches batch_size is split into (same update, 1/grad_accum of the memory)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW decay on matrices (0: the change stays the objective's own)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moments
    warmup_steps: int = 20  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    checkpoint_every: int = 50  # trajectory checkpoint period in steps (0 = step 0 and final only)
    log_every: int = 10  # steps between log.jsonl records
    seed: int = 0  # seeds torch and the data order
    optimizer: str = "adamw"  # adamw | sgd (plain SGD: no momentum; AdamW's elementwise normalisation reshapes δ aᵀ)
    track_updates: bool = False  # log cos(ΔW_t, −Σ_s η_s g_s) per matrix kind (`UpdateTracker`)
    train: str = "all"  # all | matrices (only the registry's matrices; embeddings, norms, biases frozen)


@dataclass
class TrainResult:
    """What a training loop did: logged records, checkpoint folders, wall time, last loss."""

    history: list[dict] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    final_loss: float = float("nan")


# Fields added after 0.1 with the value every earlier run had: left out of a spec's hash at that value, so the
# cache keys of pairs built before them (and the results that name those folders) stay valid.
_LATER_DEFAULTS = {
    "optimizer": "adamw",
    "track_updates": False,
    "train": "all",
    "pad_id": None,
    "shuffle_targets": False,
}


def hash_record(config: Any) -> dict:
    """``asdict(config)`` without the post-0.1 fields at their default (`_LATER_DEFAULTS`): what a cache key hashes."""
    record = dict(asdict(config)) if not isinstance(config, dict) else dict(config)
    for key, default in _LATER_DEFAULTS.items():
        if key in record and record[key] == default:
            del record[key]
    return record


# ------------------------------------------------------------------------------------ helpers
def _bar(total: int, progress: bool, desc: str):
    return tqdm(total=total, desc=desc, disable=not (progress and sys.stderr.isatty()), leave=False)


@contextmanager
def trainable(model: Model, train: str = "all") -> Iterator[None]:
    """Inside: with ``train="matrices"`` only the host weights of the registry's matrices require grad
    (embeddings — and a tied unembedding —, norm scales, biases are frozen, so the prediction subspace stays
    the base's); the flags are restored on exit. ``"all"`` changes nothing."""
    if train not in ("all", "matrices"):
        raise RwasymError(f"train must be 'all' or 'matrices'; got {train!r}")
    if train == "all":
        yield
        return
    keep = {id(model.host_parameter(spec.name)) for spec in model.matrices()}  # an expert's: its fused 3-D parameter
    before = [(p, p.requires_grad) for p in model.bridge.parameters()]
    try:
        for p, _ in before:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


def _optimizer(model: Model, cfg: Any) -> torch.optim.Optimizer:
    params = [p for p in model.bridge.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":  # p ← p − η (g + λ p): without momentum the same as decoupled decay
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.0)
    if cfg.optimizer != "adamw":
        raise RwasymError(f"optimizer must be 'adamw' or 'sgd'; got {cfg.optimizer!r}")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


UPDATE_SUM_FILE = "update_sum.safetensors"


def read_update_sum(folder: PathLike) -> dict[str, Tensor] | None:
    """{matrix: U_t = −Σ_{s≤t} η_s g_s} saved beside a checkpoint by a run with ``track_updates=True`` (float64),
    or None when the folder has none."""
    path = Path(folder) / UPDATE_SUM_FILE
    if not path.exists():
        return None
    from safetensors.torch import load_file

    return {name: t.to(torch.float64) for name, t in load_file(str(path)).items()}


class UpdateTracker:
    """How much of the update ΔW_t = W_t − W_0 of each studied matrix the raw gradients explain.

    Accumulates S_t = Σ_{s ≤ t} η_s g_s per matrix (g_s: the gradient of step s as the optimizer receives it,
    after clipping; η_s its learning rate; nn.Linear layout, float64) and reports
    cos(ΔW_t, −S_t) = ⟨ΔW_t, −S_t⟩_F / (‖ΔW_t‖_F ‖S_t‖_F). Plain SGD without momentum or weight decay gives
    ΔW_t = −S_t exactly, so cos = 1; AdamW's elementwise normalisation (sign-descent-like) and weight decay
    pull it below 1. Holds W_0 and S: two float64 copies of the studied matrices."""

    def __init__(self, model: Model, pattern: Any = None) -> None:
        from ..models.host import host_linear, is_transposed

        self.model = model
        self.specs = model.matrices(pattern)
        self.hosts = {s.name: host_linear(model.bridge, s.component) for s in self.specs}
        self.transposed = {n: is_transposed(h) for n, h in self.hosts.items()}
        self.start = {s.name: model.weight(s.name).clone() for s in self.specs}
        self.sums = {s.name: torch.zeros(s.n_out, s.n_in, dtype=torch.float64) for s in self.specs}

    def _rows(self, spec: Any, full: Tensor) -> Tensor:
        """The host parameter's gradient in nn.Linear layout, as `Model.weight` reads the weight."""
        g = full.detach().to("cpu", torch.float64)
        g = g.T if self.transposed[spec.name] else g
        if g.shape != (spec.n_out, spec.n_in):
            raise RwasymError(
                f"track_updates: the gradient of {spec.name}'s host parameter has shape {tuple(g.shape)}, not "
                f"{(spec.n_out, spec.n_in)} (a fused host layout); train without track_updates on this model"
            )
        return g

    def add(self, lr: float) -> None:
        for spec in self.specs:
            weight = self.hosts[spec.name].weight
            grad = weight.grad if isinstance(weight, Tensor) else None
            if grad is not None:
                self.sums[spec.name] += lr * self._rows(spec, grad)

    def cosines(self) -> dict[str, float]:
        """{matrix: cos(ΔW_t, −S_t)} (nan where either is zero)."""
        out = {}
        for spec in self.specs:
            delta, s = self.model.weight(spec.name) - self.start[spec.name], -self.sums[spec.name]
            denom = float(delta.norm()) * float(s.norm())
            out[spec.name] = float((delta * s).sum()) / denom if denom > 0 else float("nan")
        return out

    def save(self, folder: PathLike) -> Path:
        """Write U_t = −S_t, the SGD-equivalent update of every tracked matrix, to ``folder/update_sum.safetensors``
        (float32, nn.Linear layout; `read_update_sum` reads it back), beside a checkpoint."""
        from safetensors.torch import save_file

        path = Path(folder) / UPDATE_SUM_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({name: (-s).to(torch.float32).contiguous() for name, s in self.sums.items()}, str(path))
        return path

    def by_kind(self) -> dict[str, float]:
        """Mean cos per matrix kind, keys ``update_cos/<kind>``."""
        kinds: dict[str, list[float]] = {}
        for spec in self.specs:
            kinds.setdefault(spec.kind, []).append(self.cosines()[spec.name])
        return {f"update_cos/{k}": sum(v) / len(v) for k, v in kinds.items()}


def lr_at(step: int, cfg: Any) -> float:
    """Learning rate before optimizer step ``step`` (0-based): linear warmup, then cosine."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def log_spaced_steps(total: int, n: int) -> list[int]:
    """0, ~n geometrically spaced steps in [1, total], and total (sorted, unique)."""
    inner = {round(math.exp(math.log(total) * i / max(1, n - 1))) for i in range(n)} if n > 0 and total > 0 else set()
    return sorted({0, total} | inner)


def _batches(n: int, batch_size: int, steps: int, seed: int):
    """Yield ``steps`` index batches from seeded epoch permutations of range(n)."""
    g = torch.Generator().manual_seed(int(seed))
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos : pos + min(batch_size, n)]
        pos += batch_size


def save_checkpoint(model: Model, folder: PathLike, meta: dict) -> Path:
    """Save native models with `rwasym.save_model`, Hugging Face ones with ``save_pretrained`` (+
    tokenizer and an ``rwasym-train.json`` with ``meta``); either loads back with `rwasym.load`."""
    folder = Path(folder)
    if getattr(model.cfg, "architecture", None) in (None, "TransformerLensNative"):
        return save_model(model, folder, meta=meta)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)  # the adapter syncs fused QKV and unwraps the bridge's module tree
    (folder / "rwasym-train.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return folder


def _write_log(fh, record: dict) -> None:
    if fh is not None:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


def _step(
    model: Model,
    opt: torch.optim.Optimizer,
    idx: Tensor,
    loss_of: Any,
    accum: int,
    clip: float,
    lr: float,
    tracker: UpdateTracker | None = None,
) -> tuple[float, dict, float]:
    """One optimizer step on batch ``idx``, accumulated over ``accum`` micro-batches weighted by their
    share of the batch (for per-pair mean losses the gradient equals the whole batch's).
    Returns (loss, stats, gradient norm before clipping)."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    total, stats = 0.0, {}
    for part in torch.tensor_split(idx, accum):
        loss, part_stats = loss_of(part)
        weight = len(part) / len(idx)
        (loss * weight).backward()
        total += loss.item() * weight
        for key, value in part_stats.items():
            stats[key] = stats.get(key, 0.0) + value * weight
    norm = torch.nn.utils.clip_grad_norm_(model.bridge.parameters(), clip if clip > 0 else float("inf"))
    if tracker is not None:
        tracker.add(lr)
    opt.step()
    return total, stats, float(norm)


def _loop(
    model: Model,
    opt: torch.optim.Optimizer,
    config: Any,
    n: int,
    loss_of: Any,
    checkpoint: Any,
    fh: Any,
    result: "TrainResult",
    progress: bool,
    desc: str,
    tracker: UpdateTracker | None = None,
) -> None:
    """The shared optimisation loop: seeded batches, lr schedule, step, log, checkpoint, bar."""
    with _bar(config.steps, progress, desc) as bar:
        for step, idx in enumerate(_batches(n, config.batch_size, config.steps, config.seed)):
            lr = lr_at(step, config)
            result.final_loss, stats, norm = _step(
                model, opt, idx, loss_of, getattr(config, "grad_accum", 1), config.grad_clip, lr, tracker
            )
            if step % config.log_every == 0 or step + 1 == config.steps:
                if tracker is not None:
                    stats = {**stats, **tracker.by_kind()}
                record = {"step": step + 1, "loss": result.final_loss, "lr": lr, "grad_norm": norm, **stats}
                result.history.append(record)
                _write_log(fh, record)
            checkpoint(step + 1, result.final_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{result.final_loss:.3f}")


# ----------------------------------------------------------------------------------- pretrain
def pretrain(
    model: Model,
    corpus: Int[Tensor, "batch pos"],
    config: TrainConfig = TrainConfig(),
    *,
    out: PathLike | None = None,
    progress: bool = True,
) -> TrainResult:
    """Next-token CE pretraining of ``model`` (in place) on ``corpus`` rows.

    With ``out``: checkpoints at step 0, `log_spaced_steps` and the final step into
    ``out/step_{N:06d}/``, and ``out/log.jsonl`` with (step, loss, lr, grad_norm). ``config.train="matrices"``
    trains the registry's matrices only (`trainable`); ``config.pad_id`` leaves padding targets out of the loss;
    ``config.shuffle_targets`` permutes each batch's targets (`rwasym.objectives.shuffled_targets`, from a
    generator seeded by ``config.seed``).
    """
    with trainable(model, config.train):
        return _pretrain(model, corpus, config, out, progress)


def _pretrain(model: Model, corpus: Tensor, config: TrainConfig, out: PathLike | None, progress: bool) -> TrainResult:
    corpus = check_tokens(model, corpus, "corpus")
    if corpus.shape[1] < 2:
        raise RwasymError("corpus rows need >= 2 tokens to have a next-token target.")
    torch.manual_seed(config.seed)
    opt, result, t0 = _optimizer(model, config), TrainResult(), time.perf_counter()
    ckpt_steps = set(log_spaced_steps(config.steps, config.n_checkpoints)) if out is not None else set()
    fh = None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        fh = open(Path(out) / "log.jsonl", "w")

    tracker = UpdateTracker(model) if config.track_updates else None
    shuffle = torch.Generator().manual_seed(10_007 + config.seed) if config.shuffle_targets else None

    def checkpoint(step: int, loss: float) -> None:
        if step in ckpt_steps:
            assert out is not None  # ckpt_steps is empty without out
            meta = {"stage": "pretrain", "step": step, "loss": loss, "config": asdict(config)}
            result.checkpoints.append(save_checkpoint(model, Path(out) / f"step_{step:06d}", meta))
            if tracker is not None:
                tracker.save(result.checkpoints[-1])

    try:
        checkpoint(0, float("nan"))
        _loop(
            model,
            opt,
            config,
            len(corpus),
            lambda idx: (next_token_ce(model, corpus[idx], config.pad_id, shuffle), {}),
            checkpoint,
            fh,
            result,
            progress,
            "pretrain",
            tracker,
        )
    finally:
        if fh is not None:
            fh.close()
    result.seconds = time.perf_counter() - t0
    return result


# -------------------------------------------------------------------------------------- align
def align(
    model: Model,
    reference: Model | None,
    pairs: PreferencePairs,
    config: AlignConfig = AlignConfig(),
    *,
    out: PathLike | None = None,
    progress: bool = True,
) -> TrainResult:
    """Align ``model`` (in place) on ``pairs`` with ``config.objective``; ``reference`` stays frozen.

    Reference log-probs are computed once up front (the reference never changes). With ``out``:
    trajectory checkpoints at step 0, every ``checkpoint_every`` steps and the final step into
    ``out/step_{N:06d}/``, and ``out/log.jsonl`` with (step, loss, lr, grad_norm, margin, ...).
    ``config.train="matrices"`` trains the registry's matrices only (`trainable`).
    """
    with trainable(model, config.train):
        return _align(model, reference, pairs, config, out, progress)


def _align(
    model: Model,
    reference: Model | None,
    pairs: PreferencePairs,
    config: AlignConfig,
    out: PathLike | None,
    progress: bool,
) -> TrainResult:
    check_objective(config, reference)
    if config.grad_accum < 1 or config.batch_size % config.grad_accum:
        raise RwasymError(
            f"grad_accum must be >= 1 and divide batch_size; got grad_accum={config.grad_accum}, "
            f"batch_size={config.batch_size}"
        )
    if reference is model or (reference is not None and reference.bridge is model.bridge):
        raise RwasymError(
            "reference must be a separate frozen copy of the base, not the model being trained; "
            "load the base twice (e.g. rwasym.load(folder))."
        )
    packed = pack_pairs(model, pairs)
    if config.objective == "sft":
        ref = (torch.zeros(len(pairs)),) * 2
    else:
        assert reference is not None  # check_objective: a pair objective has a reference
        ref = all_scores(reference, packed)
    torch.manual_seed(config.seed)
    opt, result, t0 = _optimizer(model, config), TrainResult(), time.perf_counter()
    every = config.checkpoint_every
    fh = None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        fh = open(Path(out) / "log.jsonl", "w")

    tracker = UpdateTracker(model) if config.track_updates else None

    def checkpoint(step: int, loss: float) -> None:
        if out is not None and (step == 0 or step == config.steps or (every > 0 and step % every == 0)):
            meta = {"stage": "align", "step": step, "loss": loss, "config": asdict(config)}
            result.checkpoints.append(save_checkpoint(model, Path(out) / f"step_{step:06d}", meta))
            if tracker is not None:  # U_t = −Σ η g beside the weights: the trajectory's r(U_t) next to r(ΔW_t)
                tracker.save(result.checkpoints[-1])

    try:
        checkpoint(0, float("nan"))
        _loop(
            model,
            opt,
            config,
            len(pairs),
            lambda idx: objective_value(model, packed.take(idx), (ref[0][idx], ref[1][idx]), config),
            checkpoint,
            fh,
            result,
            progress,
            f"align[{config.objective}]",
            tracker,
        )
    finally:
        if fh is not None:
            fh.close()
    result.seconds = time.perf_counter() - t0
    return result
