# The virtual board's "firmware" start-up, run by the MicroPython unix port.
# It plays the part of a real port's main.c and frozen _boot.py: it maps the
# file-backed flash into partitions (the `vboard` module, shaped like
# esp32.Partition), mounts the LittleFS partition at / and runs /boot.py, then
# /main.py, as a board does.
#   micropython -X heapsize=192K vm_startup.py DEVICE_DIR RESET_CAUSE [MODE CTL_FD]
# With MODE (friendly or raw: keel vdev run --pty) the board has a console: main.py
# runs only in friendly mode, then the REPL (vm_console.py) takes the console until a
# soft reboot; CTL_FD is a pipe that tells the runner when Ctrl-C is a keyboard
# interrupt (b"1": code runs), when it is a character for the REPL (b"0"), and when
# the board is resetting (b"R": it is for the next boot).
import sys
import os
import vfs
import json

_RESET_EXIT = 100  # exit status that asks the host runner for a reset
_SOFT_REBOOT_EXIT = {"friendly": 103, "raw": 104}  # ... for a soft reboot, by REPL mode
_HERE = sys.argv[0].rsplit("/", 1)[0] if "/" in sys.argv[0] else "."


_ERASED = b"\xff" * 256


class Partition:
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
        f = self._flash
        f.seek(self.offset + start)
        f.readinto(buf)

    def writeblocks(self, block, buf, offset=None):
        # As esp32.Partition: without an offset, whole blocks are erased and written;
        # with one, bytes are written in place (the caller erased them before).
        start = block * self.BLOCK_SIZE + (offset or 0)
        if start + len(buf) > self.size:
            raise OSError(22)
        if offset is None:
            for i in range(len(buf) // self.BLOCK_SIZE):
                self.ioctl(6, block + i)
        f = self._flash
        f.seek(self.offset + start)
        f.write(buf)
        f.flush()

    def ioctl(self, op, arg):
        if op == 4:  # block count
            return self.size // self.BLOCK_SIZE
        if op == 5:  # block size
            return self.BLOCK_SIZE
        if op == 6:  # erase one block
            if not 0 <= arg < self.size // self.BLOCK_SIZE:
                return -22
            f = self._flash
            f.seek(self.offset + arg * self.BLOCK_SIZE)
            for _ in range(self.BLOCK_SIZE // len(_ERASED)):
                f.write(_ERASED)  # a small preallocated run: erasing allocates nothing
            f.flush()
            return 0
        return None


class _Board:
    pass


_DEEP_SLEEP_EXIT = 101  # ... and for a deep sleep (the length is in the I/O log)


def _exit(code):
    sys.modules["vboard"].exiting = True
    if _ctl is not None:
        _ctl.write(b"R")  # resetting: a Ctrl-C from now on is for the next boot
    sys.exit(code)


def reset():
    _exit(_RESET_EXIT)


def deep_sleep():
    _exit(_DEEP_SLEEP_EXIT)


def _io_files(device_dir):
    # The board's pins and peripherals, as the host sees them: the VM appends state
    # changes to io.log (new each boot) and reads commands appended to io.in.
    out = open(device_dir + "/io.log", "w")
    open(device_dir + "/io.in", "ab").close()
    cmds = open(device_dir + "/io.in", "rb")
    cmds.seek(0, 2)  # commands from before this boot are not for it
    return out, cmds


def _start(device_dir, cause):
    with open(device_dir + "/board.json") as f:
        board = json.load(f)
    names = os.listdir(device_dir)
    if "faults.json" in names:
        import vm_faults  # (beside this file; fault-injection runs only)

        vm_faults.install(device_dir, Partition, _ERASED)
    Partition._flash = open(device_dir + "/flash.bin", "r+b")
    Partition.BLOCK_SIZE = board["flash"]["block_size"]
    for p in board["flash"]["partitions"]:
        Partition._table[p["label"]] = Partition(p["label"], p["offset"], p["size"])

    vboard = _Board()
    vboard.Partition = Partition
    vboard.reset = reset
    vboard.deep_sleep = deep_sleep
    vboard.reset_cause = lambda: cause
    vboard.io_out, vboard.io_in = _io_files(device_dir)
    try:
        with open(device_dir + "/uid") as f:
            vboard.uid = f.read().strip()
    except OSError:
        vboard.uid = "000000000000000000000000"
    vboard.device_dir = device_dir
    vboard.wires = None  # simulated jumpers: pairs of pin names (keel vdev run --wires)
    if "wires.json" in names:
        with open(device_dir + "/wires.json") as f:
            vboard.wires = json.load(f)["wires"]
    sys.modules["vboard"] = vboard

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


def _print_exception(e):
    # As a port prints it: without the frames of this start-up code and the REPL's.
    try:
        import io

        buf = io.StringIO()
        sys.print_exception(e, buf)
        for line in buf.getvalue().split("\n"):
            if line and not ('"' + _HERE) in line and not line.startswith('  File "/.vm/'):
                print(line)
    except MemoryError:
        sys.print_exception(e)


def _script(path, g, ctl):
    # As a port's pyexec_file(): True once the script ran to its end (or there is
    # none), False after an exception (printed), None if it asked for a soft reboot
    # (SystemExit). Without a console (ctl None) exceptions end the VM, as before.
    try:
        with open(path) as f:
            code = f.read()
    except OSError:
        return True
    g["__file__"] = path[1:]
    if ctl is None:
        exec(compile(code, path[1:], "exec"), g)
        return True
    try:
        try:
            code = compile(code, path[1:], "exec")
            ctl.write(b"1")  # Ctrl-C interrupts from here on
            exec(code, g)
        finally:
            ctl.write(b"0")
    except SystemExit:
        if sys.modules["vboard"].exiting:
            raise  # a reset or deep sleep: the VM ends
        return None
    except BaseException as e:  # noqa: BLE001 - printed, as a port prints it, then the REPL
        ctl.write(b"0")
        _print_exception(e)
        return False
    return True


def _console(mode, ctl):
    # A port's main loop: boot.py, main.py in friendly mode, then the REPL until a
    # soft reboot, which the runner makes a new VM in the REPL mode of the moment.
    g = {"__name__": "__main__"}
    ok = _script("/boot.py", g, ctl)
    if ok and mode == "friendly":
        ok = _script("/main.py", g, ctl)
    if ok is not None:
        # The REPL, loaded only now (off a running system's heap), from beside this
        # file: the host's filesystem, mounted for as long as the import takes.
        vfs.mount(vfs.VfsPosix(_HERE), "/.vm")
        sys.path.insert(0, "/.vm")
        import vm_console

        sys.path.pop(0)
        vfs.umount("/.vm")
        mode = vm_console.repl(mode, ctl, g, _print_exception)
    sys.stdout.write("MPY: soft reboot\r\n")
    sys.exit(_SOFT_REBOOT_EXIT[mode])


if not _HERE.startswith("/"):
    _HERE = os.getcwd() + "/" + _HERE
# (opened before / becomes the flash's filesystem)
_ctl = open("/proc/self/fd/" + sys.argv[4], "wb") if len(sys.argv) > 4 else None
_start(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "power-on")
del _start
if _ctl is not None:
    _console(sys.argv[3], _ctl)
_main_globals = {"__name__": "__main__"}
try:
    os.stat("/boot.py")
except OSError:
    print("vboard: no /boot.py on the filesystem; nothing to run")
    sys.exit(0)
_script("/boot.py", _main_globals, None)  # stage 0's recovery work
_script("/main.py", _main_globals, None)  # starts Keel, which runs from then on
