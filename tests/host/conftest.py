"""Shared fixtures for the host test suite.

The tests exercise the keel package of *this* checkout (tools/keel), both in
process and through the `keel` console script of the venv running pytest.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"

# Import keel from this checkout even if the venv's editable install points elsewhere
# (the editable finder is appended to sys.meta_path, so sys.path wins).
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))
# source_root() must find this checkout, not whatever KEEL_ROOT the shell had.
os.environ.pop("KEEL_ROOT", None)


def _keel_executable() -> str:
    beside = Path(sys.executable).parent / "keel"
    if beside.is_file():
        return str(beside)
    found = shutil.which("keel")
    if not found:
        raise RuntimeError("the keel console script is not installed: run 'make setup'")
    return found


def _keel_env() -> dict:
    env = dict(os.environ)
    env.pop("KEEL_ROOT", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TOOLS), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def keel_cli():
    """run(*args) -> CompletedProcess of the `keel` command (text mode)."""
    exe = _keel_executable()
    env = _keel_env()

    def run(*args, cwd=None):
        return subprocess.run(
            [exe, *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            cwd=cwd or REPO,
            timeout=120,
        )

    return run


@pytest.fixture(scope="session")
def expect_cli_error():
    """check(proc, *needles): exit 1, one 'keel: error:' line on stderr naming every
    needle, and no traceback anywhere. Returns that line."""

    def check(proc, *needles):
        output = proc.stdout + proc.stderr
        assert "Traceback" not in output, output
        assert proc.returncode == 1, output
        lines = proc.stderr.splitlines()
        assert len(lines) == 1, proc.stderr
        line = lines[0]
        assert line.startswith("keel: error:"), line
        for needle in needles:
            assert needle in line, (needle, line)
        return line

    return check


@pytest.fixture(scope="session")
def hello_image(tmp_path_factory) -> Path:
    """examples/hello built (in process) into a user part."""
    from keel import build

    out = tmp_path_factory.mktemp("hello") / "hello.bin"
    return build.build_app(REPO / "examples" / "hello", "virtual", "1.1.0", out)
