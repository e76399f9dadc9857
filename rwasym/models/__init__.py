"""The only folder that knows TransformerBridge and host layouts.

registry (`Model`, `MatrixSpec`, self_check), heads (head slicing), layouts (Conv1D transposes,
fused QKV rows), loading (load, load_pair, native checkpoints), gpt2 (native ↔ HF GPT-2 export),
deltas (weight_deltas), lora (PEFT adapters), shards (streaming deltas from safetensors), gguf
(GGUF files de-quantized into cached Hugging Face folders), cache (the rwasym cache root).
"""

from .deltas import check_same_architecture, weight_deltas
from .heads import embed_head, head_input_block, head_range, head_slice, unit_shape
from .loading import load, load_native, load_pair, native_config, read_meta, save_model
from .registry import KINDS, READ_KINDS, MatrixSpec, Model, flatten_site

__all__ = ["KINDS", "READ_KINDS", "MatrixSpec", "Model", "check_same_architecture", "embed_head", "flatten_site",
           "head_input_block", "head_range", "head_slice", "load", "load_native", "load_pair", "native_config", "read_meta",
           "save_model", "unit_shape", "weight_deltas"]
