"""Notebooks: each runs top to bottom from a fresh kernel in quick mode (RWASYM_QUICK=1), and the
committed copy carries the outputs of a full run that are not stale (notebooks/execute.py)."""

import importlib.util
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import rwasym

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
_spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "notebooks" / "execute.py")
execute_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute_notebooks)


def _errors(nb) -> list:
    return [
        o
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
        if o.get("output_type") == "error"
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, quick_cache, shared_gguf_cache, monkeypatch):
    monkeypatch.setenv("RWASYM_QUICK", "1")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert not _errors(nb)
    first = next(c for c in nb.cells if c.cell_type == "code")
    printed = "".join(o.get("text", "") for o in first.outputs if o.get("output_type") == "stream")
    assert f"rwasym {rwasym.__version__}" in printed
    if "QUICK" in "".join(first.source):
        assert "QUICK=True" in printed  # the environment switch reached the kernel


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_outputs_are_a_current_full_run(path):
    nb = nbformat.read(path, as_version=4)
    meta = nb.metadata.get("rwasym")
    rerun = f"re-run `.venv/bin/python notebooks/execute.py {path.stem}` and commit the result"
    assert meta is not None, f"{path.name} was not executed by notebooks/execute.py: {rerun}"
    assert meta["fingerprint"] == execute_notebooks.fingerprint(nb), (
        f"{path.name}'s cells changed since its outputs were made: {rerun}"
    )
    assert meta["version"] == rwasym.__version__, f"{path.name}'s outputs are from rwasym {meta['version']}: {rerun}"
    assert meta["quick"] is False
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), f"{path.name} has cells that never ran: {rerun}"
    assert not _errors(nb)
    printed = "".join(o.get("text", "") for o in code[0].outputs if o.get("output_type") == "stream")
    assert f"rwasym {meta['version']}" in printed  # the visible version cell agrees with the metadata
    if "QUICK" in "".join(code[0].source):
        assert "QUICK=False" in printed
    plots = [c for c in code if "report." in c.source and "report.markdown" not in c.source]
    for cell in plots:  # every figure cell carries its figure
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), (path.name, cell.source[:60])


def test_fingerprint_sees_an_edited_cell():
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    before = execute_notebooks.fingerprint(nb)
    nb.cells[-1].source += "\n# edited"
    assert execute_notebooks.fingerprint(nb) != before
    assert before == execute_notebooks.fingerprint(nbformat.read(NOTEBOOKS[0], as_version=4))
