"""Generic collateral text, offline and deterministic: the docstrings of the installed Python standard
library (a fixed list of modules, members in sorted order), tokenized and cut into rows.

The effect-matched causal test (`rwasym.sweep`, ``match="kl"``) scales every edit to a budget of
collateral KL measured on text unrelated to the behaviour; this is that text for the studies (users
pass any file with ``--collateral``). Its SHA-256 and the Python version are returned with it: the
docstrings change between Python releases, so the hash is what a result records.
"""

import functools
import hashlib
import platform
from typing import Any

import torch

from ..errors import RwasymError

__all__ = ["MODULES", "generic_text"]

MODULES = (
    "argparse",
    "collections",
    "csv",
    "datetime",
    "decimal",
    "email.message",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "itertools",
    "json",
    "logging",
    "pathlib",
    "re",
    "shutil",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "unittest",
    "urllib.parse",
    "zipfile",
)


_BUILD = """
import importlib, inspect, sys
parts = []
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    doc = inspect.getdoc(module)
    if doc:
        parts.append(doc)
    for member in sorted(n for n in dir(module) if not n.startswith("_")):
        doc = inspect.getdoc(getattr(module, member, None))
        if doc and getattr(getattr(module, member, None), "__module__", name) == name:
            parts.append(doc)
seen, out = set(), []
for p in parts:  # a docstring inherited by many members counts once
    if p not in seen:
        seen.add(p)
        out.append(p)
sys.stdout.buffer.write("\\n\\n".join(out).encode())
"""


@functools.lru_cache(maxsize=1)
def _docstrings() -> str:
    """The text, built in a fresh isolated interpreter (``python -I``) that imports only `MODULES`, in order.

    A module's members include the submodules that happen to be imported, and which those are depends on what the
    calling process imported before (pandas, Jupyter, a test runner add ``logging.handlers``, ``unittest.mock``…):
    built in the caller, the text changed with its import state (38,602 tokens in a script, 38,765 in a notebook).
    In a fresh interpreter it depends on the Python version only; it equals what the causal re-run recorded."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-I", "-c", _BUILD, *MODULES], capture_output=True, check=False)
    if done.returncode != 0:
        raise RwasymError(f"building the docstring text failed: {done.stderr.decode(errors='replace')[-500:]}")
    return done.stdout.decode()


def generic_text(tokenizer: Any, n_rows: int = 16, seq_len: int = 64) -> tuple[torch.Tensor, dict]:
    """(token rows (n_rows, seq_len), info): the standard library's docstrings (module docstring),
    tokenized without special tokens, rows taken evenly spaced over the whole stream (so the text
    spans every module, not the first few). info: sha256 of the text, its characters and tokens, the
    Python version, the rows' shape."""
    text = _docstrings()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_avail = len(ids) // seq_len
    if n_rows < 1 or n_avail < n_rows:
        raise RwasymError(f"the docstring text has {len(ids)} tokens: {n_avail} rows of {seq_len}, fewer than {n_rows}")
    stream = torch.tensor(ids[: n_avail * seq_len], dtype=torch.long).view(n_avail, seq_len)
    pick = torch.linspace(0, n_avail - 1, n_rows).round().long()
    info = dict(
        source="Python standard library docstrings (rwasym.studies.collateral.MODULES)",
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        chars=len(text),
        tokens=len(ids),
        python=platform.python_version(),
        shape=[n_rows, seq_len],
    )
    return stream[pick], info
