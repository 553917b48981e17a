"""Every file that runs on a device compiles with the real mpy-cross.

The esp32 and nrf HAL backends only run on hardware (tests/hil), so this is what
checks them on every run: a syntax error, or Python that MicroPython's compiler
rejects, fails here and names the file.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Folders whose .py files run on the MicroPython VM (boards/ holds data, and the
# few .py files a board needs, e.g. the virtual board's start-up).
DEVICE_DIRS = ("bootloader", "app_loader", "system", "hal", "lib", "boards", "examples")


def _mpy_cross() -> Path:
    return Path(sys.executable).parent / "mpy-cross"


def device_sources() -> list[Path]:
    files = []
    for name in DEVICE_DIRS:
        files += (REPO / name).rglob("*.py")
    return sorted(p for p in files if "__pycache__" not in p.parts)


SOURCES = device_sources()


def test_sources_found():
    names = {p.relative_to(REPO).parts[0] for p in SOURCES}
    assert {"bootloader", "system", "hal", "boards"} <= names
    ports = {p.parent.name for p in SOURCES if p.parent.parent.name == "ports"}
    assert {"esp32", "nrf"} <= ports


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_compiles_with_mpy_cross(source, tmp_path):
    mpy_cross = _mpy_cross()
    assert mpy_cross.is_file(), f"mpy-cross not installed beside {sys.executable}"
    out = tmp_path / (source.stem + ".mpy")
    rel = source.relative_to(REPO).as_posix()
    proc = subprocess.run(
        [str(mpy_cross), "-o", str(out), "-s", rel, str(source)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"{rel} does not compile:\n{proc.stdout}{proc.stderr}"
    assert out.stat().st_size > 0
