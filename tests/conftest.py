import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def keel_env():
    """Environment for running the keel CLI in a subprocess."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def pytest_addoption(parser):
    # Hardware-in-the-loop options, here at the root so `pytest tests --port X` works too.
    group = parser.getgroup("keel-hil", "Keel hardware-in-the-loop tests (tests/hil)")
    group.addoption("--port", default=None, help="serial port of a board, e.g. /dev/ttyUSB0")
    group.addoption("--board", default=None, help="its board folder under boards/, e.g. esp32_generic")
    group.addoption("--wifi-ssid", default=None,
                    help="a WiFi access point the board can join (tests/hil/test_hil_wifi.py)")
    group.addoption("--wifi-password", default=None, help="its password (none: an open network)")
