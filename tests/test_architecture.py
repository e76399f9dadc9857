"""The package layout (ARCHITECTURE.md): import-linter's contracts from pyproject.toml hold, and the
bottom layers load without TransformerLens or transformers."""

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    """layers (math/data ← models ← hooks/objectives ← analyses/train/report ← studies ← app), nothing in the
    library imports the study, math/data forbidden from models/hooks/TL/transformers, and no import cycle
    between sibling packages or modules."""
    pytest.importorskip("importlinter", reason="the layer check needs import-linter: install rwasym[dev]")
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(lint) if lint.exists() else "lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "4 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("module", ["rwasym", "rwasym.math", "rwasym.data", "rwasym.errors"])
def test_bottom_layers_load_no_transformer_lens(module):
    code = (
        f"import sys, {module}; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformer_lens', 'transformers', 'peft', 'trl')"
        " or m.startswith(('rwasym.models', 'rwasym.hooks', 'rwasym.analyses', 'rwasym.app', 'rwasym.substrate',"
        " 'rwasym.objectives', 'rwasym.train', 'rwasym.studies')));"
        "print(len(bad), bad[:5])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("0 "), out


def test_public_names_resolve_and_nothing_shadows_a_subpackage():
    """Every name in rwasym.__all__ resolves lazily; a public function never shares its name with a
    subpackage (the old `rwasym.probe` function shadowed the `rwasym.probe` module); the namespaces
    (math, models, ...) are the subpackages themselves."""
    import importlib
    import pkgutil
    import types

    import rwasym

    subpackages = {m.name for m in pkgutil.iter_modules(rwasym.__path__) if not m.name.startswith("_")}
    for name in subpackages & set(rwasym.__all__):
        assert isinstance(getattr(rwasym, name), types.ModuleType), name
        assert getattr(rwasym, name) is importlib.import_module(f"rwasym.{name}"), name
    for name in rwasym.__all__:
        assert getattr(rwasym, name) is not None, name
    for sub in subpackages:  # importing every subpackage leaves the public names intact
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # rwasym.substrate: a deprecated alias package
            importlib.import_module(f"rwasym.{sub}")
    assert callable(rwasym.capture) and callable(rwasym.probe) and callable(rwasym.load)
    assert callable(rwasym.sweep) and isinstance(rwasym.math, types.ModuleType)
    with pytest.raises(AttributeError):
        rwasym.no_such_name


def test_type_checking_mirror_equals_the_lazy_table():
    """What IDEs and pyright read (the TYPE_CHECKING imports) is exactly what `rwasym.X` resolves to at run time."""
    import ast

    import rwasym

    tree = ast.parse((ROOT / "rwasym" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    mirror = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.dump(node)
        for alias in node.names:
            if node.module is None:  # `from . import math`: the namespace itself
                mirror[alias.asname or alias.name] = (f"rwasym.{alias.name}", None)
            else:
                mirror[alias.asname or alias.name] = (f"rwasym.{node.module}", alias.name)
    assert mirror == rwasym._LAZY
    assert set(rwasym.__all__) == set(mirror) | {"RwasymError", "__version__"}


def test_names_moved_out_of_the_top_level_warn_and_still_resolve():
    import rwasym
    import rwasym.math

    for name, (module, attr) in rwasym._MOVED.items():
        with pytest.warns(DeprecationWarning, match=rf"rwasym\.{name} moved to {module}\.{attr}"):
            value = getattr(rwasym, name)
        assert value is getattr(importlib.import_module(module), attr), name
        assert name not in rwasym.__all__
    assert len(rwasym.__all__) == 35  # 28 entry points, 5 namespaces, RwasymError, __version__ (0.1: 55)
    with pytest.warns(DeprecationWarning):
        assert rwasym.run_sweep is rwasym.sweep
