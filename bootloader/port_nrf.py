# The bootloader's flash and reset primitives on the MicroPython nrf port (nRF52840):
# the same small interface the virtual board's `vboard` module offers (see
# handover.port). The nrf port has no partition table, so a Keel slot is a raw
# flash region, an `nrf.Flash(start=, len=)` block device (why not files:
# docs/boards/nrf52840.md).
#
# The slots live in the "Keel region", the flash directly below the firmware's
# filesystem, and board.json gives their offsets from its start. On MicroPython 1.28
# and later the region is the ROMFS segment the firmware reserves there
# (vfs.rom_ioctl(2, 0), an nrf.Flash); before 1.28 there is none, and the region is
# the top of the flash the firmware leaves unused (nrf.unused_flash_start/length),
# which then ends at the filesystem. A firmware that leaves no such room, or a
# filesystem too small for Keel's code, is refused with the reason (layout_error):
# writing a slot must never erase code or the filesystem.
import os
import machine
import nrf
from keel_files import BOARD_FILE, DEEP_SLEEP_MARKER

_PAGE = 4096
exiting = False  # a reset here restarts the chip; nothing unwinds the stack
_table = {}  # label -> (address, size), worked out once
_error = []  # why this firmware cannot hold Keel's slots, once known
_cause = []


def _romfs_segment():
    # MicroPython 1.28+: the ROMFS segment between the firmware and its filesystem.
    try:
        import vfs

        if vfs.rom_ioctl(1) > 0:
            return vfs.rom_ioctl(2, 0)
    except (ImportError, AttributeError):  # before 1.23 (no vfs), before 1.28
        pass
    return None


def _start(flash):
    # nrf.Flash has no attribute for its address; it prints it (flashbdev.c):
    # "Flash(start=0x%08x, len=%u)".
    text = repr(flash)
    return int(text[text.index("=") + 1 : text.index(",")], 16)


_mapped = []  # (the ROMFS segment's memoryview, its address) when code can run in place


def rom_view(label):
    """The slot's bytes as memory-mapped flash (a memoryview), for code that runs in
    place from it (vfs.VfsRom); None when this firmware cannot: the slots are in the
    ROMFS segment (1.28+, whose nrf.Flash gives its memory: flashbdev.c
    nrf_flashbdev_get_buffer) and vfs has VfsRom (MICROPY_VFS_ROM)."""
    if layout_error() or label not in _table:
        return None
    if not _mapped:
        seg = _romfs_segment()
        try:
            import vfs

            vfs.VfsRom  # noqa: B018 - only whether the firmware has it
        except (ImportError, AttributeError):
            seg = None
        _mapped.append((memoryview(seg), _start(seg)) if seg is not None else (None, 0))
    view, start = _mapped[0]
    if view is None:
        return None
    address, size = _table[label]
    return view[address - start : address - start + size]


def _layout(board):
    """Fill _table with each slot's address, or _error with why there is no room."""
    flash = board["flash"]
    slots = [p for p in flash["partitions"] if p.get("region") == "keel"]
    need = max(p["offset"] + p["size"] for p in slots)
    free = nrf.unused_flash_start()
    free_end = free + nrf.unused_flash_length()
    seg = _romfs_segment()
    if seg is not None:
        start = _start(seg)
        size = seg.ioctl(4, 0) * _PAGE
        where = "the ROMFS segment"
    else:
        size = flash["keel_region"]
        start = free_end - size
        where = "the top of the free flash"
    if start < free or start % _PAGE:
        why = "the firmware ends at 0x%x: %s (0x%x-0x%x) overlaps it" % (
            free, where, start, start + size)
    elif size < need:
        why = "%s (0x%x-0x%x) is %dK; Keel's slots need %dK" % (
            where, start, start + size, size // 1024, need // 1024)
    else:
        fs = nrf.Flash().ioctl(4, 0) * _PAGE
        fs_need = [p["size"] for p in flash["partitions"] if p["label"] == "fs"][0]
        why = None
        if fs < fs_need:
            why = "the filesystem is %dK; Keel's code needs %dK" % (fs // 1024, fs_need // 1024)
    if why:
        _error.append("keel: no room for Keel on this firmware: %s (docs/boards/nrf52840.md)"
                      % why)
        return
    for p in slots:
        _table[p["label"]] = (start + p["offset"], p["size"])


def layout_error(board=None):
    """Why this firmware cannot hold Keel (the bootloader halts with it), or None."""
    if not _table and not _error:
        if board is None:
            import json

            with open(BOARD_FILE) as f:
                board = json.load(f)
        _layout(board)
    return _error[0] if _error else None


class Partition:
    """A Keel slot on nrf.Flash: info() is (label, address, size); blocks are the 4 KiB
    flash pages; readblocks/writeblocks take an offset (and then do not erase), ioctl 6
    erases one page, as nrf.Flash does."""

    def __init__(self, label, address, size):
        self._info = (label, address, size)
        flash = nrf.Flash(start=address, len=size)
        self.readblocks = flash.readblocks
        self.writeblocks = flash.writeblocks
        self.ioctl = flash.ioctl

    @classmethod
    def find(cls, label):
        why = layout_error()
        if why:
            raise RuntimeError(why)
        if label not in _table:
            return None
        return cls(label, *_table[label])

    def info(self):
        return self._info


def _causes():
    table = {
        machine.HARD_RESET: "pin-reset",  # the reset pin, and a plain power-on
        machine.WDT_RESET: "watchdog",
        machine.SOFT_RESET: "soft-reset",
        machine.PWRON_RESET: "deep-sleep",  # despite its name: a wake from System OFF
    }
    for name, cause in (("LOCKUP_RESET", "panic"), ("LPCOMP_RESET", "deep-sleep"),
                        ("NFC_RESET", "deep-sleep"), ("DEBUG_IF_RESET", "debugger")):
        if hasattr(machine, name):
            table[getattr(machine, name)] = cause
    return table


def reset():
    machine.reset()


def reset_cause():
    # Once per boot: an emulated deep sleep (a marker file, then a soft reset) reads
    # as "deep-sleep", and the marker is consumed here.
    if not _cause:
        raw = machine.reset_cause()
        try:
            os.remove(DEEP_SLEEP_MARKER)
            marked = True
        except OSError:
            marked = False
        if marked and raw == machine.SOFT_RESET:
            _cause.append("deep-sleep")
        else:
            _cause.append(_causes().get(raw, "unknown"))
    return _cause[0]


def deep_sleep(ms=0):
    # System OFF wakes only on a pin: emulated as hal/ports/nrf/power.py does.
    import time

    with open(DEEP_SLEEP_MARKER, "w") as f:
        f.write("%d\n" % ms)
    time.sleep_ms(ms)
    machine.reset()
