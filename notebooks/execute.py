"""Execute the notebooks in full mode and save them with their outputs (what is committed).

    .venv/bin/python notebooks/execute.py                 # every notebook
    .venv/bin/python notebooks/execute.py 06_real_model   # some of them (names or stems)

Each notebook runs from a fresh kernel in a scratch folder (files it writes are not kept) with RWASYM_QUICK=0 (the full default
pair / real pair, built on first use and cached). Its metadata gets ``rwasym``: the package version,
the fingerprint of its cells' sources, the mode and the wall time. tests/test_notebooks.py refuses a
committed notebook whose fingerprint or version no longer matches (edit a cell or bump the version,
then re-run this) or that has a cell without outputs or with an error.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def fingerprint(nb) -> str:
    """sha256 (first 16 hex digits) of every cell's type and source: what the outputs were made from."""
    cells = [(cell["cell_type"], "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"])
             for cell in nb["cells"]]
    return hashlib.sha256(json.dumps(cells, ensure_ascii=False).encode()).hexdigest()[:16]


def execute(path: Path, quick: bool = False, timeout: int = 3600):
    """Run one notebook top to bottom from a fresh kernel; returns the executed notebook (not saved)."""
    import nbformat
    from nbclient import NotebookClient

    sys.path.insert(0, str(HERE.parent))
    from rwasym._version import __version__

    nb = nbformat.read(path, as_version=4)
    scratch = tempfile.mkdtemp(prefix=f"rwasym-{path.stem}-")
    old = os.environ.get("RWASYM_QUICK")
    os.environ["RWASYM_QUICK"] = "1" if quick else "0"
    try:
        t0 = time.perf_counter()
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": scratch}}).execute()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if old is None:
            os.environ.pop("RWASYM_QUICK", None)
        else:
            os.environ["RWASYM_QUICK"] = old
    nb.metadata["rwasym"] = {"version": __version__, "fingerprint": fingerprint(nb), "quick": quick,
                             "seconds": round(time.perf_counter() - t0, 1)}
    return nb


def main(names: list) -> int:
    import nbformat

    paths = sorted(HERE.glob("*.ipynb"))
    if names:
        paths = [p for p in paths if p.stem in names or p.name in names]
    for path in paths:
        print(f"executing {path.name} ...", flush=True)
        nb = execute(path)
        nbformat.write(nb, path)
        print(f"  {nb.metadata['rwasym']['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
