"""Preference pairs as tensors, and loaders for user text and JSONL pairs.

`PreferencePairs` holds n pairs (prompt, chosen, rejected) as int64 tensors. Rows of different
lengths are right-padded with token 0 and described by boolean masks whose True entries form a
prefix of each row; ``None`` masks mean every entry is a real token. `PreferencePairs.sequences`
packs prompt + continuation into one right-padded row per pair, which is how the training code
feeds a causal model (right padding never changes the logits of earlier positions).

Tokenizers: any object with ``encode(text) -> list[int]`` (a Hugging Face tokenizer is called with
``add_special_tokens=False``), any callable ``text -> list[int]``, or the built-in `ByteTokenizer`
(UTF-8 bytes, ids 0..255). JSONL values may also be lists of token ids, needing no tokenizer.
"""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from ..errors import RwasymError

__all__ = ["ByteTokenizer", "PreferencePairs", "load_pairs", "load_pairs_jsonl", "load_text", "tokenize_preference"]

PathLike = str | os.PathLike[str]
_PARTS = ("prompt", "chosen", "rejected")


def _prefix_lengths(mask: Tensor | None, x: Tensor, what: str) -> Tensor:
    """Per-row count of valid tokens; checks the mask's True entries form a prefix."""
    if mask is None:
        return torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
    if mask.shape != x.shape or mask.dtype != torch.bool:
        raise RwasymError(
            f"{what}_mask must be a bool tensor of shape {tuple(x.shape)}; got {mask.dtype} {tuple(mask.shape)}."
        )
    lengths = mask.sum(-1)
    prefix = torch.arange(x.shape[1])[None, :] < lengths[:, None]
    if not torch.equal(prefix, mask):
        raise RwasymError(f"{what}_mask must mark a prefix of each row (right padding); it has holes.")
    return lengths


