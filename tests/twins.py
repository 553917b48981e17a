"""Board twins for the tests: a device directory whose board is a twin (an ESP32 played
by the VM with its port's stand-ins, boards/twins/), and code run on it as on a board
at its REPL (vdev.ask: the port's modules in place, the filesystem mounted, no Keel
running). Used by tests/host and tests/device."""

import json
from pathlib import Path

from keel import build, vdev

REPO = Path(__file__).resolve().parents[1]

# Code run on a twin reaches this tree through a mount, as mpremote mount would (with
# the VM's own vfs: the board's has no VfsPosix).
MOUNT_REPO = ("import vm_twin\nvm_twin.vfs.mount(vm_twin.vfs.VfsPosix(%r), '/_repo')\n"
              % str(REPO))


def make_twin(base: Path, board: str = "esp32_generic", platform: str = "esp32",
              version: str = "1.0.0", system_dir: Path | None = None,
              firmware: str | None = None) -> Path:
    """A new device directory for `board`, with a system built for its platform (and,
    for an nRF52840, the firmware build it plays: boards/twins/nrf/firmware.json)."""
    if system_dir is None:
        system_dir = base / f"system-{platform}-{version}"
        if not system_dir.is_dir():
            build.build_system(platform, version, system_dir)
    path = base / f"twin-{len(list(base.glob('twin-*')))}"
    vdev.create(path, system_dir, board, firmware=firmware)
    return path


def run_on(path: Path, code: str, cause: str = "power-on", wires=None):
    """Run code on the device's board (a fresh boot told `cause` started it); the
    jumpers, pairs of pin names, are on for that boot. Returns the finished process."""
    wires_file = Path(path) / vdev.WIRES_FILE
    if wires:
        wires_file.write_text(json.dumps({"wires": wires}))
    try:
        return vdev.ask(path, code, cause)
    finally:
        wires_file.unlink(missing_ok=True)


def io_records(path: Path) -> list[dict]:
    """What the board reported to the host in its last boot (io.log)."""
    from keel import vio

    return vio.read_records(Path(path))
