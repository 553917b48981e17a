"""keel image esp32: everything that goes on a blank ESP32, from a stock MicroPython
firmware the user supplies and Keel's module images.

What is accepted as --firmware (checked before anything is written):

- the full-flash MicroPython download (ESP32_GENERIC-OTA-<date>-v1.25.0.bin), written
  at 0x1000: the ESP-IDF second-stage bootloader at its start, MicroPython's own
  partition table 0x7000 in, and the app where that table's first app partition is;
- the same laid out from 0x0 (an `esptool merge-bin` image);
- the app image alone (micropython.bin from a build), together with --bootloader
  (the build's bootloader.bin): an app alone cannot start a blank chip.

Each ESP-IDF image is read the way the ROM and the IDF bootloader read it (see
Espressif's "App Image Format"): magic 0xE9, the chip id in the extended header
(0 = ESP32), the segments, the XOR checksum and the appended SHA-256. The app must
carry the IDF app description (magic 0xABCD5432) and fit the board's ota_0 slot.

What is written (docs/boards/esp32.md, "Image and flashing"): the IDF bootloader, a
partition table in ESP-IDF's binary format made from the board's layout, the
MicroPython app in ota_0, each Keel module in its slot, fs.bin (LittleFS holding the
bootloader's stage 0, the board definition and the bootloader's code), merged.bin (the
whole flash), flash-layout.json (what goes where, read by keel flash --usb --esp32)
and flash-command.txt (the esptool commands)."""

import hashlib
import json
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from keel import build, factory
from keel import module_format as mf
from keel.boards import Board, load_board
from keel.errors import KeelError
from keel.firmware import check_esp32_app
from keel.images import Image, folder_images, load_valid_image

BOOTLOADER_OFFSET = 0x1000  # where the ESP32 ROM looks for the second-stage bootloader
TABLE_OFFSET = 0x8000  # where the IDF bootloader looks for the partition table
TABLE_MAX = 0xC00  # the table's bytes (then 1 KiB left in the sector for a signature)
LAYOUT_FILE = "flash-layout.json"
COMMAND_FILE = "flash-command.txt"
MERGED_FILE = "merged.bin"

IMAGE_MAGIC = 0xE9
CHECKSUM_SEED = 0xEF
APP_DESC_MAGIC = 0xABCD5432
ESP32_CHIP_ID = 0
CHIP_NAMES = {0: "ESP32", 2: "ESP32-S2", 5: "ESP32-C3", 9: "ESP32-S3", 12: "ESP32-C2",
              13: "ESP32-C6", 16: "ESP32-H2", 18: "ESP32-P4", 20: "ESP32-C61", 23: "ESP32-C5"}

TABLE_ENTRY = struct.Struct("<2sBBII16sI")  # magic, type, subtype, offset, size, name, flags
TABLE_ENTRY_MAGIC = b"\xaa\x50"
TABLE_MD5_MAGIC = b"\xeb\xeb" + b"\xff" * 14
TYPES = {"app": 0x00, "data": 0x01}
SUBTYPES = {
    "app": {"factory": 0x00, "test": 0x20, **{f"ota_{n}": 0x10 + n for n in range(16)}},
    "data": {"ota": 0x00, "phy": 0x01, "nvs": 0x02, "coredump": 0x03, "nvs_keys": 0x04,
             "efuse": 0x05, "undefined": 0x06, "fat": 0x81, "spiffs": 0x82, "littlefs": 0x83},
}


# ------------------------------------------------------------------ reading images


