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
# Bounds on what a module's payload may hold, so that hostile input cannot exhaust the
# heap, the stack or the filesystem while it is walked or extracted. Keel's own parts are
# far inside them (system part 1: 42 entries on the virtual board, 3 levels, names of at most 17 bytes).
MAX_DEPTH = const(8)  # directories inside directories
MAX_ENTRIES = const(256)  # files and directories
MAX_NAME = const(64)  # bytes in one file or directory name


class RomfsError(ValueError):
    pass


class RomfsLimitError(RomfsError):
    """A well-formed image beyond the bounds above."""


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
    directory, parents first. Offsets are relative to base. Raises RomfsError for a
    malformed image, RomfsLimitError for one beyond MAX_DEPTH, MAX_ENTRIES, MAX_NAME."""
    cur = _Cursor(read, base, size, buf or bytearray(MAX_NAME))
    if bytes(cur.take(3)) != _HEADER:
        raise RomfsError("romfs: bad header")
    end = cur.uint()
    end += cur.pos
    if end > size:
        raise RomfsError("romfs: truncated")
    # An explicit stack of the open directories' ends (no recursion for hostile input to
    # deepen); prefix is the path of the innermost one.
    ends = [end]
    prefix = ""
    entries = 0
    data = 0
    while ends:
        if cur.pos >= ends[-1]:
            cur.pos = ends.pop()
            prefix = prefix[: prefix.rfind("/", 0, len(prefix) - 1) + 1]
            continue
        kind = cur.uint()
        length = cur.uint()
        stop = cur.pos + length
        if stop > ends[-1]:
            raise RomfsError("romfs: record runs past its directory")
        if kind == _KIND_DIR or kind == _KIND_FILE:
            entries += 1
            if entries > MAX_ENTRIES:
                raise RomfsLimitError("romfs: more than %d entries" % MAX_ENTRIES)
            n = cur.uint()
            if n > MAX_NAME:
                raise RomfsLimitError("romfs: a name longer than %d bytes" % MAX_NAME)
            name = bytes(cur.take(n)).decode()
            if cur.pos > stop:
                raise RomfsError("romfs: name runs past its record")
            if not name or "/" in name or name in (".", ".."):
                raise RomfsError("romfs: bad name")
            path = prefix + name
            if kind == _KIND_DIR:
                if len(ends) > MAX_DEPTH:
                    raise RomfsLimitError("romfs: directories nested deeper than %d" % MAX_DEPTH)
                yield path, -1, 0
                ends.append(stop)
                prefix = path + "/"
                continue  # its records follow
            if cur.uint() != _KIND_DATA:
                raise RomfsError("romfs: only verbatim file data is supported")
            data_len = cur.uint()
            if cur.pos + data_len > stop:
                raise RomfsError("romfs: file runs past its record")
            data += data_len
            if data > size:  # cannot happen in a well-formed image: said, not assumed
                raise RomfsLimitError("romfs: files hold more bytes than the payload")
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
    name_buf = bytearray(MAX_NAME)
    for path, offset, length in walk(read, base, size, name_buf):
        target = dest + "/" + path
        if offset < 0:
            os.mkdir(target)
            continue
        with open(target, "wb") as out:
            copy_out(read, base, offset, length, out, buf)
        files += 1
    return files
