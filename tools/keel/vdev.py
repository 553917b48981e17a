"""Virtual devices: a directory holding a board definition and a file-backed flash.

The device runs on the MicroPython unix port (boards/virtual/vm_startup.py plays the
part of the port's start-up code). The host side here creates, flashes, runs and
reads a device, as a factory programmer and a USB bootloader would."""

import ctypes
import json
import re
import secrets
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tty
from pathlib import Path

from littlefs import LittleFS, LittleFSError

from keel import module_format as mf
from keel import factory, keel_files, twin_nrf, vm_exit, vmfirmware
from keel.boards import Board, board_dir, board_from_dict, load_board
from keel.errors import KeelError
from keel.images import Image, folder_images, load_valid_image, module_label
from keel.paths import micropython, source_root
from keel.vio import CONSOLE_LOG, IO_IN, IO_LOG

FLASH_FILE = "flash.bin"
BOARD_FILE = "board.json"
PID_FILE = "vm.pid"
UID_FILE = "uid"  # the board's unique id (hal.device.unique_id)
# A soft reboot at the console's REPL, by the REPL mode the next VM starts in
SOFT_REBOOT_EXITS = {vm_exit.SOFT_REBOOT_FRIENDLY: "friendly", vm_exit.SOFT_REBOOT_RAW: "raw"}
FAULTS_FILE = "faults.json"  # fault injection for the next boot (docs/virtual-board.md)
FAULTS_OUT = "faults.out"  # what it counted: "COUNT STATE" (STATE "----------" or cut-/torn-write/-erase)
WIRES_FILE = "wires.json"  # simulated jumpers for the run (keel vdev run --wires)


