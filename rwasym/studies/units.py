"""Resumable units of work for the studies' long runs (`rwasym.studies.real`, `rwasym.studies.study`).

A unit is one named piece of work whose result is a JSON-able dict: `run_unit` reads it from
``out/units/<name>.json`` when that exists, else computes it and writes it atomically (aside, then renamed), so a
killed run loses at most the unit in flight and resumes at the next missing one.
"""

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["json_default", "run_unit"]


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for what units return besides plain data: tensors (as lists) and paths."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def run_unit(out: Path, name: str, fn: Callable[[], dict], log: Any, *, tag: str, indent: int | None = None) -> dict:
    """The result of unit ``name``: read from ``out/units/<name>.json``, else ``fn()`` with its wall time added as
    ``seconds``, written atomically; ``log`` gets "[tag] name ..." before and the seconds after."""
    path = out / "units" / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    log(f"[{tag}] {name} ...")
    t0 = time.perf_counter()
    result = fn()
    result["seconds"] = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=indent, default=json_default))
    os.replace(tmp, path)
    log(f"[{tag}] {name}: {result['seconds']:.0f} s")
    return result
