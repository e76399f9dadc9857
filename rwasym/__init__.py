"""rwasym — where a training phase changed a transformer's weights, why, and whether it matters.

Read/write asymmetry of weight updates in TransformerLens 4 (`TransformerBridge`) models.

Shape glossary (used in every signature): batch, pos, d_model, d_mlp, d_head, n_heads, d_vocab,
n_out / n_in (a studied matrix W is n_out × n_in, acting as y = W a), n (a space's dimension),
k (a subspace's dimension), d (a generic feature dimension), r (the rank of LoRA factors).

The entry points are below; the namespaces ``rwasym.math`` (pure float64 formulas), ``rwasym.models``
(architectures, ΔW, checkpoints), ``rwasym.hooks``, ``rwasym.analyses`` and ``rwasym.data`` hold the rest.
Layers (ARCHITECTURE.md): ``math | data`` ← ``models`` ← ``hooks | objectives`` ← ``analyses | train``
← ``studies`` ← ``app``. Names are imported lazily, so ``import rwasym`` (and ``import rwasym.math``)
loads neither TransformerLens nor transformers; the ``TYPE_CHECKING`` block mirrors the lazy table so
IDEs and type checkers see the real types (a test keeps the two equal).
"""

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import RwasymError

if TYPE_CHECKING:
    from . import analyses, data, hooks, math, models
    from .analyses.anisotropy import anisotropy_report
    from .analyses.behaviour import Evaluator
    from .analyses.chain import ChainConfig, ChainResult, chain
    from .analyses.probe import ProbeConfig, ProbeResult, probe
    from .analyses.sweep import SweepConfig, SweepSummary, read_sweep, summarize, sweep
    from .hooks.activations import ActivationStats, capture
    from .hooks.edits import rank1_edit
    from .hooks.gradients import GradientStats, capture_gradients
    from .models import MatrixSpec, Model, load, load_pair, native_config, save_model, weight_deltas
    from .models.audit import audit
    from .models.lora import lora_deltas
    from .objectives import objective_batches

# public name -> (module, attribute); attribute None: the module itself (a namespace)
_LAZY: dict[str, tuple[str, Any]] = {
    **{n: (f"rwasym.{n}", None) for n in ("analyses", "data", "hooks", "math", "models")},
    **{
        n: ("rwasym.models", n)
        for n in ("MatrixSpec", "Model", "load", "load_pair", "native_config", "save_model", "weight_deltas")
    },
    "lora_deltas": ("rwasym.models.lora", "lora_deltas"),
    **{n: ("rwasym.hooks.activations", n) for n in ("ActivationStats", "capture")},
    **{n: ("rwasym.hooks.gradients", n) for n in ("GradientStats", "capture_gradients")},
    "rank1_edit": ("rwasym.hooks.edits", "rank1_edit"),
    "objective_batches": ("rwasym.objectives", "objective_batches"),
    "anisotropy_report": ("rwasym.analyses.anisotropy", "anisotropy_report"),
    **{n: ("rwasym.analyses.probe", n) for n in ("ProbeConfig", "ProbeResult", "probe")},
    "Evaluator": ("rwasym.analyses.behaviour", "Evaluator"),
    **{n: ("rwasym.analyses.chain", n) for n in ("ChainConfig", "ChainResult", "chain")},
    "audit": ("rwasym.models.audit", "audit"),
    **{n: ("rwasym.analyses.sweep", n) for n in ("SweepConfig", "SweepSummary", "read_sweep", "summarize", "sweep")},
}

# 0.1's top-level names that now live in a namespace: they warn for one release, then go
_MOVED: dict[str, tuple[str, str]] = {
    **{
        n: ("rwasym.math", n)
        for n in (
            "Basis",
            "Direction",
            "FractionResult",
            "LowRankDelta",
            "NullResult",
            "RunningCovariance",
            "alpha_req",
            "closed_form_u",
            "complement_basis",
            "delta_spectrum",
            "directions",
            "fraction_curve",
            "k_for_variance",
            "lifecycle",
            "null_moments",
            "pca_basis",
            "post_training_svd",
            "prediction_basis",
            "random_basis",
            "random_null",
            "rankme",
            "rankme_from_cov",
            "rebuild",
            "relative_fraction",
            "spikiness",
        )
    },
    **{n: ("rwasym.models", n) for n in ("KINDS", "check_same_architecture", "flatten_site")},
    "read_adapter": ("rwasym.models.lora", "read_adapter"),
    "run_sweep": ("rwasym.analyses.sweep", "sweep"),
}

__all__ = ["RwasymError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = importlib.import_module(module)
        value = value if attr is None else getattr(value, attr)
        globals()[name] = value  # cache: the next access is a plain attribute
        return value
    if name in _MOVED:
        module, attr = _MOVED[name]
        warnings.warn(
            f"rwasym.{name} moved to {module}.{attr}; the top-level name is removed in rwasym 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'rwasym' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
