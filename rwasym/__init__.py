"""rwasym — where a training phase changed a transformer's weights, why, and whether it matters.

Read/write asymmetry of weight updates in TransformerLens 4 (`TransformerBridge`) models.

Shape glossary (used in every signature): batch, pos, d_model, d_mlp, d_head, n_heads, d_vocab,
n_out / n_in (a studied matrix W is n_out × n_in, acting as y = W a), n (a space's dimension),
k (a subspace's dimension), d (a generic feature dimension), r (the rank of LoRA factors).

Layers (each imports only those below it; ARCHITECTURE.md): ``math`` and ``data`` ← ``models`` ←
``hooks`` ← ``analyses`` ← ``substrate`` ← ``app``. The names below are imported lazily, so
``import rwasym`` (and ``import rwasym.math``) loads neither TransformerLens nor transformers.
"""

import importlib
from typing import Any

from ._version import __version__
from .errors import RwasymError

# public name -> (module, attribute)
_LAZY = {
    **{n: ("rwasym.models", n) for n in ("KINDS", "MatrixSpec", "Model", "check_same_architecture", "flatten_site",
                                          "load", "native_config", "save_model", "weight_deltas")},
    **{n: ("rwasym.models.lora", n) for n in ("lora_deltas", "read_adapter")},
    **{n: ("rwasym.math", n) for n in ("Basis", "Direction", "FractionResult", "LowRankDelta", "NullResult",
                                        "RunningCovariance", "alpha_req", "closed_form_u", "complement_basis",
                                        "delta_spectrum", "directions", "fraction_curve", "k_for_variance", "lifecycle",
                                        "null_moments", "pca_basis",
                                        "post_training_svd", "prediction_basis", "random_basis", "random_null",
                                        "rankme", "rankme_from_cov", "rebuild", "relative_fraction", "spikiness")},
    **{n: ("rwasym.hooks.activations", n) for n in ("ActivationStats", "capture")},
    **{n: ("rwasym.hooks.gradients", n) for n in ("GradientStats", "capture_gradients")},
    "rank1_edit": ("rwasym.hooks.edits", "rank1_edit"),
    "anisotropy_report": ("rwasym.analyses.anisotropy", "anisotropy_report"),
    "objective_batches": ("rwasym.objectives", "objective_batches"),
    **{n: ("rwasym.analyses.probe", n) for n in ("ProbeResult", "probe")},
    "Evaluator": ("rwasym.analyses.behaviour", "Evaluator"),
    **{n: ("rwasym.analyses.sweep", n) for n in ("SweepConfig", "SweepSummary", "read_sweep", "summarize")},
    "run_sweep": ("rwasym.analyses.sweep", "sweep"),
}

__all__ = ["RwasymError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # cache: the next access is a plain attribute
        return value
    raise AttributeError(f"module 'rwasym' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
