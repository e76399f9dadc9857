"""Streaming activation statistics through hook points: Σ a aᵀ, Σ a and N per site, in float64.

Nothing is cached: each hook adds its batch into a `RunningCovariance` and returns, so memory is
O(sites · d²) whatever the corpus length (TL #746). Sites are bridge hook names; by default every
studied matrix's input (Q/K/V share one attention-input site, W_gate shares W_in's) plus
`resid_pre` / `resid_mid` / `resid_post` of every layer.
"""

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm import tqdm

from .. import distributed
from .._progress import quiet
from ..errors import RwasymError
from ..math.checks import release_memory
from ..math.covariance import RunningCovariance
from ..models import Model, flatten_site, load

Batch = tuple[Tensor, Tensor | None]  # (tokens (batch, pos), attention mask (batch, pos) or None)


@dataclass
class ActivationStats:
    """Per-site streaming statistics of one model on one corpus.

    ``stats[hook]`` is a `RunningCovariance`; ``aliases`` maps TL names such as
    ``blocks.0.hook_resid_pre`` to the bridge hook that carries them.
    """

    stats: dict[str, RunningCovariance]
    aliases: dict[str, str] = field(default_factory=dict)
    model: Model | None = None
    contexts: dict[str, Any] = field(default_factory=dict)  # label -> TopContexts (capture's contexts=)

    def __getitem__(self, site: str) -> RunningCovariance:
        key = self.aliases.get(site, site)
        if key not in self.stats:
            raise RwasymError(f"no statistics for site {site!r}; captured sites: {', '.join(self.sites())}")
        return self.stats[key]

    def sites(self) -> list[str]:
        return list(self.aliases) + [s for s in self.stats if s not in self.aliases.values()]

    def for_matrix(self, name: str) -> RunningCovariance:
        """Statistics of the input of matrix ``name`` (its read side)."""
        if self.model is None:
            raise RwasymError("these statistics carry no model; index them by hook name instead")
        return self[self.model.input_hook(name)]

    @property
    def n_tokens(self) -> int:
        return next(iter(self.stats.values())).count

    def state_dict(self) -> dict[str, Any]:
        return {"stats": {k: v.state_dict() for k, v in self.stats.items()}, "aliases": dict(self.aliases)}


def default_sites(model: Model, layers: Sequence[int] | None = None) -> dict[str, int]:
    """hook name → width for every studied matrix input (deduplicated) and the residual stream."""
    keep = set(range(model.n_layers)) if layers is None else set(layers)
    sites: dict[str, int] = {}
    for spec in model.matrices():
        if spec.layer in keep and model.no_input_site(spec.name) is None:  # experts: routed statistics instead
            sites.setdefault(model.input_hook(spec.name), spec.n_in)
    for alias, hook in model.residual_hooks().items():
        if int(alias.split(".")[1]) in keep:
            sites.setdefault(hook, model.d_model)
    return sites


def _as_batches(data: Any, batch_size: int, model: Model) -> Iterator[Batch]:
    """Normalise tokens / (tokens, mask) / dicts / iterables of those into (tokens, mask) batches."""
    if isinstance(data, (str, os.PathLike)):
        from ..data.pairs import load_text

        data = load_text(Path(data), tokenizer=model.tokenizer)
    if isinstance(data, Tensor):
        data = {"input_ids": data}
    if isinstance(data, dict):
        tokens, mask = data["input_ids"], data.get("attention_mask")
        for start in range(0, tokens.shape[0], batch_size):
            yield tokens[start : start + batch_size], None if mask is None else mask[start : start + batch_size]
        return
    for item in data:
        if isinstance(item, Tensor):
            yield item, None
        elif isinstance(item, dict):
            yield item["input_ids"], item.get("attention_mask")
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            yield item[0], item[1]
        else:
            raise RwasymError(
                f"cannot read a batch from a {type(item).__name__}; yield token tensors (batch, pos), "
                "(tokens, attention_mask) pairs or dicts with 'input_ids' / 'attention_mask'"
            )


