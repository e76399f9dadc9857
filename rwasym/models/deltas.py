"""Weight deltas ΔW = W_tuned − W_base between two loaded models of one architecture.

Float64, nn.Linear layout (n_out × n_in). ``weight_deltas(..., lazy=True)`` returns a mapping that
forms each ΔW when read and keeps none, so a loop over it holds one float64 matrix at a time.
Checkpoints larger than memory stream their deltas from safetensors instead
(`rwasym.models.checkpoint.stream_weight_deltas`).
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..errors import RwasymError
from ..math.checks import require_finite
from .registry import Model

__all__ = ["ModelWeights", "WeightDeltas", "check_same_architecture", "weight_deltas"]


class WeightDeltas(Mapping):
    """{matrix name: ΔW} for two loaded models, each ΔW = W_tuned − W_base (float64) formed when it
    is read and not kept: iterating holds one n_out × n_in float64 matrix at a time (``dict(...)``
    materialises them all, as a plain dict would hold them)."""

    def __init__(self, base: Any, tuned: Any, names: Sequence[str]) -> None:
        # base, tuned: a Model, or anything with its ``weight(name)`` (`rwasym.models.checkpoint.CheckpointWeights`)
        self.base, self.tuned, self._names = base, tuned, list(names)

    def __getitem__(self, name: str):
        if name not in self._names:
            raise RwasymError(
                f"no weight delta for {name!r}; these deltas cover {len(self._names)} matrices, "
                f"e.g. {', '.join(self._names[:4])}"
            )
        joint = getattr(self.base, "delta_to", None)  # two checkpoint folders: read together, one matrix at peak
        if joint is not None and type(self.tuned) is type(self.base):
            return joint(self.tuned, name)  # finite: checked block by block as it is read
        delta = self.tuned.weight(name) - self.base.weight(name)
        require_finite(delta, f"ΔW of {name}")
        return delta

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names


class ModelWeights(Mapping):
    """{matrix name: W} of one loaded model (float64, nn.Linear layout), each read when asked for and not
    kept — the probe's ``delta="base_weight"`` reference: the same rows with ΔW := W_base, i.e. how
    aligned pretraining left the matrix itself."""

    def __init__(self, model: Model, names: Sequence[str]) -> None:
        self.model, self._names = model, list(names)

    def __getitem__(self, name: str):
        if name not in self._names:
            raise RwasymError(f"no weight for {name!r}; these weights cover {len(self._names)} matrices")
        return self.model.weight(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def weight_deltas(
    base: Model, tuned: Model, pattern: str | Sequence[str] | None = None, *, lazy: bool = False
) -> Mapping[str, Any]:
    """ΔW = W_tuned − W_base (float64, nn.Linear layout) for every studied matrix: a dict, or with
    ``lazy=True`` a `WeightDeltas` mapping that forms each ΔW when read (one in memory at a time; it
    reads the models' current weights, so an edit made in between shows).

    For a tuned Hugging Face checkpoint folder that should not be loaded, use
    `rwasym.models.checkpoint.CheckpointDeltas` (the same values, W_tuned read from its files).

    Raises RwasymError naming the first matrix whose name or shape differs. When ``tuned`` was
    loaded with a LoRA adapter (``load(base, adapter=...)``) and ``base`` was not, returns the
    attached factored deltas (`rwasym.math.lowrank.LowRankDelta`, rank 0 for untouched matrices) without
    materialising them, after checking ``base`` is the adapter's base (`rwasym.models.lora.adapter_deltas`).
    """
    check_same_architecture(base, tuned)
    if tuned.adapter is not None and base.adapter is None:
        from .lora import adapter_deltas

        return adapter_deltas(base, tuned, pattern)
    deltas = WeightDeltas(base, tuned, [spec.name for spec in base.matrices(pattern)])
    return deltas if lazy else dict(deltas)


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
