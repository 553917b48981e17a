"""Hardware-in-the-loop tests: a board over its serial port (docs/hil.md).

    pytest tests/hil --port /dev/ttyUSB0 --board esp32_generic

Without --port every test here is skipped. With it:

- test_hil_board.py checks the HAL peripheral by peripheral. The session copies the
  HAL (hal/*.py, and of hal/ports/ only the board's port and the backend it shares:
  keel.build.port_folders; compiled with mpy-cross as Keel's modules are) to
  /keel_hil on the board and
  the board's board.json to /keel/board.json, over mpremote's serial transport (the
  raw REPL), then each test runs a short snippet on the board and checks what it
  reports. The jumpers each board needs are listed in boards/<board>/hil.json.
- test_hil_keel.py checks Keel itself with the keel CLI on the same port: boot and
  status, USB flashing, safe mode, keel update; it puts the board's own modules back
  at the end.
- test_hil_esp32_flash.py (esp32_generic, with KEEL_ESP32_FIRMWARE only) erases the
  board and installs Keel: it runs last.

The board must run Keel, or be at the plain MicroPython REPL for the peripheral tests
alone. Every connection stops Keel the way `keel flash --usb` does (Ctrl-C, raw REPL,
soft reboot: /boot.py runs, /main.py, where Keel starts, does not); at the end of the
session the board is soft-rebooted at its friendly REPL, which runs /main.py: Keel
again.

The options are registered in tests/conftest.py (so `pytest tests --port X` knows
them too); run this directory or a file in it.
"""

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keel import keel_files
REPO = Path(__file__).resolve().parents[2]
HIL_DIR = Path(__file__).resolve().parent
HAL = REPO / "hal"
BOARDS = REPO / "boards"
NO_BOARD = "no board attached: run pytest tests/hil --port PORT --board BOARD"
DEVICE_ROOT = "/keel_hil"  # where the HAL goes on the board
BOARD_FILE = keel_files.BOARD_FILE  # where hal.board() reads it
APP_MARK_FILE = "/keel_hil_app.txt"  # what the test apps of test_hil_keel.py write
RESULT_MARK = "\x1eKEEL-HIL "
# The order the files run in: the peripherals with Keel stopped, then Keel (which
# resets the board many times and puts its modules back), then the erasing flash.
FILE_ORDER = ("test_hil_board.py", "test_hil_keel.py", "test_hil_wifi.py", "test_hil_esp32_flash.py")


def _option(config, name):
    return config.getoption(name, default=None)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = Path(item.path).name
        return FILE_ORDER.index(name) if name in FILE_ORDER else len(FILE_ORDER)

    hil = [i for i in items if HIL_DIR in Path(i.path).parents]
    if hil:
        others = [i for i in items if i not in hil]
        items[:] = others + sorted(hil, key=rank)  # stable: each file keeps its order
    if _option(config, "--port"):
        return
    skip = pytest.mark.skip(reason=NO_BOARD)
    for item in hil:
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

_RM = """
import os
def _rm(path):
    try:
        entries = list(os.ilistdir(path))
    except OSError:
        try:
            os.remove(path)
        except OSError:
            pass
        return
    for e in entries:
        full = path + "/" + e[0]
        if e[1] & 0x4000:
            _rm(full)
        else:
            os.remove(full)
    os.rmdir(path)
"""

_PREPARE = _RM + """
_rm({root!r})
for _d in {dirs!r}:
    try:
        os.mkdir(_d)
    except OSError:
        pass
"""


