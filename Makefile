# Two entry points (see README): `make quickstart` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install quickstart lint browser test test-all bench

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints.txt --editable ".[test]"
	touch $@

install: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(PY) -m pipelines run --config configs/digits.yaml

# Lint, format and type checks first (seconds), then the tests.
lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# The browser test (tests/test_mlflow_ui.py) drives the system's Chromium; Playwright downloads no browser.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium)

test: lint browser
	$(PY) -m pytest

test-all: $(VENV)/.installed
	$(PY) -m pytest -m "slow or not slow"

bench: $(VENV)/.installed
	$(PY) benchmarks/unet_throughput.py --variants eager channels_last compile --out benchmarks/results/unet_throughput_cpu.json
