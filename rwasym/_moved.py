"""Old import paths kept for one release: each alias module warns, then *is* the new module."""

import importlib
import sys
import warnings

REMOVED_IN = "0.3"


def alias(old: str, new: str) -> None:
    """Make ``old`` (the calling alias module) the module ``new``, with a `DeprecationWarning`.

    The alias replaces itself in ``sys.modules``, so ``from old import _private`` and monkeypatching
    through the old name reach the one real module.
    """
    warnings.warn(f"{old} moved to {new}; the old path is removed in {REMOVED_IN}", DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
