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

.PHONY: demo demo-cli test test-slow test-gpu check install clean constraints

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Every version comes from constraints.txt (torch's included: this machine's pip takes a local CPU
# wheel for 2.13.0, while any other version would pull several GB of CUDA packages); torch first.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt requirements-assets.txt
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[test,dev]"
	@# Hugging Face's `kernels` (pulled in by transformers 5.25+, left behind by a downgrade) owns the
	@# same top-level module name as this project's kernels/: one environment cannot hold both.
	$(BIN)/pip uninstall -q -y kernels 2>/dev/null || true
	$(BIN)/pip install -q --no-deps -c constraints.txt -r requirements-assets.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	sh scripts/ensure_browser.sh
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow and not gpu" -q

# On a CUDA host: every kernel compiled and checked against its reference (fp16 and bf16), a
# quantized model's logits and greedy generate() through the kernels; then the interpreter tests
# on the same host. Fails where no GPU is visible rather than skipping everything.
test-gpu: $(STAMP)
	RSAVQ_TEST_COMPILED=1 $(BIN)/python -m pytest -m gpu -q
	$(BIN)/python -m pytest -m interpret -q

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy
	@# radon's cyclomatic complexity (it also counts boolean operators): no function above 20 (rank C)
	$(BIN)/xenon --max-absolute C kernels rsavq_core service worker

# constraints.txt from a fresh environment: after changing dependencies in pyproject.toml
constraints:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q torch==2.13.0
	.venv-lock/bin/pip install -q -e ".[test,dev]"
	.venv-lock/bin/pip uninstall -q -y kernels 2>/dev/null || true
	.venv-lock/bin/pip install -q --no-deps -r requirements-assets.txt
	(sed -n '1,4p' constraints.txt; .venv-lock/bin/pip freeze --exclude-editable | grep -v '^-e' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/') > constraints.new
	mv constraints.new constraints.txt && rm -rf .venv-lock

demo-cli: $(STAMP)
	$(BIN)/python scripts/demo_cli.py

clean:
	rm -rf $(VENV) runs
