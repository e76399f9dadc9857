"""Behavioural metrics of edited models, measured by running them, and the fast batched evaluation.

Metrics (policy π = the evaluated model, reference π_ref = the base; sums over response tokens):

- DPO implicit reward r(x, y) = β [log π(y|x) − log π_ref(y|x)]; ``margin`` = mean_i r(x_i, y_w,i) −
  r(x_i, y_l,i); ``reward_accuracy`` = fraction of pairs with a positive margin (TRL's
  rewards/accuracies; 0 for the base itself; a margin at float-rounding level counts by its sign,
  so prefer ``margin`` for tiny edits); ``accuracy`` = fraction with
  log π(y_w|x) > log π(y_l|x), the policy's own preference (defined for the base too).
- ``ce``: mean next-token cross-entropy (nats) on held-out text.
- ``kl_base`` / ``kl_tuned``: mean over text positions of KL(π(·|x_<t) ‖ π_ref(·|x_<t)) with the
  base / the tuned model as reference (in transplant mode kl_base measures the edit's disruption,
  in ablate mode kl_tuned does).
- user metrics: ``{name: callable(logits, batch) -> float}``, called with the edited model's text
  logits (n_text, pos, d_vocab) and the text tokens (n_text, pos).
- `Evaluator.gap_fractions`: fraction of the base→tuned gap recovered, (m − m_base)/(m_tuned −
  m_base) (transplant), or removed, (m_tuned − m)/(m_tuned − m_base) (ablate).

Speed (`Evaluator.measure_edits`): a sweep evaluates the same data under many edits of one matrix
of layer L, and an edit cannot change anything before block L. So the clean output of block L−1
is computed once per data stream and reused: during edited passes the host modules of blocks
0..L−1 return the cached output instead of computing (TransformerBridge's ``start_at_layer``
still executes blocks 0..L−1 internally and discards them, so it saves nothing). k edits share
one forward pass, edit e on batch rows e·B:(e+1)·B (`rwasym.hooks.edits.edit_hooks`). Sequences
are not run twice: responses are scored from the text pass when the text starts with them (the
default text is prompt + chosen), chosen and rejected share one pass when they agree up to their
last scored position (one-token responses), and pair passes unembed only the scored positions (a
hook on ``unembed.hook_in``). A self-check against plain forwards switches the prefix cache and
the position selection off (with a warning) on architectures where they are not exact.

Memory: rows run in chunks whose logits fit ``logit_bytes`` (`rows_per_chunk`) and every chunk is
reduced at once (summed response log-probabilities, text and collateral sums), so no full-vocabulary
tensor of the whole text is held; the clean references' log-probabilities are kept whole while they
fit ``reference_bytes``, else each chunk's are recomputed from the cached final hidden state by the
model's unembedding (Gemma 3's 262,144-token vocabulary: 0.13 GB per 64-position row otherwise).
`Evaluator.measure` is the reference path: full forwards of chosen, rejected and text.
"""

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import RwasymError
from ..hooks.edits import MODES, edit_hooks
from ..models import Model, check_same_architecture, load

__all__ = ["Collateral", "EvalSet", "Evaluator", "as_eval_set", "collateral_set", "eval_set"]

Metric = Callable[[Tensor, Tensor], float]
_PAIR_KEYS = ("prompt", "chosen", "rejected")


# --------------------------------------------------------------------------------- data
@dataclass
class EvalSet:
    """Held-out data as packed sequences (int64 token ids, right-padded with 0).

    chosen / rejected: prompt + response per pair (`rwasym.data.PreferencePairs.sequences`);
    chosen_scored / rejected_scored (bool, same shapes): the response tokens whose
    log-probabilities are summed. text / text_mask: held-out text and its real tokens (None: all).
    """

    chosen: Int[Tensor, "batch pos_c"]
    chosen_scored: Bool[Tensor, "batch pos_c"]
    rejected: Int[Tensor, "batch pos_r"]
    rejected_scored: Bool[Tensor, "batch pos_r"]
    text: Int[Tensor, "n_text pos_t"]
    text_mask: Bool[Tensor, "n_text pos_t"] | None = None


def _as_pairs(pairs: Any) -> Any:
    from ..data.pairs import PreferencePairs, load_pairs

    if isinstance(pairs, (PreferencePairs, str, os.PathLike)):
        return load_pairs(pairs)  # token-id files (text needs a model's tokenizer: `Model.load_pairs`)
    get = pairs.get if isinstance(pairs, Mapping) else lambda k, d=None: getattr(pairs, k, d)
    if any(get(k) is None for k in _PAIR_KEYS):
        raise RwasymError(
            f"pairs need prompt, chosen and rejected token tensors; got a {type(pairs).__name__} "
            "without them (pass rwasym.data.PreferencePairs, a dict, or a file)"
        )
    keys = _PAIR_KEYS + ("prompt_mask", "chosen_mask", "rejected_mask")
    fields: dict[str, Any] = {k: None if get(k) is None else torch.as_tensor(get(k)) for k in keys}
    return PreferencePairs(**fields)


