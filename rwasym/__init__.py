"""rwasym — where a training phase changed a transformer's weights, why, and whether it matters.

Read/write asymmetry of weight updates in TransformerLens 4 (`TransformerBridge`) models.

Shape glossary (used in every signature): batch, pos, d_model, d_mlp, d_head, n_heads, d_vocab,
n_out / n_in (a studied matrix W is n_out × n_in, acting as y = W a), n (a space's dimension),
k (a subspace's dimension).
"""

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

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "MatrixSpec",
    "Model",
    "RwasymError",
    "__version__",
    "check_same_architecture",
    "flatten_site",
    "load",
    "native_config",
    "save_model",
    "weight_deltas",
]
