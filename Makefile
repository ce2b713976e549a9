# Two entry points for a newcomer: `make run` and `make test`. Both start with `make setup`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run lint format test test-fast bench bench-quality clean

setup: $(STAMP)

# Reinstall only when the lock or the package metadata changed, so `make setup` is quick when nothing did.
$(STAMP): requirements.lock requirements-test.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock -r requirements-test.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

# Stages run `python` from PATH, so the virtual environment goes first.
run: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# Lint, format check and types for the library, the stages and the benchmarks (configured in pyproject.toml).
# `make test` runs it first, so CI fails on a lint error before it spends minutes on tests.
lint: setup
	$(BIN)/ruff check charlm stages bench
	$(BIN)/ruff format --check charlm stages bench
	$(BIN)/mypy

# Apply ruff's safe fixes and its formatting.
format: setup
	$(BIN)/ruff check --fix charlm stages bench
	$(BIN)/ruff format charlm stages bench

test: lint
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Both read a local copy of the AG News test split: `make bench AG_NEWS=path/to/test.csv`.
bench: setup
	$(BIN)/python -m bench.run $(if $(AG_NEWS),--ag-news $(AG_NEWS))

# About an hour: the recipes against the plain loop, the lesson's recipe and the compressors (BENCHMARKS.md, Quality).
bench-quality: setup
	$(BIN)/python -m bench.quality $(if $(AG_NEWS),--ag-news $(AG_NEWS))

clean:
	rm -rf $(VENV) .pytest_cache