def _check_batch(tokens: Tensor, mask: Tensor | None, d_vocab: int) -> None:
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise RwasymError(
            f"token batches must be integer tensors shaped (batch, pos); got {tuple(tokens.shape)} {tokens.dtype}"
        )
    if tokens.numel() and (int(tokens.max()) >= d_vocab or int(tokens.min()) < 0):
        raise RwasymError(
            f"token ids must lie in [0, {d_vocab}) for this model; got ids in "
            f"[{int(tokens.min())}, {int(tokens.max())}]: was the data tokenized for another model?"
        )
    if mask is not None and mask.shape != tokens.shape:
        raise RwasymError(f"attention_mask shape {tuple(mask.shape)} differs from tokens {tuple(tokens.shape)}")


def _kept_tokens(
    tokens: Tensor,
    mask: Tensor | None,
    model: Model,
    max_tokens: int | None,
    seen: int,
    exclude_positions: Sequence[int],
    exclude_tokens: Sequence[int],
) -> tuple[Tensor, dict[str, Tensor]]:
    """One batch's counted positions (padding, exclusions and the token budget applied) and the forward's kwargs.

    The model sees the padding mask, cut at the budget as ever; excluded sinks still run through it."""
    _check_batch(tokens, mask, model.d_vocab)
    attention = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
    kept = exclusion_mask(tokens, attention, exclude_positions, exclude_tokens)
    if max_tokens is not None:
        kept = _budget_mask(kept, max_tokens - seen)
    model_mask = attention if exclude_positions or exclude_tokens else kept
    return kept, ({} if bool(model_mask.all()) else {"attention_mask": model_mask.long()})


def exclusion_mask(
    tokens: Int[Tensor, "batch pos"],
    mask: Tensor,
    positions: Sequence[int] = (),
    token_ids: Sequence[int] = (),
) -> Tensor:
    """``mask`` (bool, batch × pos) with the attention-sink tokens left out: the positions in ``positions``,
    counted from each row's first unpadded token (0 = the first token, BOS where the tokenizer adds one),
    and every token whose id is in ``token_ids`` (chosen delimiters). Massive activations sit on such tokens
    and can dominate a covariance's top direction."""
    if not positions and not token_ids:
        return mask
    keep = mask.clone()
    if positions:
        index = mask.long().cumsum(1) - 1  # each unpadded token's position within its row
        for pos in positions:
            keep &= index != int(pos)
    if token_ids:
        keep &= ~torch.isin(tokens, torch.tensor([int(t) for t in token_ids], dtype=tokens.dtype))
    return keep


