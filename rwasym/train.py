"""Training loops over any `rwasym.Model`: CE pretraining, DPO / SFT / graded alignment, metrics.

Plain torch: logits come from ``model.bridge(tokens)`` (batch, pos, d_vocab) and the optimised
parameters are ``model.bridge.parameters()``, so the same loops train native bridges and Hugging
Face models loaded with `rwasym.load`. Runs are deterministic from ``config.seed`` on one machine:
`torch.manual_seed` at the start and a seeded `torch.Generator` for the data order. The model's
current train/eval mode is kept; `rwasym.load` returns eval mode, so dropout stays off (as TRL's
``disable_dropout``), which also keeps runs deterministic.

Losses (pure functions, tested against hand computation):

- `sequence_logprobs`: log π(continuation | prompt) = Σ_{t ≥ 1} mask_t · log softmax(logits_{t−1})[x_t].
- `dpo_loss` (Rafailov et al. 2023): −log σ(β[(π_c − ref_c) − (π_r − ref_r)]), mean over pairs.
- `sft_loss`: token-mean cross-entropy of the masked (chosen) tokens.
- graded objective: L_λ = λ·L_DPO + (1 − λ)·L_CE(chosen)  (λ = 1: DPO, λ = 0: SFT).

Checkpoints go to ``out/step_{N:06d}/`` (`rwasym.save_model` for native models, ``save_pretrained``
for Hugging Face ones) and the log to ``out/log.jsonl`` (one JSON object per logged step).
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm import tqdm

from .errors import RwasymError
from .models import Model, save_model
from .pairs import PreferencePairs

PathLike = Union[str, os.PathLike]
OBJECTIVES = ("dpo", "sft", "graded")

__all__ = [
    "OBJECTIVES", "AlignConfig", "TrainConfig", "TrainResult", "align", "alignment_loss", "default_pair", "dpo_loss",
    "heldout_ce", "log_spaced_steps", "lr_at", "mean_kl", "pair_logprobs", "preference_accuracy", "pretrain",
    "save_checkpoint", "sequence_logprobs", "sft_loss",
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


@dataclass(frozen=True)
class AlignConfig:
    """Alignment hyper-parameters: objective "dpo" | "sft" | "graded" (L_λ, λ = ``lam``)."""

    objective: str = "dpo"  # which loss
    beta: float = 0.1  # DPO temperature β
    lam: float = 0.5  # λ of the graded objective (ignored by dpo / sft)
    steps: int = 300  # optimizer steps
    batch_size: int = 64  # pairs per step
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW decay on matrices (0: the change stays the objective's own)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moments
    warmup_steps: int = 20  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    checkpoint_every: int = 50  # trajectory checkpoint period in steps (0 = step 0 and final only)
    log_every: int = 10  # steps between log.jsonl records
    seed: int = 0  # seeds torch and the data order


@dataclass
class TrainResult:
    """What a training loop did: logged records, checkpoint folders, wall time, last loss."""

    history: list[dict] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    final_loss: float = float("nan")


# ------------------------------------------------------------------------------- pure losses
def sequence_logprobs(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"],
                      mask: Bool[Tensor, "batch pos"]) -> Float[Tensor, " batch"]:
    """Σ_{t ≥ 1} mask[b, t] · log softmax(logits[b, t−1])[tokens[b, t]] (float32 or wider).

    ``mask`` marks the scored tokens (the continuation); position 0 has no prediction and must be
    unmasked.
    """
    if logits.shape[:2] != tokens.shape or mask.shape != tokens.shape:
        raise RwasymError(f"sequence_logprobs needs logits (batch, pos, vocab) matching tokens and mask "
                          f"(batch, pos); got {tuple(logits.shape)}, {tuple(tokens.shape)}, {tuple(mask.shape)}.")
    if bool(mask[:, 0].any()):
        raise RwasymError("mask[:, 0] must be False: the first token has no prediction to score.")
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (batch, pos-1, vocab)
    picked = logp.gather(-1, tokens[:, 1:, None].long())[..., 0]  # (batch, pos-1)
    return torch.where(mask[:, 1:], picked, 0.0).sum(-1)


def dpo_loss(policy_chosen_logps: Float[Tensor, " batch"], policy_rejected_logps: Float[Tensor, " batch"],
             ref_chosen_logps: Float[Tensor, " batch"], ref_rejected_logps: Float[Tensor, " batch"],
             beta: float) -> Float[Tensor, ""]:
    """mean_i −log σ(β[(π_c − ref_c) − (π_r − ref_r)]); equals log 2 at zero margin."""
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * margin).mean()


def sft_loss(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"],
             mask: Bool[Tensor, "batch pos"]) -> Float[Tensor, ""]:
    """Token-mean cross-entropy of the masked tokens: −Σ logp / Σ mask."""
    return -sequence_logprobs(logits, tokens, mask).sum() / mask[:, 1:].sum().clamp_min(1)


# ------------------------------------------------------------------------------------ helpers
def _bar(total: int, progress: bool, desc: str):
    return tqdm(total=total, desc=desc, disable=not (progress and sys.stderr.isatty()), leave=False)


def _optimizer(model: Model, cfg: Any) -> torch.optim.Optimizer:
    params = [p for p in model.bridge.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


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


def _check_tokens(model: Model, tokens: Tensor, what: str) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        raise RwasymError(f"{what} must be an integer tensor of shape (batch, pos); got "
                          f"{type(tokens).__name__} {tuple(getattr(tokens, 'shape', ()))}.")
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    if n_ctx and tokens.shape[1] > n_ctx:
        raise RwasymError(f"{what} rows have {tokens.shape[1]} tokens but the model's context is n_ctx={n_ctx}; "
                          "use shorter sequences or prompts.")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= model.d_vocab):
        raise RwasymError(f"{what} holds token ids in [{int(tokens.min())}, {int(tokens.max())}] but the model's "
                          f"vocabulary is d_vocab={model.d_vocab}; ids must lie in [0, {model.d_vocab}).")
    return tokens.long().to(model.device)


def _next_token_ce(model: Model, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``tokens`` (with grad)."""
    tokens = tokens.to(model.device)
    logits = model.bridge(tokens)  # (batch, pos, vocab)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def _write_log(fh, record: dict) -> None:
    if fh is not None:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