@dataclass
class EspImage:
    """An ESP-IDF image (app or bootloader) as its header and segments say."""

    chip_id: int
    entry: int
    segments: list[tuple[int, int]]  # (load address, length)
    size: int  # bytes from the magic to the end of the SHA-256 (or the checksum)
    app_desc: dict | None = None

    @property
    def chip(self) -> str:
        return CHIP_NAMES.get(self.chip_id, f"chip id {self.chip_id}")


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def read_esp_image(data: bytes, what: str) -> EspImage:
    """Check an ESP-IDF image for an ESP32: header, chip, segments, checksum, SHA-256."""
    if len(data) < 24 or data[0] != IMAGE_MAGIC:
        first = f"0x{data[0]:02x}" if data else "nothing"
        raise KeelError(f"{what}: not an ESP32 image (starts with {first}, not 0xe9)")
    count, entry = data[1], struct.unpack_from("<I", data, 4)[0]
    chip_id = struct.unpack_from("<H", data, 12)[0]
    hash_appended = data[23]
    if chip_id != ESP32_CHIP_ID:
        name = CHIP_NAMES.get(chip_id, f"chip id {chip_id}")
        raise KeelError(f"{what}: built for {name}, not an ESP32 (the image's chip id is {chip_id})")
    if not 1 <= count <= 16:
        raise KeelError(f"{what}: corrupt ESP32 image ({count} segments)")
    at, checksum, segments = 24, CHECKSUM_SEED, []
    for n in range(count):
        if at + 8 > len(data):
            raise KeelError(f"{what}: truncated ESP32 image (segment {n} of {count} missing)")
        addr, length = struct.unpack_from("<II", data, at)
        at += 8
        if at + length > len(data):
            raise KeelError(f"{what}: truncated ESP32 image (segment {n} runs past the end)")
        for byte in data[at : at + length]:
            checksum ^= byte
        segments.append((addr, length))
        at += length
    at = (at | 15) + 1  # the checksum is the last byte of a 16-byte unit
    if at > len(data):
        raise KeelError(f"{what}: truncated ESP32 image (no checksum)")
    if data[at - 1] != checksum:
        raise KeelError(f"{what}: corrupt ESP32 image (checksum 0x{data[at - 1]:02x}, "
                        f"segments give 0x{checksum:02x})")
    if hash_appended == 1:
        if at + 32 > len(data):
            raise KeelError(f"{what}: truncated ESP32 image (no SHA-256)")
        if hashlib.sha256(data[:at]).digest() != data[at : at + 32]:
            raise KeelError(f"{what}: corrupt ESP32 image (SHA-256 mismatch)")
        at += 32
    image = EspImage(chip_id, entry, segments, at)
    if data[24 + 8 : 24 + 12] == struct.pack("<I", APP_DESC_MAGIC):
        desc = data[32 : 32 + 256]
        image.app_desc = {"version": _cstr(desc[16:48]), "project": _cstr(desc[48:80]),
                          "idf": _cstr(desc[112:144])}
    return image


def read_partition_table(data: bytes, what: str) -> list[dict]:
    """A binary ESP-IDF partition table (only what finding the app needs)."""
    entries, md5 = [], hashlib.md5()
    for at in range(0, TABLE_MAX, TABLE_ENTRY.size):
        raw = data[at : at + TABLE_ENTRY.size]
        if raw[:2] == b"\xff\xff":
            return entries
        if raw[:2] == TABLE_MD5_MAGIC[:2]:
            if raw[16:] != md5.digest():
                raise KeelError(f"{what}: corrupt partition table (MD5 mismatch)")
            continue
        if raw[:2] != TABLE_ENTRY_MAGIC:
            raise KeelError(f"{what}: corrupt partition table (entry {at // 32})")
        md5.update(raw)
        _, ptype, subtype, offset, size, name, _ = TABLE_ENTRY.unpack(raw)
        entries.append({"type": ptype, "subtype": subtype, "offset": offset, "size": size,
                        "label": _cstr(name)})
    raise KeelError(f"{what}: corrupt partition table (no end)")


@dataclass
class Firmware:
    """What the user's MicroPython firmware gives: the IDF bootloader and the app."""

    bootloader: bytes
    app: bytes
    app_image: EspImage
    source: str = ""

    @property
    def has_romfs(self) -> bool:
        """Whether the firmware was built with MICROPY_VFS_ROM: its interned names then
        hold "rom_ioctl" (vfs.rom_ioctl), a NUL-terminated string among the others in
        its read-only data; a build without it never names it (qstrs are collected
        from the sources the build compiles). Read from the bytes, not run."""
        return b"\0rom_ioctl\0" in self.app