class Board:
    """A board on a serial port, driven through the raw REPL.

    The connection is opened on demand: release() frees the port for another program
    (the keel CLI), and the next run() connects again (stopping Keel if it runs)."""

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
        self._raw = False
        self.deployed = False

    # -- connection

    def _open(self, wait_s: float):
        from mpremote.transport import TransportError
        from mpremote.transport_serial import SerialTransport

        deadline = time.monotonic() + wait_s
        while True:
            try:
                return SerialTransport(self.port, baudrate=115200)
            except (TransportError, OSError) as e:
                if time.monotonic() > deadline:
                    raise BoardError(f"cannot open {self.port}: {e}") from None
                time.sleep(0.25)

    def connect(self, wait_s: float = 10.0, soft_reset: bool = True) -> None:
        """The raw REPL, with Keel stopped: Ctrl-C interrupts whatever runs, and (with
        soft_reset) a soft reboot in raw mode gives a fresh heap with only /boot.py
        run, as `keel flash --usb` does. Reloads the HAL if the session deployed it."""
        from mpremote.transport import TransportError

        deadline = time.monotonic() + wait_s
        while True:
            if self._transport is None:
                self._transport = self._open(max(0.0, deadline - time.monotonic()))
            try:
                self._transport.enter_raw_repl(soft_reset=soft_reset)
                self._raw = True
                break
            except (TransportError, OSError) as e:
                self.release()
                if time.monotonic() > deadline:
                    raise BoardError(f"no raw REPL on {self.port}: {e}") from None
                time.sleep(0.5)
        if self.deployed:
            self.load_hal()

    def release(self) -> None:
        """Close the port (the board goes on running what it runs)."""
        if self._transport is not None:
            try:
                self._transport.close()
            except OSError:
                pass
            self._transport = None
            self._raw = False

    def reconnect(self, wait_s: float, soft_reset: bool = False) -> None:
        """After the board reset itself: reach its REPL again and reload the HAL."""
        self.release()
        self.connect(wait_s, soft_reset=soft_reset)

    def restart_keel(self) -> None:
        """Leave the board running: the friendly REPL and a soft reboot there, which
        runs /main.py (Keel, on a board that has it)."""
        if self._transport is None:
            self._transport = self._open(10)
        try:
            if self._raw:
                self._transport.exit_raw_repl()
            self._transport.serial.write(b"\x04")
            time.sleep(0.3)
        finally:
            self.release()

    def hard_reset(self) -> None:
        """machine.reset(), the way every MicroPython board resets; the port is freed."""
        from mpremote.transport import TransportError

        if not self._raw:
            self.connect()
        try:
            self._transport.exec_raw_no_follow("import machine\nmachine.reset()")
        except (TransportError, OSError):
            pass  # the board went away mid-answer: that is the reset
        self.release()

    def wait_output(self, needles, timeout: float) -> str | None:
        """Listen to the console (the port open, nothing sent) until one of `needles`
        is printed; the needle seen, or None at the timeout. Output printed while the
        port was closed is lost, as on any serial console: callers check the board's
        files afterwards, this only saves waiting."""
        deadline = time.monotonic() + timeout
        seen = b""
        wanted = [n.encode() for n in needles]
        while time.monotonic() < deadline:
            if self._transport is None:
                try:
                    self._transport = self._open(0)
                except BoardError:  # a USB port gone while the board resets
                    time.sleep(0.25)
                    continue
                self._raw = False
            try:
                ser = self._transport.serial
                data = ser.read(ser.in_waiting or 1) if ser.in_waiting else b""
            except OSError:
                self.release()
                continue
            if not data:
                time.sleep(0.05)
                continue
            seen = (seen + data)[-8192:]
            for needle, raw in zip(needles, wanted):
                if raw in seen:
                    return needle
        return None

    # -- files

    def deploy(self) -> None:
        # Compiled, as Keel's own modules are: compiling .py on the board would take
        # heap the board may not have beside the HAL (the ESP32 has about 110 KB).
        from keel.build import compile_py, port_folders

        port = self.data["port"]
        files = {f"{DEVICE_ROOT}/hal/{p.stem}.mpy": p for p in sorted(HAL.glob("*.py"))}
        files[f"{DEVICE_ROOT}/keel_files.mpy"] = REPO / "lib" / "keel_files.py"  # (hal reads BOARD_FILE)
        ports_init = HAL / "ports" / "__init__.py"
        if ports_init.is_file():
            files[f"{DEVICE_ROOT}/hal/ports/__init__.mpy"] = ports_init
        folders = port_folders(port)  # the port's own and the backend it shares
        for folder in folders:
            for p in sorted((HAL / "ports" / folder).glob("*.py")):
                files[f"{DEVICE_ROOT}/hal/ports/{folder}/{p.stem}.mpy"] = p
        dirs = [DEVICE_ROOT, f"{DEVICE_ROOT}/hal", f"{DEVICE_ROOT}/hal/ports"]
        dirs += [f"{DEVICE_ROOT}/hal/ports/{f}" for f in folders] + [BOARD_FILE.rsplit("/", 1)[0]]
        self.run(_PREPARE.format(root=DEVICE_ROOT, dirs=dirs), timeout=30)
        for dest, src in files.items():
            self._transport.fs_writefile(dest, compile_py(src, src.relative_to(REPO).as_posix()))
        if self.read_file(BOARD_FILE) != self.board_file.read_bytes():
            self._transport.fs_writefile(BOARD_FILE, self.board_file.read_bytes())
        self.deployed = True

    def load_hal(self) -> None:
        self.run(_PREAMBLE.format(root=DEVICE_ROOT, port=self.data["port"]))

    def read_file(self, path: str) -> bytes | None:
        """A file's bytes, or None if the board has no such file."""
        found = self.value(f"import os\ntry:\n    os.stat({path!r})\n    result = True\n"
                           "except OSError:\n    result = False")
        return bytes(self._transport.fs_readfile(path)) if found else None

    def remove(self, *paths: str) -> None:
        """Delete files or directory trees; missing ones are fine."""
        self.run(_RM + "".join(f"_rm({p!r})\n" for p in paths), timeout=30)

    # -- running code

    def run(self, code: str, timeout: float = 15) -> str:
        """Run code on the board; its output, or BoardError with the traceback."""
        if not self._raw:
            self.connect()
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

    # -- the keel CLI on this port

    def keel(self, *args, cloud=None, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run the keel CLI (the port released first, so it can open it)."""
        self.release()
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        if cloud is not None:
            env["KEEL_CLOUD"] = str(cloud)
        return subprocess.run(["keel", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="session")
def hil_board(request):
    """The board on --port, Keel stopped; at the end /keel_hil and the test apps'
    file are removed and Keel is started again."""
    port = _option(request.config, "--port")
    if not port:
        pytest.skip(NO_BOARD)
    name = _option(request.config, "--board")
    if not name:
        raise pytest.UsageError("--port needs --board BOARD (a folder under boards/)")
    b = Board(port, name)
    b.connect()
    try:
        yield b
    finally:
        try:
            b.deployed = False
            b.connect(wait_s=20)
            b.remove(DEVICE_ROOT, APP_MARK_FILE)
            b.restart_keel()
        finally:
            b.release()


@pytest.fixture(scope="session")
def board(hil_board):
    """The board with the HAL deployed to /keel_hil and imported from there."""
    if not hil_board.deployed:
        hil_board.deploy()
        hil_board.load_hal()
    return hil_board
