# The bootloader's flash and reset primitives on stock MicroPython esp32 firmware:
# the same small interface the virtual board's `vboard` module offers (see
# handover.port). Keel's slots lie inside one ESP-IDF data partition labelled
# `romfs`, at the offsets board.json gives (`"in": "romfs"`), in the partition table
# `keel image esp32` writes (docs/boards/esp32.md). On a firmware built with
# MICROPY_VFS_ROM that partition is memory-mapped flash (vfs.rom_ioctl(2, 0)), and a
# module's code runs in place from its slot; on one without (stock ESP32_GENERIC) it
# is an ordinary partition and the code is extracted. A table from before the romfs
# partition (a partition per slot, found by its label) still works.
#
# Untested on hardware: it runs on the ESP32 board twin (boards/twins/esp32/, the
# port's modules as MicroPython v1.28.0 has them) in the device tests.
import esp32
import machine

BOARD_FILE = "/keel/board.json"
_BLOCK = 4096  # NATIVE_BLOCK_SIZE_BYTES: the flash's erase sector
exiting = False  # a reset here restarts the chip; nothing unwinds the stack

_CAUSES = {
    machine.PWRON_RESET: "power-on",
    machine.HARD_RESET: "panic",
    machine.WDT_RESET: "watchdog",
    machine.DEEPSLEEP_RESET: "deep-sleep",
    machine.SOFT_RESET: "soft-reset",
}
_table = {}  # label -> (offset in the romfs partition, size), from board.json
_table_read = []
_romfs = []  # the romfs partition (esp32.Partition), or None, once looked for
_mapped = []  # its memory (a memoryview) where the firmware maps it, else None


def _slot(label):
    if not _table_read:
        import json

        with open(BOARD_FILE) as f:
            parts = json.load(f)["flash"]["partitions"]
        base = [p["offset"] for p in parts if p["label"] == "romfs"]
        for p in parts:
            if p.get("in") == "romfs":
                _table[p["label"]] = (p["offset"] - base[0], p["size"])
        _table_read.append(True)
    return _table.get(label)


def _romfs_partition():
    if not _romfs:
        found = esp32.Partition.find(esp32.Partition.TYPE_DATA, label="romfs")
        _romfs.append(found[0] if found else None)
    return _romfs[0]


class Partition:
    """A Keel slot: info() is (label, offset, size) as the bootloader reads it, offset
    on the flash. Blocks are 4 KiB erase sectors counted from the slot's start;
    readblocks and writeblocks take the extended form (an offset inside the block, and
    with it no erase), and ioctl 6 erases one block, as esp32.Partition does. Nothing
    reaches past the slot (esp32.Partition checks only its partition's bounds)."""

    def __init__(self, part, label, offset=0, size=None):
        address, length = part.info()[2:4]
        self._part = part
        self._base = offset // _BLOCK
        self._size = length if size is None else size
        self._info = (label, address + offset, self._size)

    @classmethod
    def find(cls, label):
        slot = _slot(label)
        if slot is not None:
            part = _romfs_partition()
            return cls(part, label, *slot) if part is not None else None
        found = esp32.Partition.find(esp32.Partition.TYPE_DATA, label=label)
        return cls(found[0], label) if found else None

    def info(self):
        return self._info

    def _inside(self, block, offset, length):
        if block < 0 or block * _BLOCK + offset + length > self._size:
            raise OSError(22)  # EINVAL

    def readblocks(self, block, buf, offset=0):
        self._inside(block, offset, len(buf))
        self._part.readblocks(self._base + block, buf, offset)

    def writeblocks(self, block, buf, offset=None):
        if offset is None:  # a simple write: its sectors erased first
            self._inside(block, 0, len(buf))
            self._part.writeblocks(self._base + block, buf)
        else:
            self._inside(block, offset, len(buf))
            self._part.writeblocks(self._base + block, buf, offset)

    def ioctl(self, op, arg):
        if op == 4:  # block count
            return self._size // _BLOCK
        if op == 6:  # erase a block
            self._inside(arg, 0, _BLOCK)
            arg += self._base
        return self._part.ioctl(op, arg)


def rom_view(label):
    """The slot's bytes as memory-mapped flash (a memoryview), for code that runs in
    place from it (vfs.VfsRom); None where this firmware cannot: it needs
    MICROPY_VFS_ROM (vfs.VfsRom, vfs.rom_ioctl), whose segment is the romfs partition
    (esp32_partition.c mp_vfs_rom_ioctl and esp32_partition_get_buffer, v1.28.0)."""
    slot = _slot(label)
    if slot is None:
        return None
    if not _mapped:
        view = None
        try:
            import vfs

            vfs.VfsRom  # noqa: B018 - only whether the firmware has it
            if vfs.rom_ioctl(1) > 0:
                view = memoryview(vfs.rom_ioctl(2, 0))
        except (ImportError, AttributeError):  # no vfs (before 1.23), no ROMFS
            pass
        _mapped.append(view)
    view = _mapped[0]
    offset, size = slot
    if view is None or offset + size > len(view):
        return None
    return view[offset : offset + size]


def reset():
    machine.reset()


def reset_cause():
    # The EN button resets the whole chip and reads as power-on; machine.reset() and
    # a panic both read as HARD_RESET. Keel records its own reason before it resets
    # (it takes precedence), so HARD_RESET here is a panic: the app loader counts it.
    return _CAUSES.get(machine.reset_cause(), "unknown")


def deep_sleep(ms=0):
    machine.deepsleep(ms)