def _check_exclusions(positions: Sequence[int], token_ids: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    out = []
    for what, values in (("exclude_positions", positions), ("exclude_tokens", token_ids)):
        try:
            vals = tuple(int(v) for v in values)
        except (TypeError, ValueError):
            raise RwasymError(f"{what} must be a sequence of integers such as (0,); got {values!r}") from None
        if any(v < 0 for v in vals):
            raise RwasymError(f"{what} must be non-negative (positions from each row's start, token ids); got {vals}")
        out.append(vals)
    return out[0], out[1]


def _resolve_sites(
    model: Model, sites: Sequence[str] | dict[str, int] | None, layers: Sequence[int] | None, batch_size: int
) -> dict[str, int]:
    """hook → width of the sites asked for (TL aliases resolved; `default_sites` when None), checked."""
    aliases = model.residual_hooks()
    if sites is None:
        widths = default_sites(model, layers)
    else:
        widths = {}
        for name in list(sites):
            hook = aliases.get(name, name)
            if hook not in model.bridge.hook_dict:
                valid = sorted(set(model.bridge.hook_dict) | set(aliases))
                raise RwasymError(f"unknown hook name {name!r}; valid names include: {', '.join(valid[:40])} ...")
            widths[hook] = sites[name] if isinstance(sites, dict) else _site_width(model, hook)
    if not widths:
        raise RwasymError(
            "no sites to capture: sites is empty (or layers selects no layer); pass at least one "
            "hook name, or sites=None for the default sites"
        )
    if batch_size <= 0:
        raise RwasymError(f"batch_size must be positive; got {batch_size}")
    return widths


def _require_captured(seen: int) -> None:
    if seen == 0:
        raise RwasymError(
            "no tokens were captured: the data is empty or fully masked (attention_mask all 0); "
            "pass at least one unpadded token"
        )


def _activation_stats(stats: dict[str, RunningCovariance], aliases: dict[str, str], model: Model) -> ActivationStats:
    """The result of a capture: the sums, the TL aliases of the sites it holds, the model."""
    return ActivationStats(stats=stats, aliases={a: h for a, h in aliases.items() if h in stats}, model=model)


def _budget_mask(mask: Tensor, remaining: int) -> Tensor:
    """Keep only the first `remaining` unmasked tokens (row-major) of a batch."""
    kept = mask.reshape(-1).long().cumsum(0).reshape(mask.shape)
    return mask & (kept <= remaining)


def capture(
    model: Any,
    data: Any,
    *,
    sites: Sequence[str] | dict[str, int] | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool | None = None,
    gram_dtype: torch.dtype | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    exclude_positions: Sequence[int] = (),
    exclude_tokens: Sequence[int] = (),
    contexts: Mapping[str, tuple[str, Tensor]] | None = None,
    context_top: int = 10,
    context_window: int = 12,
) -> ActivationStats:
    """Stream ``data`` through ``model`` once and accumulate float64 Σ a aᵀ, Σ a, N per site.

    data: token tensor (n_seqs, pos), a dict with ``input_ids`` / ``attention_mask``, an iterable
    of batches (tensors, (tokens, mask) pairs or dicts), or a text-file path (tokenised with the
    model's tokenizer). Padding (attention_mask == 0) is excluded from every statistic.
    sites: hook names (TL aliases such as ``blocks.0.hook_resid_pre`` are accepted) or
    {hook: width}; default `default_sites`. progress: tqdm bar (None = only on a terminal).
    max_tokens: keep only the first ``max_tokens`` unpadded tokens, in batch order.
    exclude_positions / exclude_tokens: leave attention-sink tokens out of every statistic (`exclusion_mask`:
    positions counted from each row's first unpadded token, and token ids); they still run through the
    model, and the budget counts only the tokens kept.
    gram_dtype: each batch's d × d product in float32 about the batch mean, summed in float64 (None,
    the default for float32 models: relative error ~1e-7; see `RunningCovariance`), or
    ``torch.float64`` throughout (about twice the cost on a CPU). A site whose tensor is the same
    as an earlier one's (resid_post of block L and resid_pre of block L+1, checked on the first
    batch) shares that site's accumulator; after the last captured block the final norm and the
    unembedding are not run.
    checkpoint: a ``.safetensors`` file that makes a long capture survive a crash: the statistics
    are written there (atomically) every ``checkpoint_every`` batches and at the end, keyed by the
    model's weights hash, the data's hash, the sites, the model dtype, gram_dtype, batch_size and
    max_tokens. A rerun with the same key resumes after the last written batch and gives the same
    sums as an uninterrupted run (same batches, same order); a finished file is returned without a
    forward. A file with another key, or one that cannot be read, is refused (`RwasymError`), never
    reused. Needs token data (a tensor, a dict or a text file) and a single process.
    contexts: {label: (site, V)} with V (site width × m) directions: the same pass keeps, per column of V, the
    ``context_top`` counted positions with the largest and the smallest score vᵀa and their ``context_window``
    token ids (`rwasym.hooks.contexts.TopContexts`), returned as ``ActivationStats.contexts[label]``; the site is
    captured too. Single process, no ``checkpoint``.

    Data parallel (under ``torchrun``, see `rwasym.distributed`): with a process group of
    world_size W > 1, every rank must be given the same ``data``; batches are formed first, rank
    r forwards batch i iff i mod W = r, and every statistic is then summed over ranks
    (`RunningCovariance.all_reduce`), so every rank returns the statistics of the whole corpus,
    equal to the single-process result up to float64 summation order. ``max_tokens`` stays a
    *global* budget and is exact: each rank reads every batch's mask (no forward) to count the
    tokens before it in batch order, so the tokens kept are those a single process would keep.
    """
    model = load(model)
    exclude_positions, exclude_tokens = _check_exclusions(exclude_positions, exclude_tokens)
    aliases = model.residual_hooks()
    widths = _resolve_sites(model, sites, layers, batch_size)
    rank, size = distributed.world()
    watchers = _context_watchers(model, contexts or {}, widths, aliases, context_top, context_window)
    if watchers and (checkpoint is not None or size > 1):
        raise RwasymError("contexts= needs a single process without checkpoint= (top contexts are not checkpointed)")
    stats = {hook: RunningCovariance(width, name=hook, gram_dtype=gram_dtype) for hook, width in widths.items()}
    current: dict[str, Any] = {"mask": None}
    ckpt = (
        None
        if checkpoint is None
        else _Checkpoint(
            Path(checkpoint),
            _checkpoint_key(model, data, widths, gram_dtype, batch_size, max_tokens, size)
            | (
                {"exclude": [list(exclude_positions), list(exclude_tokens)]}
                if exclude_positions or exclude_tokens
                else {}
            ),
            checkpoint_every,
        )
    )
    # resid_post of block L and resid_pre of block L+1 are usually one tensor: compare them on the
    # first batch and, when equal, keep one statistic for both (single process only: every rank
    # must reduce the same accumulators).
    pairs = _same_tensor_candidates(model, widths) if size == 1 else []
    paired = {hook for pair in pairs for hook in pair}
    first: dict[str, Tensor] = {}  # the first batch's rows of the paired sites, compared once
    comparing = [bool(pairs)]  # until the first batch has been compared
    skip: set[str] = set()

    def make_hook(hook_name: str, width: int):
        def hook_fn(x: Tensor, hook: Any = None) -> Tensor:
            for _, acc in watchers.get(hook_name, ()):
                acc.add(flatten_site(x, width), current["mask"], current["tokens"], current["offset"], current["attn"])
            if hook_name in skip:
                return x
            rows = flatten_site(x, width)
            stats[hook_name].add(rows, current["mask"])
            if hook_name in paired and comparing[0]:
                first[hook_name] = rows.detach().clone()
            return x

        return hook_fn

    stop = _last_layer(widths) + 1
    stop_at = stop if stop <= model.n_layers else None  # skip later blocks and, after the last, the unembedding
    fwd_hooks = [(hook, make_hook(hook, width)) for hook, width in widths.items()]
    seen, n_batches = 0, 0  # tokens of every rank's batches so far (the global budget), batches read
    resume = ckpt.load(stats, skip) if ckpt is not None else None
    if resume is not None:
        n_batches, seen = resume["batches"], resume["seen"]
        comparing[0] = False  # the shared statistics were restored with the file
        if resume["done"]:
            return _activation_stats(stats, aliases, model)
    done_batches = n_batches
    bar = tqdm(
        total=max_tokens if size == 1 else None,
        initial=seen if max_tokens else 0,
        desc="capture",
        unit="tok",
        disable=quiet(progress) or rank != 0,
    )
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=fwd_hooks):
        offset, next_offset = 0, 0  # index of the batch's first sequence (top contexts name sequences by it)
        for i, (tokens, mask) in enumerate(_as_batches(data, batch_size, model)):
            offset, next_offset = next_offset, next_offset + tokens.shape[0]
            if i < done_batches:
                continue  # in the checkpoint already (its token count restored with it)
            n_batches = i + 1
            raw_mask = mask
            mask, kwargs = _kept_tokens(tokens, mask, model, max_tokens, seen, exclude_positions, exclude_tokens)
            n = int(mask.sum())
            if n == 0:
                if max_tokens is not None and seen >= max_tokens:
                    break
                continue
            seen += n
            if i % size != rank:
                continue  # another rank's batch: counted towards the budget, not forwarded here
            current["mask"] = mask
            if watchers:
                current.update(tokens=tokens, offset=offset, attn=None if raw_mask is None else raw_mask.bool())
            model.bridge(tokens.to(model.device), stop_at_layer=stop_at, **kwargs)
            if comparing[0]:
                for leader, follower in pairs:
                    a, b = first.get(leader), first.get(follower)
                    if a is not None and b is not None and a.shape == b.shape and torch.equal(a, b):
                        stats[follower] = stats[leader]  # equal sums so far; one accumulator from now on
                        skip.add(follower)
                first.clear()
                comparing[0] = False
            bar.update(n)
            if ckpt is not None and n_batches % ckpt.every == 0:
                ckpt.save(stats, skip, n_batches, seen, done=False)
    bar.close()
    if ckpt is not None and seen > 0:
        ckpt.save(stats, skip, n_batches, seen, done=True)
    if size > 1:
        distributed.require_same([n_batches, seen], "the batches given to capture ([batches read, tokens])")
        for acc in stats.values():
            acc.all_reduce()
    _require_captured(seen)
    result = _activation_stats(stats, aliases, model)
    result.contexts = {label: acc for accs in watchers.values() for label, acc in accs}
    return result


