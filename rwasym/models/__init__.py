"""The only folder that knows TransformerBridge and host layouts.

registry (`Model`, `MatrixSpec`, self_check), heads (head slicing), host (the one owner of host
layouts: Conv1D transposes, fused qkv and gate-up rows, syncing, Hugging Face module names, save),
loading (load, load_pair, native checkpoints), gpt2 (native ↔ HF GPT-2 export), deltas
(weight_deltas), lora (PEFT adapters), checkpoint (streaming deltas from safetensors checkpoints),
gguf (GGUF files de-quantized into cached Hugging Face folders), cache (the rwasym cache root).
``layouts`` and ``shards`` are deprecated aliases of ``host`` and ``checkpoint`` (removed in 0.3).
"""

from .deltas import check_same_architecture, weight_deltas
from .heads import embed_head, head_input_block, head_range, head_slice, unit_shape
from .loading import load, load_native, load_pair, native_config, read_meta, save_model
from .registry import KINDS, READ_KINDS, MatrixSpec, Model, flatten_site

__all__ = [
    "KINDS",
    "READ_KINDS",
    "MatrixSpec",
    "Model",
    "check_same_architecture",
    "embed_head",
    "flatten_site",
    "head_input_block",
    "head_range",
    "head_slice",
    "load",
    "load_native",
    "load_pair",
    "native_config",
    "read_meta",
    "save_model",
    "unit_shape",
    "weight_deltas",
]
