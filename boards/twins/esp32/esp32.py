# esp32, as MicroPython v1.28.0's esp32 port has it (ports/esp32/esp32_partition.c;
# ESP-IDF's esp_partition and esp_ota_ops behind it): the flash partitions, found in
# the partition table at 0x8000 of the twin's flash as the IDF finds them, and the OTA
# boot selection in the otadata partition. Only Partition: Keel uses nothing else.
import struct
import binascii
import vm_twin

_TABLE_OFFSET = 0x8000
_TABLE_MAX = 0xC00
_SECTOR = 4096  # NATIVE_BLOCK_SIZE_BYTES, the flash's erase sector

# ESP-IDF error codes, raised as the port's check_esp_err() raises them
_INVALID_ARG = (-258, "ESP_ERR_INVALID_ARG")
_INVALID_SIZE = (-260, "ESP_ERR_INVALID_SIZE")
_NOT_FOUND = (-261, "ESP_ERR_NOT_FOUND")
_OTA_VALIDATE_FAILED = (-5379, "ESP_ERR_OTA_VALIDATE_FAILED")
_ENOENT = 2

# esp_ota_img_states_t
_OTA_NEW = 0
_OTA_PENDING_VERIFY = 1
_OTA_VALID = 2
_OTA_INVALID = 3
_OTA_ABORTED = 4
_OTA_UNDEFINED = 0xFFFFFFFF


class _Entry:
    """One partition of the table (esp_partition_t)."""

    def __init__(self, ptype, subtype, address, size, label, encrypted):
        self.type = ptype
        self.subtype = subtype
        self.address = address
        self.size = size
        self.label = label
        self.encrypted = encrypted


_entries = []


def _load_table():
    # esp_partition_find's first use: every 32-byte entry with the magic AA 50, in
    # table order, up to the first that has not (the MD5 entry, or erased flash).
    flash = vm_twin.hw.flash
    raw = bytearray(32)
    for at in range(_TABLE_OFFSET, _TABLE_OFFSET + _TABLE_MAX, 32):
        flash.read(at, raw)
        if raw[0] != 0xAA or raw[1] != 0x50:
            break
        ptype, subtype, address, size = struct.unpack_from("<BBII", raw, 2)
        label = bytes(raw[12:28]).split(b"\0", 1)[0].decode()
        flags = struct.unpack_from("<I", raw, 28)[0]
        _entries.append(_Entry(ptype, subtype, address, size, label, bool(flags & 1)))
    # main.c boardctrl_startup(): without a data partition labelled vfs or ffat, one is
    # registered from the end of the last partition to the end of the flash.
    if not any(e.type == 1 and e.label in ("vfs", "ffat") for e in _entries) and _entries:
        end = max(e.address + e.size for e in _entries)
        if end < flash.size:
            _entries.append(_Entry(1, 0x81, end, flash.size - end, "vfs", False))


def _check(code):
    raise OSError(code[0], code[1])


class Partition:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = 0
    TYPE_DATA = 1

    def __init__(self, id, block_size=_SECTOR):
        if isinstance(id, int):
            if id == Partition.BOOT:
                entry = _boot_entry()
            elif id == Partition.RUNNING:
                entry = _running[0]
            else:
                raise ValueError
        else:
            entry = _first(Partition.TYPE_APP, 0xFF, id) or _first(Partition.TYPE_DATA, 0xFF, id)
        if entry is None:
            raise OSError(_ENOENT)
        self._part = entry
        self._block = block_size
        self._cache = bytearray(_SECTOR) if block_size < _SECTOR else None

    @staticmethod
    def find(type=TYPE_APP, subtype=0xFF, label=None, block_size=_SECTOR):
        return [_new(e, block_size) for e in _entries
                if e.type == type and (subtype == 0xFF or e.subtype == subtype)
                and (label is None or e.label == label)]

    def info(self):
        p = self._part
        return (p.type, p.subtype, p.address, p.size, p.label, p.encrypted)

    def readblocks(self, block, buf, offset=0):
        _read(self._part, block * self._block + offset, buf)

    def writeblocks(self, block, buf, offset=None):
        at = block * self._block
        if offset is None:  # a simple write: erase first
            if self._block >= _SECTOR:
                _erase(self._part, at, len(buf))
            else:
                self._erase_keeping(at, len(buf))
        else:  # an extended write: erasing was done before
            at += offset
        _write(self._part, at, buf)

    def _erase_keeping(self, at, length):
        # Blocks smaller than a sector: erase the sectors, keeping the bytes around.
        cache = self._cache
        addr = at // _SECTOR * _SECTOR
        start, top = at % _SECTOR, at + length
        while addr < top:
            if start or top < addr + _SECTOR:
                _read(self._part, addr, cache)
            _erase(self._part, addr, _SECTOR)
            if start:
                _write(self._part, addr, memoryview(cache)[:start])
            if top < addr + _SECTOR:
                _write(self._part, top, memoryview(cache)[top - addr :])
            start = 0
            addr += _SECTOR

    def ioctl(self, op, arg):
        if op in (1, 2, 3):  # init, deinit, sync
            return 0
        if op == 4:
            return self._part.size // self._block
        if op == 5:
            return self._block
        if op == 6:
            if self._block != _SECTOR:
                return -22
            _erase(self._part, arg * _SECTOR, _SECTOR)
            return 0
        return None

    def set_boot(self):
        _set_boot(self._part)

    def get_next_update(self):
        entry = _next_update(self._part)
        if entry is None:
            raise OSError(_ENOENT)
        return _new(entry, _SECTOR)

    @classmethod
    def mark_app_valid_cancel_rollback(cls):
        _mark_valid()

    def __repr__(self):
        p = self._part
        return "<Partition type=%u, subtype=%u, address=%u, size=%u, label=%s, encrypted=%u>" % (
            p.type, p.subtype, p.address, p.size, p.label, p.encrypted)