def _context_watchers(
    model: Model,
    contexts: Mapping[str, tuple[str, Tensor]],
    widths: dict[str, int],
    aliases: dict,
    top: int,
    window: int,
) -> dict[str, list]:
    """{bridge hook: [(label, TopContexts)]} for ``contexts``; each site joins ``widths`` (it is captured too)."""
    from .contexts import TopContexts

    watchers: dict[str, list] = {}
    for label, (site, V) in contexts.items():
        hook = aliases.get(site, site)
        if V.dim() != 2:
            raise RwasymError(f"contexts[{label!r}]: V must be (site width, m); got shape {tuple(V.shape)}")
        extra = _resolve_sites(model, [hook], None, 1) if hook not in widths else {}
        widths.update(extra)
        if widths[hook] != V.shape[0]:
            raise RwasymError(f"contexts[{label!r}]: site {site!r} is {widths[hook]} wide but V has {V.shape[0]} rows")
        watchers.setdefault(hook, []).append((label, TopContexts(V, top=top, window=window)))
    return watchers


def capture_blocks(
    stream: Any,
    data: Any,
    *,
    sites: Sequence[str] | dict[str, int] | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool | None = None,
    gram_dtype: torch.dtype | None = None,
    exclude_positions: Sequence[int] = (),
    exclude_tokens: Sequence[int] = (),
) -> Iterator[tuple[int, ActivationStats]]:
    """Block-streamed `capture`: ``(layer, statistics of that block's sites)`` for each block in turn.

    ``stream`` is a `rwasym.models.streaming.BlockStream` (a checkpoint folder read one block at a time).
    Every batch is embedded once (`BlockStream.record`); then block L is read from the checkpoint, every
    batch's hidden states are pushed through it with the sites' hooks attached, and its statistics are
    yielded *while block L is still materialised* (so the caller can read its weights). Drop each yielded
    statistics object before asking for the next block (``for layer, acts in capture_blocks(...): ...;
    del acts``): then one block's sums are held at a time. The hidden states of the whole corpus stay in
    memory (tokens × d_model in the compute dtype). Same arguments and the same statistics as `capture` on
    ``rwasym.load(folder)`` with the same batches, bit for bit; sites must lie inside blocks
    (``blocks.L.…``), and there is no checkpoint file and no data parallelism (one process)."""
    model = stream.model
    exclude_positions, exclude_tokens = _check_exclusions(exclude_positions, exclude_tokens)
    widths = _resolve_sites(model, sites, layers, batch_size)
    outside = [hook for hook in widths if not hook.startswith("blocks.")]
    if outside:
        raise RwasymError(
            f"block streaming captures sites inside blocks only; {outside[0]} is outside them: leave it out, or "
            "load the model whole (rwasym.load) and use capture"
        )
    aliases = model.residual_hooks()
    batches, masks, seen = [], [], 0
    with stream.outside(head=False):  # the embedding read once for every batch
        for tokens, mask in _as_batches(data, batch_size, model):
            mask, kwargs = _kept_tokens(tokens, mask, model, max_tokens, seen, exclude_positions, exclude_tokens)
            n = int(mask.sum())
            if n == 0:
                if max_tokens is not None and seen >= max_tokens:
                    break
                continue
            seen += n
            batches.append(stream.record(tokens, kwargs.get("attention_mask")))
            masks.append(mask)
    _require_captured(seen)
    current: dict[str, Tensor | None] = {"mask": None}
    last = _last_layer(widths)
    for layer in tqdm(range(last + 1), desc="blocks", unit="block", disable=quiet(progress)):
        here = {hook: width for hook, width in widths.items() if int(hook.split(".")[1]) == layer}
        stats = {hook: RunningCovariance(width, name=hook, gram_dtype=gram_dtype) for hook, width in here.items()}

        def make_hook(hook_name: str, width: int, stats: dict = stats):
            def hook_fn(x: Tensor, hook: Any = None) -> Tensor:
                stats[hook_name].add(flatten_site(x, width), current["mask"])
                return x

            return hook_fn

        fwd_hooks = [(hook, make_hook(hook, width)) for hook, width in here.items()]
        with stream.block(layer) as block:
            with model.bridge.hooks(fwd_hooks=fwd_hooks):
                for batch, mask in zip(batches, masks):
                    current["mask"] = mask
                    batch.hidden = stream.run(block, layer, batch)
            if stats:
                yield (
                    layer,
                    _activation_stats(stats, aliases, model),
                )
        del stats, fwd_hooks  # this block's sums are gone before the next block runs (the caller drops its own)
        release_memory()


