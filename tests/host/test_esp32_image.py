"""keel image esp32 and keel flash --usb --esp32, checked with independent readers.

No MicroPython firmware can be downloaded here, so the tests build a small but valid
one with esptool's own image classes (the ESP32 app image format: magic 0xE9, the
extended header with the chip id, segments, checksum, appended SHA-256, and the
ESP-IDF app description), laid out as the MicroPython download is (bootloader at
0x1000, its partition table at 0x8000, the app at 0x10000).

What keel writes is then read back by code that shares nothing with keel's writer:
esptool (LoadFirmwareImage and `esptool image-info`) for the bootloader and app, in
their files and inside merged.bin; a partition-table reader written here from
ESP-IDF's documented binary format; littlefs-python, and MicroPython's own VfsLfs2 on
the unix VM, for fs.bin."""

import hashlib
import io
import json
import os
import pty
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from esptool.bin_image import ELFSection, ESP32FirmwareImage, ESP32S3FirmwareImage, LoadFirmwareImage
from littlefs import LittleFS

from keel import esp32image
from keel import module_format as mf
from keel.boards import load_board
from keel.errors import KeelError
from keel.images import parse_image
from keel.paths import micropython

REPO = Path(__file__).resolve().parents[2]
BOARD = "esp32_generic"

# ------------------------------------------------------------------ synthetic firmware


def _section(name: str, addr: int, data: bytes) -> ELFSection:
    return ELFSection(name.encode(), addr, data, 0)


# Names every ESP32_GENERIC build interns (esp32.Partition, tls, network): what Keel needs.
STOCK_NAMES = b"\0Partition\0tls\0network\0"


def app_image(extra: int = 0, cls=ESP32FirmwareImage, names: bytes = STOCK_NAMES) -> bytes:
    """An ESP-IDF app as MicroPython's build makes one, small: the app description
    first in DROM, then DRAM, IRAM and IROM segments. extra pads DROM (size tests);
    names go in DROM after it (interned names, NUL-terminated, as the build's are)."""
    desc = struct.pack(
        "<II8s32s32s16s16s32s32sHHB3s72s", 0xABCD5432, 0, b"", b"v1.25.0", b"micropython",
        b"12:00:00", b"Apr 15 2025", b"v5.2.2", bytes(32), 0, 0, 0, b"", b"")
    image = cls()
    image.segments = [
        _section(".flash.appdesc", 0x3F400020,
                 desc + bytes(range(256)) * 4 + b"\x5a" * extra + names),
        _section(".dram0.data", 0x3FFB0000, b"\x33" * 512),
        _section(".iram0.text", 0x40080000, b"\x90" * 1024),
        _section(".flash.text", 0x400D0020, b"\x22" * 4096),
    ]
    image.entrypoint = 0x40080400
    return image.save(None)


def bootloader_image() -> bytes:
    image = ESP32FirmwareImage()
    image.segments = [
        _section(".dram0.bootdesc", 0x3FFF0030, b"\x44" * 256),
        _section(".iram_loader.text", 0x40078000, b"\x55" * 2048),
    ]
    image.entrypoint = 0x40078100
    return image.save(None)


def idf_table(rows) -> bytes:
    """A partition table in ESP-IDF's binary format, written here from the spec (the
    input side: MicroPython's own table inside its full-flash download)."""
    out = b"".join(struct.pack("<2sBBII16sI", b"\xaa\x50", t, s, o, n, name.encode(), 0)
                   for name, t, s, o, n in rows)
    out += b"\xeb\xeb" + b"\xff" * 14 + hashlib.md5(out).digest()
    return out + b"\xff" * (0xC00 - len(out))


MICROPYTHON_OTA_TABLE = [  # partitions-4MiB-ota.csv
    ("nvs", 1, 2, 0x9000, 0x4000), ("otadata", 1, 0, 0xD000, 0x2000),
    ("phy_init", 1, 1, 0xF000, 0x1000), ("ota_0", 0, 0x10, 0x10000, 0x180000),
    ("ota_1", 0, 0x11, 0x190000, 0x180000), ("vfs", 1, 0x81, 0x310000, 0xF0000),
]