def _step(model: Model, opt: torch.optim.Optimizer, loss: Tensor, clip: float, lr: float) -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.bridge.parameters(), clip if clip > 0 else float("inf"))
    opt.step()
    return float(norm)


def _loop(model: Model, opt: torch.optim.Optimizer, config: Any, n: int, loss_of: Any, checkpoint: Any,
          fh: Any, result: "TrainResult", progress: bool, desc: str) -> None:
    """The shared optimisation loop: seeded batches, lr schedule, step, log, checkpoint, bar."""
    with _bar(config.steps, progress, desc) as bar:
        for step, idx in enumerate(_batches(n, config.batch_size, config.steps, config.seed)):
            lr = lr_at(step, config)
            loss, stats = loss_of(idx)
            norm = _step(model, opt, loss, config.grad_clip, lr)
            result.final_loss = loss.item()
            if step % config.log_every == 0 or step + 1 == config.steps:
                record = {"step": step + 1, "loss": result.final_loss, "lr": lr, "grad_norm": norm, **stats}
                result.history.append(record)
                _write_log(fh, record)
            checkpoint(step + 1, result.final_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{result.final_loss:.3f}")


# ----------------------------------------------------------------------------------- pretrain
def pretrain(model: Model, corpus: Int[Tensor, "batch pos"], config: TrainConfig = TrainConfig(), *,
             out: Optional[PathLike] = None, progress: bool = True) -> TrainResult:
    """Next-token CE pretraining of ``model`` (in place) on ``corpus`` rows.

    With ``out``: checkpoints at step 0, `log_spaced_steps` and the final step into
    ``out/step_{N:06d}/``, and ``out/log.jsonl`` with (step, loss, lr, grad_norm).
    """
    corpus = _check_tokens(model, corpus, "corpus")
    if corpus.shape[1] < 2:
        raise RwasymError("corpus rows need >= 2 tokens to have a next-token target.")
    torch.manual_seed(config.seed)
    opt, result, t0 = _optimizer(model, config), TrainResult(), time.perf_counter()
    ckpt_steps = set(log_spaced_steps(config.steps, config.n_checkpoints)) if out is not None else set()
    fh = None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        fh = open(Path(out) / "log.jsonl", "w")

    def checkpoint(step: int, loss: float) -> None:
        if step in ckpt_steps:
            meta = {"stage": "pretrain", "step": step, "loss": loss, "config": asdict(config)}
            result.checkpoints.append(save_checkpoint(model, Path(out) / f"step_{step:06d}", meta))

    try:
        checkpoint(0, float("nan"))
        _loop(model, opt, config, len(corpus), lambda idx: (_next_token_ce(model, corpus[idx]), {}),
              checkpoint, fh, result, progress, "pretrain")
    finally:
        if fh is not None:
            fh.close()
    result.seconds = time.perf_counter() - t0
    return result


# -------------------------------------------------------------------------------------- align
@dataclass
class _Packed:
    """Pairs as model input: packed chosen / rejected rows (n, L) and their scored-token masks.

    ``last`` (n,) is set when every continuation is a single token: then log π(chosen) and
    log π(rejected) are read from one forward pass at the last prompt position (causal masking
    makes that position blind to the continuation), halving the cost of a DPO step.
    """

    tc: Tensor
    mc: Tensor
    tr: Tensor
    mr: Tensor
    last: Optional[Tensor]

    def __len__(self) -> int:
        return len(self.tc)

    def take(self, idx: Union[Tensor, slice]) -> "_Packed":
        return _Packed(*(None if x is None else x[idx] for x in (self.tc, self.mc, self.tr, self.mr, self.last)))


def _check_pairs(model: Model, pairs: PreferencePairs) -> _Packed:
    if not isinstance(pairs, PreferencePairs) or len(pairs) == 0:
        raise RwasymError(f"pairs must be a non-empty rwasym.data.PreferencePairs; got {type(pairs).__name__}"
                          f"{' of length 0' if isinstance(pairs, PreferencePairs) else ''}.")
    tc, mc = pairs.sequences("chosen")
    tr, mr = pairs.sequences("rejected")
    L = max(tc.shape[1], tr.shape[1])
    tc, mc, tr, mr = (F.pad(x, (0, L - x.shape[1])).to(model.device) for x in (tc, mc, tr, mr))
    _check_tokens(model, torch.cat([tc, tr]), "pairs (prompt + continuation)")
    single = bool((mc.sum(-1) == 1).all() and (mr.sum(-1) == 1).all() and torch.equal(mc, mr))
    last = mc.long().argmax(-1) - 1 if single else None  # (n,) last prompt position
    return _Packed(tc, mc, tr, mr, last)


def _pair_scores(model: Model, pk: _Packed) -> tuple[Tensor, Tensor, Tensor]:
    """(log π(chosen) (n,), log π(rejected) (n,), logits of the chosen rows), with grad."""
    if pk.last is not None:
        logits = model.bridge(pk.tc)  # (n, L, vocab); position `last` does not see the continuation
        rows = torch.arange(len(pk), device=pk.tc.device)
        lp = torch.log_softmax(logits[rows, pk.last].float(), -1)  # (n, vocab)
        return lp[rows, pk.tc[rows, pk.last + 1]], lp[rows, pk.tr[rows, pk.last + 1]], logits
    logits = model.bridge(torch.cat([pk.tc, pk.tr]))  # (2n, L, vocab): chosen rows, then rejected rows
    pc, pr = sequence_logprobs(logits, torch.cat([pk.tc, pk.tr]), torch.cat([pk.mc, pk.mr])).chunk(2)
    return pc, pr, logits[: len(pk)]


@torch.no_grad()
def _all_scores(model: Model, pk: _Packed, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    out = [_pair_scores(model, pk.take(slice(i, i + batch_size)))[:2] for i in range(0, len(pk), batch_size)]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def pair_logprobs(model: Model, pairs: PreferencePairs, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Summed continuation log-probs (chosen (n,), rejected (n,)) under ``model``, no grad."""
    return _all_scores(model, _check_pairs(model, pairs), batch_size)


def _check_align_config(cfg: AlignConfig, reference: Optional[Model]) -> None:
    if cfg.objective not in OBJECTIVES:
        raise RwasymError(f"objective must be one of {OBJECTIVES}; got {cfg.objective!r}.")
    if not 0.0 <= cfg.lam <= 1.0:
        raise RwasymError(f"the graded objective needs 0 <= lam <= 1; got lam={cfg.lam}.")
    if cfg.beta <= 0:
        raise RwasymError(f"DPO needs beta > 0; got beta={cfg.beta}.")
    if cfg.objective != "sft" and reference is None:
        raise RwasymError(f"objective {cfg.objective!r} needs a frozen reference model (the base); pass reference=.")


def _objective(model: Model, pk: _Packed, ref: tuple[Tensor, Tensor], cfg: AlignConfig) -> tuple[Tensor, dict]:
    if cfg.objective == "sft":
        return sft_loss(model.bridge(pk.tc), pk.tc, pk.mc), {}
    pc, pr, chosen_logits = _pair_scores(model, pk)
    loss = dpo_loss(pc, pr, ref[0], ref[1], cfg.beta)
    margin = ((pc - ref[0]) - (pr - ref[1])).detach()
    stats = {"margin": margin.mean().item(), "reward_acc": (margin > 0).float().mean().item()}
    if cfg.objective == "graded":
        ce = sft_loss(chosen_logits, pk.tc, pk.mc)
        stats.update(dpo=loss.item(), ce=ce.item())
        loss = cfg.lam * loss + (1 - cfg.lam) * ce
    return loss, stats


def alignment_loss(model: Model, pairs: PreferencePairs, config: AlignConfig = AlignConfig(),
                   reference: Optional[Model] = None) -> Float[Tensor, ""]:
    """The alignment objective of ``config`` on all of ``pairs`` as one batch (with grad)."""
    _check_align_config(config, reference)
    pk = _check_pairs(model, pairs)
    ref = _all_scores(reference, pk) if config.objective != "sft" else (torch.zeros(0), torch.zeros(0))
    return _objective(model, pk, ref, config)[0]


def align(model: Model, reference: Optional[Model], pairs: PreferencePairs, config: AlignConfig = AlignConfig(), *,
          out: Optional[PathLike] = None, progress: bool = True) -> TrainResult:
    """Align ``model`` (in place) on ``pairs`` with ``config.objective``; ``reference`` stays frozen.

    Reference log-probs are computed once up front (the reference never changes). With ``out``:
    trajectory checkpoints at step 0, every ``checkpoint_every`` steps and the final step into
    ``out/step_{N:06d}/``, and ``out/log.jsonl`` with (step, loss, lr, grad_norm, margin, ...).
    """
    _check_align_config(config, reference)
    if reference is model or (reference is not None and reference.bridge is model.bridge):
        raise RwasymError("reference must be a separate frozen copy of the base, not the model being trained; "
                          "load the base twice (e.g. rwasym.load(folder)).")
    packed = _check_pairs(model, pairs)
    ref = _all_scores(reference, packed) if config.objective != "sft" else (torch.zeros(len(pairs)),) * 2
    torch.manual_seed(config.seed)
    opt, result, t0 = _optimizer(model, config), TrainResult(), time.perf_counter()
    every = config.checkpoint_every
    fh = None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        fh = open(Path(out) / "log.jsonl", "w")

    def checkpoint(step: int, loss: float) -> None:
        if out is not None and (step == 0 or step == config.steps or (every > 0 and step % every == 0)):
            meta = {"stage": "align", "step": step, "loss": loss, "config": asdict(config)}
            result.checkpoints.append(save_checkpoint(model, Path(out) / f"step_{step:06d}", meta))

    try:
        checkpoint(0, float("nan"))
        _loop(model, opt, config, len(pairs),
              lambda idx: _objective(model, packed.take(idx), (ref[0][idx], ref[1][idx]), config),
              checkpoint, fh, result, progress, f"align[{config.objective}]")
    finally:
        if fh is not None:
            fh.close()
    result.seconds = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------------------ metrics
def preference_accuracy(model: Model, reference: Optional[Model], pairs: PreferencePairs) -> float:
    """Fraction of pairs the model prefers chosen.

    With a reference: the implicit DPO reward margin (π_c − ref_c) − (π_r − ref_r) > 0 (the TRL
    "rewards/accuracies"; 0 for the reference itself, whose margins are all 0). With
    ``reference=None``: the model's own log π(chosen) > log π(rejected) — the number to compare
    between a base and an aligned model.
    """
    pc, pr = pair_logprobs(model, pairs)
    if reference is not None:
        rc, rr = pair_logprobs(reference, pairs)
        pc, pr = pc - rc, pr - rr
    return float((pc > pr).float().mean())


@torch.no_grad()
def mean_kl(model: Model, reference: Model, tokens: Int[Tensor, "batch pos"], batch_size: int = 64) -> float:
    """Mean over all positions of KL(model ‖ reference) between next-token distributions (nats)."""
    tokens = _check_tokens(model, tokens, "tokens")
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        x = tokens[i : i + batch_size]
        lp = torch.log_softmax(model.bridge(x).double(), -1)  # (batch, pos, vocab)
        lq = torch.log_softmax(reference.bridge(x).double(), -1)
        total += float((lp.exp() * (lp - lq)).sum())
        count += x.shape[0] * x.shape[1]
    return total / count


@torch.no_grad()
def heldout_ce(model: Model, tokens: Int[Tensor, "batch pos"], batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats) on ``tokens``, positions 1..pos−1."""
    tokens = _check_tokens(model, tokens, "tokens")
    losses = [float(_next_token_ce(model, tokens[i : i + batch_size])) * len(tokens[i : i + batch_size])
              for i in range(0, len(tokens), batch_size)]
    return sum(losses) / len(tokens)


def default_pair(cache_dir: Optional[PathLike] = None, quick: bool = False, progress: bool = True,
                 seed: int = 0) -> tuple[Model, Model, dict]:
    """(base, DPO-aligned, info) of the embedded default pair, cached on disk.

    See `rwasym.substrate.default_pair` (cache layout, configs, the numbers in ``info``).
    """
    from .substrate import default_pair as _default_pair

    return _default_pair(cache_dir, quick=quick, progress=progress, seed=seed)
