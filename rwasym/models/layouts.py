"""Host layouts: how a Hugging Face module stores a studied matrix, and fused QKV rows.

- `is_transposed`: GPT-2 ``Conv1D`` stores W as (n_in, n_out); ``nn.Linear`` as (n_out, n_in).
- `fused_qkv_rows`: W_Q, W_K, W_V of a fused qkv host (GPT-2 ``c_attn``, GPT-NeoX
  ``query_key_value``) are rows of one fused weight F (nn.Linear layout): W_Q = F[rows_q] etc.
  The rows are read off the bridge's own ``split_qkv_matrix`` applied to an index probe
  Pᵢⱼ = i (stride 0 along columns, so free), which yields GPT-2's concatenation ``[q; k; v]``
  and GPT-NeoX's per-head interleaving ``[h, (q, k, v), d_head]`` without guessing either.
  The one detector serves loaded models (`Model.sync_fused_qkv`, LoRA splits) and weightless
  checkpoint skeletons (`rwasym.models.shards`).
"""

import torch
from torch import Tensor, nn

from ..errors import RwasymError


def is_transposed(module: nn.Module) -> bool:
    """True for GPT-2 style ``Conv1D`` (weight stored (n_in, n_out)); False for ``nn.Linear``."""
    return type(module).__name__ == "Conv1D"


def host_linear(bridge: nn.Module, component: str) -> nn.Module:
    """The Hugging Face (or native) linear module a bridge component wraps."""
    module = bridge.get_submodule(component)
    host = getattr(module, "original_component", None)
    if host is None or not hasattr(host, "weight"):
        raise RwasymError(f"bridge component {component!r} wraps no linear layer with a weight")
    return host


def clean_key(key: str) -> str:
    """A bridge state-dict key with the bridge's ``._original_component`` hops removed."""
    return key.replace("._original_component", "")


def index_probe(weight: Tensor, transposed: bool) -> nn.Parameter:
    """Pᵢⱼ = i in nn.Linear layout (row index of the host output), expanded with stride 0."""
    rows = weight.shape[1] if transposed else weight.shape[0]
    idx = torch.arange(rows, dtype=torch.float32, device="cpu")
    p = idx[None, :].expand(weight.shape) if transposed else idx[:, None].expand(weight.shape)
    return nn.Parameter(p, requires_grad=False)


@torch.no_grad()
def fused_qkv_rows(bridge: nn.Module, attn_component: str) -> list[Tensor]:
    """Row indices (rows_q, rows_k, rows_v; int64) of W_Q, W_K, W_V inside the fused qkv host weight
    of ``attn_component`` (nn.Linear layout), read off the bridge's own split of an index probe."""
    attn = bridge.get_submodule(attn_component)
    fused = host_linear(bridge, f"{attn_component}.qkv")
    if not callable(getattr(attn, "split_qkv_matrix", None)):
        raise RwasymError(
            f"{attn_component} has a fused qkv host but no split_qkv_matrix, so rwasym cannot tell "
            "which rows are W_Q, W_K, W_V; compare with rwasym.weight_deltas(rwasym.load(base), "
            "rwasym.load(tuned)) instead"
        )
    original = fused._parameters["weight"]
    fused._parameters["weight"] = index_probe(original, is_transposed(fused))
    try:
        with torch.device("meta"):  # the split's nn.Linear shells allocate nothing
            parts = attn.split_qkv_matrix(attn.original_component)
    finally:
        fused._parameters["weight"] = original
    rows = []
    for part in parts:
        w = part.weight.detach()
        col = w[:, 0] if not w.is_meta else None
        if col is None or not torch.equal(w, col[:, None].expand_as(w)) or not torch.equal(col, col.round()):
            raise RwasymError(
                f"{attn_component}: the bridge's split_qkv_matrix does not select rows of the fused "
                "qkv weight, so rwasym cannot map W_Q, W_K, W_V to it; compare the checkpoints with "
                "rwasym.weight_deltas(rwasym.load(base), rwasym.load(tuned)) instead"
            )
        rows.append(col.to(torch.long))
    return rows
