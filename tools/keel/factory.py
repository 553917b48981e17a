"""The factory step: what a new board's filesystem holds before its first boot.

One definition for every board: the virtual board (`keel vdev create`) and the images
for real boards (`keel image esp32`) put the same files on a LittleFS filesystem:

  /boot.py            stage 0 of the bootloader (bootloader/stage0.py, as source)
  /keel/board.json    the board definition the bootloader and the HAL read
  /keel/m/bl/...      the bootloader module's code, extracted, and its .sha256 marker
  /keel/m/bl/trust.json  the public keys the board trusts, when it is set up with some
                      (docs/signing.md); without it the board is in development mode

`device_files()` lists them (path -> bytes); `write_files()` puts such a list on a
mounted `littlefs.LittleFS`, and `make_filesystem()` builds a whole filesystem image
from one, with the geometry MicroPython's `vfs.VfsLfs2` mounts on the board."""

import json

from littlefs import LittleFS

from keel import module_format as mf
from keel import keel_files, romfs
from keel import trust
from keel.errors import KeelError
from keel.images import Image
from keel.paths import source_root

# Stage-0 files at the filesystem root, from the source tree (path on the board ->
# path in the tree). Where the boot is split into more files, list them here.
# /boot.py runs after every reset, soft reboots included (recovery only); /main.py,
# which starts Keel, only in friendly-REPL mode, so a raw-REPL soft reboot (mpremote,
# keel flash --usb) leaves Keel stopped (docs/boot-flow.md, stage 0).
STAGE0_FILES = {"/boot.py": "bootloader/stage0.py", "/main.py": "bootloader/stage0_main.py"}
# LittleFS on-disk version 2.0: what every littlefs v2 (every MicroPython with
# VfsLfs2) mounts. Newer minor versions would lock out firmware with an older littlefs.
DISK_VERSION = 0x00020000


def bootloader_files(image: Image) -> dict[str, bytes]:
    """The bootloader's code extracted from its module image, as the bootloader
    itself installs it: every file of the ROMFS payload, and .sha256 (the hex digest
    the image declares), which tells the bootloader this code matches the slot."""
    info = image.info
    if info.function != mf.FUNCTION_BOOTLOADER:
        raise KeelError(f"{image.path}: not a bootloader module")
    read = mf.bytes_reader(image.data)
    files = {}
    for path, offset, length in romfs.walk(read, info.header_size, info.payload_size):
        if offset < 0:
            continue  # a directory: made on the way to its files
        start = info.header_size + offset
        files[f"{keel_files.BOOTLOADER_DIR}/{path}"] = bytes(image.data[start : start + length])
    digest = image.data[info.header_size + info.payload_size :][:32]
    files[f"{keel_files.BOOTLOADER_DIR}/.sha256"] = digest.hex().encode()
    return files


def device_files(board_data: dict, bootloader: Image,
                 trusted: list[bytes] | None = None) -> dict[str, bytes]:
    """Everything a new board's filesystem holds: stage 0, the board, the bootloader,
    and the keys the board trusts. trusted: raw public keys (keel vdev create --trust);
    None keeps the keys the bootloader module brings, if any."""
    files = {}
    root = source_root()
    for target, source in STAGE0_FILES.items():
        files[target] = (root / source).read_bytes()
    files[keel_files.BOARD_FILE] = json.dumps(board_data).encode()
    files.update(bootloader_files(bootloader))
    if trusted:
        files[keel_files.TRUST_FILE] = json.dumps(trust.document(trusted)).encode()
    return files


def trusted_keys(files: dict[str, bytes]) -> list[bytes] | None:
    """The keys a board with these factory files trusts ([]: development mode; None:
    a trust file that cannot be read, which the board treats as trusting nothing)."""
    data = files.get(keel_files.TRUST_FILE)
    if data is None:
        return []
    try:
        return trust.parse_keys(json.loads(data))
    except ValueError:
        return None


def write_files(fs: LittleFS, files: dict[str, bytes]) -> None:
    """Write files (absolute paths) onto a mounted LittleFS, making directories."""
    for path in sorted(files):
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(files[path])


def new_filesystem(block_size: int, block_count: int) -> LittleFS:
    """A freshly formatted, mounted LittleFS in memory (fs.context.buffer)."""
    fs = LittleFS(
        block_size=block_size,
        block_count=block_count,
        disk_version=DISK_VERSION,
        mount=False,
    )
    fs.format()
    fs.mount()
    return fs


def make_filesystem(files: dict[str, bytes], block_size: int, size: int) -> bytes:
    """A LittleFS image of size bytes holding files, as a partition of that size."""
    if size % block_size:
        raise KeelError(f"filesystem size {size} is not a multiple of the block size {block_size}")
    fs = new_filesystem(block_size, size // block_size)
    try:
        write_files(fs, files)
    except Exception as e:  # littlefs raises its own errors (LittleFSError: no space)
        raise KeelError(f"the files do not fit a {size // 1024} KiB filesystem: {e}") from None
    fs.unmount()
    return bytes(fs.context.buffer)


def write_tree(files: dict[str, bytes], root) -> list:
    """Write files (absolute paths on the board) under root on the host, to be copied
    onto a board's own filesystem (mpremote cp -r): how boards without a filesystem
    image (the nrf port) get Keel. Returns the paths written."""
    from pathlib import Path

    written = []
    for path in sorted(files):
        target = Path(root) / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[path])
        written.append(target)
    return written