def as_eval_set(pairs: Any, text: Any = None, max_pairs: int | None = None) -> EvalSet:
    """Normalise held-out data into an `EvalSet`.

    pairs: an EvalSet, a `PreferencePairs` (or any object / dict with prompt, chosen, rejected and
    optional masks), or a file (`PreferencePairs.save` safetensors, or JSONL of token-id lists).
    text: a token tensor, a dict with input_ids / attention_mask, a .safetensors file with
    input_ids, or None = the packed prompt + chosen sequences. max_pairs: keep the first pairs.
    """
    if isinstance(pairs, EvalSet):
        return pairs
    pairs = _as_pairs(pairs)
    if max_pairs is not None:
        pairs = pairs.subset(torch.arange(min(int(max_pairs), len(pairs))))
    if len(pairs) == 0:
        raise RwasymError("no preference pairs to evaluate; pass at least one pair")
    chosen, chosen_scored = pairs.sequences("chosen")
    rejected, rejected_scored = pairs.sequences("rejected")
    text_mask = None
    if text is None:
        last = (chosen_scored * torch.arange(chosen.shape[1])).max(-1).values  # (n,) last real position
        text, text_mask = chosen, torch.arange(chosen.shape[1])[None, :] <= last[:, None]
    elif isinstance(text, (str, os.PathLike)):
        from ..data import load_tensors

        if not str(text).endswith(".safetensors"):
            raise RwasymError(f"text {str(text)!r}: pass a .safetensors file with input_ids (or a token tensor)")
        text = load_tensors(text, "held-out text")
    if isinstance(text, Mapping):
        if "input_ids" not in text:
            raise RwasymError(f"the held-out text has no 'input_ids' tensor; found {sorted(text)}")
        text, text_mask = text["input_ids"], text.get("attention_mask")
    if not isinstance(text, Tensor) or text.dim() != 2 or text.is_floating_point() or text.shape[1] < 2:
        raise RwasymError(
            "held-out text must be an integer token tensor of shape (n, pos) with pos >= 2; got "
            f"{getattr(text, 'shape', type(text).__name__)}"
        )
    text = text.long().cpu()
    if text_mask is not None:
        text_mask = torch.as_tensor(text_mask).bool().cpu()
        if text_mask.shape != text.shape:
            raise RwasymError(f"text attention_mask has shape {tuple(text_mask.shape)}, text has {tuple(text.shape)}")
    return EvalSet(chosen, chosen_scored, rejected, rejected_scored, text, text_mask)


def eval_set(model: Model, pairs: Any, text: Any = None, max_pairs: int | None = None) -> EvalSet:
    """The one resolver of held-out pairs for ``model``: a file is read with the model's own tokenizer
    (`Model.load_pairs`; token-id files need none), anything else goes through `as_eval_set`; an
    `EvalSet` passes through untouched. Token ids are checked against the model's vocabulary.
    Entry points (`Evaluator`, `rwasym.sweep`) call it once; everything below takes the `EvalSet`."""
    if isinstance(pairs, EvalSet):
        data = pairs
    else:
        if isinstance(pairs, (str, os.PathLike)):  # a file: text is tokenized with the model's tokenizer
            pairs = model.load_pairs(pairs)
        data = as_eval_set(pairs, text, max_pairs)
    for name in ("chosen", "rejected", "text"):
        t = getattr(data, name)
        if int(t.max()) >= model.d_vocab or int(t.min()) < 0:
            raise RwasymError(
                f"{name} token ids must lie in [0, {model.d_vocab}) for this model; got "
                f"[{int(t.min())}, {int(t.max())}]: was the data tokenized for another model?"
            )
    return data


@dataclass
class Collateral:
    """Collateral text: where an edit's behaviour-independent cost is measured (`Evaluator.iter_collateral`).

    tokens: (n, pos) int64 rows; counted: (n, pos − 1) bool, position t counts when its prediction
    of token t + 1 does (padding and, for held-out prompts, the positions predicting the answer are
    not counted); attention_mask: the real tokens (None: all); source: where the rows came from
    ("text", or "prompts" — the held-out pairs' prompts, not disjoint from the pairs).
    """

    tokens: Int[Tensor, "n pos"]
    counted: Bool[Tensor, "n pos_minus_1"]
    attention_mask: Bool[Tensor, "n pos"] | None = None
    source: str = "text"


def collateral_set(model: Model, collateral: Any, data: EvalSet) -> Collateral:
    """The one resolver of collateral text for ``model`` (entry points call it once).

    collateral: a `Collateral`; an integer token tensor (n, pos); a dict with input_ids and an
    optional attention_mask; a ``.safetensors`` file with input_ids; a plain-text file (tokenized
    with the model's tokenizer, rows of 64 tokens, `rwasym.data.load_text`); or None = the held-out
    pairs' prompts with the positions that predict a response token excluded (a fallback: it is
    not disjoint from the pairs, so a warning says so). Warns when a held-out prompt occurs inside
    the collateral rows (the cost would then partly measure the behaviour)."""
    if isinstance(collateral, Collateral):
        return collateral
    if collateral is None:
        warnings.warn(
            "rwasym: no collateral text given; the collateral KL is measured on the held-out prompts "
            "(answer positions excluded), which are not disjoint from the pairs. Pass collateral= "
            "(rwasym intervene --collateral FILE) with generic text",
            stacklevel=3,
        )
        first = _first_response(data)
        pos = torch.arange(data.chosen.shape[1] - 1)
        counted = (pos[None, :] + 1) < first[:, None]  # predicting a prompt token, not the answer
        return Collateral(data.chosen, counted, None, "prompts")
    mask = None
    if isinstance(collateral, (str, os.PathLike)):
        if str(collateral).endswith(".safetensors"):
            from ..data import load_tensors

            collateral = load_tensors(collateral, "collateral text")
            if "input_ids" not in collateral:
                raise RwasymError(f"the collateral file has no 'input_ids' tensor; found {sorted(collateral)}")
        else:
            from ..data.pairs import load_text

            collateral = load_text(collateral, tokenizer=model.tokenizer, d_vocab=model.d_vocab)
    if isinstance(collateral, Mapping):
        collateral, mask = collateral.get("input_ids"), collateral.get("attention_mask")
    if not isinstance(collateral, Tensor) or collateral.dim() != 2 or collateral.is_floating_point():
        raise RwasymError(
            "collateral text must be an integer token tensor of shape (n, pos), a dict with input_ids, a "
            f".safetensors file or a text file; got {getattr(collateral, 'shape', type(collateral).__name__)}"
        )
    tokens = collateral.long().cpu()
    if tokens.shape[1] < 2 or int(tokens.min()) < 0 or int(tokens.max()) >= model.d_vocab:
        raise RwasymError(
            f"collateral token rows need pos >= 2 and ids in [0, {model.d_vocab}); got shape {tuple(tokens.shape)}, "
            f"ids [{int(tokens.min())}, {int(tokens.max())}]: was it tokenized for another model?"
        )
    if mask is not None:
        mask = torch.as_tensor(mask).bool().cpu()
        if mask.shape != tokens.shape:
            raise RwasymError(
                f"collateral attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(tokens.shape)}"
            )
    valid = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask
    counted = valid[:, :-1] & valid[:, 1:]
    if not bool(counted.any()):
        raise RwasymError("the collateral text has no position with a real next token; pass longer rows")
    shared = _shared_prompts(data, tokens)
    if shared:
        warnings.warn(
            f"rwasym: {shared} held-out prompt(s) occur in the collateral text, so its KL partly measures the "
            "behaviour; use collateral text disjoint from the pairs",
            stacklevel=3,
        )
    return Collateral(tokens, counted, None if mask is None or bool(mask.all()) else mask, "text")


