"""What a MicroPython firmware is, and whether Keel runs on it (`keel firmware info`).

An ELF (a build's micropython.elf, or the unix port's binary) is read with pyelftools:
its symbol table says which modules and types were compiled in, `mp_frozen_names` lists
the frozen modules, the banner string gives the version and board, and linker symbols
give a heap reserved at link time. A `.bin` (an ESP32 flash image) is read with what
keel.esp32image reads (the ESP-IDF app description), and what was compiled in is told
from the interned names (qstrs) it carries as NUL-terminated strings.

The names looked for are MicroPython's own (v1.28/v1.29 sources):
- `vfs.rom_ioctl`: `mp_vfs_rom_ioctl_obj` (extmod/modvfs.c, with MICROPY_VFS_ROM_IOCTL);
- `esp32.Partition`: `esp32_partition_type` (ports/esp32/modesp32.c, esp32_partition.c);
- `nrf.Flash`: `nrf_flashbdev_type` (ports/nrf/modules/nrf/modnrf.c, flashbdev.c);
- `tls`: `mp_module_tls` (extmod/modtls_mbedtls.c, modtls_axtls.c);
- `network`: `mp_module_network` (extmod/modnetwork.c);
- frozen modules: `mp_frozen_names` (py/frozenmod.c: names, each NUL-terminated, then an
  empty one)."""

import re
from dataclasses import dataclass, field
from pathlib import Path

from keel.errors import KeelError

# feature: (ELF symbols, any of which shows it; the qstr a .bin then carries)
FEATURES = {
    "vfs.rom_ioctl": (("mp_vfs_rom_ioctl_obj", "mp_vfs_rom_ioctl"), b"rom_ioctl"),
    "esp32.Partition": (("esp32_partition_type",), b"Partition"),
    "nrf.Flash": (("nrf_flashbdev_type",), b"Flash"),
    "tls": (("mp_module_tls",), b"tls"),
    "network": (("mp_module_network",), b"network"),
}
# What Keel needs on each port, and what it can do without (docs/boards/).
NEEDS = {
    "esp32": {"esp32.Partition": "Keel's modules live in a partition of the flash",
              "tls": "the cloud session is TLS",
              "network": "the board joins WiFi"},
    "nrf": {"nrf.Flash": "Keel's modules live in the flash past the filesystem"},
    "unix": {"tls": "the cloud session is TLS"},
}
OPTIONAL = {"vfs.rom_ioctl": "Keel's code runs in place from ROMFS (without it, it is extracted "
                             "to the filesystem and an update over the air may not fit beside "
                             "the cloud session on an ESP32)"}
# The port, from a module or type only it has.
PORT_SIGNS = (("esp32", ("mp_module_esp32", "esp32_partition_type")),
              ("nrf", ("mp_module_nrf", "nrf_flashbdev_type")),
              ("rp2", ("mp_module_rp2",)),
              ("unix", ("mp_type_vfs_posix", "mp_module_termios", "mp_module_ffi")))
_BANNER = re.compile(rb"MicroPython (v?[0-9][^ ;]*) on ([0-9-]+); ([^\0\[]+?)(?: \[|\0| version)")
_VERSION = re.compile(rb"(?:MicroPython v|Linux-|Darwin-)([0-9]+\.[0-9]+\.[0-9]+(?:-(?:preview|alpha|beta|rc)[.0-9]*)?)")
HEAP_SYMBOLS = (("_heap_start", "_heap_end"), ("__HeapBase", "__HeapLimit"))


