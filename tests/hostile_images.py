"""Hostile module images for the tests: valid images changed the way an attacker (or a
broken build) would, then sealed again (SHA-256 and CRC32 recomputed with
module_format.build_image), so that only the semantic checks of
bootloader/module_check.py can catch them. Used by tests/host and tests/device."""

import hashlib

from keel import build, romfs
from keel import module_format as mf

# What a good .mpy file starts with on every Keel target today (mpy-cross's output).
# A bootloader version one patch above this tree's (bootloader/VERSION): what an update
# to a new bootloader brings, which the system parts' dependency on it still accepts.
_MAJOR, _MINOR, _PATCH = build.bootloader_version().split("-")[0].split(".")
NEXT_BOOTLOADER = f"{_MAJOR}.{_MINOR}.{int(_PATCH) + 1}"
MPY_HEAD = b"M\x06\x00\x1f"


def header_and_files(image: bytes) -> tuple[mf.ModuleInfo, dict[str, bytes]]:
    """The header of an image and the files of its ROMFS payload."""
    info = mf.parse_header(image)
    read = mf.bytes_reader(image)
    files = {}
    for path, offset, length in romfs.walk(read, info.header_size, info.payload_size):
        if offset >= 0:
            start = info.header_size + offset
            files[path] = image[start:start + length]
    return info, files


def seal(info: mf.ModuleInfo, payload: bytes, function=None, index=None, version=None) -> bytes:
    """A whole image around payload, with a header like info's (function, index and
    version changed when given) and its digest and CRC computed afresh."""
    new = mf.ModuleInfo(
        info.function if function is None else function,
        info.index if index is None else index,
        info.version if version is None else mf.encode_version(version),
        info.platform,
        info.dependencies,
    )
    return mf.build_image(new, payload, hashlib.sha256)


def with_files(image: bytes, files: dict[str, bytes], **header) -> bytes:
    info, _ = header_and_files(image)
    return seal(info, build.make_romfs(files), **header)


def payload_of(image: bytes) -> bytes:
    info = mf.parse_header(image)
    return image[info.header_size:info.header_size + info.payload_size]


# ROMFS written by hand, for shapes make_romfs (recursive) cannot build

