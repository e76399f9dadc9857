"""Deprecated alias: ``rwasym.models.shards`` moved to `rwasym.models.checkpoint` (removed in 0.3)."""

import importlib
import sys
import warnings

warnings.warn(
    "rwasym.models.shards moved to rwasym.models.checkpoint; the old path is removed in 0.3",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("rwasym.models.checkpoint")