@dataclass(frozen=True)
class PreferencePairs:
    """n preference pairs: prompt (n, p), chosen (n, c), rejected (n, c), int64 token ids.

    Masks (bool, same shapes, True = real token, a prefix of each row) are None when every entry is
    real. ``rule[i]`` indexes ``rule_names`` (which rule made pair i), or is None for user data.
    """

    prompt: Int[Tensor, "n p"]
    chosen: Int[Tensor, "n c"]
    rejected: Int[Tensor, "n c"]
    prompt_mask: Bool[Tensor, "n p"] | None = None
    chosen_mask: Bool[Tensor, "n c"] | None = None
    rejected_mask: Bool[Tensor, "n c"] | None = None
    rule: Int[Tensor, " n"] | None = None
    rule_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = None
        for part in _PARTS:
            x = getattr(self, part)
            if not isinstance(x, Tensor) or x.dim() != 2 or x.is_floating_point() or x.dtype == torch.bool:
                raise RwasymError(
                    f"PreferencePairs.{part} must be a 2-D integer tensor (n, len); got "
                    f"{type(x).__name__} {getattr(x, 'shape', '')}."
                )
            n = x.shape[0] if n is None else n
            if x.shape[0] != n:
                raise RwasymError(
                    f"prompt, chosen and rejected need the same number of rows; "
                    f"got {self.prompt.shape[0]}, {self.chosen.shape[0]}, {self.rejected.shape[0]}."
                )
            if x.shape[1] == 0:
                raise RwasymError(f"PreferencePairs.{part} has zero columns; every part needs >= 1 token.")
            lengths = _prefix_lengths(getattr(self, f"{part}_mask"), x, part)
            if n and int(lengths.min()) == 0:
                raise RwasymError(f"pair {int(lengths.argmin())} has an empty {part}; every part needs >= 1 token.")
        if self.rule is not None and (self.rule.shape != (n,) or (n and int(self.rule.max()) >= len(self.rule_names))):
            raise RwasymError(f"rule must be an int tensor of shape ({n},) indexing rule_names={self.rule_names}.")

    def __len__(self) -> int:
        return int(self.prompt.shape[0])

    def max_token(self) -> int:
        """Largest token id used anywhere (padding included)."""
        return max(int(getattr(self, p).max()) for p in _PARTS) if len(self) else -1

    def subset(self, index: Tensor) -> "PreferencePairs":
        """The pairs at ``index`` (a LongTensor of row indices or a bool mask)."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in kwargs.items():
            if isinstance(value, Tensor):
                kwargs[key] = value[index]
        return PreferencePairs(**kwargs)

    def split(self, frac: float = 0.2, seed: int = 0) -> tuple["PreferencePairs", "PreferencePairs"]:
        """(train, heldout) with a share ``frac`` of the pairs held out, stratified by rule."""
        if not 0.0 < frac < 1.0:
            raise RwasymError(f"split(frac) takes the held-out fraction in (0, 1); got frac={frac}.")
        g = torch.Generator().manual_seed(int(seed))
        groups = (
            [torch.arange(len(self))]
            if self.rule is None
            else [torch.nonzero(self.rule == r)[:, 0] for r in range(len(self.rule_names))]
        )
        train, held = [], []
        for idx in groups:
            idx = idx[torch.randperm(len(idx), generator=g)]
            n_held = round(frac * len(idx))
            held.append(idx[:n_held])
            train.append(idx[n_held:])
        train_idx, held_idx = torch.cat(train).sort().values, torch.cat(held).sort().values
        if len(train_idx) == 0 or len(held_idx) == 0:
            raise RwasymError(
                f"split(frac={frac}) of {len(self)} pairs leaves an empty part; use more pairs "
                "or a fraction nearer 0.5."
            )
        return self.subset(train_idx), self.subset(held_idx)

    def by_rule(self) -> dict[str, "PreferencePairs"]:
        """{rule name: its pairs}; user data without rules comes back as {"all": self}."""
        if self.rule is None:
            return {"all": self}
        return {
            name: self.subset(self.rule == r) for r, name in enumerate(self.rule_names) if bool((self.rule == r).any())
        }

    def sequences(self, which: str = "chosen") -> tuple[Int[Tensor, "n pos"], Bool[Tensor, "n pos"]]:
        """Packed prompt + continuation (``which`` = "chosen" | "rejected"), right-padded with 0,
        and the mask of continuation positions (the tokens whose log-probability is scored)."""
        if which not in ("chosen", "rejected"):
            raise RwasymError(f"which must be 'chosen' or 'rejected'; got {which!r}.")
        cont, cont_mask = getattr(self, which), getattr(self, f"{which}_mask")
        plen = _prefix_lengths(self.prompt_mask, self.prompt, "prompt")  # (n,)
        clen = _prefix_lengths(cont_mask, cont, which)  # (n,)
        L = int((plen + clen).max()) if len(self) else 1
        pos = torch.arange(L)[None, :]  # (1, L)
        from_prompt = torch.gather(self.prompt, 1, pos.clamp_max(self.prompt.shape[1] - 1).expand(len(self), L))
        cpos = (pos - plen[:, None]).clamp(0, cont.shape[1] - 1)  # (n, L)
        from_cont = torch.gather(cont, 1, cpos)
        target = (pos >= plen[:, None]) & (pos < (plen + clen)[:, None])  # (n, L)
        tokens = torch.where(pos < plen[:, None], from_prompt, torch.where(target, from_cont, 0))
        return tokens.long(), target

    @staticmethod
    def concat(parts: Sequence["PreferencePairs"]) -> "PreferencePairs":
        """Stack pair sets with equal shapes (rule indices are remapped onto the union of names)."""
        if not parts:
            raise RwasymError("concat needs at least one PreferencePairs.")
        names = tuple(dict.fromkeys(n for p in parts for n in p.rule_names))
        kwargs: dict[str, Any] = {}
        for part in _PARTS:
            widths = {getattr(p, part).shape[1] for p in parts}
            if len(widths) != 1 or any(getattr(p, f"{part}_mask") is not None for p in parts):
                raise RwasymError(f"concat needs unmasked pairs of equal {part} length; got lengths {sorted(widths)}.")
            kwargs[part] = torch.cat([getattr(p, part) for p in parts])
        rules = [p.rule for p in parts if p.rule is not None]
        if len(rules) == len(parts):
            kwargs["rule"] = torch.cat(
                [
                    torch.tensor([names.index(p.rule_names[r]) for r in rule.tolist()], dtype=torch.long)
                    for p, rule in zip(parts, rules)
                ]
            )
            kwargs["rule_names"] = names
        return PreferencePairs(**kwargs)

    def save(self, path: PathLike) -> Path:
        """Write to a safetensors file (rule names in its metadata)."""
        from safetensors.torch import save_file

        tensors = {
            f.name: getattr(self, f.name).contiguous()
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        save_file(tensors, str(path), metadata={"rule_names": json.dumps(list(self.rule_names))})
        return Path(path)

    @staticmethod
    def load(path: PathLike) -> "PreferencePairs":
        """Read a file written by `PreferencePairs.save`."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
                names = tuple(json.loads((f.metadata() or {}).get("rule_names", "[]")))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise RwasymError(f"cannot read preference pairs from {str(path)!r} ({err}).") from None
        return PreferencePairs(**tensors, rule_names=names)