def _new(entry, block_size):
    obj = object.__new__(Partition)
    obj._part = entry
    obj._block = block_size
    obj._cache = bytearray(_SECTOR) if block_size < _SECTOR else None
    return obj


class _RomfsPartition(vm_twin.MappedFlash):
    """The static esp32_partition_romfs_obj of a firmware built with MICROPY_VFS_ROM:
    the first data partition labelled romfs, with 4 KiB blocks, whose buffer (read
    only: esp32_partition_get_buffer) is the whole partition memory-mapped by
    esp_partition_mmap on first use. VfsRom mounts it and code runs from it; writes go
    through the block calls. On the twin the mapping is made at start-up (it is the
    firmware's memory, not the heap's)."""

    def setup(self, entry):
        part = _new(entry, _SECTOR)
        self.map(entry.address)
        for name in ("info", "readblocks", "writeblocks", "ioctl"):
            setattr(self, name, getattr(part, name))
        self._repr = repr(part)

    def __repr__(self):
        return self._repr


_romfs = []  # the romfs partition object, once made


def romfs_partition():
    """vfs.rom_ioctl's segment: the data partition labelled romfs, or None."""
    if not _romfs:
        entry = _first(Partition.TYPE_DATA, 0xFF, "romfs")
        if entry is None:
            _romfs.append(None)
        else:
            seg = _RomfsPartition(entry.size)
            seg.setup(entry)
            _romfs.append(seg)
    return _romfs[0]


def rom_ioctl(op, *args):
    # esp32_partition.c mp_vfs_rom_ioctl: 1, the number of segments (0 or 1); 2, the
    # segment (-EINVAL without a romfs partition); anything else -EINVAL
    seg = romfs_partition()
    if op == 1:
        return 0 if seg is None else 1
    if op == 2 and seg is not None:
        return seg
    return -22


def _first(ptype, subtype, label):
    for e in _entries:
        if e.type == ptype and (subtype == 0xFF or e.subtype == subtype) and \
                (label is None or e.label == label):
            return e
    return None


# esp_partition_read/write/erase_range: the range checks, then the flash


def _range(p, offset, length):
    if offset > p.size:
        _check(_INVALID_ARG)
    if offset + length > p.size:
        _check(_INVALID_SIZE)


def _read(p, offset, buf):
    _range(p, offset, len(buf))
    vm_twin.hw.flash.read(p.address + offset, buf)


def _write(p, offset, buf):
    _range(p, offset, len(buf))
    vm_twin.hw.flash.write(p.address + offset, buf)


def _erase(p, offset, length):
    _range(p, offset, length)
    if length % _SECTOR:
        _check(_INVALID_SIZE)
    if offset % _SECTOR:
        _check(_INVALID_ARG)
    flash = vm_twin.hw.flash
    for at in range(p.address + offset, p.address + offset + length, _SECTOR):
        flash.erase(at)


