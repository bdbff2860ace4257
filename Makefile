# Two commands do all set-up on a fresh machine with Python 3.11 and pip:
#   make demo   the main job end to end through the service: `rsavq serve` (SQLite + embedded
#               broker), submit the bundled model at 3 bits over HTTP, follow, download, verify
#   make test   the default test suite, including the integration tests against the real Redis
#               and PostgreSQL on 127.0.0.1 (skipped, saying so, when they are not reachable)
# `make check` runs what CI runs before the tests: lint, format, types, import contracts.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-cli test test-slow check install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed first: this machine's pip takes a local CPU wheel for 2.13.0,
# while any other spec would pull several GB of CUDA packages.
$(STAMP): $(BIN)/python pyproject.toml requirements-assets.txt
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,dev]"
	@# Hugging Face's `kernels` (pulled in by transformers 5.25+, left behind by a downgrade) owns the
	@# same top-level module name as this project's kernels/: one environment cannot hold both.
	$(BIN)/pip uninstall -q -y kernels 2>/dev/null || true
	$(BIN)/pip install -q --no-deps -r requirements-assets.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	sh scripts/ensure_browser.sh
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow and not gpu" -q

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

demo-cli: $(STAMP)
	$(BIN)/python scripts/demo_cli.py

clean:
	rm -rf $(VENV) runs
