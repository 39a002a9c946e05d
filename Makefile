# The project's vocabulary: install, test, demo, bench, lint, docs.
# `make test` and `make demo` install first when .venv is missing, so each is
# one command on a fresh machine.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench bench-quick reliability lint docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(BIN)/python -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/ipcbus demo

bench: install
	@command -v nats-server >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && apt-get install -y -qq nats-server) >/dev/null 2>&1; } || \
		echo "nats-server not installed: the NATS baseline rows will be skipped"
	$(BIN)/python -m ipcbus.bench $(BENCH_ARGS)

bench-quick:
	$(MAKE) bench BENCH_ARGS=--quick

# Rerun the fault-injection suite and regenerate docs/reliability.md from its results.
reliability: install
	$(BIN)/python -m tests.faults.report

lint: install
	$(BIN)/ruff check ipcbus tests examples
	$(BIN)/mypy

docs: install
	$(BIN)/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache .hypothesis