class VirtualDevice:
    def __init__(self, path: Path | str):
        self.path = Path(path)

    @property
    def flash_path(self) -> Path:
        return self.path / FLASH_FILE

    def exists(self) -> bool:
        return (self.path / BOARD_FILE).is_file() and self.flash_path.is_file()

    def board(self) -> Board:
        if not self.exists():
            raise KeelError(f"{self.path}: not a virtual device (make one with 'keel vdev create')")
        data = json.loads((self.path / BOARD_FILE).read_text())
        build = self.path / twin_nrf.FIRMWARE_FILE  # a twin whose firmware places Keel's flash
        if data["port"] == "nrf" and build.is_file():
            return board_from_dict(data, twin_nrf.regions(data, json.loads(build.read_text())))
        return board_from_dict(data)

    def read_flash(self) -> bytearray:
        return bytearray(self.flash_path.read_bytes())

    def write_flash(self, flash: bytearray) -> None:
        """Replace the flash file in one step, so an interrupted write changes nothing."""
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".flash.")
        with os.fdopen(fd, "wb") as f:
            f.write(flash)
        os.replace(tmp, self.flash_path)

    def running_pid(self) -> int | None:
        try:
            pid = int((self.path / PID_FILE).read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def open_fs(self, flash: bytearray, board: Board) -> LittleFS:
        part = board.partition("fs")
        fs = LittleFS(
            block_size=board.block_size, block_count=part.size // board.block_size, mount=False
        )
        fs.context.buffer = bytearray(flash[part.offset : part.offset + part.size])
        return fs

    def store_fs(self, flash: bytearray, board: Board, fs: LittleFS) -> None:
        part = board.partition("fs")
        flash[part.offset : part.offset + part.size] = fs.context.buffer


def _place(flash: bytearray, board: Board, image: Image) -> None:
    slot = board.slot_for(image.info.function, image.info.index)
    flash[slot.offset : slot.offset + slot.size] = b"\xff" * slot.size
    flash[slot.offset : slot.offset + len(image.data)] = image.data


def check_for_board(board: Board, image: Image) -> None:
    """Refuse a module for another platform, without a slot, or too big for it."""
    info = image.info
    if info.platform != board.platform_id:
        raise KeelError(
            f"{image.path}: built for platform {mf.platform_name(info.platform)}, "
            f"this device is {board.platform}"
        )
    slot = board.slot_for(info.function, info.index)
    if slot is None:
        raise KeelError(f"{image.path}: board {board.name} has no slot for {module_label(info)}")
    if len(image.data) > slot.size:
        raise KeelError(
            f"{image.path}: {len(image.data)} bytes do not fit the {slot.label} slot "
            f"({slot.size} bytes)"
        )


def check_signatures(images: list[Image], trusted: list[bytes] | None) -> None:
    """Refuse, before anything is written, modules a board trusting these keys would
    refuse (docs/signing.md)."""
    from keel import signing

    for image in images:
        reason = signing.check_signature(image.data, image.info, trusted)
        if reason:
            text = signing.refusal_text(reason, image.signed_by, trusted or [])
            raise KeelError(f"{image.path}: {image.name}: {text}: nothing written")


def check_images_for_board(board: Board, images: list[Image]) -> None:
    """Check a set of modules to be written together: each fits, none collide."""
    seen = {}
    for image in images:
        check_for_board(board, image)
        key = (image.info.function, image.info.index)
        if key in seen:
            raise KeelError(f"{image.path} and {seen[key]} go to the same slot")
        seen[key] = image.path


# Stage 0 at the filesystem root (board path -> source): /boot.py after every reset,
# /main.py, which starts Keel, only in friendly-REPL mode (docs/boot-flow.md).
def create(path: Path | str, system_dir: Path | str, board_name: str = "virtual",
           trusted: list[bytes] | None = None, firmware: str | None = None) -> list[Image]:
    """Make a virtual device with the bootloader and system parts from system_dir.
    trusted: the raw public keys the board trusts (keel vdev create --trust); none
    leaves it in development mode, unless its bootloader module brings keys.
    firmware: the MicroPython build a twin plays (boards/twins/<port>/firmware.json;
    none: the one Keel documents)."""
    device = VirtualDevice(path)
    if device.exists():
        raise KeelError(f"{device.path}: a virtual device is already there")
    board = load_board(board_name)
    if firmware and board.port not in twin_nrf.CHIPS:
        raise KeelError(f"board {board_name}: no firmware to choose (--firmware is for the "
                        f"ESP32 and nRF52840 twins)")
    if board.port != "virtual" and not twin_dir(board.port).is_dir():
        raise KeelError(f"board {board_name} has no twin on the VM yet "
                        f"(its port {board.port} has no boards/twins/{board.port}/)")
    images = folder_images(system_dir)
    check_images_for_board(board, images)
    functions = {(i.info.function, i.info.index) for i in images}
    needed = [(p.function, p.index) for p in board.partitions if p.function in
              (mf.FUNCTION_BOOTLOADER, mf.FUNCTION_SYSTEM_PART)]
    for function, index in needed:
        if (function, index) not in functions:
            label = mf.function_name(function) + (f" {index}" if index else "")
            raise KeelError(f"{system_dir}: no {label} module")
    boot = [i for i in images if i.info.function == mf.FUNCTION_BOOTLOADER][0]
    files = factory.device_files(board.data, boot, trusted)
    check_signatures(images, factory.trusted_keys(files))

    flash = bytearray(b"\xff" * board.flash_size)
    port_flash = PORT_FLASH.get(board.port)
    if port_flash:
        port_flash(board, flash)
    build = None
    if board.port == "nrf":  # the firmware build decides where the slots and the fs are
        build = twin_nrf.choose(firmware)
        twin_nrf.write_firmware(build, flash)
        board = board_from_dict(board.data, twin_nrf.regions(board.data, build))
    elif board.port == "esp32":  # with ROMFS or without: where the code runs from
        build = twin_nrf.choose(firmware, "esp32")
    for image in images:
        _place(flash, board, image)
    part = board.partition("fs")
    flash[part.offset : part.offset + part.size] = factory.make_filesystem(
        files, board.block_size, part.size)

    device.path.mkdir(parents=True, exist_ok=True)
    (device.path / BOARD_FILE).write_text(json.dumps(board.data, indent=2) + "\n")
    (device.path / UID_FILE).write_text(new_uid(board.port) + "\n")
    if build:
        (device.path / twin_nrf.FIRMWARE_FILE).write_text(json.dumps(build, indent=2) + "\n")
    device.write_flash(flash)
    return images


# ---------------------------------------------------------------- board twins
# A board whose port is not "virtual" runs on the VM as that board's twin: its port's
# stand-ins and start-up are boards/twins/<port>/ (docs/virtual-board.md, "Board
# twins"). Per port, what the host side needs:

# The chip's own unique id, in bytes, as the port reads it: the virtual board's 12 (its
# own choice), the ESP32's factory base MAC in eFuse (6, machine.unique_id()), the
# nRF52840's FICR DEVICEID (8, read with machine.mem32: the port's unique_id() is b'').
UID_BYTES = {"virtual": 12, "esp32": 6, "nrf": 8}  # nrf: FICR DEVICEID, 64 bits
# The VM's heap beyond the board's, for the twin's own firmware (what its stand-ins
# and the simulated hardware hold); the twin measures it at start-up and keeps for
# Keel exactly the board's heap (boards/twins/vm_twin.py).
TWIN_FIRMWARE_ROOM = 192 * 1024
# The heap a twin keeps for Keel (the board's, or --heap): vm_twin.py reads it.
BOARD_HEAP_ENV = "KEEL_BOARD_HEAP"


def twin_firmware_room(device_dir: Path) -> int:
    """The VM's heap a twin's firmware needs beyond the board's: TWIN_FIRMWARE_ROOM, and
    the memory image of a ROMFS firmware's segment (nRF52840: the one its build
    places; ESP32: the romfs partition), which on the chip is memory-mapped flash
    (boards/twins/vm_twin.py MappedFlash)."""
    room = TWIN_FIRMWARE_ROOM
    build = Path(device_dir) / twin_nrf.FIRMWARE_FILE
    if build.is_file():
        doc = json.loads(build.read_text())
        if doc.get("vfs_rom") and "layout" in doc:
            room += doc["layout"]["romfs"][1]
        elif doc.get("vfs_rom"):  # (a table without a romfs partition maps nothing)
            room += sum(p.size for p in VirtualDevice(device_dir).board().partitions
                        if p.label == "romfs")
    return room


def _esp32_flash(board: Board, flash: bytearray) -> None:
    # What `keel image esp32` writes besides the modules and the filesystem: the
    # ESP-IDF partition table at 0x8000, by which esp32.Partition finds every slot. The
    # app partitions stay erased: on the twin the VM itself is MicroPython.
    from keel import esp32image

    table = esp32image.partition_table(board)
    flash[esp32image.TABLE_OFFSET : esp32image.TABLE_OFFSET + len(table)] = table


# The flash contents a port's factory image has beyond the slots and the filesystem.
PORT_FLASH = {"esp32": _esp32_flash}


def twin_dir(port: str) -> Path:
    return source_root() / "boards" / "twins" / port


def is_twin(board: Board) -> bool:
    return board.port != "virtual"


def ask(path: Path | str, code: str, cause: str = "power-on", heap: int | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    """Start the device's board once and run `code` on it instead of /boot.py and
    /main.py: the port's modules in place and the filesystem mounted, as a board's
    REPL would find them. For host tools (keel device provision asks for the id) and
    tests. `cause` is what the board is told started it (a twin's reset cause)."""
    device = VirtualDevice(path)
    board = device.board()
    if device.running_pid():
        raise KeelError(f"{device.path}: the device is running; stop it first")
    heap = heap or board.heap
    board_heap = heap
    if is_twin(board):
        heap += twin_firmware_room(device.path)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "ask.py"
        script.write_text(code)
        env = dict(os.environ, **{vmfirmware.ENV: str(vmfirmware.firmware_dir()),
                                  "KEEL_VM_SCRIPT": str(script), BOARD_HEAP_ENV: str(board_heap)})
        startup = board_dir("virtual") / "vm_startup.py"
        return subprocess.run([micropython(), "-X", f"heapsize={heap}", str(startup),
                               str(device.path), cause], capture_output=True, text=True,
                              env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def new_uid(port: str) -> str:
    """A new board's unique id, hex, as long as the port's chips have theirs."""
    return secrets.token_hex(UID_BYTES.get(port, 12))


def flash(path: Path | str, files: list[Path | str]) -> list[Image]:
    """Write modules into the device's flash, as a USB bootloader would.

    Every file is checked before anything is written: all are written or none."""
    device = VirtualDevice(path)
    board = device.board()
    if not files:
        raise KeelError("no module files given")
    if device.running_pid():
        raise KeelError(f"{device.path}: the device is running; stop it before flashing")
    images = []
    for given in files:
        given = Path(given)
        if given.is_dir():  # a folder of modules (keel build system -o DIR): all, in order
            images += sorted(folder_images(given), key=_dependency_order)
        elif not given.exists():
            raise KeelError(f"{given}: no such file or folder")
        else:
            images.append(load_valid_image(given))
    check_images_for_board(board, images)
    check_signatures(images, trusted_keys(device.path))
    flash_data = device.read_flash()
    for image in images:
        _place(flash_data, board, image)
    device.write_flash(flash_data)
    return images


def _dependency_order(image: Image) -> tuple:
    """The bootloader, then the system parts by index, then the app: each after what it
    depends on."""
    rank = {mf.FUNCTION_BOOTLOADER: 0, mf.FUNCTION_SYSTEM_PART: 1, mf.FUNCTION_USER_PART: 2}
    return rank.get(image.info.function, 3), image.info.index


def status(path: Path | str) -> dict:
    """What the device recorded in its flash at its last boot."""
    device = VirtualDevice(path)
    board = device.board()
    fs = device.open_fs(device.read_flash(), board)
    try:
        fs.mount()
        with fs.open(keel_files.STATUS_FILE, "r") as f:
            doc = json.loads(f.read())
    except (LittleFSError, OSError):
        raise KeelError(f"{device.path}: no status recorded yet (has the device booted?)") from None
    except ValueError:
        raise KeelError(f"{device.path}: the recorded status is unreadable") from None
    if not isinstance(doc, dict):
        raise KeelError(f"{device.path}: the recorded status is unreadable")
    attempts = doc.get(BOOT_ATTEMPTS)
    attempts = attempts if isinstance(attempts, int) else 0
    if attempts >= BOOT_LOOP_ATTEMPTS:
        # Boots that started and never recorded their own status: what is recorded is
        # stale (docs/boot-flow.md, "Boot loops").
        doc = {**doc, "mode": BOOT_LOOP, "recorded_mode": doc.get("mode"),
               "console": last_console_lines(device.path)}
    elif "mode" not in doc:
        raise KeelError(f"{device.path}: no status recorded yet (has the device booted?)")
    return _ordered(doc, STATUS_KEYS)


# The bootloader counts, in the recorded status, the boots since it was recorded; the
# boot in progress is one, so two or more have started and not got as far.
BOOT_ATTEMPTS = "boot_attempts"
BOOT_LOOP_ATTEMPTS = 2
BOOT_LOOP = "boot-loop"


def last_console_lines(path: Path | str, count: int = 12) -> list[str]:
    """The end of what the device printed in its last `keel vdev run`."""
    try:
        text = (Path(path) / CONSOLE_LOG).read_bytes().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-count:]


# The device writes JSON in whatever order its dicts keep; show it in a fixed one.
STATUS_KEYS = ("board", "device_id", "mode", BOOT_ATTEMPTS, "boot_error", "recorded_mode", "safe_mode_reason",
               "missing", "reset_reason", "vm", "app", "mem", "modules")
DEP_KEYS = ("function", "index", "version")
MODULE_KEYS = ("function", "index", "version", "platform", "dependencies", "size", "crc_ok",
               "sha256_ok", "valid")


def _ordered(doc: dict, keys: tuple) -> dict:
    out = {k: doc[k] for k in keys if k in doc}
    out.update((k, v) for k, v in doc.items() if k not in out)
    for key, keys in (("modules", MODULE_KEYS), ("missing", DEP_KEYS), ("dependencies", DEP_KEYS)):
        if isinstance(out.get(key), list):
            out[key] = [_ordered(item, keys) for item in out[key]]
    return out


def write_files(path: Path | str, files: dict[str, bytes]) -> None:
    """Write files into the device's filesystem (factory provisioning)."""
    device = VirtualDevice(path)
    if device.running_pid():
        raise KeelError(f"{device.path}: the device is running; stop it first")
    board = device.board()
    flash_data = device.read_flash()
    fs = device.open_fs(flash_data, board)
    fs.mount()
    for name, data in files.items():
        fs.makedirs(name.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(name, "wb") as f:
            f.write(data)
    device.store_fs(flash_data, board, fs)
    device.write_flash(flash_data)


def trusted_keys(path: Path | str) -> list[bytes] | None:
    """The keys the device's board trusts, as its bootloader reads them ([]: development
    mode; None: a trust file it cannot read, so it takes nothing)."""
    from keel import trust

    try:
        data = read_file(path, keel_files.TRUST_FILE)
    except (LittleFSError, OSError):
        return []
    try:
        return trust.parse_keys(json.loads(data))
    except ValueError:
        return None


def read_file(path: Path | str, name: str) -> bytes:
    """Read a file from the device's filesystem (for tools and tests)."""
    device = VirtualDevice(path)
    board = device.board()
    fs = device.open_fs(device.read_flash(), board)
    fs.mount()
    with fs.open(name, "rb") as f:
        return f.read()


class Console:
    """Relays the VM's output to out and to <device>/console.log, and keeps what it
    printed, so callers can wait for a line."""

    def __init__(self, out, log_path: Path):
        self.out = out
        self.text = bytearray()
        self.lock = threading.Lock()
        self.log = open(log_path, "wb")

    def write(self, data: bytes) -> None:
        with self.lock:
            self.text += data
            self.out.write(data)
            self.out.flush()
            self.log.write(data)
            self.log.flush()

    def close(self) -> None:
        self.log.close()

    def pump(self, stream, tee=None) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            self.write(chunk)
            if tee is not None:
                tee.send(chunk)

    def contains(self, needle: str) -> bool:
        with self.lock:
            return needle.encode() in self.text


_NEWLINE = re.compile(rb"(?<!\r)\n")
_HELD_MAX = 4096  # input kept across a reset
_PTY_BACKLOG = 1 << 20  # output kept for a client that reads slowly; the oldest goes first
_INTR_PENDING, _INTR_ON, _INTR_OFF, _INTR_RESET = "pending", "on", "off", "reset"


class ConsolePty:
    """The board's console as a pty, as a USB-serial adapter would show it: the slave is
    linked at `link`, the same across VM restarts. The runner calls attach() for each
    VM with its stdin pipe and its control pipe, and send() with the VM's output.

    It plays the port's UART driver: Ctrl-C from the host becomes SIGINT (the unix
    port's keyboard interrupt) while the VM says code runs (b"1" on the control pipe,
    as when mp_interrupt_char is set), and a character for the REPL otherwise (b"0").
    A Ctrl-C that comes before the VM says either (start-up), or while the board
    resets (b"R", or no VM), interrupts as soon as the next VM says b"1"; other input
    that comes during a reset waits for the next VM (up to _HELD_MAX bytes).
    Output goes out with LF as CR LF (a board's stdout is cooked), only while a client
    has the pty open."""

    def __init__(self, link: Path | str):
        self.link = Path(link)
        if self.link.exists() and not self.link.is_symlink():
            raise KeelError(f"{self.link}: already exists and is not a link")
        self.master, slave = os.openpty()
        tty.setraw(slave)  # a serial line: no echo, no line editing, no \n translation
        self.tty = os.ttyname(slave)
        os.close(slave)
        os.set_blocking(self.master, False)
        tmp = self.link.with_name(f".{self.link.name}.{os.getpid()}")
        try:
            tmp.unlink(missing_ok=True)
            os.symlink(self.tty, tmp)
            os.replace(tmp, self.link)
        except OSError as e:
            os.close(self.master)
            raise KeelError(f"{self.link}: cannot link the console there ({e.strerror})") from None
        self.lock = threading.Lock()
        self.out = bytearray()  # for the client
        self.into_vm = bytearray()
        self.held = b""  # input that came while the board reset, for the next boot
        self.vm = None  # (proc, stdin fd, control fd)
        self.ctl_open = False
        self.intr = _INTR_OFF
        self.interrupt_pending = False
        self.client = False
        self.last_cr = False
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def attach(self, proc: subprocess.Popen, stdin_fd: int, ctl_fd: int) -> None:
        os.set_blocking(stdin_fd, False)
        self.detach()  # the last VM's pipes, if it was killed (watchdog)
        with self.lock:
            self.vm = (proc, stdin_fd, ctl_fd)
            self.ctl_open = True
            self.intr = _INTR_PENDING  # keeps a Ctrl-C from the reset (interrupt_pending)
            self.into_vm[:] = self.held  # and what came with it
            self.held = b""
        self._wake()

    def detach(self) -> None:
        with self.lock:
            if self.vm is not None:
                os.close(self.vm[1])
                os.close(self.vm[2])
            self.vm = None
            self.intr = _INTR_PENDING
            self.into_vm.clear()
        self._wake()

    def send(self, data: bytes) -> None:
        """The VM's output, for the client."""
        if data[:1] == b"\n" and self.last_cr:
            data = b"\n" + _NEWLINE.sub(b"\r\n", data[1:])
        else:
            data = _NEWLINE.sub(b"\r\n", data)
        self.last_cr = data[-1:] == b"\r"
        with self.lock:
            if not self.client:
                return  # nobody listening: a UART's bytes are gone
            self.out += data
            if len(self.out) > _PTY_BACKLOG:
                del self.out[: len(self.out) - _PTY_BACKLOG]
            self._flush_out()

    def close(self) -> None:
        self.stopping = True
        self._wake()
        self.thread.join(2)
        self.detach()
        try:
            if os.readlink(self.link) == self.tty:
                self.link.unlink()
        except OSError:
            pass
        for fd in (self.master, self.wake_r, self.wake_w):
            os.close(fd)

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass

    def _flush_out(self) -> None:
        # (lock held)
        if self.out:
            try:
                del self.out[: os.write(self.master, self.out)]
            except BlockingIOError:
                pass
            except OSError:
                self.out.clear()

    def _flush_into_vm(self) -> None:
        # (lock held)
        if self.into_vm and self.vm is not None:
            try:
                del self.into_vm[: os.write(self.vm[1], self.into_vm)]
            except BlockingIOError:
                pass
            except OSError:  # the VM is gone
                self.into_vm.clear()

    def _interrupt(self) -> None:
        # (lock held)
        if self.intr == _INTR_ON:
            try:
                self.vm[0].send_signal(signal.SIGINT)
            except OSError:
                pass
        else:
            self.interrupt_pending = True

    def _from_client(self, data: bytes) -> None:
        with self.lock:
            if self.vm is None or self.intr == _INTR_RESET:
                # The board is resetting: what comes is for the next boot, a Ctrl-C
                # as an interrupt, the rest as input (a FIFO's worth).
                self.interrupt_pending = self.interrupt_pending or b"\x03" in data
                self.held = (self.held + data.replace(b"\x03", b""))[:_HELD_MAX]
                return
            while data:
                if self.intr == _INTR_OFF or b"\x03" not in data:
                    self.into_vm += data
                    break
                before, _, data = data.partition(b"\x03")
                self.into_vm += before
                self._interrupt()
            self._flush_into_vm()

    def _control(self, data: bytes) -> None:
        # (lock held) b"1": code runs, Ctrl-C interrupts; b"0": the REPL reads it.
        if not data:
            self.ctl_open = False  # the VM ended: stop polling its pipe
            return
        if self.intr == _INTR_RESET or b"R" in data:
            self.intr = _INTR_RESET  # whatever it says while it unwinds
            return
        self.intr = _INTR_ON if data[-1:] == b"1" else _INTR_OFF
        if self.intr == _INTR_ON and self.interrupt_pending:
            self.interrupt_pending = False
            self._interrupt()

    def _loop(self) -> None:
        while not self.stopping:
            poller = select.poll()
            poller.register(self.wake_r, select.POLLIN)
            with self.lock:
                client = self.client
                if client:
                    poller.register(self.master, select.POLLIN | (select.POLLOUT if self.out else 0))
                vm = self.vm
                if vm is not None and self.ctl_open:
                    poller.register(vm[2], select.POLLIN)
                    if self.into_vm:
                        poller.register(vm[1], select.POLLOUT)
            # Without a client the master reports a hang-up at every poll: look for
            # one every 50 ms instead.
            events = dict(poller.poll(None if client else 50))
            if self.wake_r in events:
                os.read(self.wake_r, 4096)
            if not client or events.get(self.master, 0) & select.POLLHUP:
                self._check_client()
                if not self.client:
                    self._drain_client()
            ev = events.get(self.master, 0)
            if ev & select.POLLIN:
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    data = b""
                if data:
                    self._from_client(data)
            if ev & select.POLLOUT:
                with self.lock:
                    self._flush_out()
            if vm is not None and events.get(vm[2], 0):
                with self.lock:
                    if self.vm is vm:  # not detached meanwhile (its fds closed)
                        try:
                            data = os.read(vm[2], 256)
                        except OSError:
                            data = b""
                        self._control(data)
            if vm is not None and events.get(vm[1], 0):
                with self.lock:
                    self._flush_into_vm()

    def _drain_client(self) -> None:
        # What a client wrote just before it closed the port: the kernel may report the
        # hang-up before it has moved those bytes to the master (keel flash ending with
        # a Ctrl-D that restarts Keel). A UART would still deliver them: so do we.
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # nothing there (EAGAIN), or no slave open (EIO)
                return
            if not data:
                return
            self._from_client(data)

    def _check_client(self) -> None:
        p = select.poll()
        p.register(self.master, select.POLLIN)
        connected = not any(ev & select.POLLHUP for _, ev in p.poll(0))
        with self.lock:
            if connected and not self.client:
                self.out.clear()
            self.client = connected


class BoardMonitor:
    """What the runner simulates outside the CPU: the watchdog and the deep-sleep
    timer. It follows the VM's io.log (new each boot)."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.restart()

    def restart(self) -> None:
        self.log_path.write_bytes(b"")
        self.offset = 0
        self.wdt_timeout_ms = None
        self.last_feed = 0.0
        self.sleep_ms = None
        self.halt_code = None

    def poll(self) -> None:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            kind = rec.get("k")
            if kind == "wdt":
                self.wdt_timeout_ms = rec.get("timeout")
                self.last_feed = time.monotonic()
            elif kind == "wdt-feed":
                self.last_feed = time.monotonic()
            elif kind == "deep-sleep":
                self.sleep_ms = rec.get("ms")  # None: no timer, it sleeps on
            elif kind == "halt":  # a twin stopped itself at once: why (an exit status)
                self.halt_code = rec.get("code")

    def watchdog_expired(self) -> bool:
        if not self.wdt_timeout_ms:
            return False
        return time.monotonic() - self.last_feed > self.wdt_timeout_ms / 1000


def run(
    path: Path | str,
    seconds: float | None = None,
    heap: int | None = None,
    out=None,
    stop_when=None,
    pty: Path | str | None = None,
    wires: Path | str | None = None,
) -> Console:
    """Boot the device on the MicroPython VM and relay its console to out.

    A reset requested by the device restarts the VM. Stops, as a power cut would,
    after `seconds`, or as soon as stop_when(console) is true; or when the VM exits
    on its own. Returns the console with everything printed.

    With `pty`, the board's console is also a pty linked at that path, which speaks
    MicroPython's REPL (mpremote connect PATH): see docs/virtual-board.md.

    With `wires`, a JSON file with a "wires" list of pin-name pairs (a board's hil.json),
    those pins are jumpered for the run (docs/virtual-board.md, "Simulated jumpers")."""
    device = VirtualDevice(path)
    board = device.board()
    if device.running_pid():
        raise KeelError(f"{device.path}: the device is already running")
    jumpers = load_wires(wires, board) if wires is not None else None
    wires_file = device.path / WIRES_FILE
    if jumpers:
        wires_file.write_text(json.dumps({"wires": jumpers}) + "\n")
    else:
        wires_file.unlink(missing_ok=True)
    console = Console(out or sys.stdout.buffer, device.path / CONSOLE_LOG)
    monitor = BoardMonitor(device.path / IO_LOG)
    (device.path / IO_IN).write_bytes(b"")
    heap = heap or board.heap
    twin = is_twin(board)
    # A twin's VM holds its firmware (stand-ins, simulated hardware) beside the board's
    # heap, and keeps for Keel the board's heap exactly (boards/twins/vm_twin.py).
    vm_heap = heap + twin_firmware_room(device.path) if twin else heap
    startup = board_dir("virtual") / "vm_startup.py"  # every board's start-up on the VM
    firmware = vmfirmware.firmware_dir()
    started = time.monotonic()
    deadline = None if seconds is None else started + seconds
    cause = "power-on"  # what the VM is told started the boot
    boots = 0
    proc = None
    link = ConsolePty(pty) if pty is not None else None
    repl_mode = "friendly"  # the REPL's mode, kept across soft reboots only

    def note(text: str) -> None:
        console.write(f"vdev: {text}\n".encode())

    def stop_now() -> bool:
        if stop_when is not None and stop_when(console):
            return True
        return deadline is not None and time.monotonic() >= deadline

    # `kill PID` or a closed terminal stops the board as Ctrl-C does: the VM goes with
    # it (from the main thread only: signal handlers live there).
    caught = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            caught[sig] = signal.signal(sig, _interrupt)
    try:
        while True:
            boots += 1
            note(f"boot {boots} ({cause}), heap {heap // 1024}K")
            monitor.restart()
            proc = _start_vm(startup, device.path, vm_heap, cause, link, repl_mode, firmware,
                             heap)
            (device.path / PID_FILE).write_text(str(proc.pid))
            pump = threading.Thread(target=console.pump, args=(proc.stdout, link), daemon=True)
            pump.start()
            watchdog = False
            while proc.poll() is None and not stop_now():
                time.sleep(0.02)
                monitor.poll()
                if monitor.watchdog_expired():
                    watchdog = True
                    _power_off(proc)
                    break
            if watchdog:
                pump.join(2)
                note("watchdog expired: resetting the board")
                cause = next_cause(twin, "watchdog", cause)
                repl_mode = "friendly"  # a hard reset: /main.py runs again
                continue
            if proc.poll() is None:
                _power_off(proc)
                pump.join(2)
                note(f"stopped after {time.monotonic() - started:.1f} s")
                return console
            pump.join(2)
            if link is not None:
                link.detach()
            code = proc.returncode
            monitor.poll()
            if code == -signal.SIGKILL and monitor.halt_code is not None:
                code = monitor.halt_code  # a twin stopped at once, for this reason
            repl_mode = SOFT_REBOOT_EXITS.get(code, "friendly")  # a reset: friendly again
            if code in SOFT_REBOOT_EXITS:
                note(f"soft reboot ({repl_mode} REPL)")
                event = "soft-reboot"
            elif code == vm_exit.RESET:
                event = "reset"
            elif code == vm_exit.DEEP_SLEEP:
                ms = monitor.sleep_ms
                note(f"deep sleep for {ms} ms" if ms is not None else "deep sleep, no timer")
                wake = time.monotonic() + (ms if ms is not None else float("inf")) / 1000
                while time.monotonic() < wake and not stop_now():
                    time.sleep(0.02)
                event = "deep-sleep"
            elif code == vm_exit.POWER_CUT:
                note("power cut (fault injection): powering on again")
                event = "power-on"
            elif code == 0:
                note("the VM exited")
                return console
            else:
                note(f"the VM died (exit status {code}); restarting as after a panic")
                event = "panic"
                time.sleep(0.2)
            cause = next_cause(twin, event, cause)
            if stop_now():
                note(f"stopped after {time.monotonic() - started:.1f} s")
                return console
    except KeyboardInterrupt:
        note("interrupted")
        return console
    finally:
        if proc is not None and proc.poll() is None:
            _power_off(proc)
        for sig, handler in caught.items():
            signal.signal(sig, handler)
        (device.path / PID_FILE).unlink(missing_ok=True)
        wires_file.unlink(missing_ok=True)
        if link is not None:
            link.close()
        console.close()


# The virtual board's reset causes, by what started the boot; a soft reboot keeps the
# last one. A twin is told the event itself, and its port's machine.reset_cause() says
# what the port would (boards/twins/<port>/machine.py).
VIRTUAL_CAUSES = {"power-on": "power-on", "reset": "soft-reset", "deep-sleep": "deep-sleep",
                  "watchdog": "watchdog", "panic": "panic"}


def next_cause(twin: bool, event: str, last: str) -> str:
    if twin:
        return event
    return last if event == "soft-reboot" else VIRTUAL_CAUSES[event]


def load_wires(path: Path | str, board: Board) -> list[list[str]]:
    """The jumpers in a wires file: {"wires": [["D2", "D3"], ...]} (a board's hil.json
    has that key) or the bare list; every pin checked against the board."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise KeelError(f"{path}: cannot read the wires file ({e})") from None
    wires = doc.get("wires") if isinstance(doc, dict) else doc
    if not isinstance(wires, list):
        raise KeelError(f"{path}: no \"wires\" list (pairs of pin names, e.g. [[\"D2\", \"D3\"]])")
    pins = board.data.get("pins", {})
    aliases = board.data.get("aliases", {})
    out = []
    for wire in wires:
        if not (isinstance(wire, list) and len(wire) == 2 and all(isinstance(n, str) for n in wire)):
            raise KeelError(f"{path}: a wire is a pair of pin names, not {wire!r}")
        for name in wire:
            if aliases.get(name, name) not in pins:
                raise KeelError(f"{path}: board {board.name} has no pin {name}")
        out.append(list(wire))
    return out


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


try:  # (looked up here: the child of a fork must not import)
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    # In the VM's process, before exec: Linux kills it when `keel vdev run` dies, however
    # it dies (SIGKILL too), so no board is left running without its host (prctl
    # PR_SET_PDEATHSIG, tied to the thread that started it; elsewhere nothing is done).
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


def _start_vm(startup: Path, device_dir: Path, heap: int, cause: str, link, mode: str,
              firmware: Path, board_heap: int):
    """One boot: the VM process. With a console pty, its stdin and a control pipe
    (vm_startup.py's CTL_FD) go to the pty's relay."""
    command = [micropython(), "-X", f"heapsize={heap}", str(startup), str(device_dir), cause]
    env = dict(os.environ, **{vmfirmware.ENV: str(firmware), BOARD_HEAP_ENV: str(board_heap)})
    if link is None:
        return subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            preexec_fn=_die_with_parent,
        )
    stdin_r, stdin_w = os.pipe()
    ctl_r, ctl_w = os.pipe()
    os.set_blocking(stdin_r, False)  # the REPL takes whatever has come (vm_console.py)
    try:
        proc = subprocess.Popen(
            [*command, mode, str(ctl_w)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=stdin_r,
            pass_fds=(ctl_w,),
            start_new_session=True,
            env=env,
            preexec_fn=_die_with_parent,
        )
    finally:
        os.close(stdin_r)
        os.close(ctl_w)
    link.attach(proc, stdin_w, ctl_r)
    return proc


def _power_off(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