@dataclass
class PredictionStats:
    """The next-token statistics `rwasym.math.subspaces.prediction_fisher` needs: Σ_t p_t (d_vocab) and the
    running second moment of g_t = W̃_U p_t (d_model), over ``count`` unpadded positions."""

    p_sum: Tensor
    g: RunningCovariance

    @property
    def count(self) -> int:
        return self.g.count

    @property
    def p_mean(self) -> Tensor:
        return self.p_sum / self.count

    def fisher(self, unembedding: Tensor) -> Tensor:
        """E_t[W̃_U (diag p_t − p_t p_tᵀ) W̃_Uᵀ] (`rwasym.math.subspaces.prediction_fisher`)."""
        from ..math.subspaces import prediction_fisher

        return prediction_fisher(unembedding, self.p_mean, self.g.second_moment())


def prediction_statistics(
    model: Any,
    data: Any,
    *,
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool | None = None,
    chunk_tokens: int = 256,
    exclude_positions: Sequence[int] = (),
    exclude_tokens: Sequence[int] = (),
) -> PredictionStats:
    """Stream ``data`` through the whole ``model`` once and accumulate, in float64, Σ_t p_t and Σ_t g_t g_tᵀ
    with p_t = softmax(logits_t) (the model's own output, after any logit soft-capping) and
    g_t = W̃_U p_t (`Model.unembedding`; computed in the model's precision, summed in float64), over every
    unpadded position: the same tokens, budget and batches as `capture` with the same ``data``, ``batch_size``,
    ``max_tokens`` and exclusions. ``chunk_tokens`` positions are projected at a time, so the probabilities
    held stay at chunk_tokens × d_vocab."""
    model = load(model)
    exclude_positions, exclude_tokens = _check_exclusions(exclude_positions, exclude_tokens)
    if batch_size <= 0:
        raise RwasymError(f"batch_size must be positive; got {batch_size}")
    # the projection p_t ↦ W̃_U p_t dominates (d_model · d_vocab per token): in the model's precision when that is
    # below float64, summed in float64 (as `capture` forms its Gram products; relative error ~1e-7)
    wide = model.dtype == torch.float64
    w_t = model.unembedding().T.contiguous().to(torch.float64 if wide else torch.float32)  # (d_vocab, d_model)
    p_sum = torch.zeros(model.d_vocab, dtype=torch.float64)
    g = RunningCovariance(model.d_model, name="prediction g = W̃_U p")
    seen = 0
    bar = tqdm(total=max_tokens, desc="prediction statistics", unit="tok", disable=quiet(progress))
    with torch.no_grad():
        for tokens, mask in _as_batches(data, batch_size, model):
            mask, kwargs = _kept_tokens(tokens, mask, model, max_tokens, seen, exclude_positions, exclude_tokens)
            n = int(mask.sum())
            if n == 0:
                if max_tokens is not None and seen >= max_tokens:
                    break
                continue
            seen += n
            logits = model.bridge(tokens.to(model.device), **kwargs)
            rows = logits.reshape(-1, logits.shape[-1])[mask.reshape(-1).to(logits.device)].detach().cpu()
            for start in range(0, rows.shape[0], chunk_tokens):
                p = torch.softmax(rows[start : start + chunk_tokens].to(w_t.dtype), dim=-1)  # (c, d_vocab)
                p_sum += p.sum(0, dtype=torch.float64)
                g.add(p @ w_t)
            bar.update(n)
    bar.close()
    if seen == 0:
        raise RwasymError("no tokens for the prediction statistics: the data is empty or fully masked")
    return PredictionStats(p_sum=p_sum, g=g)