# ------------------------------------------------------------------------------------- loaders
class ByteTokenizer:
    """The built-in tokenizer: UTF-8 bytes, token id = byte value (vocabulary of 256, no merges).

    >>> ByteTokenizer().encode("hé")
    [104, 195, 169]
    """

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size


def _vocab_size(tokenizer: Any, d_vocab: int | None) -> int | None:
    if d_vocab is not None:
        return int(d_vocab)
    try:
        return len(tokenizer)  # HF tokenizers (special tokens included), ByteTokenizer
    except TypeError:
        return getattr(tokenizer, "vocab_size", None)


def load_pairs(
    source: Any,
    tokenizer: Any = None,
    *,
    d_vocab: int | None = None,
    n_ctx: int | None = None,
    chat_template: bool = False,
    max_length: int | None = None,
) -> "PreferencePairs":
    """Preference pairs from `PreferencePairs` (as is), a ``.jsonl`` file (`load_pairs_jsonl`) or a
    ``.safetensors`` file written by `PreferencePairs.save`. ``max_length`` truncates JSONL pairs as
    TRL does (`load_pairs_jsonl`); stored tensors are used as they are."""
    if isinstance(source, PreferencePairs):
        if max_length is not None:
            raise RwasymError(
                "max_length truncates pairs while they are read from a JSONL file; these pairs are "
                "already tensors: truncate them when you build them, or pass the .jsonl file."
            )
        return source
    path = Path(source)
    if not path.exists():
        raise RwasymError(f"pairs file {str(path)!r} does not exist")
    if path.suffix in (".jsonl", ".json"):
        return load_pairs_jsonl(
            path, tokenizer, d_vocab, chat_template=chat_template, n_ctx=n_ctx, max_length=max_length
        )
    if max_length is not None:
        raise RwasymError(
            f"max_length truncates pairs while they are read from a JSONL file; {str(path)!r} holds "
            "stored token tensors: truncate them when you write them, or pass the .jsonl file."
        )
    pairs = PreferencePairs.load(path)
    for part in _PARTS:
        _check_ids(getattr(pairs, part), d_vocab, f"{str(path)!r} ({part})")
    return pairs


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids: Any  # whatever the tokenizer returns: an iterable of token ids
    if hasattr(tokenizer, "encode"):
        try:
            ids = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            ids = tokenizer.encode(text)
    elif callable(tokenizer):
        ids = tokenizer(text)
    else:
        raise RwasymError(f"tokenizer must have .encode(text) or be callable; got {type(tokenizer).__name__}.")
    return [int(i) for i in ids]


def _check_ids(ids: Tensor, d_vocab: int | None, where: str) -> None:
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (d_vocab is not None and hi >= d_vocab):
        raise RwasymError(
            f"{where}: token ids must lie in [0, {d_vocab}); got range [{lo}, {hi}]. Use the model's own "
            "tokenizer, or a model whose vocabulary covers these ids (d_vocab > max id)."
        )


