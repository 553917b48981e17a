# Streaming reader for MicroPython ROMFS images: walks a module's payload and
# extracts its files without holding the image in RAM. Also used by the host tools.
# Format as written by mpremote's VfsRomWriter: header d2 cd 31, varuint length,
# then records (kind, length, payload); directories nest records.
import os

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


_HEADER = b"\xd2\xcd\x31"
_KIND_DATA = const(2)
_KIND_DIR = const(4)
_KIND_FILE = const(5)


class RomfsError(ValueError):
    pass


class _Cursor:
    def __init__(self, read, base, size, buf):
        self.read = read  # read(offset, buf) -> count
        self.base = base
        self.size = size
        self.buf = buf
        self.pos = 0

    def take(self, n):
        if n > len(self.buf):
            raise RomfsError("romfs: name too long")
        if self.pos + n > self.size:
            raise RomfsError("romfs: truncated")
        view = memoryview(self.buf)[:n]
        if self.read(self.base + self.pos, view) != n:
            raise RomfsError("romfs: truncated")
        self.pos += n
        return view

    def uint(self):
        value = 0
        for _ in range(5):
            b = self.take(1)[0]
            value = (value << 7) | (b & 0x7F)
            if not b & 0x80:
                return value
        raise RomfsError("romfs: bad length")


def walk(read, base, size, buf=None):
    """Yield (path, offset, length) for each file and (path, -1, 0) for each
    directory, parents first. Offsets are relative to base."""
    cur = _Cursor(read, base, size, buf or bytearray(256))
    if bytes(cur.take(3)) != _HEADER:
        raise RomfsError("romfs: bad header")
    end = cur.uint()
    end += cur.pos
    if end > size:
        raise RomfsError("romfs: truncated")
    yield from _records(cur, end, "")


def _records(cur, end, prefix):
    while cur.pos < end:
        kind = cur.uint()
        length = cur.uint()
        stop = cur.pos + length
        if stop > end:
            raise RomfsError("romfs: record runs past its directory")
        if kind == _KIND_DIR or kind == _KIND_FILE:
            name = bytes(cur.take(cur.uint())).decode()
            if not name or "/" in name or name in (".", ".."):
                raise RomfsError("romfs: bad name")
            path = prefix + name
            if kind == _KIND_DIR:
                yield path, -1, 0
                yield from _records(cur, stop, path + "/")
            else:
                if cur.uint() != _KIND_DATA:
                    raise RomfsError("romfs: only verbatim file data is supported")
                data_len = cur.uint()
                if cur.pos + data_len > stop:
                    raise RomfsError("romfs: file runs past its record")
                yield path, cur.pos, data_len
        cur.pos = stop


def copy_out(read, base, offset, length, out, buf):
    """Write length bytes at base+offset to the file object out."""
    view = memoryview(buf)
    while length:
        step = min(length, len(buf))
        if read(base + offset, view[:step]) != step:
            raise RomfsError("romfs: truncated")
        out.write(view[:step])
        offset += step
        length -= step


def extract(read, base, size, dest, buf=None):
    """Extract the ROMFS image at [base, base+size) into directory dest.
    Returns the number of files written."""
    buf = buf or bytearray(256)
    files = 0
    # walk() reuses the start of buf for names, so copy with a separate view.
    name_buf = bytearray(256)
    for path, offset, length in walk(read, base, size, name_buf):
        target = dest + "/" + path
        if offset < 0:
            os.mkdir(target)
            continue
        with open(target, "wb") as out:
            copy_out(read, base, offset, length, out, buf)
        files += 1
    return files
