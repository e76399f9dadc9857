"""Block-streamed execution: a checkpoint folder's model run one transformer block at a time.

`BlockStream(folder)` holds a weightless TransformerBridge of the folder's config (parameters on the
``meta`` device, buffers real) and materialises the parameters of one block at a time from the
checkpoint's safetensors (`safetensors.safe_open`, one tensor at a time; single-file or sharded). Peak
memory is one block's parameters plus the hidden states of the corpus, never the model.

Execution is block-major: `record` runs the embedding once per batch and records what each block is
called with (its positional and keyword arguments: attention masks, rotary cos/sin, position ids), with
every block replaced by the identity; `run` then calls block L on the stored hidden states of every
batch with exactly those arguments. TransformerLens stays the hook host: a block is the bridge's
``blocks[L]``, so its hook points (``blocks.L.hook_resid_pre``, ``blocks.L.attn.hook_z`` …) fire as in a
full forward, and the activations are those of `rwasym.load(folder)` with the same batches bit for bit.

Why not accelerate's offload hooks (``device_map="disk"``): they materialise each block inside every
forward, so a corpus of B batches reads the checkpoint B times, and the statistics of every layer must
stay resident until the last batch. Block-major order reads it once and lets each layer's statistics be
finished and freed before the next block is read.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import RwasymError
from .checkpoint import _checked_folder, _open, _skeleton, _weight_map
from .host import clean_key
from .registry import Model

# architectures whose blocks, called one at a time, do not reproduce the model's own forward bit for bit
_NOT_STREAMED = {"gptj": "rotary attention (a block called alone differs from the model's forward by ~1e-8)"}
_CACHES = ("cache", "past_key_values", "past_key_value", "layer_past")


class _Recorded(Exception):
    """Raised by the last block's pre-hook once every block's arguments are recorded."""


@dataclass
class BlockCall:
    """One batch as block L is called on it: its hidden states and the other arguments (shared by reference
    between blocks that get the same objects, as in the model's own forward)."""

    hidden: Tensor
    calls: list[tuple[tuple, dict]]  # per block: (positional arguments after the hidden states, keyword arguments)


class BlockStream:
    """The model of checkpoint ``folder`` with at most one block's parameters in memory.

    ``model`` is the weightless `rwasym.models.Model` (registry, hook names, widths); ``dtype`` the
    compute precision (the checkpoint's tensors are cast to it as they are read, as `rwasym.load` does).
    Fused hosts (GPT-2 ``c_attn``, NeoX ``query_key_value``, Phi-3 ``qkv_proj``) are refused: the bridge
    computes through split copies of them that a block-by-block read would have to rebuild.
    """

    def __init__(self, folder: Any, dtype: torch.dtype = torch.float32) -> None:
        self.folder = _checked_folder(folder, "checkpoint")
        self.dtype = dtype
        bridge, hf = _skeleton(self.folder, empty_weights=True)
        self.model = Model(bridge, source=str(self.folder), weightless=True)
        if any(self.folder.glob("tokenizer*")):
            self.model.tokenizer_source = (str(self.folder), None)  # text data is tokenised as rwasym.load's would be
        fused = sorted({s.name for s in self.model.matrices() if self.model.host_layout(s.name).fused})
        model_type = getattr(hf.config, "model_type", "")
        why = (
            f"fused hosts ({fused[0]} …), which the bridge computes through split copies"
            if fused
            else "mixture-of-experts MLPs (fused expert parameters)"
            if self.model.unsupported or any(s.expert is not None for s in self.model.matrices())
            else _NOT_STREAMED.get(model_type)
        )
        if why:
            raise RwasymError(
                f"{self.folder}: block streaming does not support {model_type or 'this model'}'s {why} yet; "
                "load the model whole with rwasym.load (probe without stream=True)"
            )
        self.hf = hf
        self.keys = _weight_map(self.folder)
        self.prefix = getattr(hf, "base_model_prefix", "") or ""
        self.n_layers = len(bridge.blocks)
        # every parameter once (by identity), with each (module, name) that holds it, bridge aliases included,
        # and its Hugging Face names (the checkpoint keys)
        self._params: dict[int, nn.Parameter] = {}
        self._refs: dict[int, list[tuple[nn.Module, str]]] = {}
        self._names: dict[int, list[str]] = {}
        seen: set[tuple[int, str]] = set()
        for root in (hf, bridge):
            for module_name, module in root.named_modules(remove_duplicate=False):
                for leaf, p in module._parameters.items():
                    if p is None:
                        continue
                    if root is hf:
                        self._names.setdefault(id(p), []).append(clean_key(f"{module_name}.{leaf}".lstrip(".")))
                    if (id(module), leaf) not in seen:
                        seen.add((id(module), leaf))
                        self._params[id(p)] = p
                        self._refs.setdefault(id(p), []).append((module, leaf))
        # a tied output embedding built as its own (meta) parameter: read from the input embedding's tensor
        out_emb, in_emb = hf.get_output_embeddings(), hf.get_input_embeddings()
        self._tied: dict[int, int] = {}
        if out_emb is not None and getattr(hf.config.get_text_config(), "tie_word_embeddings", False):
            self._tied[id(out_emb.weight)] = id(in_emb.weight)
        self._block_of = {id(p): layer for layer, block in enumerate(bridge.blocks) for p in block.parameters()}
        self._held: dict[int, nn.Parameter] = {}  # id(meta parameter) -> its materialised replacement

    # -- parameters -------------------------------------------------------------------------------
    def _key(self, pid: int) -> str:
        """The checkpoint key of a parameter: one of its Hugging Face names, with the base-model prefix
        tolerated missing or extra (as `rwasym.models.checkpoint` resolves matrices)."""
        names = self._names.get(pid, []) + self._names.get(self._tied.get(pid, -1), [])
        for plain in names:
            candidates = [plain]
            if self.prefix and plain.startswith(self.prefix + "."):
                candidates.append(plain[len(self.prefix) + 1 :])
            elif self.prefix:
                candidates.append(f"{self.prefix}.{plain}")
            for candidate in candidates:
                if candidate in self.keys:
                    return candidate
        shown = (self._names.get(pid) or ["<not in the Hugging Face model>"])[0]
        raise RwasymError(
            f"{self.folder}: no checkpoint tensor for parameter {shown}; the weights do not match config.json: "
            "re-save the checkpoint with save_pretrained"
        )

    def _set(self, pid: int, value: nn.Parameter) -> None:
        for module, leaf in self._refs[pid]:
            module._parameters[leaf] = value

    def _materialise(self, pids: list[int]) -> None:
        by_file: dict[str, list[tuple[int, str]]] = {}
        for pid in pids:
            key = self._key(pid)
            by_file.setdefault(self.keys[key], []).append((pid, key))
        for file, items in by_file.items():
            with _open(self.folder, file) as handle:
                for pid, key in items:
                    value = _read(handle, key, self.dtype)
                    if tuple(value.shape) != tuple(self._params[pid].shape):
                        raise RwasymError(
                            f"{self.folder}: tensor {key} has shape {tuple(value.shape)} but config.json implies "
                            f"{tuple(self._params[pid].shape)}; fix config.json or re-save the checkpoint"
                        )
                    held = nn.Parameter(value, requires_grad=False)
                    self._held[pid] = held
                    self._set(pid, held)

    def _release(self, pids: list[int]) -> None:
        for pid in pids:
            if self._held.pop(pid, None) is not None:
                self._set(pid, self._params[pid])  # the meta parameter again: the values are freed

    def _outside(self, head: bool) -> list[int]:
        """Parameters outside the blocks: with ``head`` all but an untied input embedding (the final norm and the
        unembedding), without it all but an untied output embedding (what runs before the blocks)."""
        out, inp = self.hf.get_output_embeddings(), self.hf.get_input_embeddings()
        out_ids = {id(p) for p in out.parameters()} if out is not None else set()
        in_ids = {id(p) for p in inp.parameters()}
        skip = (in_ids - out_ids) if head else (out_ids - in_ids)  # a tied pair sharing one parameter stays
        return [pid for pid in self._params if pid not in self._block_of and pid not in skip]

    @contextlib.contextmanager
    def outside(self, head: bool = True) -> Iterator[Model]:
        """The model with the parameters outside the blocks read, freed on exit: with ``head`` the final norm and
        the unembedding (`Model.unembedding` works), without it the input embedding (`record`)."""
        pids = self._outside(head)
        try:
            self._materialise(pids)
            yield self.model
        finally:
            self._release(pids)

    @contextlib.contextmanager
    def block(self, layer: int) -> Iterator[nn.Module]:
        """Block ``layer`` with its parameters read from the checkpoint; freed on exit (also on an error)."""
        pids = [pid for pid, b in self._block_of.items() if b == layer]
        try:
            self._materialise(pids)
            yield self.model.bridge.blocks[layer]
        finally:
            self._release(pids)

    # -- execution --------------------------------------------------------------------------------
    def record(self, tokens: Tensor, attention_mask: Tensor | None = None) -> BlockCall:
        """The batch's hidden states entering block 0 and the arguments every block is called with.

        One forward of the bridge with each block's Hugging Face module replaced by the identity; it stops
        at the last block's call. The embedding (and anything else outside the blocks but the untied
        output embedding) is read from the checkpoint for the call and freed after it."""
        bridge = self.model.bridge
        calls: list[tuple[tuple, dict] | None] = [None] * self.n_layers
        first: list[Tensor] = []

        def recorder(layer: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict):
                hidden = args[0] if args else kwargs["hidden_states"]
                rest = args[1:] if args else ()
                # no key/value cache: a block called once per batch has nothing to reuse, and a recorded cache
                # object would grow with every call
                kw = {k: (None if k in _CACHES else False if k == "use_cache" else v) for k, v in kwargs.items()}
                kw.pop("hidden_states", None)
                calls[layer] = (rest, kw)
                if layer == 0:
                    first.append(hidden)
                if layer == self.n_layers - 1:
                    raise _Recorded

            return hook

        handles = [b.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, b in enumerate(bridge.blocks)]
        originals = [b.original_component for b in bridge.blocks]
        for original in originals:
            original.forward = _identity
        outside = [pid for pid in self._outside(head=False) if pid not in self._held]  # unless held by the caller
        try:
            self._materialise(outside)
            kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
            with torch.no_grad():
                bridge(tokens, **kwargs)
        except _Recorded:
            pass
        finally:
            for handle in handles:
                handle.remove()
            for original in originals:
                del original.forward
            self._release(outside)
        if not first or any(c is None for c in calls):
            raise RwasymError(f"{self.folder}: the model's forward did not call every block; cannot stream it")
        return BlockCall(hidden=first[0].detach(), calls=[c for c in calls if c is not None])

    def run(self, block: nn.Module, layer: int, batch: BlockCall) -> Tensor:
        """Block ``layer`` (materialised by `block`) applied to ``batch``: its output hidden states."""
        rest, kwargs = batch.calls[layer]
        with torch.no_grad():
            out = block(batch.hidden, *rest, **kwargs)
        return out[0] if isinstance(out, tuple) else out


_DIRECT_BYTES = 256 * 2**20  # tensors above this (in the compute dtype) are read in row blocks


def _read(handle: Any, key: str, dtype: torch.dtype) -> Tensor:
    """Tensor ``key`` in ``dtype``; a large one (an 8B model's 128k × 4096 embedding) is read in row blocks
    straight into its result, so the checkpoint's own copy is never whole in memory beside it (same values)."""
    piece = handle.get_slice(key)
    shape = tuple(piece.get_shape())
    numel = 1
    for size in shape:
        numel *= size
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize <= _DIRECT_BYTES or len(shape) < 2:
        return handle.get_tensor(key).to(dtype)
    out = torch.empty(shape, dtype=dtype)
    step = max(1, _DIRECT_BYTES // (itemsize * (numel // shape[0])))
    for start in range(0, shape[0], step):
        out[start : start + step].copy_(piece[start : start + step])
    return out


def _identity(hidden_states: Any = None, *args: Any, **kwargs: Any) -> Any:
    return hidden_states
