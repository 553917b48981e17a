# nrf, as MicroPython v1.28.0's nrf port has it on an nRF52840
# (ports/nrf/modules/nrf/modnrf.c, flashbdev.c): the internal flash as block devices,
# and where the firmware's image ends. The flash is the twin's (DEVICE_DIR/flash.bin,
# NOR flash: programming only clears bits); the layout is the firmware build's
# (port.py FIRMWARE). Only what Keel uses: not dcdc().
import vm_twin

_PAGE = 4096  # FLASH_PAGESIZE (drivers/flash.h)
_layout = None  # (image end, ROMFS segment start, its size, filesystem start, its size)


def setup(layout):
    global _layout
    _layout = layout


def _flash():
    return vm_twin.hw.flash


class _Flash:
    """An nrf.Flash object: a region of the flash, in 4 KiB pages, addressed from its
    start. Nothing is checked against the firmware or the filesystem (flashbdev.c
    checks only that start and len are whole pages)."""

    def __init__(self, start, length):
        self._start = start
        self._len = length

    def _at(self, n, off, count):
        at = self._start + n * _PAGE + off
        if at < 0 or at + count > _flash().size:
            # The chip has nothing there: reading faults and the port hangs. Not modelled.
            raise RuntimeError("twin: nrf.Flash access at 0x%x is outside the flash" % at)
        return at

    def readblocks(self, n, buf, off=0):
        _flash().read(self._at(n, off, len(buf)), buf)  # memcpy from the mapped flash
        return 0

    def writeblocks(self, n, buf, off=None):
        # Without an offset one page is erased first, however long buf is.
        if off is None:
            _flash().erase(self._at(n, 0, _PAGE))
            off = 0
        _flash().write(self._at(n, off, len(buf)), buf)
        return 0

    def ioctl(self, op, arg):
        if op in (1, 2, 3):  # INIT, DEINIT, SYNC
            return 0
        if op == 4:  # BLOCK_COUNT
            return self._len // _PAGE
        if op == 5:  # BLOCK_SIZE
            return _PAGE
        if op == 6:  # BLOCK_ERASE
            _flash().erase(self._at(arg, 0, _PAGE))
            return 0
        return None

    def __repr__(self):
        return "Flash(start=0x%08x, len=%u)" % (self._start, self._len)


_objs = []  # the filesystem's object, the ROMFS segment's: static in the port


def Flash(*, start=-1, len=-1):  # noqa: A002 - the port's keyword names
    """nrf.Flash(): the filesystem, from _fs_start to _fs_end in whole pages (the same
    object every time); nrf.Flash(start=, len=): any page-aligned region."""
    if start == -1 and len == -1:
        if not _objs:
            _objs.append(_Flash(_layout[3], _layout[4]))
        return _objs[0]
    if start == -1 or start % _PAGE or len == -1 or len % _PAGE:
        raise ValueError()
    return _Flash(start, len)


class _MappedFlash(vm_twin.MappedFlash):
    """The ROMFS segment's nrf.Flash: the same block device as any other, and also
    the flash itself as memory (flashbdev.c nrf_flashbdev_get_buffer: the CPU reads
    the flash at its address), which VfsRom mounts and runs code from."""

    def setup(self, start):
        self._dev = _Flash(start, len(self))
        self.map(start)
        self.readblocks = self._dev.readblocks
        self.writeblocks = self._dev.writeblocks
        self.ioctl = self._dev.ioctl

    def __repr__(self):
        return repr(self._dev)


def romfs_segment():
    """The ROMFS segment's static nrf.Flash (vfs.rom_ioctl(2, 0)), or None."""
    if not _layout[2]:
        return None
    if len(_objs) < 2:
        Flash()
        segment = _MappedFlash(_layout[2])
        segment.setup(_layout[1])
        _objs.append(segment)
    return _objs[1]


def unused_flash_start():
    # _unused_flash_start (the end of the firmware image) rounded up to a page
    return (_layout[0] + _PAGE - 1) // _PAGE * _PAGE


def unused_flash_length():
    # ... to the end of the code area: the ROMFS segment's start, or the filesystem's
    # where there is none; rounded down to whole pages
    end = _layout[1] if _layout[2] else _layout[3]
    return (end - unused_flash_start()) // _PAGE * _PAGE
