# Keel module image format: the one definition shared by the host tools (CPython)
# and the device (MicroPython). Spec: docs/module-format.md.
#
# Layout (little-endian):
#   header   HEADER_FMT, then dep_count x DEP_FMT
#   payload  payload_size bytes (a ROMFS image for system and user parts)
#   suffix   SHA-256 over header+payload (32 bytes), then, when FLAG_SIGNED is set, the
#            signature block (key id 32 + Ed25519 signature 64), then CRC32 over all
#            before it (4 bytes)
import struct
import binascii

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


MAGIC = b"KEEL"
FORMAT_VERSION = const(1)
HEADER_FMT = "<4sBBBBIHBxI"
HEADER_SIZE = const(20)
DEP_FMT = "<BBxxI"
DEP_SIZE = const(8)
SUFFIX_SIZE = const(36)  # SHA-256 + CRC32: the suffix of an unsigned module
SIGNATURE_SIZE = const(96)  # key id (SHA-256 of the raw public key) + Ed25519 signature
MAX_DEPS = const(8)
MIN_BUFFER = const(84)  # HEADER_SIZE + MAX_DEPS * DEP_SIZE, and more than SUFFIX_SIZE

# Module functions, numbered as in Particle's module_info_t.
FUNCTION_BOOTLOADER = const(2)
FUNCTION_SYSTEM_PART = const(4)
FUNCTION_USER_PART = const(5)
FUNCTION_VM = const(10)
FUNCTION_NAMES = {
    FUNCTION_BOOTLOADER: "bootloader",
    FUNCTION_SYSTEM_PART: "system-part",
    FUNCTION_USER_PART: "user-part",
    FUNCTION_VM: "vm",
}

FLAG_COMPRESSED = const(1)  # reserved: a reader refuses it (nothing writes it yet)
FLAG_SIGNED = const(2)
# What a signature covers: this prefix and the module's SHA-256 (its suffix digest).
SIGNED_PREFIX = b"KEELSIG1"

# Platform ids. A board names its platform; a module runs only on its platform.
PLATFORMS = {"virtual": 1, "esp32": 2, "nrf52840": 3}

# Prerelease tags in the low byte of an encoded version (Particle's scheme):
# alpha.N = N, beta.N = 0x40|N, rc.N = 0x80|N, release = 0xFF; N < 64.
_PRERELEASE_BASE = {"alpha": 0x00, "beta": 0x40, "rc": 0x80}
_TAG_RELEASE = const(0xFF)


class FormatError(ValueError):
    pass


def function_name(function):
    return FUNCTION_NAMES.get(function, "function-%d" % function)


def function_id(name):
    for number, known in FUNCTION_NAMES.items():
        if known == name:
            return number
    raise FormatError("unknown module function '%s'" % name)


def platform_name(platform_id):
    for name, number in PLATFORMS.items():
        if number == platform_id:
            return name
    return "platform-%d" % platform_id


def platform_id(name):
    if name not in PLATFORMS:
        raise FormatError(
            "unknown platform '%s' (known: %s)" % (name, ", ".join(sorted(PLATFORMS)))
        )
    return PLATFORMS[name]


def _number(text, what, limit, original):
    ascii_digits = text and all("0" <= c <= "9" for c in text)
    if not ascii_digits or (len(text) > 1 and text[0] == "0"):
        raise FormatError("invalid version '%s': %s must be a number" % (original, what))
    value = int(text)
    if value > limit:
        raise FormatError("invalid version '%s': %s must be at most %d" % (original, what, limit))
    return value


def encode_version(text):
    """'1.2.0-rc.3' -> 32-bit integer; integers order as the versions do."""
    if not isinstance(text, str):
        raise FormatError("invalid version %r: expected a string like 1.2.0" % (text,))
    core, dash, pre = text.partition("-")
    parts = core.split(".")
    if len(parts) != 3:
        raise FormatError("invalid version '%s': expected MAJOR.MINOR.PATCH[-rc.N]" % text)
    major = _number(parts[0], "major", 255, text)
    minor = _number(parts[1], "minor", 255, text)
    patch = _number(parts[2], "patch", 255, text)
    tag = _TAG_RELEASE
    if dash:
        kind, dot, num = pre.partition(".")
        if kind not in _PRERELEASE_BASE or not dot:
            raise FormatError(
                "invalid version '%s': prerelease must be alpha.N, beta.N or rc.N" % text
            )
        tag = _PRERELEASE_BASE[kind] | _number(num, "prerelease number", 63, text)
    return (major << 24) | (minor << 16) | (patch << 8) | tag