def load_tensors(path: PathLike, what: str = "token data") -> dict[str, Tensor]:
    """Every tensor of a ``.safetensors`` file (token ids, masks, pairs): a missing, truncated or corrupt file is an
    RwasymError naming it (safetensors itself raises a bare ``SafetensorError``); nothing is unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise RwasymError(f"{what}: no such file {str(path)!r}; pass an existing .safetensors file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise RwasymError(
            f"{what}: cannot read {str(path)!r} as safetensors ({err}); the file is truncated or not a safetensors "
            "file: write it again with safetensors.torch.save_file({'input_ids': ...}, path)"
        ) from None


def load_text(
    path: PathLike, tokenizer: Any = None, seq_len: int = 64, d_vocab: int | None = None
) -> Int[Tensor, "batch pos"]:
    """Tokenize a UTF-8 text file and cut the token stream into rows of ``seq_len`` (the tail that
    does not fill a row is dropped). ``tokenizer`` defaults to `ByteTokenizer`; ``d_vocab``
    (default: the tokenizer's vocabulary size) bounds the ids."""
    path = Path(path)
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RwasymError(f"cannot read text file {str(path)!r} ({err}).") from None
    if not text.strip():
        raise RwasymError(f"text file {str(path)!r} is empty; it needs at least {seq_len} tokens.")
    ids = torch.tensor(_encode(tokenizer, text), dtype=torch.long)
    _check_ids(ids, _vocab_size(tokenizer, d_vocab), str(path))
    if len(ids) < seq_len:
        raise RwasymError(
            f"{str(path)!r} has {len(ids)} tokens, fewer than seq_len={seq_len}; pass a "
            "smaller seq_len or a longer file."
        )
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)  # (n, seq_len)


def _pad(rows: list[list[int]]) -> tuple[Tensor, Tensor | None]:
    width = max(len(r) for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return out, (None if bool(mask.all()) else mask)


def _is_messages(value: Any) -> bool:
    """A conversational value: a non-empty list of {"role": ..., "content": ...} messages."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_preference(
    record: dict[str, Any], tokenizer: Any, *, chat_template: bool = False, where: str = "pair"
) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) of one text pair, tokenized as TRL's ``DPOTrainer``
    (1.16, ``_prepare_dataset``) does, so the completion's tokens are exactly the ones TRL scores:

    - strings: the EOS string is appended to chosen / rejected (unless already there); ``prompt``,
      ``prompt + chosen`` and ``prompt + rejected`` are tokenized whole (the tokenizer's own special
      tokens, e.g. a BOS, included), so a token merging across the boundary goes to the completion;
    - messages (``[{"role": ..., "content": ...}, ...]``, or strings with ``chat_template=True``, which
      become one user turn and one assistant turn): the tokenizer's chat template renders the prompt
      with the generation prompt and prompt + chosen / prompt + rejected without it;
    - the prompt is the common prefix of the three token lists; the rest of each is the completion.
    """
    values: list[Any] = [record[p] for p in _PARTS]  # JSON values: strings or message lists
    if chat_template and all(isinstance(v, str) for v in values):
        values = [
            [{"role": "user", "content": values[0]}],
            [{"role": "assistant", "content": values[1]}],
            [{"role": "assistant", "content": values[2]}],
        ]
    if all(_is_messages(v) for v in values):
        if getattr(tokenizer, "chat_template", None) is None or not hasattr(tokenizer, "apply_chat_template"):
            raise RwasymError(
                f"{where} is conversational (or --chat-template was given), but the tokenizer has no "
                "chat template; pass plain-string pairs, or a model whose tokenizer has one."
            )

        def render(messages: list[dict[str, Any]], generation: bool = False) -> list[int]:
            out = tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=generation, return_dict=True
            )
            return [int(i) for i in out["input_ids"]]

        prompt = render(values[0], generation=True)
        full = [render(values[0] + v) for v in values[1:]]
    elif all(isinstance(v, str) for v in values):
        eos = getattr(tokenizer, "eos_token", None) or ""
        completions = [v if not eos or v.endswith(eos) else v + eos for v in values[1:]]

        def encode(text: str) -> list[int]:
            if callable(tokenizer):
                out: Any = tokenizer(text=text)  # a Hugging Face BatchEncoding
                return [int(i) for i in out["input_ids"]]
            return _encode(tokenizer, text)

        prompt = encode(values[0])
        full = [encode(values[0] + c) for c in completions]
    else:
        raise RwasymError(
            f"{where}: prompt, chosen and rejected must all be strings, or all message lists "
            '([{"role": ..., "content": ...}]); got '
            f"{', '.join(type(v).__name__ for v in values)}."
        )
    n = min(_common_prefix(prompt, f) for f in full)
    return prompt[:n], full[0][n:], full[1][n:]