def _first_response(data: EvalSet) -> Tensor:
    """(n,) the first response (scored) position of each pair's chosen sequence: its prompt's length."""
    return data.chosen_scored.long().argmax(-1)


def _shared_prompts(data: EvalSet, tokens: Tensor) -> int:
    """How many held-out prompts (the tokens before the first response token) occur contiguously in ``tokens``."""
    first = _first_response(data).tolist()
    prompts = {tuple(row[:f].tolist()) for row, f in zip(data.chosen, first) if f >= 2}
    rows = [r.tolist() for r in tokens]
    hits = 0
    for length in sorted({len(p) for p in prompts}):
        windows = {tuple(r[i : i + length]) for r in rows for i in range(len(r) - length + 1)}
        hits += sum(1 for p in prompts if len(p) == length and p in windows)
    return hits


@dataclass
class _Stream:
    """One batch of sequences run through the model. select: logit positions kept (None = all);
    scores: (role, rows, targets, weights) — response log-probabilities read off this stream;
    text: the held-out text stream (its positions give ce / kl_* and the user metrics)."""

    tokens: Tensor
    attention_mask: Tensor | None = None
    select: Tensor | None = None
    scores: tuple = ()
    text: bool = False


def _cols(scored: Tensor) -> Tensor:
    return torch.nonzero(scored[:, 1:].any(0))[:, 0]  # positions t − 1 whose next token t is scored


def _streams(data: EvalSet, text_metrics: bool = True) -> list[_Stream]:
    """The sequences to run, skipping work that cannot change the metrics; the text stream last (without
    ``text_metrics`` there is none, and the responses come from pair streams).

    A position's logits depend only on the tokens up to it, so a response is scored from any
    sequence that agrees with it up to its last scored position: from the text stream when the
    text starts with it (the default text is prompt + chosen), else from a pair stream cut after
    that position. Chosen and rejected agreeing on every kept token (one-token responses: only
    the prompt is kept) share one pass; kept sequences of equal length are stacked in one pass.
    Score = (role, rows, positions in the stream's logits, targets, weights).
    """
    n, rows = data.chosen.shape[0], torch.arange(data.chosen.shape[0])
    mask = data.text_mask
    text = _Stream(data.text, None if mask is None or bool(mask.all()) else mask.long(), text=True)
    pending = []
    for role, tok, sc in (
        ("chosen", data.chosen, data.chosen_scored),
        ("rejected", data.rejected, data.rejected_scored),
    ):
        cols = _cols(sc)
        length = int(cols.max()) + 1
        if (
            text_metrics
            and data.text.shape[0] == n
            and data.text.shape[1] >= length
            and torch.equal(data.text[:, :length], tok[:, :length])
        ):
            text.scores += ((role, rows, cols, tok[:, cols + 1], sc[:, cols + 1]),)
        else:
            pending.append((role, tok, sc, cols, length))

    def stream(parts: list, stacked: bool) -> _Stream:
        sel = torch.unique(torch.cat([p[3] for p in parts]))
        scores = tuple(
            (role, rows + i * n * stacked, torch.searchsorted(sel, cols), tok[:, cols + 1], sc[:, cols + 1])
            for i, (role, tok, sc, cols, _) in enumerate(parts)
        )
        tokens = torch.cat([p[1][:, : p[4]] for p in parts]) if stacked else parts[0][1][:, : parts[0][4]]
        return _Stream(tokens, None, sel, scores)

    if len(pending) == 2 and pending[0][4] == pending[1][4]:
        same = torch.equal(pending[0][1][:, : pending[0][4]], pending[1][1][:, : pending[1][4]])
        out = [stream(pending, stacked=not same)]
    else:
        out = [stream([p], stacked=False) for p in pending]
    return out + [text] if text_metrics else out


def _plain_streams(data: EvalSet, text_metrics: bool = True) -> list[_Stream]:
    """The reference path's sequences: chosen and rejected whole (every position unembedded), then the text."""
    n = data.chosen.shape[0]

    def whole(role: str, tok: Tensor, sc: Tensor) -> _Stream:
        score = (role, torch.arange(n), torch.arange(tok.shape[1] - 1), tok[:, 1:], sc[:, 1:])
        return _Stream(tok, None, None, (score,))

    mask = data.text_mask
    text = _Stream(data.text, None if mask is None or bool(mask.all()) else mask.long(), text=True)
    pairs = [whole("chosen", data.chosen, data.chosen_scored), whole("rejected", data.rejected, data.rejected_scored)]
    return pairs + [text] if text_metrics else pairs