def decode_version(value):
    """32-bit integer -> semver string; the inverse of encode_version."""
    if not 0 <= value <= 0xFFFFFFFF:
        raise FormatError("version %r out of range" % (value,))
    text = "%d.%d.%d" % ((value >> 24) & 0xFF, (value >> 16) & 0xFF, (value >> 8) & 0xFF)
    tag = value & 0xFF
    if tag == _TAG_RELEASE:
        return text
    if tag >= 0xC0:
        raise FormatError("version 0x%08x has an invalid prerelease tag" % value)
    kind = "rc" if tag & 0x80 else ("beta" if tag & 0x40 else "alpha")
    return "%s-%s.%d" % (text, kind, tag & 0x3F)


def _valid_tag(value):
    tag = value & 0xFF
    return tag < 0xC0 or tag == _TAG_RELEASE


def is_prerelease(value):
    return (value & 0xFF) != _TAG_RELEASE


class ModuleInfo:
    """What a module header says. Dependencies are (function, index, version) tuples."""

    def __init__(self, function, index, version, platform, dependencies=(), flags=0, size=0):
        self.function = function
        self.index = index
        self.version = version
        self.platform = platform
        self.dependencies = list(dependencies)
        self.flags = flags
        self.payload_size = size

    @property
    def header_size(self):
        return HEADER_SIZE + DEP_SIZE * len(self.dependencies)

    @property
    def signed(self):
        return bool(self.flags & FLAG_SIGNED)

    @property
    def suffix_size(self):
        return SUFFIX_SIZE + (SIGNATURE_SIZE if self.flags & FLAG_SIGNED else 0)

    @property
    def image_size(self):
        return self.header_size + self.payload_size + self.suffix_size

    def to_dict(self):
        return {
            "function": function_name(self.function),
            "index": self.index,
            "version": decode_version(self.version),
            "platform": platform_name(self.platform),
            "dependencies": [dependency_dict(d) for d in self.dependencies],
        }


def dependency_dict(dependency):
    function, index, version = dependency
    return {"function": function_name(function), "index": index, "version": decode_version(version)}


def pack_header(info):
    if len(info.dependencies) > MAX_DEPS:
        raise FormatError("at most %d dependencies" % MAX_DEPS)
    if info.flags & ~FLAG_SIGNED:
        raise FormatError("unsupported module flags 0x%02x" % info.flags)
    for version in [info.version] + [d[2] for d in info.dependencies]:
        if not _valid_tag(version):
            raise FormatError("invalid version 0x%08x" % version)
    out = bytearray(
        struct.pack(
            HEADER_FMT,
            MAGIC,
            FORMAT_VERSION,
            info.function,
            info.index,
            info.flags,
            info.version,
            info.platform,
            len(info.dependencies),
            info.payload_size,
        )
    )
    for function, index, version in info.dependencies:
        out += struct.pack(DEP_FMT, function, index, version)
    return bytes(out)


def parse_header(data):
    """Parse the header at the start of data (at least the header, not the whole image)."""
    if len(data) < HEADER_SIZE:
        raise FormatError("truncated: %d bytes, a header needs %d" % (len(data), HEADER_SIZE))
    magic, fmt, function, index, flags, version, platform, ndeps, size = struct.unpack_from(
        HEADER_FMT, data, 0
    )
    if magic != MAGIC:
        raise FormatError("not a Keel module (bad magic)")
    if fmt != FORMAT_VERSION:
        raise FormatError("unsupported module format version %d" % fmt)
    if ndeps > MAX_DEPS:
        raise FormatError("corrupt header: %d dependencies" % ndeps)
    if flags & ~FLAG_SIGNED:
        # A flag this reader does not know may change the layout: never guess.
        raise FormatError("unsupported module flags 0x%02x" % flags)
    if not _valid_tag(version):
        raise FormatError("corrupt header: invalid version 0x%08x" % version)
    if len(data) < HEADER_SIZE + DEP_SIZE * ndeps:
        raise FormatError("truncated: header ends inside the dependency list")
    deps = []
    for i in range(ndeps):
        dep = struct.unpack_from(DEP_FMT, data, HEADER_SIZE + DEP_SIZE * i)
        if not _valid_tag(dep[2]):
            raise FormatError("corrupt header: invalid dependency version 0x%08x" % dep[2])
        deps.append((dep[0], dep[1], dep[2]))
    return ModuleInfo(function, index, version, platform, deps, flags, size)


