# The "firmware" start-up of every board on the VM, run by the MicroPython unix port:
# the virtual board, and the twins that play real boards (boards/twins/). It plays the
# part of a port's main.c: it reads the device directory (board.json, flash.bin, the
# host link files, the id, the jumpers), builds the board's port modules, mounts the
# filesystem and runs /boot.py, then /main.py, as a board does.
#   micropython -X heapsize=N vm_startup.py DEVICE_DIR RESET_CAUSE [MODE CTL_FD]
# The virtual board's port module is `vboard` (below, shaped like esp32.Partition); a
# twin's are the stand-ins of its MicroPython port (boards/twins/vm_twin.py).
# With MODE (friendly or raw: keel vdev run --pty) the board has a console: main.py
# runs only in friendly mode, then the REPL (vm_console.py) takes the console until a
# soft reboot; CTL_FD is a pipe that tells the runner when Ctrl-C is a keyboard
# interrupt (b"1": code runs), when it is a character for the REPL (b"0"), and when
# the board is resetting (b"R": it is for the next boot).
import sys
import os
import vfs
import json

_HERE = sys.argv[0].rsplit("/", 1)[0] if "/" in sys.argv[0] else "."
# The firmware's other modules, compiled (tools/keel/vmfirmware.py); else boards/'s sources.
_FIRMWARE = os.getenv("KEEL_VM_FIRMWARE")


# ---------------------------------------------------------------- every board on the VM

# The board's flash chip, backed by DEVICE_DIR/flash.bin: what every board on the VM
# (the virtual board's vboard.Partition, a twin's esp32.Partition) reads, programs and
# erases through, at addresses in the chip. Fault injection (vm_faults.py) wraps its
# three methods. On the virtual board a write stores the new bytes as they are (its
# documented shortcut); a twin's is NOR flash, as the chips are (vm_twin.py).
ERASED = b"\xff" * 256  # a small preallocated run: erasing allocates nothing


