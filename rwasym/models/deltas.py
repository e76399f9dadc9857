"""Weight deltas ΔW = W_tuned − W_base between two loaded models of one architecture.

Float64, nn.Linear layout (n_out × n_in). Checkpoints larger than memory stream their deltas
from safetensors instead (`rwasym.models.shards.stream_weight_deltas`).
"""

from typing import Any, Sequence, Union

from ..errors import RwasymError
from ..math.checks import require_finite
from .registry import Model

__all__ = ["check_same_architecture", "weight_deltas"]


def weight_deltas(base: Model, tuned: Model, pattern: Union[str, Sequence[str], None] = None) -> dict[str, Any]:
    """ΔW = W_tuned − W_base (float64, nn.Linear layout) for every studied matrix.

    Raises RwasymError naming the first matrix whose name or shape differs. When ``tuned`` was
    loaded with a LoRA adapter (``load(base, adapter=...)``) and ``base`` was not, returns the
    attached factored deltas (`rwasym.math.lowrank.LowRankDelta`, rank 0 for untouched matrices) without
    materialising them, after checking ``base`` is the adapter's base (`rwasym.models.lora.adapter_deltas`).
    """
    check_same_architecture(base, tuned)
    if tuned.adapter is not None and base.adapter is None:
        from .lora import adapter_deltas

        return adapter_deltas(base, tuned, pattern)
    out = {}
    for spec in base.matrices(pattern):
        delta = tuned.weight(spec.name) - base.weight(spec.name)
        require_finite(delta, f"ΔW of {spec.name}")
        out[spec.name] = delta
    return out


def check_same_architecture(base: Model, tuned: Model) -> None:
    a, b = base.matrices(), tuned.matrices()
    for sa, sb in zip(a, b):
        if sa.name != sb.name or sa.shape != sb.shape or sa.n_heads != sb.n_heads:
            raise RwasymError(
                f"base and tuned models differ at {sa.name}: base has {sa.name} {sa.shape} with "
                f"{sa.n_heads} heads, tuned has {sb.name} {sb.shape} with {sb.n_heads} heads; "
                "compare two checkpoints of one architecture"
            )
    if len(a) != len(b):
        longer, which = (a, "base") if len(a) > len(b) else (b, "tuned")
        first = longer[min(len(a), len(b))].name
        raise RwasymError(
            f"base has {len(a)} studied matrices and tuned has {len(b)}; the first unmatched one "
            f"is {first} (only in {which}); compare two checkpoints of one architecture"
        )
    if base.d_vocab != tuned.d_vocab:
        raise RwasymError(
            f"vocabulary sizes differ: base {base.d_vocab}, tuned {tuned.d_vocab}; compare two "
            "checkpoints of one architecture"
        )