# ---------------------------------------------------------------- OTA (esp_ota_ops.c)
# otadata holds two 32-byte entries, one per sector: ota_seq, seq_label[20], ota_state,
# crc (crc32_le(UINT32_MAX, ota_seq)). The valid entry with the higher sequence picks
# the app: ota_{(seq - 1) % count}; none valid picks factory, else ota_0.

_ENTRY = "<I20sII"


def _otadata():
    return _first(Partition.TYPE_DATA, 0x00, None)


def _ota_apps():
    return sorted((e for e in _entries if e.type == 0 and 0x10 <= e.subtype < 0x20),
                  key=lambda e: e.subtype)


def _read_otadata():
    part = _otadata()
    out = []
    for sector in (0, 1):
        raw = bytearray(32)
        if part is not None:
            _read(part, sector * _SECTOR, raw)
        out.append(list(struct.unpack(_ENTRY, raw)))
    return part, out


def _entry_valid(e):
    crc = binascii.crc32(struct.pack("<I", e[0]), 0xFFFFFFFF) & 0xFFFFFFFF
    return e[0] != 0xFFFFFFFF and e[3] == crc and e[2] not in (_OTA_INVALID, _OTA_ABORTED)


def _active(entries):
    best = -1
    for i, e in enumerate(entries):
        if _entry_valid(e) and (best < 0 or e[0] > entries[best][0]):
            best = i
    return best


def _boot_entry():
    apps = _ota_apps()
    _part, entries = _read_otadata()
    active = _active(entries)
    if active >= 0 and apps:
        return apps[(entries[active][0] - 1) % len(apps)]
    return _first(Partition.TYPE_APP, 0x00, None) or (apps[0] if apps else None)


def _write_entry(part, sector, entry):
    entry[3] = binascii.crc32(struct.pack("<I", entry[0]), 0xFFFFFFFF) & 0xFFFFFFFF
    _erase(part, sector * _SECTOR, _SECTOR)
    _write(part, sector * _SECTOR, struct.pack(_ENTRY, *entry))


def _set_boot(entry):
    # esp_ota_set_boot_partition(): an app partition holding a valid image; an OTA app
    # gets the next sequence (in the other sector, state NEW: rollback is enabled in
    # every MicroPython build), the factory app erases otadata.
    if entry.type != 0:
        _check(_INVALID_ARG)
    head = bytearray(1)
    _read(entry, 0, head)
    if head[0] != 0xE9:  # (the IDF verifies the whole image; the twin its magic)
        _check(_OTA_VALIDATE_FAILED)
    part, entries = _read_otadata()
    if part is None:
        _check(_NOT_FOUND)
    if entry.subtype == 0x00:
        _erase(part, 0, 2 * _SECTOR)
        return
    apps = _ota_apps()
    n = len(apps)
    target = apps.index(entry)
    active = _active(entries)
    seq = entries[active][0] if active >= 0 else 0
    i = 0
    while seq >= (target + 1) % n + i * n:
        i += 1
    nxt = 0 if active < 0 else 1 - active
    _write_entry(part, nxt, [(target + 1) % n + i * n, b"\xff" * 20, _OTA_NEW, 0])


def _next_update(start):
    # esp_ota_get_next_update_partition(): the OTA app after `start`, round the list.
    apps = _ota_apps()
    if not apps:
        return None
    if start in apps:
        return apps[(apps.index(start) + 1) % len(apps)]
    return apps[0]


def _mark_valid():
    part, entries = _read_otadata()
    active = _active(entries)
    if part is not None and active >= 0 and entries[active][2] == _OTA_PENDING_VERIFY:
        entries[active][2] = _OTA_VALID
        _write_entry(part, active, entries[active])


def _boot():
    # What the IDF bootloader did before this boot (with rollback enabled): the chosen
    # app's entry in state NEW becomes PENDING_VERIFY; one still PENDING_VERIFY did not
    # confirm itself and is ABORTED, and the previous app boots. Not after a soft reboot.
    part, entries = _read_otadata()
    active = _active(entries)
    if vm_twin.event != "soft-reboot" and part is not None and active >= 0:
        state = entries[active][2]
        if state == _OTA_NEW:
            entries[active][2] = _OTA_PENDING_VERIFY
            _write_entry(part, active, entries[active])
        elif state == _OTA_PENDING_VERIFY:
            entries[active][2] = _OTA_ABORTED
            _write_entry(part, active, entries[active])
    return _boot_entry()


_load_table()
_running = [_boot()]  # the app the chip started (Partition.RUNNING) for this boot
