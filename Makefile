# network-moments: the two set-up commands of the README are `make demo` and `make test`.
# torch is installed first and pinned (the CPU wheel): an unpinned requirement resolved with
# no torch present would pull the newest CUDA build (several GB).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test verify lint generate

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Main job: kernels checked and verified against mpmath, LeNet (trained once, cached),
# analytic moments vs Monte Carlo, one targeted and one sparse-smooth attack.
demo: install
	$(BIN)/nm demo

# Tests: generated/ in sync with derivations/, kernels vs mpmath (table), pytest, ruff.
# generated/ is regenerated once (by --check, with a non-default hash seed); pytest's
# generator tests reuse that result (NM_GENERATED_CHECKED=1) instead of regenerating.
test: install
	PYTHONHASHSEED=12345 $(BIN)/nmgen generate --check
	$(BIN)/nmgen verify --quick
	$(BIN)/ruff check .
	NM_GENERATED_CHECKED=1 $(BIN)/python -m pytest

verify: install
	$(BIN)/nmgen verify

generate: install
	$(BIN)/nmgen generate

lint: install
	$(BIN)/ruff check .