def _site_width(model: Model, hook: str) -> int:
    for spec in model.matrices():
        if hook == spec.hook_in:
            return spec.n_in
        if hook == spec.hook_out:
            return spec.n_out
    if hook in model.residual_hooks().values():
        return model.d_model
    raise RwasymError(f"cannot infer the width of hook {hook!r}; pass sites as a dict {{hook: width}}")


_CHECKPOINT_FORMAT = "rwasym-capture/1"


def _checkpoint_key(
    model: Model,
    data: Any,
    widths: dict[str, int],
    gram_dtype: torch.dtype | None,
    batch_size: int,
    max_tokens: int | None,
    size: int,
) -> dict:
    """What a capture checkpoint must match to be resumed."""
    if size > 1:
        raise RwasymError(
            "capture(checkpoint=...) runs in one process; under torchrun drop checkpoint= "
            "(each rank's share is short) or capture in a single process"
        )
    if isinstance(data, (str, os.PathLike)):
        digest = "file:" + hashlib.sha256(Path(data).read_bytes()).hexdigest()[:16]
    elif isinstance(data, Tensor):
        digest = "tokens:" + data_hash(data)
    elif isinstance(data, dict) and isinstance(data.get("input_ids"), Tensor):
        mask = data.get("attention_mask")
        digest = "tokens:" + data_hash(data["input_ids"]) + ("" if mask is None else ":mask:" + data_hash(mask.long()))
    else:
        raise RwasymError(
            "capture(checkpoint=...) needs data it can hash to recognise on resume: a token tensor, "
            "a dict with input_ids (and attention_mask) or a text file; an iterable of batches "
            "cannot be checked"
        )
    return dict(
        format=_CHECKPOINT_FORMAT,
        weights=model.weights_hash(),
        data=digest,
        sites=sorted([h, int(w)] for h, w in widths.items()),
        dtype=str(model.dtype),
        gram_dtype=str(gram_dtype),
        batch_size=int(batch_size),
        max_tokens=max_tokens,
    )


