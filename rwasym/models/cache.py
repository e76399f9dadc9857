"""Where rwasym keeps what it builds once: the default pair, de-quantized GGUF folders."""

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$RWASYM_CACHE``, else ``~/.cache/rwasym``: where rwasym keeps what it
    builds once (the default pair, de-quantized GGUF folders)."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("RWASYM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rwasym"
