"""Hardware-in-the-loop tests: the HAL on a real board, over its serial port.

    pytest tests/hil --port /dev/ttyUSB0 --board esp32_generic

Without --port every test here is skipped. With it, the session copies the HAL
(hal/*.py and hal/ports/<the board's port>/ only) to /keel_hil on the board and the
board's board.json to /keel/board.json, over mpremote's serial transport (the raw
REPL), then each test runs a short snippet on the board and checks what it reports.
The jumpers each board needs are listed in boards/<board>/hil.json.

The board must be at the plain MicroPython REPL: Keel itself must not be running on
it (it would own the peripherals, and may have started a watchdog).

The options are registered here, so pass tests/hil (or a file in it) on the command
line: `pytest tests --port X` does not know --port.
"""

import ast
import json
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HIL_DIR = Path(__file__).resolve().parent
HAL = REPO / "hal"
BOARDS = REPO / "boards"
NO_BOARD = "no board attached: run pytest tests/hil --port PORT --board BOARD"
DEVICE_ROOT = "/keel_hil"  # where the HAL goes on the board
BOARD_FILE = "/keel/board.json"  # where hal.board() reads it
RESULT_MARK = "\x1eKEEL-HIL "


def _option(config, name):
    return config.getoption(name, default=None)


def pytest_collection_modifyitems(config, items):
    if _option(config, "--port"):
        return
    skip = pytest.mark.skip(reason=NO_BOARD)
    for item in items:
        if HIL_DIR in Path(item.path).parents:
            item.add_marker(skip)


class BoardError(AssertionError):
    """The board raised, or could not be reached."""


# Run after every (re)connect: the HAL copied to DEVICE_ROOT, not any other copy
# (a Keel system part, or an earlier session's modules), is the one imported.
_PREAMBLE = """
import sys
for _k in [_k for _k in sys.modules if _k == "hal" or _k.startswith("hal.")]:
    del sys.modules[_k]
if {root!r} in sys.path:
    sys.path.remove({root!r})
sys.path.insert(0, {root!r})
import hal
assert hal.PORT == {port!r}, "board runs the %s port, board.json says {port}" % hal.PORT
"""

_PREPARE = """
import os
def _rm(path):
    try:
        entries = list(os.ilistdir(path))
    except OSError:
        return
    for e in entries:
        full = path + "/" + e[0]
        if e[1] & 0x4000:
            _rm(full)
        else:
            os.remove(full)
    os.rmdir(path)
_rm({root!r})
for _d in {dirs!r}:
    try:
        os.mkdir(_d)
    except OSError:
        pass
"""


class Board:
    """A board on a serial port, driven through the raw REPL."""

    def __init__(self, port: str, name: str):
        self.port = port
        self.name = name
        board_file = BOARDS / name / "board.json"
        if not board_file.is_file():
            raise pytest.UsageError(f"--board {name}: no {board_file.relative_to(REPO)}")
        self.board_file = board_file
        self.data = json.loads(board_file.read_text())
        hil_file = BOARDS / name / "hil.json"
        self.hil = json.loads(hil_file.read_text()) if hil_file.is_file() else {}
        self._transport = None

    # -- connection

    def connect(self, wait_s: float = 5.0) -> None:
        from mpremote.transport import TransportError
        from mpremote.transport_serial import SerialTransport

        deadline = time.monotonic() + wait_s
        while True:
            transport = None
            try:
                transport = SerialTransport(self.port, baudrate=115200)
                transport.enter_raw_repl(soft_reset=False)
                self._transport = transport
                return
            except (TransportError, OSError) as e:
                if transport is not None:
                    transport.close()
                if time.monotonic() > deadline:
                    raise BoardError(f"cannot reach a board on {self.port}: {e}") from None
                time.sleep(0.5)

    def close(self) -> None:
        if self._transport is not None:
            try:
                self._transport.exit_raw_repl()
            finally:
                self._transport.close()
                self._transport = None

    def reconnect(self, wait_s: float) -> None:
        """After the board reset itself: reach its REPL again and reload the HAL."""
        if self._transport is not None:
            try:
                self._transport.close()
            except OSError:
                pass
            self._transport = None
        self.connect(wait_s)
        self.load_hal()

    # -- files

    def deploy(self) -> None:
        port = self.data["port"]
        files = {f"{DEVICE_ROOT}/hal/{p.name}": p for p in sorted(HAL.glob("*.py"))}
        ports_init = HAL / "ports" / "__init__.py"
        if ports_init.is_file():
            files[f"{DEVICE_ROOT}/hal/ports/__init__.py"] = ports_init
        for p in sorted((HAL / "ports" / port).glob("*.py")):
            files[f"{DEVICE_ROOT}/hal/ports/{port}/{p.name}"] = p
        dirs = [DEVICE_ROOT, f"{DEVICE_ROOT}/hal", f"{DEVICE_ROOT}/hal/ports"]
        dirs += [f"{DEVICE_ROOT}/hal/ports/{port}", BOARD_FILE.rsplit("/", 1)[0]]
        self.run(_PREPARE.format(root=DEVICE_ROOT, dirs=dirs), timeout=30)
        for dest, src in files.items():
            self._transport.fs_writefile(dest, src.read_bytes())
        self._transport.fs_writefile(BOARD_FILE, self.board_file.read_bytes())

    def load_hal(self) -> None:
        self.run(_PREAMBLE.format(root=DEVICE_ROOT, port=self.data["port"]))

    # -- running code

    def run(self, code: str, timeout: float = 15) -> str:
        """Run code on the board; its output, or BoardError with the traceback."""
        out, err = self._transport.exec_raw(code, timeout=timeout)
        if err:
            raise BoardError(f"on the board:\n{err.decode(errors='replace')}")
        return out.decode(errors="replace")

    def value(self, code: str, timeout: float = 15):
        """Run code that sets `result` (made of literals); return that value."""
        out = self.run(code + f"\nprint({RESULT_MARK!r} + repr(result))\n", timeout)
        _, mark, text = out.rpartition(RESULT_MARK)
        assert mark, f"no result in the board's output:\n{out}"
        return ast.literal_eval(text.strip())

    # -- wiring

    def wiring(self, key: str):
        """hil.json's entry for a check, or skip the test with the reason given."""
        value = self.hil.get(key)
        if not value:
            reason = self.hil.get("skip", {}).get(key)
            pytest.skip(reason or f"boards/{self.name}/hil.json has no '{key}'")
        return value


@pytest.fixture(scope="session")
def board(request):
    port = _option(request.config, "--port")
    if not port:
        pytest.skip(NO_BOARD)
    name = _option(request.config, "--board")
    if not name:
        raise pytest.UsageError("--port needs --board BOARD (a folder under boards/)")
    b = Board(port, name)
    b.connect()
    try:
        b.deploy()
        b.load_hal()
        yield b
    finally:
        b.close()