# --------------------------------------------------------------------------------- memory: row chunks
LOGIT_BYTES = 1 << 30  # what one evaluation chunk's logits and log-probabilities may hold
REFERENCE_BYTES = 1 << 30  # a reference's log-probabilities kept whole up to this; above it, recomputed per chunk


def rows_per_chunk(n_rows: int, width: int, d_vocab: int, k: int, n_refs: int, budget: int = LOGIT_BYTES) -> int:
    """Rows of a stream evaluated at once: k edits' float32 logits (``width`` positions × ``d_vocab``) and the
    float64 log-probabilities, probabilities and ``n_refs`` reference log-probabilities of one edit, per row,
    within ``budget`` bytes (at least 1 row). A 262k vocabulary at 64 positions and 4 edits: 1 row per GiB."""
    per_row = width * d_vocab * (4 * k + 8 * (2 + n_refs))
    return max(1, min(n_rows, budget // max(1, per_row)))


def _chunks(n: int, step: int) -> list[slice]:
    return [slice(a, min(a + step, n)) for a in range(0, n, step)]


def _forward(model: Model, tokens: Tensor, mask: Tensor | None, capture: bool = False) -> tuple[Tensor, Tensor | None]:
    """Plain logits of ``tokens`` (and, when ``capture``, the input of ``unembed.hook_in``)."""
    box: dict[str, Tensor] = {}
    hooks = []
    if capture:

        def grab(x: Tensor, hook: Any = None) -> Tensor:
            box["h"] = x.detach()
            return x

        hooks.append(("unembed.hook_in", grab))
    kw = {} if mask is None else {"attention_mask": mask.long().to(model.device)}
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=hooks):
        logits = model.bridge(tokens.to(model.device), **kw)
    return logits, box.get("h")


class _Reference:
    """The next-token log-probabilities log softmax(logits[:, :-1]) (float64) of one clean model on fixed rows,
    served by row chunks (`logp`). Kept whole when they fit ``keep`` bytes; otherwise (a 262k vocabulary) the
    input of ``unembed.hook_in`` is kept (n × pos × d_model) and each chunk's logits are recomputed by the
    model's unembedding — one matmul, checked equal to the forward's logits on the first chunk — or, where that
    check fails, by a plain forward of the chunk."""

    def __init__(self, model: Model, tokens: Tensor, mask: Tensor | None, step: int, keep: int = REFERENCE_BYTES):
        self.model, self.tokens, self.mask = model, tokens, mask
        n, pos = tokens.shape
        self.whole = n * (pos - 1) * model.d_vocab * 8 <= keep
        capture = not self.whole and "unembed.hook_in" in model.bridge.hook_dict
        parts: list[Tensor] = []
        for i, rows in enumerate(_chunks(n, step)):
            logits, h = _forward(model, tokens[rows], None if mask is None else mask[rows], capture)
            if self.whole:
                parts.append(logits[:, :-1].double().log_softmax(-1).cpu())
                continue
            if capture and i == 0:
                with torch.no_grad():
                    again = model.bridge.unembed(h)
                tol = 1e-5 * (1.0 + float(logits.abs().max()))
                capture = again.shape == logits.shape and float((again - logits).abs().max()) <= tol
            if capture and h is not None:
                parts.append(h[:, :-1].clone())
        self.kept = torch.cat(parts) if parts else None
        self.mode = "whole" if self.whole else ("hidden" if capture else "forward")

    def logp(self, rows: slice) -> Float[Tensor, "c pos_minus_1 d_vocab"]:
        kept = self.kept
        if self.mode == "whole" and kept is not None:
            return kept[rows]
        if self.mode == "hidden" and kept is not None:
            with torch.no_grad():
                logits = self.model.bridge.unembed(kept[rows])
        else:
            logits = _forward(self.model, self.tokens[rows], None if self.mask is None else self.mask[rows])[0][:, :-1]
        return logits.double().log_softmax(-1).cpu()


# --------------------------------------------------------------------------------- the fast runner
class _PrefixUnsupported(Exception):
    pass


@contextlib.contextmanager
def _patched_forward(module: torch.nn.Module, fn: Callable) -> Iterator[None]:
    previous = module.__dict__.get("forward")  # an instance-level forward (a hook's, a patch's) to restore
    module.forward = fn
    try:
        yield
    finally:
        if previous is not None:
            module.forward = previous
        else:
            del module.forward


def _expand(out: Any, k: int, batch: int) -> Any:
    """Repeat every batch-leading tensor of a block output k times (edit-major rows)."""
    if isinstance(out, Tensor):
        if out.dim() == 0 or out.shape[0] != batch:
            raise _PrefixUnsupported(f"block output tensor of shape {tuple(out.shape)}")
        return out.repeat(k, *([1] * (out.dim() - 1)))
    if isinstance(out, (tuple, list)):
        return type(out)(_expand(x, k, batch) for x in out)
    if out is None:
        return None
    raise _PrefixUnsupported(f"block output of type {type(out).__name__}")


def _take(out: Any, rows: slice, batch: int) -> Any:
    """The rows ``rows`` of every batch-leading tensor of a block output."""
    if isinstance(out, Tensor):
        if out.dim() == 0 or out.shape[0] != batch:
            raise _PrefixUnsupported(f"block output tensor of shape {tuple(out.shape)}")
        return out[rows]
    if isinstance(out, (tuple, list)):
        return type(out)(_take(x, rows, batch) for x in out)
    if out is None:
        return None
    raise _PrefixUnsupported(f"block output of type {type(out).__name__}")


class _Runner:
    """One host model on fixed streams, under batches of k edits of one matrix in layer ``layer``.
    ``steps``: rows per chunk of each stream for the self-check (default: whole streams)."""

    def __init__(
        self, model: Model, streams: list[_Stream], layer: int, reuse: bool = True, steps: Sequence[int] | None = None
    ):
        self.model, self.streams, self.layer = model, streams, layer
        self.select = "unembed.hook_in" in model.bridge.hook_dict
        self.reuse = bool(reuse) and layer > 0
        self._cache: dict[tuple[int, int, int, int], Any] = {}
        self._prefix: list[Any] = []
        self._steps = list(steps) if steps is not None else [st.tokens.shape[0] for st in streams]
        if self.reuse or self.select:
            self._self_check()

    def _host(self, layer: int) -> torch.nn.Module:
        return self.model.bridge.blocks[layer].original_component

    def _record(self, stream: _Stream) -> Any:
        box: dict[str, Any] = {}
        host = self._host(self.layer - 1)
        original = host.forward

        def recording(*args: Any, **kwargs: Any) -> Any:
            box["out"] = original(*args, **kwargs)
            return box["out"]

        with _patched_forward(host, recording), torch.no_grad():
            self.model.bridge(stream.tokens.to(self.model.device), stop_at_layer=self.layer, **self._kwargs(stream, 1))
        if "out" not in box:
            raise _PrefixUnsupported(f"block {self.layer - 1} was never called")
        return box["out"]

    def _kwargs(self, stream: _Stream, k: int, rows: slice | None = None) -> dict:
        m = stream.attention_mask
        if m is None:
            return {}
        m = m if rows is None else m[rows]
        return {"attention_mask": m.repeat(k, 1).to(self.model.device)}

    def logits(self, i: int, k: int, hooks: Sequence = (), rows: slice | None = None) -> Tensor:
        """(k, c, S, d_vocab) logits of stream i (its rows ``rows``, default all) under k edits (hooks from
        `edit_hooks`)."""
        st = self.streams[i]
        n = st.tokens.shape[0]
        rows = slice(0, n) if rows is None else rows
        tokens = st.tokens[rows]
        fwd = list(hooks)
        if st.select is not None and self.select:
            sel = st.select.to(self.model.device)
            fwd.append(("unembed.hook_in", lambda x, hook=None: x[:, sel]))
        with contextlib.ExitStack() as stack, torch.no_grad():
            if self.reuse:
                key = (i, k, rows.start, rows.stop)
                if key not in self._cache:
                    self._cache = {kk: vv for kk, vv in self._cache.items() if kk[1] == k}
                    part = _take(self._prefix[i], rows, n)
                    self._cache[key] = _expand(part, k, tokens.shape[0])
                cached = self._cache[key]
                for layer in range(self.layer):  # blocks 0..L-1 return block L-1's clean output
                    stack.enter_context(_patched_forward(self._host(layer), lambda *a, **kw: cached))
            stack.enter_context(self.model.bridge.hooks(fwd_hooks=fwd))
            out = self.model.bridge(tokens.repeat(k, 1).to(self.model.device), **self._kwargs(st, k, rows))
        if st.select is not None and not self.select:
            out = out[:, st.select.to(out.device)]
        return out.reshape(k, -1, *out.shape[1:])

    def _self_check(self) -> None:
        try:
            self._prefix = [self._record(st) for st in self.streams] if self.reuse else []
            ok = True
            for i, st in enumerate(self.streams):
                for rows in _chunks(st.tokens.shape[0], self._steps[i]):
                    mask = None if st.attention_mask is None else st.attention_mask[rows]
                    plain = _forward(self.model, st.tokens[rows], mask)[0]
                    plain = plain if st.select is None else plain[:, st.select.to(plain.device)]
                    fast = self.logits(i, 2, rows=rows)
                    tol = 1e-5 * (1.0 + float(plain.abs().max()))
                    ok = ok and all(float((f - plain).abs().max()) <= tol for f in fast)
        except Exception as err:  # noqa: BLE001 — any failure means: use the plain path
            ok, reason = False, f"{type(err).__name__}: {err}"
        else:
            reason = "the cached-prefix logits differ from a plain forward"
        self._cache = {}
        if not ok:
            warnings.warn(
                f"rwasym: prefix reuse / response-only unembedding is not exact on this "
                f"architecture ({reason}); falling back to full forward passes",
                stacklevel=3,
            )
            self.reuse, self.select, self._prefix, self._cache = False, False, [], {}


# --------------------------------------------------------------------------------- evaluator
def _joint_hooks(host: Model, edits: Sequence[Mapping[str, tuple[Tensor, Tensor]]], caller: str) -> tuple[list, int]:
    """The forward hooks of k edits that each name the same matrices (`edit_hooks` per matrix) and the
    first edited layer."""
    names = list(edits[0]) if edits else []
    if not names or any(list(e) != names for e in edits):
        raise RwasymError(f"{caller} needs k >= 1 edits that all name the same matrices, in the same order")
    hooks: list = []
    for name in names:
        pairs = [e[name] for e in edits]
        hooks += edit_hooks(host, name, torch.stack([u for u, _ in pairs]), torch.stack([v for _, v in pairs]))
    # a write hook runs before any read hook at the same point (one matrix's output may be another's input)
    return hooks[1::2] + hooks[0::2], min(host.matrix(n).layer for n in names)


def _response_logps(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Σ_t w_t log softmax(logits_t)[y_t] per row, float64 (logits: (B, S, d_vocab))."""
    lp = logits.double().log_softmax(-1).gather(-1, targets.to(logits.device).unsqueeze(-1)).squeeze(-1)
    return (lp * weights.to(lp.device)).sum(-1).cpu()


def _nll_kl(logits: Tensor, refs: Sequence[Tensor], targets: Tensor, weight: Tensor) -> Tensor:
    """(1 + len(refs),) float64: Σ w_t −log softmax(logits_t)[y_t], then Σ w_t KL(softmax(logits_t) ‖ exp ref_t)
    for each reference, over rows and positions (logits (c, pos − 1, d_vocab), refs float64 log-probs of the
    same shape, targets and weight (c, pos − 1))."""
    logp = logits.double().log_softmax(-1).cpu()
    out = torch.zeros(1 + len(refs), dtype=torch.float64)
    out[0] = (-logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * weight).sum()
    p = logp.exp()
    neg_entropy = torch.einsum("btv,btv->bt", p, logp)  # Σ_v p log p (einsum: no (b, t, v) temporary)
    for j, ref in enumerate(refs):
        out[1 + j] = ((neg_entropy - torch.einsum("btv,btv->bt", p, ref)) * weight).sum()  # KL(p ‖ ref)
    return out


@dataclass
class _Collected:
    """What k edited (or plain) runs left, per edit: summed response log-probs (k, n) of chosen and rejected,
    the text sums (k, 1 + n_refs) = (Σ nll, Σ KL to each reference) over counted positions, the text logits
    (for user metrics only)."""

    chosen: Tensor
    rejected: Tensor
    text: Tensor
    logits: list[Tensor] | None


class Evaluator:
    """Behavioural metrics (module docstring) of edited models against fixed references.

    base, tuned: models (anything `rwasym.load` accepts); data: pairs (see `as_eval_set`); text:
    held-out text (default: prompt + chosen of the pairs); beta: the DPO β; metrics: user metrics
    ``{name: callable(logits, batch) -> float}`` (a list of functions uses their ``__name__``);
    collateral: the text of `iter_collateral` (see `collateral_set`; default: the held-out prompts).
    text_metrics: False leaves out ce / kl_base / kl_tuned (and user metrics): only the pairs' response
    positions are unembedded, far cheaper at a large vocabulary.
    ``reference`` holds the metrics of the base and of the tuned model.

    Memory: every pass runs its rows in chunks whose logits and log-probabilities fit ``logit_bytes``
    (`rows_per_chunk`), and the clean references' log-probabilities are kept whole up to
    ``reference_bytes``, else recomputed per chunk from the final hidden state (`_Reference`), so no
    (n, pos, d_vocab) tensor is held whatever the vocabulary — except the text logits user metrics are
    called with.
    """

    def __init__(
        self,
        base: Any,
        tuned: Any,
        data: Any,
        *,
        text: Any = None,
        beta: float = 0.1,
        metrics: Mapping[str, Metric] | Sequence[Metric] | None = None,
        reuse_prefix: bool = True,
        max_pairs: int | None = None,
        collateral: Any = None,
        logit_bytes: int = LOGIT_BYTES,
        reference_bytes: int = REFERENCE_BYTES,
        text_metrics: bool = True,
    ):
        self.base, self.tuned = load(base), load(tuned)
        check_same_architecture(self.base, self.tuned)
        self.data = eval_set(self.base, data, text, max_pairs)
        self.logit_bytes, self.reference_bytes = int(logit_bytes), int(reference_bytes)
        # the collateral text (`collateral_set`) is resolved on first use: only effect-matched sweeps need it
        self._collateral_arg = collateral
        self._collateral: Collateral | None = None
        self._collateral_ref: dict[int, tuple[_Reference, float]] = {}
        if isinstance(metrics, Mapping):
            self.metrics = dict(metrics)
        else:
            self.metrics = {getattr(f, "__name__", f"metric{i}"): f for i, f in enumerate(metrics or [])}
        if not all(callable(f) for f in self.metrics.values()):
            raise RwasymError("metrics must be callables (logits, batch) -> float")
        self.text_metrics = bool(text_metrics)
        if self.metrics and not self.text_metrics:
            raise RwasymError(
                "user metrics are called with the held-out text's logits; keep text_metrics (drop --no-text-metrics)"
            )
        self.beta = float(beta)
        self.reuse_prefix = reuse_prefix
        self.streams = _streams(self.data, self.text_metrics)
        self._plain = _plain_streams(self.data, self.text_metrics)
        t_mask = self.data.text_mask
        valid = torch.ones_like(self.data.text, dtype=torch.bool) if t_mask is None else t_mask
        self._text_valid = (valid[:, :-1] & valid[:, 1:]).double()  # (n_text, pos-1)
        self._runners: dict[tuple, _Runner] = {}
        text = self._plain[-1]
        step = self._step(text, 1)
        self._ref_text = {
            name: _Reference(model, text.tokens, text.attention_mask, step, self.reference_bytes)
            for name, model in (("base", self.base), ("tuned", self.tuned))
            if self.text_metrics
        }
        base_out, tuned_out = self._collect_plain(self.base), self._collect_plain(self.tuned)
        self._ref_c, self._ref_r = base_out.chosen[0], base_out.rejected[0]
        self.reference = {"base": self._metrics(base_out, 0), "tuned": self._metrics(tuned_out, 0)}

    # -- internals ------------------------------------------------------------------------------
    def _step(self, stream: _Stream, k: int, n_refs: int | None = None) -> int:
        """Rows per chunk of ``stream`` under k edits (`rows_per_chunk`)."""
        width = stream.tokens.shape[1] if stream.select is None else len(stream.select)
        refs = (2 if stream.text else 0) if n_refs is None else n_refs
        return rows_per_chunk(stream.tokens.shape[0], width, self.base.d_vocab, k, refs, self.logit_bytes)

    def _collect(self, streams: list[_Stream], k: int, forward: Callable[[int, slice], Tensor]) -> _Collected:
        """Run ``forward(i, rows)`` → (k, c, S, d_vocab) logits over every stream in row chunks and reduce each
        chunk at once: response log-probs from the scored positions, text sums against the references."""
        n = self.data.chosen.shape[0]
        lp = {role: torch.zeros(k, n, dtype=torch.float64) for role in ("chosen", "rejected")}
        sums = torch.zeros(k, 1 + len(self._ref_text), dtype=torch.float64)
        kept: list[Tensor] | None = [] if self.metrics else None
        for i, st in enumerate(streams):
            for rows in _chunks(st.tokens.shape[0], self._step(st, k)):
                lg = forward(i, rows)
                for role, r, cols, targets, weights in st.scores:
                    j = torch.nonzero((r >= rows.start) & (r < rows.stop))[:, 0]
                    if len(j) == 0:
                        continue
                    sub = lg[:, (r[j] - rows.start).to(lg.device)][:, :, cols.to(lg.device)]  # (k, m, |cols|, V)
                    scored = _response_logps(sub.flatten(0, 1), targets[j].repeat(k, 1), weights[j].repeat(k, 1))
                    lp[role][:, j] = scored.view(k, -1)
                if st.text:
                    sums += self._text_sums(lg, rows)
                    if kept is not None:
                        kept.append(lg.cpu())
        logits = None if kept is None else list(torch.cat(kept, 1).unbind(0))
        return _Collected(lp["chosen"], lp["rejected"], sums, logits)

    def _text_sums(self, lg: Tensor, rows: slice) -> Tensor:
        """(k, 1 + n_refs): Σ nll and Σ KL(edit ‖ reference) over the counted text positions of ``rows``."""
        refs = [ref.logp(rows) for ref in self._ref_text.values()]
        valid, targets = self._text_valid[rows], self.data.text[rows, 1:]
        return torch.stack([_nll_kl(lg[e][:, :-1], refs, targets, valid) for e in range(lg.shape[0])])

    def _collect_plain(self, model: Model) -> _Collected:
        """The reference path: full forwards of the chosen, rejected and text sequences (chunked)."""

        def forward(i: int, rows: slice) -> Tensor:
            st = self._plain[i]
            return _forward(model, st.tokens[rows], None if st.attention_mask is None else st.attention_mask[rows])[0][
                None
            ]

        return self._collect(self._plain, 1, forward)

    def _metrics(self, out: _Collected, e: int) -> dict[str, float]:
        margins = self.beta * ((out.chosen[e] - self._ref_c) - (out.rejected[e] - self._ref_r))
        values = dict(margin=float(margins.mean()), reward_accuracy=float((margins > 0).double().mean()))
        values["accuracy"] = float((out.chosen[e] > out.rejected[e]).double().mean())
        if self.text_metrics:
            n = float(self._text_valid.sum())
            values["ce"] = float(out.text[e, 0]) / n
            for j, name in enumerate(self._ref_text):
                values[f"kl_{name}"] = float(out.text[e, 1 + j]) / n
        for name, fn in self.metrics.items():
            assert out.logits is not None  # kept whenever there are user metrics
            values[name] = float(fn(out.logits[e], self.data.text))
        return values

    def _runner(self, host: Model, layer: int) -> _Runner:
        key = (id(host), layer, self.reuse_prefix)
        if key not in self._runners:
            self._runners = {k: v for k, v in self._runners.items() if k[0] == id(host)}
            steps = [self._step(st, 2) for st in self.streams]
            self._runners[key] = _Runner(host, self.streams, layer, self.reuse_prefix, steps)
        return self._runners[key]

    def _edited(self, runner: _Runner, k: int, hooks: list) -> Iterator[dict[str, float]]:
        out = self._collect(self.streams, k, lambda i, rows: runner.logits(i, k, hooks, rows))
        for e in range(k):
            yield self._metrics(out, e)

    # -- public ---------------------------------------------------------------------------------
    def measure(self, model: Any = None) -> dict[str, float]:
        """Metrics of ``model`` (default: the base) with plain full forward passes — whatever edit
        is active on it (`rwasym.hooks.edits.rank1_edit`) is measured."""
        return self._metrics(self._collect_plain(self.base if model is None else load(model)), 0)

    def iter_edits(
        self, host: Model, matrix: str, U: Float[Tensor, "k n_out"], V: Float[Tensor, "k n_in"]
    ) -> Iterator[dict[str, float]]:
        """Metrics of ``host`` under each of the k edits W + U[e] V[e]ᵀ (α folded into U), yielded
        edit by edit after one batched forward per stream and row chunk (cached clean prefix, see
        module doc). The host's weights must not change between calls (its clean prefix is cached)."""
        spec = host.matrix(matrix)
        runner = self._runner(host, spec.layer)
        yield from self._edited(runner, U.shape[0], edit_hooks(host, matrix, U, V))

    def iter_joint(
        self, host: Model, edits: Sequence[Mapping[str, tuple[Tensor, Tensor]]]
    ) -> Iterator[dict[str, float]]:
        """Metrics of ``host`` under each of k joint edits, after one batched forward per stream and row chunk.

        edits[e] maps every matrix of the set to (U (r, n_out), V (r, n_in)) (α folded into U):
        edit e is W_m + U_mᵀ V_m for all m at once (`rwasym.hooks.edits.edit_hooks`, rank r). Every
        edit of a call names the same matrices with the same r."""
        hooks, layer = _joint_hooks(host, edits, "iter_joint")
        yield from self._edited(self._runner(host, layer), len(edits), hooks)

    @property
    def collateral(self) -> Collateral:
        """The collateral text (`collateral_set`), resolved on first use."""
        if self._collateral is None:
            self._collateral = collateral_set(self.base, self._collateral_arg, self.data)
        return self._collateral

    def _collateral_stream(self) -> _Stream:
        col = self.collateral
        return _Stream(col.tokens, None if col.attention_mask is None else col.attention_mask.long())

    def iter_collateral(
        self, host: Model, edits: Sequence[Mapping[str, tuple[Tensor, Tensor]]]
    ) -> Iterator[dict[str, float]]:
        """The collateral cost of each of k edits of ``host`` (one batched forward per row chunk of the
        collateral text):

        - ``collateral_kl`` = mean over counted positions t of KL(π_edit(·|x_<t) ‖ π_host(·|x_<t)),
          the behaviour-independent effect an effect-matched sweep scales every edit to;
        - ``collateral_dce`` = CE_edit − CE_host, the change of the mean next-token cross-entropy (nats).

        edits[e] maps matrices to (U (r, n_out), V (r, n_in)), α folded into U, as in `iter_joint`
        (a rank-1 edit of one matrix: ``{name: (u[None], v[None])}``). The host's weights must not
        change between calls (its reference log-probabilities and clean prefix are cached)."""
        hooks, layer = _joint_hooks(host, edits, "iter_collateral")
        key = (id(host), layer, self.reuse_prefix, "collateral")
        stream = self._collateral_stream()
        if key not in self._runners:
            steps = [self._step(stream, 2, n_refs=1)]
            self._runners[key] = _Runner(host, [stream], layer, self.reuse_prefix, steps)
        runner, k = self._runners[key], len(edits)
        yield from self._collateral_costs(host, k, lambda rows: runner.logits(0, k, hooks, rows))

    def _collateral_costs(self, host: Model, k: int, forward: Callable[[slice], Tensor]) -> Iterator[dict]:
        """collateral_kl and collateral_dce of k edits whose collateral logits ``forward(rows)`` gives, by chunks."""
        ref, ref_ce = self._collateral_reference(host)
        col = self.collateral
        weight = col.counted.double()
        sums = torch.zeros(k, 2, dtype=torch.float64)
        for rows in _chunks(col.tokens.shape[0], self._step(self._collateral_stream(), k, n_refs=1)):
            lg, logp_ref = forward(rows), ref.logp(rows)
            for e in range(k):
                sums[e] += _nll_kl(lg[e][:, :-1], [logp_ref], col.tokens[rows, 1:], weight[rows])
        total = float(weight.sum())
        for e in range(k):
            yield dict(collateral_kl=float(sums[e, 1]) / total, collateral_dce=float(sums[e, 0]) / total - ref_ce)

    def measure_weights(self, host: Model, donor: Model, names: Sequence[str]) -> dict[str, float]:
        """Metrics and collateral cost of ``host`` with the matrices ``names`` replaced by ``donor``'s
        (`Model.edit`: the host parameters are written, measured by plain forwards, and restored
        bit-exactly, also on error). With host = base and donor = tuned this is the transplant of the
        full ΔW of those matrices — the logits of the base carrying the tuned weights of the set —
        and with host = tuned, donor = base its ablation: the ceiling of every edit inside the set."""
        self._collateral_reference(host)  # the clean host's, before its weights change
        with host.edit({name: donor.weight(name) for name in names}):
            values = self._metrics(self._collect_plain(host), 0)
            col = self.collateral

            def forward(rows: slice) -> Tensor:
                mask = None if col.attention_mask is None else col.attention_mask[rows]
                return _forward(host, col.tokens[rows], mask)[0][None]

            values.update(next(self._collateral_costs(host, 1, forward)))
        return values

    def _collateral_reference(self, host: Model) -> tuple[_Reference, float]:
        """The clean host's log-probabilities on the collateral text (`_Reference`) and its CE, once per host."""
        if id(host) not in self._collateral_ref:
            col = self.collateral
            step = self._step(self._collateral_stream(), 1, n_refs=1)
            ref = _Reference(host, col.tokens, col.attention_mask, step, self.reference_bytes)
            weight = col.counted.double()
            nll = 0.0
            for rows in _chunks(col.tokens.shape[0], step):
                logp = ref.logp(rows)
                nll += float((-logp.gather(-1, col.tokens[rows, 1:].unsqueeze(-1)).squeeze(-1) * weight[rows]).sum())
            self._collateral_ref[id(host)] = (ref, nll / float(weight.sum()))
        return self._collateral_ref[id(host)]

    def measure_edits(
        self, host: Model, matrix: str, U: Float[Tensor, "k n_out"], V: Float[Tensor, "k n_in"]
    ) -> list[dict[str, float]]:
        """`iter_edits` as a list."""
        return list(self.iter_edits(host, matrix, U, V))

    def gap_fractions(self, metrics: Mapping[str, float], mode: str) -> dict[str, float | None]:
        """``gap_<m>`` for every metric but the KLs: (m − m_base)/(m_tuned − m_base) in transplant
        mode, (m_tuned − m)/(m_tuned − m_base) in ablate mode; None where the gap is 0."""
        if mode not in MODES:
            raise RwasymError(f"mode must be one of {MODES}; got {mode!r}")
        out: dict[str, float | None] = {}
        for name, value in metrics.items():
            if name.startswith("kl_") or name not in self.reference["base"]:
                continue
            b, t = self.reference["base"][name], self.reference["tuned"][name]
            if abs(t - b) <= 1e-12 * max(1.0, abs(t), abs(b)):
                out[f"gap_{name}"] = None
            else:
                out[f"gap_{name}"] = (value - b) / (t - b) if mode == "transplant" else (t - value) / (t - b)
        return out
