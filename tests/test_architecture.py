"""The package layout (ARCHITECTURE.md): import-linter's contracts from pyproject.toml hold, and the
bottom layers load without TransformerLens or transformers."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    """layers (math/data ← models ← hooks/objectives ← analyses/train/report ← studies ← app), nothing in the
    library imports the study, math/data forbidden from models/hooks/TL/transformers, and no import cycle
    between sibling packages or modules."""
    pytest.importorskip("importlinter", reason="the layer check needs import-linter: install rwasym[dev]")
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint) if lint.exists() else "lint-imports", "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "4 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("module", ["rwasym", "rwasym.math", "rwasym.data", "rwasym.errors"])
def test_bottom_layers_load_no_transformer_lens(module):
    code = (f"import sys, {module}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformer_lens', 'transformers', 'peft', 'trl')"
            " or m.startswith(('rwasym.models', 'rwasym.hooks', 'rwasym.analyses', 'rwasym.app', 'rwasym.substrate',"
            " 'rwasym.objectives', 'rwasym.train', 'rwasym.studies')));"
            "print(len(bad), bad[:5])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("0 "), out


def test_public_names_resolve_and_nothing_shadows_a_subpackage():
    """Every name in rwasym.__all__ resolves lazily; a public function never shares its name with a
    subpackage (the old `rwasym.probe` function shadowed the `rwasym.probe` module)."""
    import importlib
    import pkgutil

    import rwasym

    subpackages = {m.name for m in pkgutil.iter_modules(rwasym.__path__) if not m.name.startswith("_")}
    assert not subpackages & set(rwasym.__all__), subpackages & set(rwasym.__all__)
    for name in rwasym.__all__:
        assert getattr(rwasym, name) is not None, name
    for sub in subpackages:  # importing every subpackage leaves the public names intact
        importlib.import_module(f"rwasym.{sub}")
    assert callable(rwasym.capture) and callable(rwasym.probe) and callable(rwasym.load)
    with pytest.raises(AttributeError):
        rwasym.no_such_name
