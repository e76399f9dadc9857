"""The 0.1 import paths still work for one release: each warns (DeprecationWarning naming the new path)
and then *is* the new module, so private names and monkeypatching reach the one real module."""

import importlib
import sys

import pytest

MOVED = {
    "rwasym.analyses.objectives": "rwasym.objectives",
    "rwasym.substrate.train": "rwasym.train.loops",
    "rwasym.substrate.trl_backend": "rwasym.train.trl_backend",
    "rwasym.substrate.language": "rwasym.studies.language",
    "rwasym.substrate.default_pair": "rwasym.studies.default_pair",
    "rwasym.substrate.real_pair": "rwasym.studies.real_pair",
    "rwasym.app.experiments": "rwasym.studies.experiments",
    "rwasym.app.real": "rwasym.studies.real",
    "rwasym.app.demo": "rwasym.studies.demo",
    "rwasym.app.report": "rwasym.report",
    "rwasym.models.shards": "rwasym.models.checkpoint",
    "rwasym.models.layouts": "rwasym.models.host",
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_warns_and_is_the_new_module(old):
    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)  # a cached alias would import silently
    parent, _, child = old.rpartition(".")
    if hasattr(sys.modules.get(parent), child):
        delattr(sys.modules[parent], child)
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {MOVED[old]}; the old path is removed in"):
        aliased = importlib.import_module(old)
    assert aliased is new
    assert sys.modules[old] is new
    assert getattr(sys.modules[parent], child) is new  # `from rwasym.app import report` gets the new module too


def test_from_import_of_a_private_name_through_an_old_path():
    sys.modules.pop("rwasym.substrate.train", None)
    with pytest.warns(DeprecationWarning):
        from rwasym.substrate.train import _batches
    from rwasym.train.loops import _batches as new

    assert _batches is new


def test_the_library_itself_imports_no_old_path():
    """Fresh interpreter, a deprecation raised from rwasym code is an error: the library touches no old path."""
    import subprocess

    modules = sorted(set(MOVED.values()) | {"rwasym.app.cli", "rwasym.app.spectra", "rwasym.train", "rwasym.studies"})
    code = (
        "import importlib, warnings\nwarnings.filterwarnings('error', category=DeprecationWarning, module='rwasym')\n"
    )
    code += "".join(f"importlib.import_module({m!r})\n" for m in modules)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
