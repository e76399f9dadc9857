"""rwasym — where a training phase changed a transformer's weights, why, and whether it matters.

Read/write asymmetry of weight updates in TransformerLens 4 (`TransformerBridge`) models.

Shape glossary (used in every signature): batch, pos, d_model, d_mlp, d_head, n_heads, d_vocab,
n_out / n_in (a studied matrix W is n_out × n_in, acting as y = W a), n (a space's dimension),
k (a subspace's dimension), d (a generic feature dimension), r (the rank of LoRA factors).
"""

__version__ = "0.1.0"

from .errors import RwasymError
from .models import (
    KINDS,
    MatrixSpec,
    Model,
    check_same_architecture,
    flatten_site,
    load,
    native_config,
    save_model,
    weight_deltas,
)
from .lora import LowRankDelta, lora_deltas, read_adapter
from .stats import RunningCovariance
from .subspaces import Basis, complement_basis, k_for_variance, pca_basis, prediction_basis, random_basis
from .probe_math import FractionResult, NullResult, fraction_curve, random_null, relative_fraction
from .activations import ActivationStats, capture
from .gradients import GradientStats, anisotropy_report, capture_gradients, objective_batches
from .probe import ProbeResult, probe
from .spectra import alpha_req, lifecycle, rankme, rankme_from_cov, spikiness
from .svd_compare import post_training_svd, rebuild
from .intervene import Direction, closed_form_u, directions, rank1_edit
from .behaviour import Evaluator
from .sweep import SweepSummary, read_sweep, summarize
from .sweep import sweep as run_sweep

from . import behaviour, companion, distributed, experiments, intervene, probe_math, report, shards, spectra, svd_compare  # noqa: F401

__all__ = [
    "KINDS",
    "LowRankDelta",
    "lora_deltas",
    "read_adapter",
    "ActivationStats",
    "GradientStats",
    "anisotropy_report",
    "capture_gradients",
    "objective_batches",
    "Direction",
    "Evaluator",
    "SweepSummary",
    "closed_form_u",
    "directions",
    "rank1_edit",
    "read_sweep",
    "run_sweep",
    "summarize",
    "Basis",
    "FractionResult",
    "MatrixSpec",
    "Model",
    "NullResult",
    "ProbeResult",
    "RunningCovariance",
    "RwasymError",
    "__version__",
    "alpha_req",
    "capture",
    "check_same_architecture",
    "complement_basis",
    "flatten_site",
    "fraction_curve",
    "k_for_variance",
    "lifecycle",
    "load",
    "native_config",
    "pca_basis",
    "post_training_svd",
    "prediction_basis",
    "probe",
    "random_basis",
    "random_null",
    "rankme",
    "rankme_from_cov",
    "rebuild",
    "relative_fraction",
    "save_model",
    "spikiness",
    "weight_deltas",
]