class Flash:
    def __init__(self, path, size, erase_size=4096):
        self.file = open(path, "r+b")
        self.size = size
        self.erase_size = erase_size

    def read(self, addr, buf):
        f = self.file
        f.seek(addr)
        f.readinto(buf)

    def write(self, addr, buf):
        f = self.file
        f.seek(addr)
        f.write(buf)
        f.flush()  # in the file at once: a killed VM leaves what it wrote

    def erase(self, addr):
        """Erase the erase block (sector) at addr to 0xFF."""
        f = self.file
        f.seek(addr)
        for _ in range(self.erase_size // len(ERASED)):
            f.write(ERASED)
        f.flush()


class _Board:
    pass


def _read_device(device_dir, cause, ctl):
    """What every board on the VM has, from its device directory: the board
    definition, the flash chip, the host link files, its id and the run's jumpers."""
    hw = _Board()
    with open(device_dir + "/board.json") as f:
        hw.board = json.load(f)
    hw.device_dir = device_dir
    hw.cause = cause  # what the runner says started this boot
    hw.ctl = ctl
    names = os.listdir(device_dir)
    flash = hw.board["flash"]
    hw.flash = Flash(device_dir + "/flash.bin", flash["size"], flash["block_size"])
    hw.faults = "faults.json" in names and not _ask  # (armed for a boot, not a question)
    hw.io_out, hw.io_in = _io_files(device_dir)
    try:
        with open(device_dir + "/uid") as f:
            hw.uid = f.read().strip()
    except OSError:
        hw.uid = None
    hw.wires = None  # simulated jumpers: pairs of pin names (keel vdev run --wires)
    if "wires.json" in names:
        with open(device_dir + "/wires.json") as f:
            hw.wires = json.load(f)["wires"]
    return hw


def _io_files(device_dir):
    # The board's pins and peripherals, as the host sees them: the VM appends state
    # changes to io.log (new each boot) and reads commands appended to io.in.
    out = open(device_dir + "/io.log", "w")
    open(device_dir + "/io.in", "ab").close()
    cmds = open(device_dir + "/io.in", "rb")
    cmds.seek(0, 2)  # commands from before this boot are not for it
    return out, cmds


_twin = None  # vm_twin, on a board twin (below)


def load(names, where="virtual"):
    """Import the firmware's own modules from boards/<where> (compiled, or as source),
    through a mount of that host folder that lasts as long as the imports."""
    vfs.mount(vfs.VfsPosix((_FIRMWARE or _BOARDS) + "/" + where), "/.vm")
    sys.path.insert(0, "/.vm")
    # (on a twin, through vm_twin: its names are the firmware's, not charged to Keel)
    imp = _twin.firmware_import if _twin is not None else __import__
    try:
        return [imp(name) for name in names]
    finally:
        sys.path.pop(0)
        vfs.umount("/.vm")


# ---------------------------------------------------------------- the virtual board


class Partition:
    """A flash partition of the virtual board, shaped like esp32.Partition."""

    _table = {}
    _flash = None
    BLOCK_SIZE = 4096

    def __init__(self, label, offset, size):
        self.label = label
        self.offset = offset
        self.size = size

    @classmethod
    def find(cls, label):
        return cls._table.get(label)

    def info(self):
        return (self.label, self.offset, self.size)

    def readblocks(self, block, buf, offset=0):
        start = block * self.BLOCK_SIZE + offset
        if start + len(buf) > self.size:
            raise OSError(22)
        self._flash.read(self.offset + start, buf)

    def writeblocks(self, block, buf, offset=None):
        # As esp32.Partition: without an offset, whole blocks are erased and written;
        # with one, bytes are written in place (the caller erased them before).
        start = block * self.BLOCK_SIZE + (offset or 0)
        if start + len(buf) > self.size:
            raise OSError(22)
        if offset is None:
            for i in range(len(buf) // self.BLOCK_SIZE):
                self._flash.erase(self.offset + start + i * self.BLOCK_SIZE)
        self._flash.write(self.offset + start, buf)

    def ioctl(self, op, arg):
        if op == 4:  # block count
            return self.size // self.BLOCK_SIZE
        if op == 5:  # block size
            return self.BLOCK_SIZE
        if op == 6:  # erase one block
            if not 0 <= arg < self.size // self.BLOCK_SIZE:
                return -22
            self._flash.erase(self.offset + arg * self.BLOCK_SIZE)
            return 0
        return None


_hw = None


def _exit(code=None):
    # A reset, a deep sleep or (by default) a power cut of fault injection, whose flash
    # is frozen (vm_faults.py): the stack unwinds to the runner, which starts the board
    # again; not an app crash (vboard.exiting is set).
    sys.modules["vboard"].exiting = True
    if _ctl is not None:
        _ctl.write(b"R")  # resetting: a Ctrl-C from now on is for the next boot
    sys.exit(vm_exit.POWER_CUT if code is None else code)


def reset():
    _exit(vm_exit.RESET)


def deep_sleep():
    _exit(vm_exit.DEEP_SLEEP)


_sims = {}


def sim(name, board):
    """The simulated hardware's module `name` (boards/virtual/sim_*.py), loaded when the
    HAL first asks for it (off the heap of a board that does not use it). board() gives
    the board definition the HAL has (one copy in RAM)."""
    found = _sims.get(name)
    if found is None:
        if not _sims:
            found = _sims["sim_link"] = load(("sim_link",))[0]
            found.setup(_hw.io_out, _hw.io_in)
        if name != "sim_link" and "sim_board" not in _sims:
            found = _sims["sim_board"] = load(("sim_board",))[0]
            found.setup(board, _hw.wires)
        found = _sims[name] = _sims.get(name) or load((name,))[0]
    return found


def _start_virtual(hw):
    board = hw.board
    Partition._flash = hw.flash
    Partition.BLOCK_SIZE = board["flash"]["block_size"]
    for p in board["flash"]["partitions"]:
        Partition._table[p["label"]] = Partition(p["label"], p["offset"], p["size"])
    hw.board = None  # the HAL reads its own copy (/keel/board.json): one in RAM

    vboard = _Board()
    vboard.Partition = Partition
    vboard.reset = reset
    vboard.deep_sleep = deep_sleep
    vboard.exiting = False
    vboard.reset_cause = lambda: hw.cause
    vboard.io_out, vboard.io_in = hw.io_out, hw.io_in
    vboard.uid = hw.uid or "000000000000000000000000"
    vboard.device_dir = hw.device_dir
    vboard.wires = hw.wires
    vboard.sim = sim
    sys.modules["vboard"] = vboard
    if hw.faults:
        import vm_faults  # (beside this file; fault-injection runs only)

        vm_faults.install(hw.device_dir, hw.flash, _exit)

    fs = Partition.find("fs")
    try:
        root = vfs.VfsLfs2(fs)
    except OSError:
        print("vboard: formatting the filesystem partition")
        vfs.VfsLfs2.mkfs(fs)
        root = vfs.VfsLfs2(fs)
    vfs.umount("/")
    vfs.mount(root, "/")
    os.chdir("/")
    sys.path.clear()
    sys.path.append("")
    sys.path.append("/lib")


# ---------------------------------------------------------------- boot.py and main.py


def _print_exception(e):
    # As a port prints it: without the frames of this start-up code and the REPL's.
    try:
        import io

        buf = io.StringIO()
        sys.print_exception(e, buf)
        for line in buf.getvalue().split("\n"):
            if line and not ('"' + _HERE) in line and not line.startswith('  File "/.vm/') \
                    and not line.startswith('  File "/_twin/'):
                print(line)
    except MemoryError:
        sys.print_exception(e)


def _script(path, g, ctl):
    # As a port's pyexec_file_if_exists(): True once the script ran to its end (or
    # there is none), False after an exception (printed), None if it asked for a soft
    # reboot (SystemExit). Without a console (ctl None) exceptions end the VM, as
    # before. path is relative, as ports name boot.py and main.py: from the directory
    # the start-up left (/; the nrf port's /flash, which its boot.py may change).
    try:
        with open(path) as f:
            code = f.read()
    except OSError:
        return True
    g["__file__"] = path
    if ctl is None:
        exec(compile(code, path, "exec"), g)
        return True
    try:
        try:
            code = compile(code, path, "exec")
            ctl.write(b"1")  # Ctrl-C interrupts from here on
            exec(code, g)
        finally:
            ctl.write(b"0")
    except SystemExit:
        # A reset or deep sleep of the virtual board unwinds the stack (vboard.exiting
        # set); a twin's never does: it stops the VM at once.
        if getattr(sys.modules.get("vboard"), "exiting", False):
            raise  # a reset or deep sleep: the VM ends
        return None
    except BaseException as e:  # noqa: BLE001 - printed, as a port prints it, then the REPL
        ctl.write(b"0")
        _print_exception(e)
        return False
    return True


def _console(mode, ctl, banner):
    # A port's main loop: boot.py, main.py in friendly mode, then the REPL until a
    # soft reboot, which the runner makes a new VM in the REPL mode of the moment.
    g = {"__name__": "__main__"}
    ok = _script("boot.py", g, ctl)
    if ok and mode == "friendly":
        ok = _script("main.py", g, ctl)
    if ok is not None:
        # The REPL, loaded only now (off a running system's heap), from beside this file.
        vm_console = load(("vm_console",))[0]
        mode = vm_console.repl(mode, ctl, g, _print_exception, banner)
    sys.stdout.write("MPY: soft reboot\r\n")
    sys.exit(vm_exit.SOFT_REBOOT_RAW if mode == "raw" else vm_exit.SOFT_REBOOT_FRIENDLY)


if not _HERE.startswith("/"):
    _HERE = os.getcwd() + "/" + _HERE
_BOARDS = _HERE.rsplit("/", 1)[0]
vm_exit = load(("vm_exit",))[0]  # why the VM stops, as the runner reads it
# (opened before / becomes the flash's filesystem)
_ctl = open("/proc/self/fd/" + sys.argv[4], "wb") if len(sys.argv) > 4 else None
# A host tool's question to the board (keel device provision: its id), instead of boot.py
# and main.py: a script from the host, read before the host's files are out of reach.
_ask = os.getenv("KEEL_VM_SCRIPT")
if _ask:
    with open(_ask) as _f:
        _ask = _f.read()
_hw = _read_device(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "power-on", _ctl)
_on_twin = _hw.board["port"] != "virtual"
if not _on_twin:
    _start_virtual(_hw)
    import gc

    gc.collect()
    _banner = "Keel virtual board"
else:
    # A twin: its port's stand-ins and start-up (boards/twins/vm_twin.py).
    _twin = load(("vm_twin",), "twins")[0]
    _banner = _twin.start(_hw, load)
del _read_device, _start_virtual, _io_files
if _ask:
    exec(_ask, {"__name__": "__main__"})
    sys.exit(0)
if _ctl is not None:
    _console(sys.argv[3], _ctl, _banner)
_main_globals = {"__name__": "__main__"}
try:
    os.stat("boot.py")
except OSError:
    print("vboard: no /boot.py on the filesystem; nothing to run")
    sys.exit(0)
if not _on_twin:
    _script("boot.py", _main_globals, None)  # stage 0's recovery work
    _script("main.py", _main_globals, None)  # starts Keel, which runs from then on
else:
    # A twin as its port's main loop (ports/esp32/main.c mp_task, ports/nrf/main.c
    # main at v1.28.0): an exception in boot.py or main.py is printed, main.py runs
    # only after a boot.py that ended well, then the REPL, where with nobody on the
    # console the board waits (a watchdog already armed still fires).
    try:
        _script("boot.py", _main_globals, None)
    except Exception as e:  # noqa: BLE001 - printed, as the port does
        _print_exception(e)
    else:
        try:
            _script("main.py", _main_globals, None)
        except Exception as e:  # noqa: BLE001
            _print_exception(e)
    import time

    while True:
        time.sleep(3600)