def _uint(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.insert(0, 0x80 | (value & 0x7F))
        value >>= 7
    return bytes(out)


def _record(kind: int, payload: bytes) -> bytes:
    return _uint(kind) + _uint(len(payload)) + payload


def romfs_file(name: str, data: bytes) -> bytes:
    raw = name.encode()
    return _record(5, _uint(len(raw)) + raw + _record(2, data))


def romfs_dir(name: str, records: bytes) -> bytes:
    raw = name.encode()
    return _record(4, _uint(len(raw)) + raw + records)


def romfs_image(records: bytes) -> bytes:
    return b"\xd2\xcd\x31" + _uint(len(records)) + records


def nested_romfs(depth: int, leaf: bytes = MPY_HEAD, extra: bytes = b"") -> bytes:
    """main.mpy (and extra records) at the top, and a file under `depth` directories."""
    inner = romfs_file("x.mpy", leaf)
    for level in range(depth):
        inner = romfs_dir("d", inner)
    return romfs_image(romfs_file("main.mpy", MPY_HEAD) + extra + inner)


def wide_romfs(count: int) -> bytes:
    """main.mpy and count more files at the top."""
    records = romfs_file("main.mpy", MPY_HEAD)
    records += b"".join(romfs_file("f%d.mpy" % i, MPY_HEAD) for i in range(count))
    return romfs_image(records)


def mpy_with_head(data: bytes, head: bytes) -> bytes:
    return head + data[len(head):]


# The catalogue: name -> (make(images) -> bytes, the reasons module_check may give).
# `images` maps "bootloader", "system1", "system2", "app" to valid images (bytes).

def _swap(payload_from, header_from, **header):
    def make(im):
        return seal(mf.parse_header(im[header_from]), payload_of(im[payload_from]), **header)

    return make


def _edit(base, change, **header):
    def make(im):
        _, files = header_and_files(im[base])
        return with_files(im[base], change(dict(files)), **header)

    return make


def _drop(name):
    def change(files):
        del files[name]
        return files

    return change


def _rename(name, new):
    def change(files):
        files[new] = files.pop(name)
        return files

    return change


def _all_mpy(head):
    def change(files):
        return {p: (mpy_with_head(d, head) if p.endswith(".mpy") else d) for p, d in files.items()}

    return change


def _add(path, data):
    def change(files):
        files[path] = data
        return files

    return change


def _raw_payload(base, payload):
    return lambda im: seal(mf.parse_header(im[base]), payload(im))


HOSTILE = {
    # a payload under another module's header
    "app-as-bootloader": (_swap("app", "bootloader"), {"content"}),
    "system2-as-system1": (_swap("system2", "system1"), {"content"}),
    "system1-as-system2": (_swap("system1", "system2"), {"content"}),
    "bootloader-as-app": (_swap("bootloader", "app"), {"content"}),
    "app-as-system1": (_swap("app", "system1"), {"content"}),
    # entry files missing, renamed, or not files
    "bootloader-without-keel_boot": (_edit("bootloader", _drop("keel_boot.mpy")), {"content"}),
    "bootloader-without-romfs": (_edit("bootloader", _drop("romfs.mpy")), {"content"}),
    "system1-keel_system-renamed": (
        _edit("system1", _rename("keel_system.mpy", "keel_sys.mpy")), {"content"}),
    "system2-without-keel": (_edit("system2", _drop("keel.mpy")), {"content"}),
    "app-without-main": (_edit("app", _rename("main.mpy", "lib/main.mpy")), {"content"}),
    "app-main-is-a-directory": (
        _edit("app", lambda f: {**{k: v for k, v in f.items() if k != "main.mpy"},
                                "main.mpy/x.mpy": MPY_HEAD}), {"content"}),
    # markers of Keel's own among the code
    "app-with-sha256-marker": (_edit("app", _add(".sha256", b"0" * 64)), {"content"}),
    # .mpy files this VM does not load
    "app-mpy-version-5": (_edit("app", _all_mpy(b"M\x05")), {"mpy"}),
    "system1-mpy-not-mpy": (_edit("system1", _all_mpy(b"XX")), {"mpy"}),
    "system2-mpy-truncated": (_edit("system2", _add("cloud.mpy", b"M\x06")), {"mpy"}),
    # beyond the bounds of the ROMFS walk
    "app-nested-deep": (_raw_payload("app", lambda im: nested_romfs(romfs.MAX_DEPTH + 1)),
                        {"content"}),
    "app-nested-very-deep": (_raw_payload("app", lambda im: nested_romfs(5000)), {"content"}),
    "app-thousands-of-entries": (_raw_payload("app", lambda im: wide_romfs(3000)), {"content"}),
    "app-long-name": (_edit("app", _add("n" * (romfs.MAX_NAME + 1), b"")), {"content"}),
    # malformed: a ROMFS that stops half-way
    "system1-truncated-romfs": (
        _raw_payload("system1", lambda im: payload_of(im["system1"])[:-100]), {"integrity"}),
    "app-not-romfs": (_raw_payload("app", lambda im: b"print('hello')\n"), {"integrity"}),
}

# Native code for a CPU the device does not have: only the device knows its own CPU,
# so the host lets this through and the bootloader refuses it (reason mpy).
NATIVE_FOR_ANOTHER_CPU = b"M\x06\x27\x1f"  # arch 9 (xtensa), sub-version 3


def native_app(images) -> bytes:
    return _edit("app", _all_mpy(NATIVE_FOR_ANOTHER_CPU))(images)


def load_images(system_dir, app_path) -> dict[str, bytes]:
    """The valid images hostile ones are made from."""
    out = {"app": app_path.read_bytes()}
    for path in system_dir.glob("*.bin"):
        info = mf.parse_header(path.read_bytes())
        key = "bootloader" if info.function == mf.FUNCTION_BOOTLOADER else f"system{info.index}"
        out[key] = path.read_bytes()
    return out


SLOT_OF = {"bootloader 0": "bootloader", "system-part 1": "system1", "system-part 2": "system2",
           "user-part 1": "user"}


def slot_label(image: bytes) -> str:
    info = mf.parse_header(image)
    return SLOT_OF[f"{mf.function_name(info.function)} {info.index}"]


def with_module_source(image: bytes, name: str, source: str, tmp_dir, version=None) -> bytes:
    """The image with one top-level module (name.mpy) compiled from source."""
    from pathlib import Path

    path = Path(tmp_dir) / f"{name}.py"
    path.write_text(source)
    _, files = header_and_files(image)
    files[f"{name}.mpy"] = build.compile_py(path, f"{name}.py")
    return with_files(image, files, **({"version": version} if version else {}))


def bootloader_with(image: bytes, keel_boot_source: str, version: str, tmp_dir) -> bytes:
    """The bootloader image with keel_boot compiled from other source, as a new version:
    content a board accepts, code that may fail when it runs."""
    return with_module_source(image, "keel_boot", keel_boot_source, tmp_dir, version)
