# The virtual board's "firmware" start-up, run by the MicroPython unix port.
# It plays the part of a real port's frozen _boot.py: it maps the file-backed
# flash into partitions (the `vboard` module, shaped like esp32.Partition),
# mounts the LittleFS partition at / and runs /boot.py, as a board would.
#   micropython -X heapsize=192K vm_startup.py DEVICE_DIR RESET_CAUSE
import sys
import os
import vfs
import json

_RESET_EXIT = 100  # exit status that asks the host runner for a reset


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
    if "faults.json" in os.listdir(device_dir):
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


_start(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "power-on")
del _start
try:
    os.stat("/boot.py")
except OSError:
    print("vboard: no /boot.py on the filesystem; nothing to run")
    sys.exit(0)
import boot  # noqa: F401  (runs the Keel bootloader stage, as a board runs boot.py)