class _Checkpoint:
    """The capture's checkpoint file: every statistic's sums as safetensors, the key and progress as
    its JSON metadata; written to a temporary file and renamed, so a kill leaves the last one."""

    def __init__(self, path: Path, key: dict, every: int) -> None:
        if path.suffix != ".safetensors":
            raise RwasymError(f"capture checkpoint {str(path)!r} must be a .safetensors file")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise RwasymError(f"checkpoint_every must be a positive integer (batches); got {every!r}")
        self.path, self.key, self.every = path, key, every

    def load(self, stats: dict, skip: set, extra: dict | None = None) -> dict | None:
        """Restore the sums into ``stats`` (and the shared sites into ``skip``) and the ``extra``
        tensors in place; the metadata, or None if there is no file."""
        if not self.path.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {})["rwasym"])
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as err:  # safetensors raises several types for a damaged file
            raise RwasymError(
                f"capture checkpoint {str(self.path)!r} cannot be read ({type(err).__name__}: {err}); "
                "it is corrupt or not a capture checkpoint: delete it to start again"
            ) from None
        if meta.get("key") != self.key:
            theirs = meta.get("key") or {}
            diff = sorted(k for k in set(self.key) | set(theirs) if theirs.get(k) != self.key.get(k))
            raise RwasymError(
                f"capture checkpoint {str(self.path)!r} belongs to another capture (differs in "
                f"{', '.join(diff)}); pass another checkpoint path or delete the file"
            )
        try:
            for follower, leader in meta["shared"].items():
                stats[follower] = stats[leader]
                skip.add(follower)
            for hook, acc in stats.items():
                if hook not in meta["shared"]:
                    acc.load_state_dict(
                        {
                            "dim": acc.dim,
                            "count": int(meta["counts"][hook]),
                            "sum": tensors[f"{hook}/sum"],
                            "sum_outer": tensors[f"{hook}/sum_outer"],
                        }
                    )
            for name, tensor in (extra or {}).items():
                tensor.copy_(tensors[f"extra/{name}"])
            _ = (int(meta["batches"]), int(meta["seen"]), bool(meta["done"]))  # malformed metadata raises here
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise RwasymError(
                f"capture checkpoint {str(self.path)!r} has the right key but incomplete contents "
                f"(missing {err}); it is corrupt: delete it to start again"
            ) from None
        return meta

    def save(
        self,
        stats: dict,
        skip: set,
        batches: int,
        seen: int,
        done: bool,
        extra: dict | None = None,
        info: dict | None = None,
    ) -> None:
        """Write the sums, the ``extra`` tensors and progress (``info``: more JSON metadata)."""
        from safetensors.torch import save_file

        shared = {f: next(h for h, a in stats.items() if a is stats[f] and h not in skip) for f in skip}
        tensors, counts = {}, {}
        for hook, acc in stats.items():
            if hook not in shared:
                state = acc.state_dict()
                tensors[f"{hook}/sum"], tensors[f"{hook}/sum_outer"] = state["sum"], state["sum_outer"]
                counts[hook] = state["count"]
        tensors.update({f"extra/{name}": t.contiguous() for name, t in (extra or {}).items()})
        meta = dict(key=self.key, batches=batches, seen=seen, done=done, shared=shared, counts=counts, **(info or {}))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"rwasym": json.dumps(meta)})
        os.replace(tmp, self.path)


def _same_tensor_candidates(model: Model, widths: dict[str, int]) -> list[tuple[str, str]]:
    """(resid_post of block L, resid_pre of block L+1) hook pairs that are both captured."""
    resid = model.residual_hooks()
    out = []
    for layer in range(model.n_layers - 1):
        a, b = resid.get(f"blocks.{layer}.hook_resid_post"), resid.get(f"blocks.{layer + 1}.hook_resid_pre")
        if a in widths and b in widths and a != b:
            out.append((a, b))
    return out


def _last_layer(widths: dict[str, int]) -> int:
    layers = [int(h.split(".")[1]) for h in widths if h.startswith("blocks.")]
    return max(layers) if len(layers) == len(widths) else 10**9


def data_hash(tokens: Int[Tensor, "batch pos"]) -> str:
    """A short content hash of a token tensor (keys saved statistics by data, not by name)."""
    return hashlib.sha256(tokens.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]
