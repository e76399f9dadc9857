"""When progress bars show (imported by every layer, like errors.py)."""

import sys


def quiet(progress: bool | None) -> bool:
    """True when progress bars stay off: ``progress=False``, or None and stderr is not a terminal."""
    return not (progress if progress is not None else sys.stderr.isatty())
