# The bootloader's flash and reset primitives on MicroPython esp32 firmware: the same
# small interface the virtual board's `vboard` module offers (see handover.port).
# Keel's slots lie inside one ESP-IDF data partition labelled `romfs`, at the offsets
# board.json gives them (`"in": "romfs"`), in the partition table `keel image esp32`
# writes (docs/boards/esp32.md). A firmware built with MICROPY_VFS_ROM maps that
# partition as memory (vfs.rom_ioctl(2, 0)) and a module's code runs in place from its
# slot; stock firmware (no ROMFS) reads it as an ordinary partition and the code is
# extracted. A table from before the romfs partition (a partition per slot, found by
# its label) still works. Kept small: the system keeps this module loaded, and with
# the code extracted its bytecode is in the heap.
#
# Untested on hardware: it runs on the ESP32 board twin (boards/twins/esp32/, the
# port's modules as MicroPython v1.28.0 has them) in the device tests.
import esp32
import machine
from keel_files import BOARD_FILE

exiting = False  # a reset here restarts the chip; nothing unwinds the stack

_CAUSES = {
    machine.PWRON_RESET: "power-on",
    machine.HARD_RESET: "panic",
    machine.WDT_RESET: "watchdog",
    machine.DEEPSLEEP_RESET: "deep-sleep",
    machine.SOFT_RESET: "soft-reset",
}
_romfs = []  # once read: {slot label: (offset in the romfs partition, size)}, the partition


def layout_error(board=None):
    """Why this flash cannot hold Keel's slots (the bootloader halts with it), or None:
    board.json puts them in a romfs partition the partition table does not have. The
    boot gives the board it has read; other callers read /keel/board.json once."""
    if not _romfs:
        if board is None:
            import json

            with open(BOARD_FILE) as f:
                board = json.load(f)
        parts = board["flash"]["partitions"]
        base = [p["offset"] for p in parts if p["label"] == "romfs"]
        _romfs.append({p["label"]: (p["offset"] - base[0], p["size"]) for p in parts if p.get("in")})
        found = esp32.Partition.find(esp32.Partition.TYPE_DATA, label="romfs")
        _romfs.append(found[0] if found else None)
    if _romfs[0] and _romfs[1] is None:
        return ("keel: no room for Keel on this board: the partition table has no romfs "
                "partition for its slots (write it with keel image esp32: docs/boards/esp32.md)")
    return None


def _slot(label):
    if not _romfs:
        layout_error()
    return _romfs[0].get(label)


class Partition:
    """A Keel slot: info() is (label, offset on the flash, size). Blocks are 4 KiB erase
    sectors from the slot's start; readblocks and writeblocks take the extended form (an
    offset inside the block, and with it no erase) and ioctl 6 erases one block, as
    esp32.Partition does, and nothing reaches past the slot (OSError EINVAL): the
    partition's own calls check only the partition's bounds."""

    def __init__(self, part, label, offset=0, size=0):
        info = part.info()
        self._part = part
        self._base = offset >> 12
        self._size = size or info[3]
        self._info = (label, info[2] + offset, self._size)

    @classmethod
    def find(cls, label):
        slot = _slot(label)
        if slot:
            return cls(_romfs[1], label, *slot) if _romfs[1] else None
        found = esp32.Partition.find(esp32.Partition.TYPE_DATA, label=label)
        return cls(found[0], label) if found else None

    def info(self):
        return self._info

    def _block(self, block, end):
        # The partition's block, for bytes up to `end` from the slot's block `block`.
        if block < 0 or (block << 12) + end > self._size:
            raise OSError(22)
        return self._base + block

    def readblocks(self, block, buf, offset=0):
        self._part.readblocks(self._block(block, offset + len(buf)), buf, offset)

    def writeblocks(self, block, buf, offset=None):
        if offset is None:  # a simple write: its sectors erased first
            self._part.writeblocks(self._block(block, len(buf)), buf)
        else:
            self._part.writeblocks(self._block(block, offset + len(buf)), buf, offset)

    def ioctl(self, op, arg):
        if op == 4:  # block count
            return self._size >> 12
        if op == 6:  # erase a block
            arg = self._block(arg, 4096)
        return self._part.ioctl(op, arg)


def rom_view(label):
    """The slot's bytes as memory-mapped flash (a memoryview), for code that runs in
    place from it (vfs.VfsRom); None where the firmware has no MICROPY_VFS_ROM (vfs
    without VfsRom and rom_ioctl), whose segment is the romfs partition
    (esp32_partition.c mp_vfs_rom_ioctl and esp32_partition_get_buffer, v1.28.0)."""
    slot = _slot(label)
    try:
        import vfs

        vfs.VfsRom  # noqa: B018 - only whether the firmware has it
        view = memoryview(vfs.rom_ioctl(2, 0)) if slot and vfs.rom_ioctl(1) > 0 else None
    except (ImportError, AttributeError):  # no vfs (before 1.23), no ROMFS
        view = None
    if view is None or slot[0] + slot[1] > len(view):
        return None
    return view[slot[0] : slot[0] + slot[1]]


def reset():
    machine.reset()


def reset_cause():
    # The EN button resets the whole chip and reads as power-on; machine.reset() and
    # a panic both read as HARD_RESET. Keel records its own reason before it resets
    # (it takes precedence), so HARD_RESET here is a panic: the app loader counts it.
    return _CAUSES.get(machine.reset_cause(), "unknown")


def deep_sleep(ms=0):
    machine.deepsleep(ms)