@dataclass
class FirmwareInfo:
    path: Path
    kind: str  # "elf" or "esp32-bin"
    version: str | None = None
    port: str | None = None
    board: str | None = None
    features: dict = field(default_factory=dict)  # name: True/False
    frozen: list | None = None  # names, or None when the file does not say
    heap: dict | None = None  # {"bytes", "from"}: reserved at link time
    note: str | None = None  # how it was read (a launcher followed, say)
    image: dict | None = None  # an ESP32 app: what esptool's image reader gives

    def keel(self) -> dict:
        """{"ok", "missing": [{"feature", "why"}], "without": [{"feature", "why"}]}."""
        needs = NEEDS.get(self.port or "", {})
        missing = [{"feature": f, "why": why} for f, why in needs.items() if not self.features.get(f)]
        without = [{"feature": f, "why": why} for f, why in OPTIONAL.items() if not self.features.get(f)]
        return {"ok": self.port in NEEDS and not missing, "missing": missing, "without": without}

    def refusal(self) -> str | None:
        """Why Keel cannot run on it, in one sentence (None when it can)."""
        verdict = self.keel()
        if self.port not in NEEDS:
            return f"a MicroPython firmware for port {self.port or 'unknown'}, which Keel does not support"
        if verdict["missing"]:
            return "it lacks " + "; ".join(f"{m['feature']} ({m['why']})" for m in verdict["missing"])
        return None

    def to_dict(self) -> dict:
        return {"file": str(self.path), "kind": self.kind, "version": self.version, "port": self.port,
                "board": self.board, "features": self.features, "frozen": self.frozen,
                "heap": self.heap, "note": self.note, "image": self.image, "keel": self.keel()}


def info(path: Path | str) -> FirmwareInfo:
    path = Path(path)
    try:
        head = path.read_bytes()[:4096]
    except IsADirectoryError:
        raise KeelError(f"{path}: a folder, not a firmware file") from None
    except OSError as e:
        raise KeelError(f"{path}: {e.strerror}") from None
    note = None
    if head.startswith(b"#!") and b"micropython_unix" in head:
        # The VM's launcher (pip's console script): the VM itself is an extension module.
        path, note = _vm_extension(), f"{path} is a launcher; read the VM it runs"
        head = path.read_bytes()[:4]
    if head[:4] == b"\x7fELF":
        found = _from_elf(path)
    elif head[:1] == b"\xe9":
        found = _from_esp32_bin(path)
    else:
        raise KeelError(f"{path}: not a MicroPython firmware (an ELF, or an ESP32 .bin)")
    found.note = note
    return found


def _vm_extension() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("micropython_run")
    if spec is None or not spec.origin:
        raise KeelError("the MicroPython VM's extension (micropython_run) is not installed")
    return Path(spec.origin)


def _from_elf(path: Path) -> FirmwareInfo:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            symbols = {}
            for section in elf.iter_sections():
                if isinstance(section, SymbolTableSection):
                    for symbol in section.iter_symbols():
                        if symbol.name:
                            symbols.setdefault(symbol.name, symbol)
            rodata = b"".join(s.data() for s in elf.iter_sections()
                              if s.name in (".rodata", ".flash.rodata", ".data") and s["sh_type"] != "SHT_NOBITS")
            frozen = None
            if "mp_frozen_names" in symbols:
                frozen = _strings_at(elf, symbols["mp_frozen_names"]["st_value"])
    except (ELFError, OSError) as e:
        raise KeelError(f"{path}: cannot read the ELF ({e})") from None
    if not symbols:
        raise KeelError(f"{path}: a stripped ELF (no symbol table): give the build's micropython.elf")
    if "mp_execute_bytecode" not in symbols and "mp_init" not in symbols:
        raise KeelError(f"{path}: an ELF, but not MicroPython (no mp_init)")
    found = FirmwareInfo(path, "elf")
    found.features = {name: any(s in symbols for s in names) for name, (names, _) in FEATURES.items()}
    found.port = next((port for port, signs in PORT_SIGNS if any(s in symbols for s in signs)), None)
    found.frozen = frozen
    banner = _BANNER.search(rodata)
    if banner:
        found.board = banner[3].decode(errors="replace").strip()
    version = _VERSION.search(rodata)
    if version:
        found.version = version[1].decode()
    elif banner and banner[1][:1] == b"v":
        found.version = banner[1][1:].decode(errors="replace")
    for start, end in HEAP_SYMBOLS:
        if start in symbols and end in symbols:
            size = symbols[end]["st_value"] - symbols[start]["st_value"]
            if size > 0:
                found.heap = {"bytes": size, "from": f"{start} .. {end}"}
                break
    return found


