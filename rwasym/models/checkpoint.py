"""Streamed checkpoints: weight deltas from Hugging Face checkpoints bigger than memory.

`stream_weight_deltas(base, tuned)` yields ``(name, ΔW)`` one studied matrix at a time, with
ΔW = W_tuned − W_base in float64 and `nn.Linear` layout (n_out × n_in), reading each tensor
lazily from the checkpoints' safetensors files (single ``model.safetensors`` or sharded with
``model.safetensors.index.json``). Peak memory is a few matrices, never two models. Names, order
and layouts are exactly those of ``rwasym.load(folder).matrices()``, and the values equal
``rwasym.weight_deltas(load(base), load(tuned))`` bit for bit for fp32, fp16 and bf16 checkpoints
(the cast to float64 is exact). Only float64 checkpoints differ: `load` casts them to float32,
streaming keeps their full precision.

How a registry matrix is found in a checkpoint without loading it (the *skeleton*):
the folder's ``config.json`` is instantiated on the ``meta`` device (no allocation) and wrapped in
the same TransformerBridge adapter `rwasym.load` uses, so the registry is the one
`rwasym.models.Model` builds, and each matrix's `rwasym.models.host.HostLayout` is the one a
loaded model has. Its checkpoint key is ``<host module name>.weight``
(`rwasym.models.host.host_module_names`) and W is read from that tensor T as a loaded model reads
it (`HostLayout.matrix`): Tᵀ for a GPT-2 ``Conv1D``, and for a fused host (qkv: GPT-2 ``c_attn``,
NeoX ``query_key_value``, Phi-3 ``qkv_proj``; gate-up: Phi-3 ``gate_up_proj``) the matrix's rows
of T (after the transpose).
"""

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import RwasymError
from .deltas import WeightDeltas, check_same_architecture
from .host import host_module_names, index_probe, is_transposed, read_matrix
from .loading import checkpoint_folder, is_checkpoint_folder
from .registry import MatrixSpec, Model, matches_pattern

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_CHUNK_BYTES = 8 * 2**20  # float64 bytes per streamed block of rows (sub_ makes a block-sized temporary)

PathLike = str | os.PathLike


@dataclass(frozen=True)
class CheckpointMatrix:
    """Where one studied matrix lives in a checkpoint folder.

    key: the safetensors key of the host tensor T; file: the file (relative to the folder) holding
    it; host_shape: T's shape; transposed: T stores W transposed (GPT-2 ``Conv1D``); rows: for a
    fused host, the row indices of T (in nn.Linear layout, after the transpose) that make up W (n_out
    of them), else None; fused: ``"qkv"``, ``"gate_up"`` or None. All from the matrix's
    `rwasym.models.host.HostLayout`.
    """

    spec: MatrixSpec
    key: str
    file: str
    host_shape: tuple[int, ...]
    transposed: bool = False
    rows: tuple[int, ...] | None = None
    fused: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def layout(self) -> str:
        """``linear`` (W = T), ``conv1d`` (W = Tᵀ), ``fused`` (W = T[rows]) or ``fused-conv1d``
        (W = (Tᵀ)[rows])."""
        if self.rows is None:
            return "conv1d" if self.transposed else "linear"
        return "fused-conv1d" if self.transposed else "fused"


# -- the checkpoint's files -------------------------------------------------------------------
def _weight_map(folder: Path) -> dict[str, str]:
    """key → file for a single-file or sharded safetensors checkpoint (headers only)."""
    index = folder / _INDEX_FILE
    if index.exists():
        try:
            files = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise RwasymError(
                f"{str(index)!r} is corrupt (no valid 'weight_map': {err}); re-save the checkpoint with save_pretrained"
            ) from None
        for file in sorted(set(files.values())):
            if not (folder / file).exists():
                raise RwasymError(
                    f"shard {file!r} listed in {str(index)!r} is missing; the checkpoint folder is "
                    "incomplete: copy or download the missing shard"
                )
        return dict(files)
    if (folder / _SINGLE_FILE).exists():
        with _open(folder, _SINGLE_FILE) as handle:
            return {key: _SINGLE_FILE for key in handle.keys()}
    other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = (
        f" It holds {', '.join(other[:3])}: convert it once with "
        "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)."
        if other
        else ""
    )
    raise RwasymError(
        f"folder {str(folder)!r} has neither {_SINGLE_FILE} nor {_INDEX_FILE}; streaming reads "
        f"safetensors checkpoints only.{hint}"
    )