def build_image(info, payload, sha256, sign=None):
    """Header + payload + suffix. sha256 is a constructor (hashlib.sha256); sign, when
    given, is sign(message) -> (key_id, signature) and makes a signed module."""
    info.payload_size = len(payload)
    if sign is not None:
        info.flags |= FLAG_SIGNED
    elif info.flags & FLAG_SIGNED:
        raise FormatError("a signed module needs a signer")
    body = pack_header(info) + payload
    tail = sha256(body).digest()
    if sign is not None:
        key_id, signature = sign(SIGNED_PREFIX + tail)
        if len(key_id) + len(signature) != SIGNATURE_SIZE:
            raise FormatError("a signature block is %d bytes" % SIGNATURE_SIZE)
        tail += key_id + signature
    crc = binascii.crc32(body + tail) & 0xFFFFFFFF
    return body + tail + struct.pack("<I", crc)


def check_image(read, total_size, sha256=None, buf=None):
    """Validate an image read through read(offset, buf) -> count, of total_size bytes.

    Streams with one buffer (at least MIN_BUFFER bytes: the largest header) so it
    works on a device with little RAM. Returns
    (info, crc_ok, sha256_ok); sha256_ok is None when sha256 is not given.
    Raises FormatError when the image is truncated or the header is unreadable.
    """
    if buf is None:
        buf = bytearray(512)
    if len(buf) < MIN_BUFFER:
        raise ValueError("check_image needs a buffer of at least %d bytes" % MIN_BUFFER)
    if total_size < HEADER_SIZE:
        raise FormatError("truncated: %d bytes, a header needs %d" % (total_size, HEADER_SIZE))
    got = read(0, buf)
    info = parse_header(memoryview(buf)[:got])
    body_size = info.header_size + info.payload_size
    crc_at = info.image_size - 4
    if total_size < info.image_size:
        raise FormatError(
            "truncated: %d bytes, the header says %d" % (total_size, info.image_size)
        )
    crc = 0
    hasher = sha256() if sha256 else None
    offset = 0
    view = memoryview(buf)
    while offset < crc_at:
        want = min(len(buf), crc_at - offset)
        got = read(offset, view[:want])
        if got <= 0:
            raise FormatError("truncated at byte %d" % offset)
        chunk = view[:got]
        crc = binascii.crc32(chunk, crc)
        if hasher is not None:
            body_part = min(got, max(0, body_size - offset))
            if body_part:
                hasher.update(chunk[:body_part])
        offset += got
    read(body_size, view[:32])
    stored_digest = bytes(view[:32])
    read(crc_at, view[:4])
    stored_crc = struct.unpack_from("<I", buf, 0)[0]
    crc_ok = (crc & 0xFFFFFFFF) == stored_crc
    sha_ok = None
    if hasher is not None:
        sha_ok = hasher.digest() == stored_digest
    return info, crc_ok, sha_ok


def stored_sha256(read, info, buf):
    """The SHA-256 recorded in the suffix (not recomputed)."""
    read(info.header_size + info.payload_size, memoryview(buf)[:32])
    return bytes(buf[:32])


def signature_block(read, info, buf):
    """(key_id, signature) of a signed module, as copies; None for an unsigned one.
    buf holds at least SIGNATURE_SIZE bytes."""
    if not info.flags & FLAG_SIGNED:
        return None
    read(info.header_size + info.payload_size + 32, memoryview(buf)[:SIGNATURE_SIZE])
    return bytes(buf[:32]), bytes(buf[32:SIGNATURE_SIZE])


def bytes_reader(data):
    """A read(offset, buf) function over an in-memory image."""

    def read(offset, buf):
        chunk = data[offset : offset + len(buf)]
        buf[: len(chunk)] = chunk
        return len(chunk)

    return read


def dependency_met(dependency, modules):
    """modules: ModuleInfo of the installed, valid modules."""
    function, index, version = dependency
    for module in modules:
        if module.function == function and module.index == index:
            return module.version >= version
    return False


def missing_dependencies(module, installed):
    return [d for d in module.dependencies if not dependency_met(d, installed)]