def full_flash(app: bytes, boot: bytes | None = None) -> bytes:
    """The layout of MicroPython's ESP32 download: written at 0x1000."""
    boot = boot or bootloader_image()
    image = bytearray(b"\xff" * (0x10000 - 0x1000))
    image[0 : len(boot)] = boot
    image[0x7000 : 0x7000 + 0xC00] = idf_table(MICROPYTHON_OTA_TABLE)
    return bytes(image) + app


@pytest.fixture(scope="module")
def firmware(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fw") / "ESP32_GENERIC-OTA-20250415-v1.25.0.bin"
    path.write_bytes(full_flash(app_image()))
    return path


@pytest.fixture(scope="module")
def system_dir(tmp_path_factory) -> Path:
    from keel import build

    out = tmp_path_factory.mktemp("system-esp32")
    build.build_system("esp32", None, out)
    return out


@pytest.fixture(scope="module")
def built(firmware, system_dir, tmp_path_factory, keel_cli):
    out = tmp_path_factory.mktemp("image") / "out"
    proc = keel_cli("image", "esp32", "--board", BOARD, "--firmware", firmware,
                    "--system", system_dir, "-o", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


# ------------------------------------------------------------------ independent readers


def read_table(data: bytes) -> list[dict]:
    """ESP-IDF's partition table format, as its documentation gives it: 32-byte entries
    (0xAA 0x50, type, subtype, offset, size, 16-byte name, flags), an entry starting
    0xEB 0xEB carrying the MD5 of the entries before it, then 0xFF."""
    entries, seen = [], b""
    for at in range(0, len(data), 32):
        raw = data[at : at + 32]
        if raw == b"\xff" * 32:
            return entries
        if raw[:2] == b"\xeb\xeb":
            assert raw[2:16] == b"\xff" * 14
            assert raw[16:] == hashlib.md5(seen).digest(), "MD5 entry does not match"
            continue
        assert raw[:2] == b"\xaa\x50", f"bad entry magic at {at}"
        seen += raw
        ptype, subtype, offset, size = struct.unpack_from("<BBII", raw, 2)
        name = raw[12:28].rstrip(b"\0").decode()
        entries.append(dict(name=name, type=ptype, subtype=subtype, offset=offset, size=size,
                            flags=struct.unpack_from("<I", raw, 28)[0]))
    raise AssertionError("no end of table")


def esptool_image_info(path: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "esptool", "--chip", "esp32", "image-info",
                           str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# ------------------------------------------------------------------ the image


def test_outputs_and_command(built):
    out, stdout = built
    layout = json.loads((out / esp32image.LAYOUT_FILE).read_text())
    names = [f["file"] for f in layout["files"]]
    assert names == ["idf-bootloader.bin", "partition-table.bin", "micropython.bin",
                     "keel-bootloader.bin", "keel-system1.bin", "keel-system2.bin", "fs.bin"]
    command = (out / esp32image.COMMAND_FILE).read_text()
    assert "esptool --chip esp32 --port PORT --baud 460800 erase-flash" in command
    pairs = " ".join(f"0x{f['offset']:x} {f['file']}" for f in layout["files"])
    assert f"write-flash {pairs}" in command
    assert "write-flash 0x0 merged.bin" in command
    assert "micropython v1.25.0" in stdout and "write-flash" in stdout
    assert (out / "merged.bin").stat().st_size == load_board(BOARD).flash_size


def test_firmware_read_by_esptool(built, firmware):
    out, _ = built
    merged = (out / "merged.bin").read_bytes()
    app = app_image()
    assert (out / "micropython.bin").read_bytes() == app
    for data in ((out / "micropython.bin").read_bytes(), merged[0x10000:]):
        image = LoadFirmwareImage("esp32", data)
        assert image.chip_id == 0 and image.entrypoint == 0x40080400
        assert image.calculate_checksum() == image.checksum
        assert image.stored_digest == image.calc_digest
    info = esptool_image_info(out / "micropython.bin")
    assert "Checksum: " in info and "(valid)" in info.split("Checksum: ")[1].splitlines()[0]
    assert "(valid)" in info.split("Validation hash: ")[1].splitlines()[0]
    assert "Project name: micropython" in info and "App version: v1.25.0" in info
    boot = LoadFirmwareImage("esp32", merged[0x1000:])
    assert boot.calculate_checksum() == boot.checksum and boot.stored_digest == boot.calc_digest
    assert boot.entrypoint == 0x40078100
    assert (out / "idf-bootloader.bin").read_bytes() == bootloader_image()
    # merged.bin through `esptool image-info`, read from the bootloader's and the app's
    # offsets (image-info reads the image a file starts with)
    for offset, entry in ((0x1000, "0x40078100"), (0x10000, "0x40080400")):
        (out / "merged-tail.bin").write_bytes(merged[offset:])
        info = esptool_image_info(out / "merged-tail.bin")
        assert f"Entry point: {entry}" in info
        assert "(valid)" in info.split("Checksum: ")[1].splitlines()[0]
    (out / "merged-tail.bin").unlink()


def test_partition_table(built):
    out, _ = built
    board = load_board(BOARD)
    data = (out / "partition-table.bin").read_bytes()
    merged = (out / "merged.bin").read_bytes()
    assert merged[0x8000 : 0x8000 + len(data)] == data
    assert len(data) == 0xC00
    table = read_table(data)
    by_name = {e["name"]: e for e in table}
    assert [e["name"] for e in table] == ["nvs", "otadata", "phy_init", "ota_0", "ota_1",
                                          "romfs", "vfs"]
    # The app slots MicroPython's OTA uses, where ESP-IDF wants them.
    assert (by_name["ota_0"]["type"], by_name["ota_0"]["subtype"]) == (0, 0x10)
    assert (by_name["ota_1"]["type"], by_name["ota_1"]["subtype"]) == (0, 0x11)
    assert by_name["ota_0"]["offset"] == 0x10000
    assert all(e["offset"] % 0x10000 == 0 for e in table if e["type"] == 0)
    assert (by_name["otadata"]["type"], by_name["otadata"]["subtype"]) == (1, 0)
    assert by_name["otadata"]["size"] == 0x2000
    # Stock MicroPython mounts the data partition labelled "vfs": Keel's fs.
    assert by_name["vfs"]["type"] == 1
    assert by_name["vfs"]["offset"] == board.partition("fs").offset
    # Keel's slots in one data partition labelled romfs, which a firmware built with
    # MICROPY_VFS_ROM maps as memory (esp32_partition.c mp_vfs_rom_ioctl): every slot
    # inside it, 64 KiB-aligned as the MMU maps pages.
    romfs = by_name["romfs"]
    assert (romfs["type"], romfs["subtype"]) == (1, 0x8F) and romfs["offset"] % 0x10000 == 0
    for p in board.partitions:
        if p.function is not None or p.label == "staging":
            assert p.label not in by_name
            assert romfs["offset"] <= p.offset and p.offset + p.size <= romfs["offset"] + romfs["size"]
    end = 0x9000
    for e in sorted(table, key=lambda e: e["offset"]):
        assert e["offset"] >= end and e["offset"] % 0x1000 == 0 and e["flags"] == 0
        end = e["offset"] + e["size"]
    assert end <= board.flash_size


def test_modules_in_their_slots(built, system_dir):
    out, _ = built
    board = load_board(BOARD)
    merged = (out / "merged.bin").read_bytes()
    for path in sorted(system_dir.glob("*.bin")):
        image = parse_image(path.read_bytes(), path)
        slot = board.slot_for(image.info.function, image.info.index)
        placed = parse_image(merged[slot.offset : slot.offset + len(image.data)])
        assert placed.ok and placed.data == image.data
        assert merged[slot.offset + len(image.data) : slot.offset + slot.size] == \
            b"\xff" * (slot.size - len(image.data))


def _bootloader_module(system_dir):
    for path in sorted(system_dir.glob("*.bin")):
        image = parse_image(path.read_bytes(), path)
        if image.info.function == mf.FUNCTION_BOOTLOADER:
            return image
    raise AssertionError("no bootloader")


def test_filesystem_read_by_littlefs_python(built, system_dir):
    out, _ = built
    board = load_board(BOARD)
    fs_part = board.partition("fs")
    data = (out / "fs.bin").read_bytes()
    assert len(data) == fs_part.size
    assert (out / "merged.bin").read_bytes()[fs_part.offset : fs_part.offset + len(data)] == data
    fs = LittleFS(block_size=4096, block_count=0, mount=False)  # count read from the image
    fs.context.buffer = bytearray(data)
    fs.mount()
    assert fs.fs_stat().block_count == fs_part.size // 4096
    with fs.open("/boot.py", "r") as f:
        assert f.read() == (REPO / "bootloader" / "stage0.py").read_text()
    with fs.open("/main.py", "r") as f:  # where Keel starts (friendly-REPL boots only)
        assert f.read() == (REPO / "bootloader" / "stage0_main.py").read_text()
    with fs.open("/keel/board.json", "r") as f:
        assert json.load(f) == json.loads((REPO / "boards" / BOARD / "board.json").read_text())
    boot = _bootloader_module(system_dir)
    names = set(fs.listdir("/keel/m/bl"))
    assert {"keel_boot.mpy", "module_format.mpy", "romfs.mpy", "flashfs.mpy",
            "port_esp32.mpy", ".sha256"} <= names
    assert "port_nrf.mpy" not in names
    with fs.open("/keel/m/bl/.sha256", "r") as f:
        assert f.read() == boot.data[boot.info.header_size + boot.info.payload_size :][:32].hex()
    with fs.open("/keel/m/bl/keel_boot.mpy", "rb") as f:
        assert f.read(1) == b"M"  # .mpy


MOUNT_ON_VM = r"""
import vfs, sys
class Dev:
    def __init__(self, data):
        self.data = data
    def readblocks(self, n, buf, off=0):
        s = n * 4096 + off
        buf[:] = self.data[s : s + len(buf)]
    def writeblocks(self, n, buf, off=None):
        s = n * 4096 + (off or 0)
        self.data[s : s + len(buf)] = buf
    def ioctl(self, op, arg):
        if op == 4: return len(self.data) // 4096
        if op == 5: return 4096
        if op == 6: return 0
with open(sys.argv[1], "rb") as f:
    dev = Dev(bytearray(f.read()))
vfs.mount(vfs.VfsLfs2(dev), "/fs")
print(sorted(__import__("os").listdir("/fs/keel/m/bl")))
with open("/fs/boot.py") as f:
    print(len(f.read()))
"""


def test_filesystem_mounted_by_micropython(built, tmp_path):
    """MicroPython's own littlefs driver (the unix VM's VfsLfs2) mounts fs.bin."""
    out, _ = built
    script = tmp_path / "mount.py"
    script.write_text(MOUNT_ON_VM)
    proc = subprocess.run([micropython(), str(script), str(out / "fs.bin")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listing, size = proc.stdout.splitlines()
    assert "keel_boot.mpy" in listing and ".sha256" in listing
    assert int(size) == len((REPO / "bootloader" / "stage0.py").read_text())


def test_app_image_with_bootloader(tmp_path, system_dir):
    (tmp_path / "micropython.bin").write_bytes(app_image())
    (tmp_path / "bootloader.bin").write_bytes(bootloader_image())
    result = esp32image.build_image(BOARD, tmp_path / "micropython.bin", tmp_path / "out",
                                    system_dir, bootloader_path=tmp_path / "bootloader.bin")
    assert result.firmware.source == "app image and bootloader"
    merged = (tmp_path / "out" / "merged.bin").read_bytes()
    assert merged[0x1000 : 0x1000 + len(bootloader_image())] == bootloader_image()
    assert merged[0x10000 : 0x10000 + len(app_image())] == app_image()


def test_merged_from_zero_accepted_as_firmware(built, tmp_path, system_dir):
    out, _ = built
    result = esp32image.build_image(BOARD, out / "merged.bin", tmp_path / "again", system_dir)
    assert result.firmware.source == "full-flash image from 0x0"
    assert (tmp_path / "again" / "merged.bin").read_bytes() == (out / "merged.bin").read_bytes()


def test_the_firmware_says_whether_code_runs_in_place(built, tmp_path, system_dir, keel_cli):
    """A stock build (no vfs.rom_ioctl among its names): extracted, and said; a build
    with MICROPY_VFS_ROM: in place. The table is the same for both (Keel's slots in
    the romfs partition); only the firmware decides."""
    _, stdout = built
    assert "ROMFS           no (a stock build)" in stdout
    names = STOCK_NAMES + b"mount\0umount\0VfsRom\0rom_ioctl\0VfsLfs2\0"
    fw = tmp_path / "ESP32_GENERIC_ROMFS.bin"
    fw.write_bytes(full_flash(app_image(names=names)))
    out = keel_cli("image", "esp32", "--board", BOARD, "--firmware", fw, "--system", system_dir,
                   "-o", tmp_path / "o")
    assert "ROMFS           yes (vfs.rom_ioctl)" in out.stdout, out.stdout + out.stderr
    assert (tmp_path / "o" / "partition-table.bin").read_bytes() == \
        (built[0] / "partition-table.bin").read_bytes()


def test_with_an_app(tmp_path, firmware, system_dir):
    from keel import build

    app = build.build_app(REPO / "examples" / "hello", "esp32", None, tmp_path / "app.bin")
    result = esp32image.build_image(BOARD, firmware, tmp_path / "out", system_dir, [app])
    user = load_board(BOARD).partition("user")
    assert [f.offset for f in result.files if f.name == "keel-user.bin"] == [user.offset]
    merged = (tmp_path / "out" / "merged.bin").read_bytes()
    assert merged[user.offset : user.offset + app.stat().st_size] == app.read_bytes()


# ------------------------------------------------------------------ refused inputs


def _image_cli(keel_cli, tmp_path, firmware, *extra, system=None):
    args = ["image", "esp32", "--board", BOARD, "--firmware", firmware, "-o", tmp_path / "o"]
    if system:
        args += ["--system", system]
    return keel_cli(*args, *extra)


@pytest.mark.parametrize("content, needle", [
    (b"\x00" * 70000, "not an ESP32 image (starts with 0x00, not 0xe9)"),
    (b"hello world\n", "not an ESP32 image"),
    (b"\x7fELF" + b"\x00" * 60, "an ELF file"),
    (b"UF2\n" + b"\x00" * 508, "a UF2 file"),
    (b"", "not an ESP32 image (starts with nothing"),
])
def test_not_an_esp32_image(keel_cli, expect_cli_error, tmp_path, system_dir, content, needle):
    (tmp_path / "fw.bin").write_bytes(content)
    proc = _image_cli(keel_cli, tmp_path, tmp_path / "fw.bin", system=system_dir)
    expect_cli_error(proc, "fw.bin", needle)
    assert not (tmp_path / "o").exists(), "nothing is written for a refused firmware"


def test_a_keel_module_is_not_firmware(keel_cli, expect_cli_error, tmp_path, system_dir):
    module = next(system_dir.glob("*.bin"))
    expect_cli_error(_image_cli(keel_cli, tmp_path, module, system=system_dir),
                     "a Keel module, not MicroPython firmware")


def test_firmware_for_another_chip(keel_cli, expect_cli_error, tmp_path, system_dir):
    (tmp_path / "s3.bin").write_bytes(full_flash(app_image(cls=ESP32S3FirmwareImage)))
    expect_cli_error(_image_cli(keel_cli, tmp_path, tmp_path / "s3.bin", system=system_dir),
                     "built for ESP32-S3, not an ESP32")


def test_corrupt_app(keel_cli, expect_cli_error, tmp_path, system_dir):
    app = bytearray(app_image())
    app[0x40] ^= 0xFF  # inside the first segment: the checksum and the digest break
    (tmp_path / "bad.bin").write_bytes(full_flash(bytes(app)))
    expect_cli_error(_image_cli(keel_cli, tmp_path, tmp_path / "bad.bin", system=system_dir),
                     "corrupt ESP32 image (checksum")


def test_truncated_app(keel_cli, expect_cli_error, tmp_path, system_dir):
    (tmp_path / "cut.bin").write_bytes(full_flash(app_image()[:3000]))
    expect_cli_error(_image_cli(keel_cli, tmp_path, tmp_path / "cut.bin", system=system_dir),
                     "truncated ESP32 image")


def test_app_without_bootloader(keel_cli, expect_cli_error, tmp_path, system_dir):
    (tmp_path / "micropython.bin").write_bytes(app_image())
    expect_cli_error(_image_cli(keel_cli, tmp_path, tmp_path / "micropython.bin",
                                system=system_dir), "without the ESP-IDF bootloader", "--bootloader")


def test_firmware_too_big_for_its_slot(keel_cli, expect_cli_error, tmp_path, system_dir):
    slot = load_board(BOARD).partition("ota_0").size
    (tmp_path / "big.bin").write_bytes(full_flash(app_image(extra=slot)))
    expect_cli_error(_image_cli(keel_cli, tmp_path, tmp_path / "big.bin", system=system_dir),
                     f"the ota_0 slot holds {slot}", "ESP32_GENERIC-OTA")


def test_module_for_another_platform(keel_cli, expect_cli_error, tmp_path, firmware):
    from keel import build

    build.build_system("virtual", None, tmp_path / "virtual")
    expect_cli_error(_image_cli(keel_cli, tmp_path, firmware, system=tmp_path / "virtual"),
                     "built for platform virtual, this device is esp32")


def test_unknown_board(keel_cli, expect_cli_error, tmp_path, firmware):
    proc = keel_cli("image", "esp32", "--board", "esp64_nope", "--firmware", firmware,
                    "-o", tmp_path / "o")
    expect_cli_error(proc, "unknown board 'esp64_nope'", "esp32_generic")


def test_board_of_another_platform(keel_cli, expect_cli_error, tmp_path, firmware):
    proc = keel_cli("image", "esp32", "--board", "nrf52840_dk", "--firmware", firmware,
                    "-o", tmp_path / "o")
    expect_cli_error(proc, "nrf52840_dk is a nrf52840 board")


# ------------------------------------------------------------------ keel flash --usb --esp32


def test_flash_needs_a_port(keel_cli, expect_cli_error, built):
    out, _ = built
    expect_cli_error(keel_cli("flash", "--usb", "--esp32", out), "--esp32 needs --port")


def test_flash_needs_usb(keel_cli, expect_cli_error, built):
    out, _ = built
    expect_cli_error(keel_cli("flash", "--esp32", out, "--port", "/dev/null"), "--usb")


def test_flash_refuses_what_is_not_an_image_dir(keel_cli, expect_cli_error, tmp_path, firmware):
    expect_cli_error(keel_cli("flash", "--usb", "--esp32", tmp_path, "--port", "/dev/null"),
                     "not a directory made by 'keel image esp32'")
    expect_cli_error(keel_cli("flash", "--usb", "--esp32", firmware, "--port", "/dev/null"),
                     "not a whole-flash ESP32 image")


def test_flash_missing_port(keel_cli, expect_cli_error, built):
    out, _ = built
    proc = keel_cli("flash", "--usb", "--esp32", out, "--port", "/dev/ttyKEEL-NO-SUCH-PORT")
    expect_cli_error(proc, "esptool on /dev/ttyKEEL-NO-SUCH-PORT",
                     "Could not open /dev/ttyKEEL-NO-SUCH-PORT")


def test_flash_talks_the_rom_protocol(built):
    """Against a port where nothing answers (a pty), esptool is really driven: the
    board side of the pty receives SLIP-framed SYNC commands of the ESP32 ROM loader
    (command 0x08, payload 07 07 12 20 and 32 × 0x55), and the failure to connect is
    one clear error, after which the logger esptool had is back in place."""
    from esp_pylib.logger import EspLog

    out, _ = built
    before = EspLog.instance
    board_side, host_side = pty.openpty()
    received = bytearray()

    def drain():
        while True:
            try:
                chunk = os.read(board_side, 4096)
            except OSError:
                return
            if not chunk:
                return
            received.extend(chunk)

    threading.Thread(target=drain, daemon=True).start()
    shown = io.StringIO()
    try:
        with pytest.raises(KeelError, match="No serial data received"):
            esp32image.flash_usb([out], os.ttyname(host_side), stream=shown)
    finally:
        os.close(host_side)
    sync = b"\xc0\x00\x08\x24\x00\x00\x00\x00\x00\x07\x07\x12\x20" + b"\x55" * 32 + b"\xc0"
    assert sync in bytes(received)
    assert "Connecting" in shown.getvalue()
    assert EspLog.instance is before