@contextlib.contextmanager
def _open(folder: Path, file: str):
    """safe_open one file; closed on exit so its memory map (resident pages) is released."""
    from safetensors import SafetensorError, safe_open

    path = folder / file
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise RwasymError(
            f"cannot read {str(path)!r} ({err}); the file is truncated or corrupt: re-save or "
            "re-download the checkpoint"
        ) from None
    with handle:
        yield handle


def _host_delta(base_folder: Path, b: CheckpointMatrix, tuned_folder: Path, t: CheckpointMatrix) -> Tensor:
    """T_tuned − T_base in float64 and in the host's layout (Conv1D and fused tensors untouched)."""
    fused_parts: dict[str | None, str] = {"qkv": "W_Q, W_K, W_V", "gate_up": "W_gate, W_in"}
    parts = fused_parts.get(b.fused, "fused matrices")
    what = b.name if b.rows is None else f"{b.key} ({parts} of layer {b.spec.layer})"
    return _host_read([(tuned_folder, t), (base_folder, b)], f"ΔW of {what}")


def _host_read(terms: Sequence[tuple[Path, CheckpointMatrix]], what: str) -> Tensor:
    """T₀ − T₁ − … over ``terms`` ((folder, entry); one term: T₀ itself) in float64, host layout.

    Filled in row blocks of at most `_CHUNK_BYTES` (float64): ``out[i:j] = T₀[i:j]`` then
    ``out[i:j] -= T₁[i:j]`` (mixed-dtype in-place ops compute in float64, exactly). Each block
    is read through its own `safe_open`, so no more than one block of a file is mapped at a time:
    peak ≈ one float64 matrix + two raw blocks.
    """
    out = torch.empty(terms[0][1].host_shape, dtype=torch.float64)
    step = max(1, _CHUNK_BYTES // (8 * max(1, out[0].numel())))
    for start in range(0, out.shape[0], step):
        block = out[start : start + step]
        for i, (folder, entry) in enumerate(terms):
            with _open(folder, entry.file) as handle:
                piece = handle.get_slice(entry.key)
                if start == 0:
                    _check_slice(folder, entry, piece)
                value = piece[start : start + step]
                if i == 0:
                    block.copy_(value)
                else:
                    block.sub_(value)
            del value
        if not torch.isfinite(block).all():  # per block: isfinite makes a temporary of its input's size
            raise RwasymError(f"{what} contains NaN or Inf; check the checkpoints (re-save or re-download)")
    return out


def _check_slice(folder: Path, entry: CheckpointMatrix, piece) -> None:
    shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
    if shape != entry.host_shape:
        raise RwasymError(
            f"{entry.name}: tensor {entry.key} in {str(folder / entry.file)!r} has shape {shape} but the "
            f"other checkpoint and config.json imply {entry.host_shape}; compare two checkpoints of one "
            "architecture"
        )
    if dtype not in _FLOAT_DTYPES:
        raise RwasymError(
            f"{entry.name}: tensor {entry.key} in {str(folder / entry.file)!r} has dtype {dtype}; streaming "
            f"reads {', '.join(_FLOAT_DTYPES)} checkpoints: dequantize the checkpoint first"
        )


# -- the skeleton -----------------------------------------------------------------------------
def _skeleton(folder: Path, empty_weights: bool = False):
    """(bridge, HF model) for ``folder``'s config, without weights.

    ``empty_weights``: parameters on ``meta`` but buffers real (accelerate's ``init_empty_weights``), so
    rotary frequencies and other computed buffers hold their values (`rwasym.models.streaming` runs it).

    Everything is built on the ``meta`` device. A bridge whose fused split reads real values at boot
    (GPT-2's default qkv split, Phi-3's qkv and gate-up splits) refuses meta weights
    (NotImplementedError from TransformerLens' ``require_readable_weight``); for those
    architectures the 2-D weights become stride-0 index probes (`index_probe`) instead.

    TransformerLens' public boot (``TransformerBridge.boot_transformers``) loads weights; building
    a bridge around an existing (meta) module goes through its public ``model_bridge.sources``
    re-exports (``build_bridge_from_module``, ``determine_architecture_from_hf_config``,
    ``get_hf_model_class_for_architecture``), not its private modules.
    """
    from transformers import AutoConfig

    from .loading import bridge_classes

    bridge_classes()
    from transformer_lens.model_bridge.sources import build_bridge_from_module
    from transformer_lens.model_bridge.sources.transformers import (
        determine_architecture_from_hf_config,
        get_hf_model_class_for_architecture,
    )

    try:
        hf_config = AutoConfig.from_pretrained(str(folder))
        architecture = determine_architecture_from_hf_config(hf_config)
        model_class = get_hf_model_class_for_architecture(architecture)
    except (OSError, ValueError, KeyError) as err:
        raise RwasymError(
            f"cannot read the model config in {str(folder)!r} ({err}); fix config.json "
            "(it must name a TransformerLens-supported architecture)"
        ) from None

    def build(probed: bool):
        with _empty(empty_weights):
            hf = model_class.from_config(hf_config)
            if probed:
                # Give every 2-D weight but the (tied) embeddings a stride-0 probe: real and
                # readable, yet free (the bridge copies embeddings, so those stay on meta).
                skip = {id(hf.get_output_embeddings()), id(hf.get_input_embeddings())}
                for module in list(hf.modules()):
                    w = module._parameters.get("weight")
                    if w is not None and w.dim() == 2 and id(module) not in skip:
                        module._parameters["weight"] = index_probe(w, is_transposed(module))
            bridge = build_bridge_from_module(hf, architecture, hf_config=hf_config, model_name=str(folder))
        return bridge, hf

    try:
        return build(probed=False)
    except NotImplementedError:
        # A fused split that reads real values at boot. The failed attempt left its module tree
        # half rewired, so build a fresh one.
        return build(probed=True)


def _empty(empty_weights: bool):
    if not empty_weights:
        return torch.device("meta")
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def _resolve_key(name: str, keys: dict[str, str], prefix: str) -> str | None:
    """The checkpoint key of module ``name``'s weight; tolerates a missing or extra base-model
    prefix (``transformer.h.0…`` saved as ``h.0…`` by older GPT-2 checkpoints)."""
    candidates = [f"{name}.weight"]
    if prefix and name.startswith(prefix + "."):
        candidates.append(f"{name[len(prefix) + 1 :]}.weight")
    elif prefix:
        candidates.append(f"{prefix}.{name}.weight")
    return next((c for c in candidates if c in keys), None)


def _checked_folder(folder: PathLike, role: str) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        snapshot = checkpoint_folder(folder)  # a hub name: its snapshot in huggingface_hub's cache
        if snapshot is not None:
            return snapshot
        raise RwasymError(
            f"{role} {str(folder)!r} does not exist as a local folder, and is no hub name with a safetensors snapshot "
            "(downloaded, or in huggingface_hub's cache); pass a checkpoint folder or an org/name[@revision]"
        )
    if not (path / "config.json").exists():
        raise RwasymError(
            f"{role} folder {str(path)!r} has no config.json; streaming needs a Hugging Face checkpoint "
            "folder written by save_pretrained (config.json + safetensors)"
        )
    return path


def _is_moe_matrix(spec: MatrixSpec) -> bool:
    """A matrix of a mixture-of-experts MLP (an expert's, the router, a shared expert's linear)."""
    return spec.expert is not None or spec.kind == "W_router" or f"blocks.{spec.layer}.mlp.shared." in spec.name


def _entries(
    folder: Path, role: str = "checkpoint", pattern: str | Sequence[str] | None = None
) -> tuple[Model, list[CheckpointMatrix]]:
    """The weightless registry of ``folder`` and where each of its matrices lives in the checkpoint:
    key, file and rows from the matrix's `rwasym.models.host.HostLayout` and module name.

    Mixture-of-experts matrices have no entry: transformers 5 converts their checkpoint tensors as it loads
    them (per-expert ``experts.{e}.w1`` / ``gate_proj`` … under the checkpoint's own names, fused into 3-D
    parameters), which this module does not reproduce yet: without ``pattern`` they are left out with a
    warning, and a ``pattern`` selecting one raises RwasymError."""
    bridge, hf = _skeleton(folder)
    skeleton = Model(bridge, source=str(folder), weightless=True)  # rwasym.load(folder)'s registry, no weights
    moe = [s.name for s in skeleton.matrices(pattern) if _is_moe_matrix(s)]
    if moe and pattern is None:
        warnings.warn(
            f"{folder}: its {len(moe)} mixture-of-experts matrices (router, experts, shared expert) are not read "
            "from checkpoint files yet and are left out; load the model (rwasym.load) to study them",
            stacklevel=3,
        )
    elif moe:
        raise RwasymError(
            f"{moe[0]}: reading mixture-of-experts matrices from checkpoint files is not supported yet "
            "(transformers converts their per-expert tensors as it loads them); load both models "
            "(rwasym.weight_deltas(rwasym.load(base), rwasym.load(tuned))) or select the other matrices "
            "(e.g. matrices='blocks.*.attn.*')"
        )
    specs = [s for s in skeleton.matrices() if not _is_moe_matrix(s)]
    layouts = {spec.name: skeleton.host_layout(spec.name) for spec in specs}
    modules = host_module_names(bridge, layouts)
    keys = _weight_map(folder)
    prefix = getattr(hf, "base_model_prefix", "") or ""
    entries = []
    for spec in specs:
        layout, module = layouts[spec.name], modules.get(spec.name)
        if module is None:
            raise RwasymError(
                f"{spec.name}: its host module is not part of the Hugging Face model, so it has no "
                "checkpoint key; compare with rwasym.weight_deltas(rwasym.load(base), rwasym.load(tuned))"
            )
        key = _resolve_key(module, keys, prefix)
        if key is None:
            raise RwasymError(
                f"{spec.name}: the {role} checkpoint {str(folder)!r} has no tensor {module}.weight (its "
                f"config.json implies it); the weights do not match the config: re-save the checkpoint "
                "with save_pretrained, or fix config.json"
            )
        with _open(folder, keys[key]) as handle:
            shape = tuple(handle.get_slice(key).get_shape())
        expected = tuple(cast(Tensor, layout.module.weight).shape)  # torch types a module attribute as Tensor | Module
        if shape != expected:
            raise RwasymError(
                f"{spec.name}: tensor {key} in the {role} checkpoint has shape {shape} but its config.json "
                f"implies {expected}; the weights do not match the config: fix "
                "config.json or re-save the checkpoint"
            )
        rows = None if layout.rows is None else tuple(layout.rows.tolist())
        entries.append(CheckpointMatrix(spec, key, keys[key], shape, layout.transposed, rows, layout.fused))
    return skeleton, entries


# -- public -----------------------------------------------------------------------------------
def checkpoint_matrices(folder: PathLike, pattern: str | Sequence[str] | None = None) -> list[CheckpointMatrix]:
    """Every studied matrix of a Hugging Face checkpoint folder, with its key, file and layout,
    in the order of ``rwasym.load(folder).matrices(pattern)`` — read from config.json and the
    safetensors headers only (no weights are loaded)."""
    path = _checked_folder(folder, "checkpoint")
    _, entries = _entries(path, pattern=pattern)
    return [e for e in entries if pattern is None or matches_pattern(e.name, pattern)]


def stream_weight_deltas(
    base_folder: PathLike,
    tuned_folder: PathLike,
    pattern: str | Sequence[str] | None = None,
) -> Iterator[tuple[str, Float[Tensor, "n_out n_in"]]]:
    """An iterator of ``(name, ΔW)``, ΔW = W_tuned − W_base (float64, nn.Linear layout n_out × n_in),
    one matrix at a time, in registry order.

    Equals ``rwasym.weight_deltas(rwasym.load(base_folder), rwasym.load(tuned_folder), pattern)``
    (Conv1D deltas are transposed views, as `Model.weight` returns them) without loading either
    model: each host tensor is read from its safetensors file in row blocks when needed and
    dropped after use; a fused ΔW (qkv, gate-up) is kept only while its matrices are yielded. Peak
    memory ≈ the largest ΔW in float64 (plus the one the caller still holds) + 16 MiB of blocks.

    Checks run at the call, before any weight is read: missing folder, config.json or safetensors
    files, unreadable headers, different architectures (`rwasym.check_same_architecture`, on the
    two configs), keys missing from a checkpoint or shapes that disagree with its config.json all
    raise RwasymError naming the matrix. While streaming: a corrupt block or a non-finite ΔW.
    """
    base_path = _checked_folder(base_folder, "base")
    tuned_path = _checked_folder(tuned_folder, "tuned")
    base_model, base_entries = _entries(base_path, "base", pattern)
    tuned_model, tuned_entries = _entries(tuned_path, "tuned", pattern)
    check_same_architecture(base_model, tuned_model)
    pairs = []
    for b, t in zip(base_entries, tuned_entries):
        if pattern is not None and not matches_pattern(b.name, pattern):
            continue
        if (b.host_shape, b.transposed, b.rows) != (t.host_shape, t.transposed, t.rows):
            raise RwasymError(
                f"base and tuned checkpoints differ at {b.name}: {b.key} is {b.layout} {b.host_shape} in "
                f"base and {t.key} is {t.layout} {t.host_shape} in tuned; compare two checkpoints of one "
                "architecture"
            )
        pairs.append((b, t))
    return _stream(base_path, tuned_path, pairs)


def _stream(base_path: Path, tuned_path: Path, pairs: list) -> Iterator[tuple[str, Tensor]]:
    fused_key, fused_delta = None, None  # a fused ΔW, kept while its matrices (q, k, v or gate, in) are yielded
    for b, t in pairs:
        if b.rows is None:
            fused_key, fused_delta = None, None
            delta = _linear(_host_delta(base_path, b, tuned_path, t), b)
        else:
            if fused_key != (b.key, t.key):
                fused_key, fused_delta = None, None  # free the previous layer's first
                fused_delta = _host_delta(base_path, b, tuned_path, t)
                fused_key = (b.key, t.key)
            assert fused_delta is not None  # set together with fused_key
            delta = _linear(fused_delta, b)
        yield b.name, delta
        del delta  # the consumer holds the only reference now


def _linear(host: Tensor, entry: CheckpointMatrix) -> Tensor:
    """W (n_out × n_in, nn.Linear layout) from its host tensor T (`rwasym.models.host.read_matrix`):
    Tᵀ for Conv1D, then W's rows of a fused qkv or gate-up tensor."""
    rows = None if entry.rows is None else torch.tensor(entry.rows, dtype=torch.long)
    w = read_matrix(host, transposed=entry.transposed, rows=rows)
    if tuple(w.shape) != entry.spec.shape:
        raise RwasymError(
            f"{entry.name}: tensor {entry.key} read as W in nn.Linear layout has shape {tuple(w.shape)}, but "
            f"config.json implies (n_out, n_in) = {entry.spec.shape}; the checkpoint does not match its "
            "config.json: fix config.json or re-save the checkpoint with save_pretrained"
        )
    return w


class CheckpointWeights(Mapping):
    """{matrix name: W} of a Hugging Face checkpoint folder, W in float64 and nn.Linear layout
    (n_out × n_in), read from its safetensors files when looked up and not kept; the names are
    those of ``rwasym.load(folder).matrices(pattern)`` and each W equals ``load(folder).weight(name)``
    (for fp32 / fp16 / bf16 files). A fused tensor is read once while its matrices (W_Q, W_K, W_V;
    W_gate, W_in) are looked up in turn. ``model`` is the weightless registry (`Model` on the meta device)."""

    def __init__(self, folder: PathLike, pattern: str | Sequence[str] | None = None) -> None:
        self.folder = _checked_folder(folder, "checkpoint")
        self.model, entries = _entries(self.folder, pattern=pattern)
        self._entries = {e.name: e for e in entries if pattern is None or matches_pattern(e.name, pattern)}
        self._fused: tuple = (None, None)  # (key, host tensor) of the last fused tensor read

    def __getitem__(self, name: str) -> Float[Tensor, "n_out n_in"]:
        entry = self._entries.get(name)
        if entry is None:
            raise RwasymError(
                f"checkpoint {str(self.folder)!r} has no studied matrix {name!r}; its matrices "
                f"include {', '.join(list(self._entries)[:4])}"
            )
        if entry.rows is None:
            return _linear(_host_read([(self.folder, entry)], f"{name} in {str(self.folder)!r}"), entry)
        if self._fused[0] != entry.key:
            self._fused = (None, None)  # free the previous layer's first
            self._fused = (entry.key, _host_read([(self.folder, entry)], f"{entry.key} in {str(self.folder)!r}"))
        return _linear(self._fused[1], entry)

    def weight(self, name: str) -> Float[Tensor, "n_out n_in"]:
        """``self[name]``, under `Model.weight`'s name (so a `WeightDeltas` can read it as its tuned side)."""
        return self[name]

    def delta_to(self, tuned: "CheckpointWeights", name: str) -> Float[Tensor, "n_out n_in"]:
        """ΔW = W_tuned − W_self of ``name``, the two files read together in row blocks (`_host_delta`): one
        float64 matrix at peak instead of three (5.6 GB → 1.9 GB for a 70B model's 28,672 × 8192 MLP matrix).
        The same values as ``tuned[name] - self[name]`` (the same float64 subtraction of the stored values, one
        rounding); a fused tensor's matrices take that path."""
        b, t = self._entries.get(name), tuned._entries.get(name)
        if b is None or t is None or b.rows is not None or t.rows is not None:
            return tuned[name] - self[name]
        return _linear(_host_delta(self.folder, b, tuned.folder, t), t)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class CheckpointDeltas(WeightDeltas):
    """{matrix name: ΔW} with ΔW = W_tuned − W_base (float64, nn.Linear layout), W_tuned read from
    a tuned checkpoint folder (`CheckpointWeights`) and W_base from the loaded ``base``: the tuned
    model is never loaded, and each ΔW is formed when looked up and not kept (`WeightDeltas`, with
    the checkpoint as its tuned side). Equals ``weight_deltas(base, load(tuned_folder), pattern)``
    (fp32 / fp16 / bf16 checkpoints)."""

    def __init__(self, base: Model, tuned_folder: PathLike, pattern: str | Sequence[str] | None = None) -> None:
        tuned = CheckpointWeights(tuned_folder, pattern)
        check_same_architecture(base, tuned.model)
        # mixture-of-experts matrices are not read from checkpoint files (`_entries` warned or refused)
        super().__init__(base, tuned, [s.name for s in base.matrices(pattern) if not _is_moe_matrix(s)])


def weight_delta_norms(
    base_folder: PathLike,
    tuned_folder: PathLike,
    pattern: str | Sequence[str] | None = None,
) -> dict[str, float]:
    """‖ΔW‖_F = sqrt(Σᵢⱼ ΔWᵢⱼ²) for every studied matrix, streamed (`stream_weight_deltas`)."""
    norms = {}
    for name, delta in stream_weight_deltas(base_folder, tuned_folder, pattern):
        norms[name] = float(torch.linalg.vector_norm(delta))
        del delta  # free it before the next one is read
    return norms


__all__ = [
    "CheckpointDeltas",
    "CheckpointMatrix",
    "CheckpointWeights",
    "checkpoint_matrices",
    "is_checkpoint_folder",
    "stream_weight_deltas",
    "weight_delta_norms",
]