def load_pairs_jsonl(
    path: PathLike,
    tokenizer: Any = None,
    d_vocab: int | None = None,
    *,
    chat_template: bool = False,
    n_ctx: int | None = None,
    max_length: int | None = None,
) -> PreferencePairs:
    """Read ``{"prompt": ..., "chosen": ..., "rejected": ...}`` lines (blank lines skipped).

    Values are lists of token ids, or text in TRL's preference format — strings or conversational
    message lists — tokenized with ``tokenizer`` exactly as TRL does (`tokenize_preference`;
    ``chat_template`` renders string prompts through the tokenizer's chat template). ``d_vocab``
    (default: the tokenizer's vocabulary size) bounds the ids; ``n_ctx`` bounds prompt + completion.
    ``max_length`` truncates prompt + chosen and prompt + rejected to their first ``max_length``
    tokens, as TRL's DPO collator does (``truncation_mode="keep_start"``, 1.16): the prompt is kept
    whole and each completion cut; a pair whose prompt leaves no completion token is refused.
    Errors name the file and line number.
    """
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise RwasymError(
            f"max_length must be an integer >= 2 (prompt + at least one completion token); got {max_length!r}."
        )
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RwasymError(f"cannot read JSONL file {str(path)!r} ({err}).") from None
    vocab = _vocab_size(tokenizer, d_vocab) if tokenizer is not None else d_vocab
    rows: dict[str, list[list[int]]] = {p: [] for p in _PARTS}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{str(path)!r} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RwasymError(
                f"{where} is not valid JSON ({err.msg}); each line must be one object "
                '{"prompt": ..., "chosen": ..., "rejected": ...}.'
            ) from None
        if not isinstance(record, dict) or any(p not in record for p in _PARTS):
            raise RwasymError(
                f'{where} must be an object with keys "prompt", "chosen", "rejected"; got '
                f"{list(record) if isinstance(record, dict) else type(record).__name__}."
            )
        if any(isinstance(record[p], str) or _is_messages(record[p]) for p in _PARTS):
            if tokenizer is None:
                raise RwasymError(
                    f"{where} holds text, but there is no tokenizer to read it: use a model that has "
                    "one (a Hugging Face folder, hub name or GGUF file), pass a tokenizer (tokenizer=), "
                    "or give token-id lists."
                )
            parts = tokenize_preference(record, tokenizer, chat_template=chat_template, where=where)
        else:
            parts = []
            for part in _PARTS:
                value = record[part]
                if not (isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
                    raise RwasymError(
                        f"{where}: {part} must be a string, a message list or a list of integer token ids."
                    )
                parts.append(value)
        if max_length is not None and parts[0]:
            room = max_length - len(parts[0])
            if room < 1:
                raise RwasymError(
                    f"{where}: the prompt alone is {len(parts[0])} tokens, so max_length={max_length} "
                    "leaves no completion token to score; raise --max-length or shorten the prompt."
                )
            parts = [parts[0], parts[1][:room], parts[2][:room]]
        for part, ids in zip(_PARTS, parts):
            if not ids:
                raise RwasymError(
                    f"{where}: {part} is empty after tokenization; every part needs >= 1 token "
                    "(a completion that only repeats the end of its prompt tokenizes to nothing)."
                )
            _check_ids(torch.tensor(ids, dtype=torch.long), vocab, f"{where} ({part})")
            rows[part].append(ids)
        longest = len(parts[0]) + max(len(parts[1]), len(parts[2]))
        if n_ctx and longest > n_ctx:
            raise RwasymError(
                f"{where}: prompt + completion is {longest} tokens, longer than the model's context "
                f"n_ctx={n_ctx}; shorten the pair or drop it."
            )
    if not rows["prompt"]:
        raise RwasymError(f"JSONL file {str(path)!r} holds no pairs; it needs one JSON object per line.")
    kwargs = {}
    for part in _PARTS:
        kwargs[part], kwargs[f"{part}_mask"] = _pad(rows[part])
    if kwargs["chosen"].shape[1] != kwargs["rejected"].shape[1]:  # same width keeps (n, c) shapes equal
        c = max(kwargs["chosen"].shape[1], kwargs["rejected"].shape[1])
        for part in ("chosen", "rejected"):
            x, m = kwargs[part], kwargs[f"{part}_mask"]
            m = torch.ones_like(x, dtype=torch.bool) if m is None else m
            pad = c - x.shape[1]
            kwargs[part] = torch.nn.functional.pad(x, (0, pad))
            kwargs[f"{part}_mask"] = torch.nn.functional.pad(m, (0, pad))
    return PreferencePairs(**kwargs)