def _strings_at(elf, address: int) -> list[str]:
    """NUL-terminated names from address up to an empty one."""
    for segment in elf.iter_segments():
        if segment["p_type"] == "PT_LOAD" and segment["p_vaddr"] <= address < segment["p_vaddr"] + segment["p_filesz"]:
            data = segment.data()[address - segment["p_vaddr"]:]
            break
    else:
        for section in elf.iter_sections():  # an object file: by section
            if section["sh_addr"] <= address < section["sh_addr"] + section["sh_size"] and section.data():
                data = section.data()[address - section["sh_addr"]:]
                break
        else:
            return []
    names = []
    for raw in data.split(b"\0"):
        if not raw:
            break
        names.append(raw.decode(errors="replace"))
    return names


def _from_esp32_bin(path: Path) -> FirmwareInfo:
    from keel import esp32image

    firmware = esp32image.load_firmware(path)
    found = esp32_app(path, firmware.app, firmware.app_image.app_desc)
    found.image = _esptool_view(firmware.app)
    return found


def _esptool_view(app: bytes) -> dict:
    """The app as esptool's image reader (esptool.bin_image) sees it: entry point, flash
    settings, and its segments with their load addresses."""
    from esptool.bin_image import LoadFirmwareImage

    image = LoadFirmwareImage("esp32", app)
    return {"chip": "esp32", "entry": f"0x{image.entrypoint:08x}",
            "flash_mode": image.flash_mode, "flash_size_freq": image.flash_size_freq,
            "segments": [{"address": f"0x{s.addr:08x}", "size": len(s.data)} for s in image.segments]}


def esp32_app(path, app: bytes, desc: dict | None) -> FirmwareInfo:
    """An ESP32 MicroPython app image (keel.esp32image reads it): what its interned
    names say was compiled in."""
    desc = desc or {}
    found = FirmwareInfo(Path(path), "esp32-bin", port="esp32")
    found.version = (desc.get("version") or "").lstrip("v") or None
    found.board = desc.get("project")
    found.features = {name: b"\0" + qstr + b"\0" in app for name, (_, qstr) in FEATURES.items()}
    found.features["nrf.Flash"] = False  # ("Flash" is a common name: not this one's)
    return found


def check_esp32_app(path, app: bytes, desc: dict | None) -> None:
    """Refuse (KeelError, with the reason) an ESP32 firmware Keel cannot run on."""
    refusal = esp32_app(path, app, desc).refusal()
    if refusal:
        raise KeelError(f"{path}: Keel does not run on this firmware: {refusal}")


def text(found: FirmwareInfo) -> str:
    lines = [f"file            {found.path} ({'ELF' if found.kind == 'elf' else 'ESP32 flash image'})"]
    if found.note:
        lines.append(f"                ({found.note})")
    lines += [f"MicroPython     {found.version or 'unknown'}",
              f"port            {found.port or 'unknown'}",
              f"board           {found.board or 'unknown'}"]
    for name, present in found.features.items():
        lines.append(f"{name:<15} {'present' if present else 'absent'}")
    if found.frozen is not None:
        lines.append(f"frozen modules  {len(found.frozen)}: {', '.join(found.frozen) or 'none'}")
    lines.append("heap            " + (f"{found.heap['bytes']} bytes ({found.heap['from']})" if found.heap
                                       else "not reserved in the file (allocated at run time)"))
    if found.image:
        lines.append(f"image           entry {found.image['entry']}, {len(found.image['segments'])} segments: "
                     + ", ".join(f"{s['address']} ({s['size']} bytes)" for s in found.image["segments"]))
    verdict = found.keel()
    refusal = found.refusal()
    lines.append("Keel            " + ("runs on it" if refusal is None else f"does not run on it: {refusal}"))
    for w in verdict["without"]:
        lines.append(f"                without {w['feature']}: {w['why']}")
    return "\n".join(lines)
