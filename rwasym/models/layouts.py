"""Deprecated alias: ``rwasym.models.layouts`` moved to `rwasym.models.host` (removed in 0.3)."""

import importlib
import sys
import warnings

warnings.warn(
    "rwasym.models.layouts moved to rwasym.models.host; the old path is removed in 0.3",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("rwasym.models.host")
