# The habits a newcomer reaches for first. Every target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast chaos lint fmt typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: the local failover demo on embedded etcd + Postgres (main command)
demo: $(STAMP)
	$(BIN)/paydispatch demo

## test: the whole suite, chaos tests included (what CI runs)
test: $(STAMP)
	$(BIN)/python -m pytest

## test-fast: everything but the slow chaos tests
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not chaos"

## chaos: only the slow fault-injection tests
chaos: $(STAMP)
	$(BIN)/python -m pytest -m chaos

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

typecheck: $(STAMP)
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
