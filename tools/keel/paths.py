"""Where the Keel source tree and the tools it runs are."""

import os
import shutil
import sys
from pathlib import Path

from keel.errors import KeelError


def source_root() -> Path:
    """The Keel source tree: $KEEL_ROOT, or the checkout this package lives in."""
    env = os.environ.get("KEEL_ROOT")
    root = Path(env) if env else Path(__file__).resolve().parents[2]
    if not (root / "system" / "VERSION").is_file():
        raise KeelError(f"cannot find the Keel source tree at {root} (set KEEL_ROOT)")
    return root


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise KeelError(f"'{name}' not found: run 'make setup' or install it on PATH")
    return found


def micropython() -> str:
    return _tool("micropython")


def mpy_cross() -> str:
    return _tool("mpy-cross")
