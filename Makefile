# Keel: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= /tmp/keel-demo

.PHONY: setup demo test test-host test-device clean

setup: $(STAMP)

# Re-runs only when the pins or the tools' package description change.
$(STAMP): requirements.txt tools/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e tools
	touch $@

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" DEMO_DIR="$(DEMO_DIR)" bash examples/demo.sh

test: setup
	$(BIN)/python -m pytest -q tests

test-host: setup
	$(BIN)/python -m pytest -q tests/host

test-device: setup
	$(BIN)/python -m pytest -q tests/device

clean:
	rm -rf $(VENV) build .pytest_cache
