"""Objectives and their scores on any `rwasym.Model`: losses, pair log-probs, behavioural metrics.

The one home of the package's training and gradient objectives (`rwasym.train` optimises
them, `rwasym.hooks.gradients` differentiates them, `objective_batches` packages them):

- `sequence_logprobs`: log π(continuation | prompt) = Σ_{t ≥ 1} mask_t · log softmax(logits_{t−1})[x_t].
- `dpo_loss` (Rafailov et al. 2023): −log σ(β[(π_c − ref_c) − (π_r − ref_r)]), mean over pairs.
- `sft_loss`: token-mean cross-entropy of the masked (chosen) tokens.
- graded objective: L_λ = λ·L_DPO + (1 − λ)·L_CE(chosen)  (λ = 1: DPO, λ = 0: SFT).
- `next_token_ce`: mean next-token cross-entropy (the pretraining / "ce" objective).

Metrics: `preference_accuracy`, `mean_kl`, `heldout_ce`, `pair_logprobs`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .data.pairs import PreferencePairs
from .errors import RwasymError
from .models import Model

__all__ = [
    "ALIGN_OBJECTIVES",
    "OBJECTIVES",
    "Objective",
    "alignment_loss",
    "check_tokens",
    "dpo_loss",
    "heldout_ce",
    "mean_kl",
    "next_token_ce",
    "shuffled_targets",
    "objective_batches",
    "pair_logprobs",
    "preference_accuracy",
    "sequence_logprobs",
    "sft_loss",
]

ALIGN_OBJECTIVES = ("dpo", "sft", "graded")  # preference objectives (`rwasym.train.loops.align`)
OBJECTIVES = ("ce",) + ALIGN_OBJECTIVES  # everything `objective_batches` packages


@dataclass(frozen=True)
class Objective:
    """Which alignment loss, with its parameters (`rwasym.train.loops.AlignConfig` carries the same
    three fields, so either can be passed where an objective is expected)."""

    objective: str = "dpo"  # dpo | sft | graded
    beta: float = 0.1  # DPO temperature β
    lam: float = 0.5  # λ of the graded objective (ignored by dpo / sft)


# ------------------------------------------------------------------------------- pure losses
def sequence_logprobs(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]
) -> Float[Tensor, " batch"]:
    """Σ_{t ≥ 1} mask[b, t] · log softmax(logits[b, t−1])[tokens[b, t]] (float32 or wider).

    ``mask`` marks the scored tokens (the continuation); position 0 has no prediction and must be
    unmasked.
    """
    if logits.shape[:2] != tokens.shape or mask.shape != tokens.shape:
        raise RwasymError(
            f"sequence_logprobs needs logits (batch, pos, vocab) matching tokens and mask "
            f"(batch, pos); got {tuple(logits.shape)}, {tuple(tokens.shape)}, {tuple(mask.shape)}."
        )
    if bool(mask[:, 0].any()):
        raise RwasymError("mask[:, 0] must be False: the first token has no prediction to score.")
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (batch, pos-1, vocab)
    picked = logp.gather(-1, tokens[:, 1:, None].long())[..., 0]  # (batch, pos-1)
    return torch.where(mask[:, 1:], picked, 0.0).sum(-1)


def dpo_loss(
    policy_chosen_logps: Float[Tensor, " batch"],
    policy_rejected_logps: Float[Tensor, " batch"],
    ref_chosen_logps: Float[Tensor, " batch"],
    ref_rejected_logps: Float[Tensor, " batch"],
    beta: float,
) -> Float[Tensor, ""]:
    """mean_i −log σ(β[(π_c − ref_c) − (π_r − ref_r)]); equals log 2 at zero margin."""
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * margin).mean()


def sft_loss(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]
) -> Float[Tensor, ""]:
    """Token-mean cross-entropy of the masked tokens: −Σ logp / Σ mask."""
    return -sequence_logprobs(logits, tokens, mask).sum() / mask[:, 1:].sum().clamp_min(1)


def check_tokens(model: Model, tokens: Tensor, what: str) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        raise RwasymError(
            f"{what} must be an integer tensor of shape (batch, pos); got "
            f"{type(tokens).__name__} {tuple(getattr(tokens, 'shape', ()))}."
        )
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    if n_ctx and tokens.shape[1] > n_ctx:
        raise RwasymError(
            f"{what} rows have {tokens.shape[1]} tokens but the model's context is n_ctx={n_ctx}; "
            "use shorter sequences or prompts."
        )
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= model.d_vocab):
        raise RwasymError(
            f"{what} holds token ids in [{int(tokens.min())}, {int(tokens.max())}] but the model's "
            f"vocabulary is d_vocab={model.d_vocab}; ids must lie in [0, {model.d_vocab})."
        )
    return tokens.long().to(model.device)


def shuffled_targets(
    targets: Int[Tensor, "batch pos"], valid: Tensor, generator: torch.Generator
) -> Int[Tensor, "batch pos"]:
    """``targets`` with the entries at ``valid`` positions permuted uniformly among themselves (the rest kept):
    the same inputs and the same multiset of targets, no input–target structure (the study's C2 condition)."""
    where = valid.flatten().nonzero()[:, 0]
    perm = where[torch.randperm(len(where), generator=generator).to(where.device)]
    flat = targets.flatten().clone()
    flat[where] = targets.flatten()[perm]
    return flat.view_as(targets)


def next_token_ce(
    model: Model, tokens: Tensor, pad_id: int | None = None, shuffle: torch.Generator | None = None
) -> Tensor:
    """Mean next-token cross-entropy of ``tokens`` (with grad), over every target position, or with ``pad_id``
    over the positions whose target is not padding (token-weighted over the batch). With ``shuffle`` (a seeded
    generator) the targets are `shuffled_targets` first."""
    tokens = tokens.to(model.device)
    logits = model.bridge(tokens)  # (batch, pos, vocab)
    targets = tokens[:, 1:]
    valid = targets != pad_id if pad_id is not None else torch.ones_like(targets, dtype=torch.bool)
    if shuffle is not None:
        targets = shuffled_targets(targets, valid, shuffle)
    targets = targets.masked_fill(~valid, -100)  # cross_entropy's ignore_index
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


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
    last: Tensor | None

    def __len__(self) -> int:
        return len(self.tc)

    def take(self, idx: Tensor | slice) -> "_Packed":
        last = None if self.last is None else self.last[idx]
        return _Packed(self.tc[idx], self.mc[idx], self.tr[idx], self.mr[idx], last)


def pack_pairs(model: Model, pairs: PreferencePairs) -> _Packed:
    if not isinstance(pairs, PreferencePairs) or len(pairs) == 0:
        raise RwasymError(
            f"pairs must be a non-empty rwasym.data.PreferencePairs; got {type(pairs).__name__}"
            f"{' of length 0' if isinstance(pairs, PreferencePairs) else ''}."
        )
    tc, mc = pairs.sequences("chosen")
    tr, mr = pairs.sequences("rejected")
    L = max(tc.shape[1], tr.shape[1])
    tc, mc, tr, mr = (F.pad(x, (0, L - x.shape[1])).to(model.device) for x in (tc, mc, tr, mr))
    check_tokens(model, torch.cat([tc, tr]), "pairs (prompt + continuation)")
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


LOGIT_BUDGET = 1 << 28  # logits (float32 entries) one scoring batch may hold: 1 GiB, whatever the vocabulary


def scoring_batch(n_pairs: int, length: int, d_vocab: int, batch_size: int | None = None) -> int:
    """Pairs per no-grad scoring batch: ``batch_size`` when given, else as many as keep the batch's logits
    (2 rows per pair, ``length`` positions, ``d_vocab``) within `LOGIT_BUDGET` (at least 1, at most 256): a
    262k-token vocabulary scores 8 pairs of 64 tokens at a time, a 50k one 42."""
    if batch_size is not None:
        return batch_size
    return max(1, min(256, n_pairs, LOGIT_BUDGET // max(1, 2 * length * d_vocab)))


@torch.no_grad()
def all_scores(model: Model, pk: _Packed, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
    step = scoring_batch(len(pk), pk.tc.shape[1], model.d_vocab, batch_size)
    out = [_pair_scores(model, pk.take(slice(i, i + step)))[:2] for i in range(0, len(pk), step)]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def pair_logprobs(model: Model, pairs: PreferencePairs, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Summed continuation log-probs (chosen (n,), rejected (n,)) under ``model``, no grad; ``batch_size``
    pairs per forward (default `scoring_batch`: the logits of a batch stay within 1 GiB)."""
    return all_scores(model, pack_pairs(model, pairs), batch_size)


def check_objective(cfg: Any, reference: Model | None) -> None:
    """Raise unless ``cfg`` (objective, beta, lam) is a valid alignment objective with what it needs."""
    if cfg.objective not in ALIGN_OBJECTIVES:
        raise RwasymError(f"objective must be one of {ALIGN_OBJECTIVES}; got {cfg.objective!r}.")
    if not 0.0 <= cfg.lam <= 1.0:
        raise RwasymError(f"the graded objective needs 0 <= lam <= 1; got lam={cfg.lam}.")
    if cfg.beta <= 0:
        raise RwasymError(f"DPO needs beta > 0; got beta={cfg.beta}.")
    if cfg.objective != "sft" and reference is None:
        raise RwasymError(f"objective {cfg.objective!r} needs a frozen reference model (the base); pass reference=.")


def objective_value(model: Model, pk: "_Packed", ref: tuple[Tensor, Tensor], cfg: Any) -> tuple[Tensor, dict]:
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


def alignment_loss(
    model: Model, pairs: PreferencePairs, config: Any = Objective(), reference: Model | None = None
) -> Float[Tensor, ""]:
    """The alignment objective of ``config`` (an `Objective` or an `AlignConfig`) on all of ``pairs`` as one
    batch (with grad)."""
    check_objective(config, reference)
    pk = pack_pairs(model, pairs)
    if config.objective == "sft":
        ref = (torch.zeros(0), torch.zeros(0))
    else:
        assert reference is not None  # check_objective: a pair objective has a reference
        ref = all_scores(reference, pk)
    return objective_value(model, pk, ref, config)[0]


# ------------------------------------------------------------------------------------ metrics
def preference_accuracy(model: Model, reference: Model | None, pairs: PreferencePairs) -> float:
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
    tokens = check_tokens(model, tokens, "tokens")
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
    tokens = check_tokens(model, tokens, "tokens")
    losses = [
        float(next_token_ce(model, tokens[i : i + batch_size])) * len(tokens[i : i + batch_size])
        for i in range(0, len(tokens), batch_size)
    ]
    return sum(losses) / len(tokens)


# ------------------------------------------------------------------------- gradient objectives
def objective_batches(
    objective: str,
    data: Any,
    *,
    reference: Model | None = None,
    batch_size: int = 16,
    n_batches: int = 4,
    beta: float = 0.1,
    lam: float = 0.5,
) -> tuple[Callable[[Model, Any], Tensor], list]:
    """(loss_fn, batches) for `capture_gradients` under one of the package's objectives.

    "ce": next-token cross-entropy (mean over tokens) on ``data``, a token tensor (n_seqs, pos);
    batches are consecutive slices of ``batch_size`` rows. "dpo" | "sft" | "graded": the
    alignment objective (`alignment_loss` (graded: λ·DPO + (1−λ)·CE(chosen)) on ``data``, a
    `PreferencePairs`; dpo and graded need the frozen ``reference`` (usually the base itself,
    where the DPO margin starts at zero). At most ``n_batches`` batches are used.
    """
    if objective not in OBJECTIVES:
        raise RwasymError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    if batch_size <= 0 or n_batches <= 0:
        raise RwasymError(f"batch_size and n_batches must be positive; got {batch_size} and {n_batches}")
    if objective == "ce":
        if not isinstance(data, Tensor) or data.dim() != 2:
            raise RwasymError(
                "objective 'ce' needs a token tensor of shape (n_seqs, pos); "
                f"got {type(data).__name__}. Pass text tokens, not preference pairs"
            )
        batches = [data[i : i + batch_size] for i in range(0, len(data), batch_size)][:n_batches]
        return next_token_ce, batches
    if not isinstance(data, PreferencePairs):
        raise RwasymError(
            f"objective {objective!r} needs PreferencePairs (a .jsonl or pairs .safetensors "
            f"file); got {type(data).__name__}"
        )
    cfg = Objective(objective=objective, beta=beta, lam=lam)
    if objective != "sft" and reference is None:
        raise RwasymError(f"objective {objective!r} needs a frozen reference model; pass reference= (e.g. the base)")
    batches = [data.subset(torch.arange(i, min(i + batch_size, len(data)))) for i in range(0, len(data), batch_size)][
        :n_batches
    ]

    def align_loss(model: Model, pairs: Any) -> Tensor:
        return alignment_loss(model, pairs, cfg, reference)

    return align_loss, batches
