# Keel: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= /tmp/keel-demo

.PHONY: setup demo test test-host test-device bench clean system-packages mosquitto postgresql chromium

setup: $(STAMP)

# Re-runs only when the pins or the tools' package description change.
$(STAMP): requirements.txt tools/pyproject.toml cloud/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e tools -e cloud
	@$(MAKE) --no-print-directory system-packages
	touch $@

# What the tests need from Debian, installed when missing (as root, with apt-get;
# `apt-get update` only if the install fails without it). Quick when all is there.
system-packages: mosquitto postgresql chromium

# The cloud tests also run against a real Mosquitto, from Debian's packages.
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get install -y -qq mosquitto >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && apt-get install -y -qq mosquitto >/dev/null)) && \
	  echo "installed mosquitto"; \
	else echo "mosquitto is not installed (not root, or no apt-get): its tests will fail"; fi

# ... and the registry's against a PostgreSQL server they start (initdb, pg_ctl).
postgresql:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null)) && \
	  echo "installed postgresql"; \
	else echo "PostgreSQL is not installed (not root, or no apt-get): its registry tests will fail"; fi

# ... and the console's browser tests drive Debian's Chromium through its ChromeDriver.
chromium:
	@if test -x /usr/bin/chromium && test -x /usr/bin/chromedriver; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)) && \
	  echo "installed chromium and chromium-driver"; \
	else echo "chromium and chromium-driver are not installed (not root, or no apt-get): the console's browser tests will fail"; fi

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" DEMO_DIR="$(DEMO_DIR)" bash examples/demo.sh

# Every suite, then the hardware-in-the-loop suite on the virtual board's pty (docs/hil.md).
test: setup
	$(BIN)/python -m pytest -q tests
	$(BIN)/python tests/hil/on_virtual_board.py

test-host: setup
	$(BIN)/python -m pytest -q tests/host

test-device: setup
	$(BIN)/python -m pytest -q tests/device

# Benchmarks (bench/README.md): every figure against its baseline; writes bench/results.md
# and bench/results.json. They report and never fail on a goal; `make test` runs their
# smoke run (tests/bench).
bench: setup
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build .pytest_cache