def _sniff(data: bytes, what: str) -> None:
    """A clear word for the usual wrong files, before the generic one."""
    if data[:4] == b"\x7fELF":
        raise KeelError(f"{what}: an ELF file, not a flash image: give the firmware .bin "
                        "(or convert it with: esptool --chip esp32 elf2image FILE)")
    if data[:4] == b"UF2\n":
        raise KeelError(f"{what}: a UF2 file, not an ESP32 flash image (UF2 is for the "
                        "nRF52840 and ESP32-S2/S3 boards)")
    if data[:4] == mf.MAGIC:
        raise KeelError(f"{what}: a Keel module, not MicroPython firmware")


def _full_image_base(data: bytes) -> int | None:
    """The flash address a full-flash image starts at (0x1000 or 0), else None."""
    for base in (BOOTLOADER_OFFSET, 0):
        table = TABLE_OFFSET - base
        boot = BOOTLOADER_OFFSET - base
        if data[boot : boot + 1] == bytes([IMAGE_MAGIC]) and \
                data[table : table + 2] == TABLE_ENTRY_MAGIC:
            return base
    return None


def load_firmware(path: Path | str, bootloader_path: Path | str | None = None) -> Firmware:
    """Read and check the user's MicroPython firmware (see the module's doc)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeelError(f"{path}: {e.strerror}") from None
    _sniff(data, str(path))
    base = _full_image_base(data)
    if base is not None:
        if bootloader_path:
            raise KeelError(f"{path}: a full-flash image already holds a bootloader: "
                            "leave out --bootloader")
        boot = data[BOOTLOADER_OFFSET - base :]
        table = read_partition_table(data[TABLE_OFFSET - base :], f"{path} (at 0x8000)")
        apps = [p for p in table if p["type"] == TYPES["app"]]
        if not apps:
            raise KeelError(f"{path}: its partition table has no app partition")
        app_at = min(p["offset"] for p in apps) - base
        boot_image = read_esp_image(boot, f"{path} (bootloader at 0x1000)")
        app = data[app_at:]
        source = f"full-flash image from 0x{base:x}"
    else:
        app = data
        if not bootloader_path:
            read_esp_image(app, str(path))  # the clearest error when it is not one at all
            raise KeelError(
                f"{path}: an ESP32 app image without the ESP-IDF bootloader: give the full "
                "MicroPython firmware (ESP32_GENERIC-OTA-...bin, written at 0x1000), or "
                "--bootloader BOOTLOADER.bin from the same build")
        try:
            boot = Path(bootloader_path).read_bytes()
        except OSError as e:
            raise KeelError(f"{bootloader_path}: {e.strerror}") from None
        boot_image = read_esp_image(boot, str(bootloader_path))
        source = "app image and bootloader"
    if boot_image.app_desc is not None:
        raise KeelError(f"{path}: what sits at 0x1000 is an app, not the ESP-IDF bootloader")
    app_image = read_esp_image(app, f"{path} (app)")
    if app_image.app_desc is None:
        raise KeelError(f"{path}: not a MicroPython app (no ESP-IDF app description): "
                        "is it a bootloader?")
    return Firmware(boot[: boot_image.size], app[: app_image.size], app_image, source)


# ------------------------------------------------------------------ writing


def _idf_code(value: str, table: dict, what: str) -> int:
    if value in table:
        return table[value]
    try:
        return int(value, 0)
    except ValueError:
        raise KeelError(f"{what}: unknown ESP-IDF {value!r}") from None


def partition_table(board: Board) -> bytes:
    """The board's layout in ESP-IDF's binary format: a 32-byte entry per partition
    that has "idf" in board.json, the MD5 entry over them, 0xFF to 0xC00 bytes."""
    out = b""
    for p in board.data["flash"]["partitions"]:
        idf = p.get("idf")
        if not idf:
            continue  # the bootloader and the table itself are not entries
        what = f"board {board.name}, partition {p['label']}"
        ptype = _idf_code(idf["type"], TYPES, what)
        subtype = _idf_code(idf["subtype"], SUBTYPES.get(idf["type"], {}), what)
        label = idf.get("label", p["label"]).encode()
        if len(label) > 16:
            raise KeelError(f"{what}: an ESP-IDF label has at most 16 bytes")
        if ptype == TYPES["app"] and p["offset"] % 0x10000:
            raise KeelError(f"{what}: an app partition must start on a 64 KiB boundary")
        out += TABLE_ENTRY.pack(TABLE_ENTRY_MAGIC, ptype, subtype, p["offset"], p["size"], label, 0)
    out += TABLE_MD5_MAGIC + hashlib.md5(out).digest()
    if len(out) > TABLE_MAX:
        raise KeelError(f"board {board.name}: too many partitions for an ESP-IDF table")
    return out + b"\xff" * (TABLE_MAX - len(out))


@dataclass
class FlashFile:
    offset: int
    name: str
    data: bytes
    what: str


@dataclass
class Esp32Image:
    """What `keel image esp32` wrote."""

    out_dir: Path
    files: list[FlashFile] = field(default_factory=list)
    merged: Path | None = None
    firmware: Firmware | None = None

    def command(self, port: str = "PORT") -> str:
        return esptool_command(self.files, port)


def esptool_command(files: list[FlashFile], port: str = "PORT") -> str:
    pairs = " ".join(f"0x{f.offset:x} {f.name}" for f in files)
    tool = f"esptool --chip esp32 --port {port} --baud 460800"
    return (f"# a blank board: erase, then write every part\n{tool} erase-flash\n"
            f"{tool} write-flash {pairs}\n"
            f"# or the same in one file (the whole flash)\n{tool} write-flash 0x0 {MERGED_FILE}\n")


def _slot_name(board: Board, image: Image) -> str:
    return f"keel-{board.slot_for(image.info.function, image.info.index).label}.bin"


def board_modules(board: Board, system_dir: Path | None, apps: list[Path]) -> list[Image]:
    """The modules to install: system_dir's, or the tree's system built for the board."""
    from keel.vdev import check_images_for_board  # the same checks as a virtual device

    if system_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            paths = build.build_system(board.platform, None, Path(tmp))
            images = [load_valid_image(p) for p in paths]
    else:
        images = folder_images(system_dir)
    images += [load_valid_image(p) for p in apps]
    check_images_for_board(board, images)
    present = {(i.info.function, i.info.index) for i in images}
    for p in board.partitions:
        if p.function in (mf.FUNCTION_BOOTLOADER, mf.FUNCTION_SYSTEM_PART) and \
                (p.function, p.index) not in present:
            name = mf.function_name(p.function) + (f" {p.index}" if p.index else "")
            raise KeelError(f"{system_dir}: no {name} module")
    return images


def check_board_signatures(modules: list[Image], fs_files: dict, system_dir) -> None:
    """A board set up to trust keys installs only modules signed by one of them: refuse
    the set-up before writing anything when it would not."""
    from keel.vdev import check_signatures

    trusted = factory.trusted_keys(fs_files)
    if trusted and system_dir is None:
        raise KeelError("a board that trusts keys needs a signed system: build one with "
                        "keel build system --sign KEYFILE and give it with --system")
    check_signatures(modules, trusted)


def _fit(board: Board, label: str, data: bytes, what: str) -> int:
    part = board.partition(label)
    if len(data) > part.size:
        raise KeelError(f"{what}: {len(data)} bytes do not fit the {label} partition "
                        f"({part.size} bytes at 0x{part.offset:x})")
    return part.offset


def build_image(
    board_name: str,
    firmware_path: Path | str,
    out_dir: Path | str,
    system_dir: Path | str | None = None,
    apps: list[Path | str] = (),
    bootloader_path: Path | str | None = None,
    trusted: list[bytes] | None = None,
) -> Esp32Image:
    """Check every input, then write the files for a blank ESP32 into out_dir.
    trusted: raw public keys the board trusts (--trust; docs/signing.md)."""
    board = load_board(board_name)
    if board.platform != "esp32":
        raise KeelError(f"board {board_name} is a {board.platform} board, not an esp32 one")
    firmware = load_firmware(firmware_path, bootloader_path)
    check_esp32_app(firmware_path, firmware.app, firmware.app_image.app_desc)
    vm_slot = board.partition("ota_0")
    if len(firmware.app) > vm_slot.size:
        raise KeelError(
            f"{firmware_path}: the MicroPython app is {len(firmware.app)} bytes, the "
            f"ota_0 slot holds {vm_slot.size}: use the firmware's OTA variant "
            "(ESP32_GENERIC-OTA), which is built to fit")
    modules = board_modules(board, Path(system_dir) if system_dir else None, [Path(a) for a in apps])
    boot_module = next(i for i in modules if i.info.function == mf.FUNCTION_BOOTLOADER)
    fs_part = board.partition("fs")
    fs_files = factory.device_files(board.data, boot_module, trusted)
    check_board_signatures(modules, fs_files, system_dir)
    fs = factory.make_filesystem(fs_files, board.block_size, fs_part.size)

    files = [
        FlashFile(_fit(board, "idf-bootloader", firmware.bootloader, "the ESP-IDF bootloader"),
                  "idf-bootloader.bin", firmware.bootloader, "ESP-IDF second-stage bootloader"),
        FlashFile(TABLE_OFFSET, "partition-table.bin", partition_table(board),
                  "partition table"),
        FlashFile(vm_slot.offset, "micropython.bin", firmware.app, "MicroPython (ota_0)"),
    ]
    for image in sorted(modules, key=lambda i: board.slot_for(i.info.function, i.info.index).offset):
        slot = board.slot_for(image.info.function, image.info.index)
        files.append(FlashFile(slot.offset, _slot_name(board, image), image.data, image.name))
    files.append(FlashFile(fs_part.offset, "fs.bin", fs, "LittleFS (mounted at /)"))

    merged = bytearray(b"\xff" * board.flash_size)
    for f in files:
        merged[f.offset : f.offset + len(f.data)] = f.data
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise KeelError(f"{out}: not a directory")
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        (out / f.name).write_bytes(f.data)
    (out / MERGED_FILE).write_bytes(merged)
    layout = {"chip": "esp32", "board": board.name, "flash_size": board.flash_size,
              "files": [{"offset": f.offset, "file": f.name, "what": f.what} for f in files],
              "merged": MERGED_FILE}
    (out / LAYOUT_FILE).write_text(json.dumps(layout, indent=2) + "\n")
    result = Esp32Image(out, files, out / MERGED_FILE, firmware)
    (out / COMMAND_FILE).write_text(result.command())
    return result


# ------------------------------------------------------------------ flashing over USB


def flash_plan(targets: list[Path | str]) -> list[FlashFile]:
    """What `keel flash --usb --esp32` writes: a directory made by `keel image esp32`
    (each part at its offset, from flash-layout.json), or one whole-flash image (its
    merged.bin, from 0x0). Every file is checked before the board is touched."""
    if len(targets) != 1:
        raise KeelError("--esp32 takes one directory made by 'keel image esp32' "
                        f"(or its {MERGED_FILE})")
    target = Path(targets[0])
    if target.is_dir():
        try:
            layout = json.loads((target / LAYOUT_FILE).read_text())
            files = [FlashFile(e["offset"], e["file"], (target / e["file"]).read_bytes(),
                               e.get("what", "")) for e in layout["files"]]
        except (OSError, ValueError, KeyError) as e:
            raise KeelError(f"{target}: not a directory made by 'keel image esp32' ({e})") from None
        by_name = {f.name: f for f in files}
        for name in ("idf-bootloader.bin", "micropython.bin"):
            if name not in by_name:
                raise KeelError(f"{target}: {LAYOUT_FILE} lists no {name}")
        read_esp_image(by_name["idf-bootloader.bin"].data, str(target / "idf-bootloader.bin"))
        app = read_esp_image(by_name["micropython.bin"].data, str(target / "micropython.bin"))
        check_esp32_app(target / "micropython.bin", by_name["micropython.bin"].data, app.app_desc)
        return files
    try:
        data = target.read_bytes()
    except OSError as e:
        raise KeelError(f"{target}: {e.strerror}") from None
    if _full_image_base(data) != 0:
        raise KeelError(f"{target}: not a whole-flash ESP32 image (one written at 0x0, with "
                        "the bootloader at 0x1000 and a partition table at 0x8000)")
    read_esp_image(data[BOOTLOADER_OFFSET:], f"{target} (bootloader at 0x1000)")
    firmware = load_firmware(target)
    check_esp32_app(target, firmware.app, firmware.app_image.app_desc)
    return [FlashFile(0, target.name, data, "the whole flash")]


def _esptool_logger(stream):
    """An esptool logger that prints esptool's messages and draws its progress as
    one bar per step on stream (a terminal: redrawn in place)."""
    from esptool.logger import TemplateLogger

    from keel.progress import bar

    class KeelEsptoolLog(TemplateLogger):
        def __init__(self):
            self.tty = stream.isatty()
            self.last = None

        def _line(self, text):
            if self.last is not None and self.tty:
                stream.write("\n")
            self.last = None
            stream.write(f"{text}\n")
            stream.flush()

        def print(self, *args, sep=" ", end="\n", **kwargs):
            if self.last is not None and self.tty:
                stream.write("\n")
            self.last = None
            stream.write(sep.join(str(a) for a in args) + end)
            stream.flush()

        def note(self, message):
            self._line(f"note: {message}")

        def warning(self, message):
            self._line(f"warning: {message}")

        def error(self, message):
            self._line(f"error: {message}")

        def stage(self, finish=False):
            pass

        def set_verbosity(self, verbosity):
            pass

        def progress_bar(self, cur_iter, total_iters, prefix="", suffix="", bar_length=30):
            percent = 100 * cur_iter // max(total_iters, 1)
            step = (prefix.strip().split(" at ")[0] or "esptool", percent)
            if step == self.last or (not self.tty and percent % 25 and cur_iter < total_iters):
                return
            self.last = step
            drawn = bar(cur_iter, total_iters).rsplit(" ", 2)[0]  # the bar and percent only
            text = f"{step[0]:<10} {drawn}"
            stream.write(("\r" + text) if self.tty else text + "\n")
            if self.tty and cur_iter >= total_iters:
                stream.write("\n")
                self.last = None
            stream.flush()

    return KeelEsptoolLog()


def flash_usb(targets: list[Path | str], port: str | None, baud: int = 460800,
              stream=None) -> list[FlashFile]:
    """Write a blank ESP32 with esptool's library API: connect (ROM bootloader, then
    esptool's stub), check it is an ESP32, erase the whole flash, write every part,
    verify every part against its MD5 on the chip, and hard-reset into the firmware."""
    import sys

    files = flash_plan(targets)
    if not port:
        raise KeelError("--esp32 needs --port: the board's serial port (e.g. /dev/ttyUSB0)")
    from esp_pylib.logger import EspLog
    from esptool import cmds
    from esptool.logger import log
    from esptool.util import FatalError

    saved = EspLog.instance
    log.set_logger(_esptool_logger(stream or sys.stderr))
    esp = None
    try:
        esp = cmds.detect_chip(port, connect_attempts=3)
        if esp.CHIP_NAME != "ESP32":
            raise KeelError(f"{port}: the chip is an {esp.CHIP_NAME}, this image is for an ESP32")
        esp = cmds.run_stub(esp)
        if baud and baud != esp.ESP_ROM_BAUD:
            esp.change_baud(baud)
        cmds.attach_flash(esp)
        parts = [(f.offset, f.data) for f in files]
        cmds.erase_flash(esp)
        cmds.write_flash(esp, parts)
        cmds.verify_flash(esp, parts)
        cmds.reset_chip(esp, "hard-reset")
    except FatalError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KeelError(f"esptool on {port}: {first}") from None
    finally:
        if esp is not None:
            try:
                esp._port.close()
            except Exception:  # noqa: BLE001 - closing a port that already failed
                pass
        EspLog.instance = saved
    return files
