"""keel build: compile .py sources with mpy-cross into ROMFS payloads and module images."""

import fnmatch
import hashlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

from mpremote.romfs import VfsRomWriter

from keel import module_format as mf
from keel import trust
from keel.boards import PLATFORM_PORTS, known_boards, load_board
from keel.errors import KeelError
from keel.paths import mpy_cross, source_root

SYSTEM_PARTS_FILE = "system/parts.json"
# Folders below a 'ports' folder that a port builds on besides its own: the esp32 and
# nrf HAL backends share hal/ports/machine/, the backend over MicroPython's machine.
SHARED_PORT_FOLDERS = {"esp32": ("machine",), "nrf": ("machine",)}


def port_folders(port: str) -> tuple[str, ...]:
    """The folders below a 'ports' folder that a build for `port` keeps."""
    return (port, *SHARED_PORT_FOLDERS.get(port, ()))


def parse_version(text: str) -> int:
    try:
        return mf.encode_version(text)
    except mf.FormatError as e:
        raise KeelError(str(e)) from None


def system_version() -> str:
    """The system version declared once in the source tree (system/VERSION)."""
    return (source_root() / "system" / "VERSION").read_text().strip()


def bootloader_version() -> str:
    return (source_root() / "bootloader" / "VERSION").read_text().strip()


def check_platform(platform: str) -> int:
    try:
        return mf.platform_id(platform)
    except mf.FormatError as e:
        raise KeelError(str(e)) from None


_TRACE_LINE = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')


def compile_py(source: Path, shown_name: str, error_name: str | None = None,
               lines: bool = True) -> bytes:
    """Compile one file to .mpy bytecode. shown_name is the file name tracebacks on
    the device show; errors name error_name (default: the same) and the line. Without
    lines, tracebacks name the functions but not the lines (smaller bytecode)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.mpy"
        proc = subprocess.run(
            [mpy_cross(), "-o", str(out), "-s", shown_name, *([] if lines else ["-X", "no-source-lines"]),
             str(source)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            text = (proc.stdout + proc.stderr).strip()
            where = _TRACE_LINE.search(text)
            last = text.splitlines()[-1] if text else "mpy-cross failed"
            name = error_name or shown_name
            if where:
                raise KeelError(f"{name}:{where['line']}: {last}")
            raise KeelError(f"{name}: {last}")
        return out.read_bytes()


def make_romfs(files: dict[str, bytes]) -> bytes:
    """A ROMFS image holding files (paths with '/' separators), in sorted order."""
    writer = VfsRomWriter()
    tree: dict = {}
    for path, data in files.items():
        node = tree
        *dirs, name = path.split("/")
        for d in dirs:
            node = node.setdefault(d, {})
        node[name] = data

    def emit(node: dict) -> None:
        for name in sorted(node):
            value = node[name]
            if isinstance(value, dict):
                writer.opendir(name)
                emit(value)
                writer.closedir()
            else:
                writer.mkfile(name, value)

    emit(tree)
    return writer.finalise()


def _expand_sources(root: Path, specs: list[str], port: str) -> dict[str, Path]:
    """Map ROMFS path (of the .py) -> source file.

    "dir/*.py" puts matching files at the top; "dir:dest" copies a package tree into
    dest, keeping only port_folders(port) below any 'ports' folder."""
    found: dict[str, Path] = {}
    kept = port_folders(port)
    for spec in specs:
        if ":" in spec:
            src, dest = spec.split(":", 1)
            base = root / src
            for path in sorted(base.rglob("*.py")):
                rel = path.relative_to(base)
                parts = rel.parts
                if "ports" in parts[:-1]:
                    i = parts.index("ports")
                    if len(parts) <= i + 1 or parts[i + 1] not in kept:
                        continue
                found[f"{dest}/{rel.as_posix()}"] = path
        else:
            matches = sorted(root.glob(spec))
            if not matches:
                raise KeelError(f"{SYSTEM_PARTS_FILE}: '{spec}' matches no file")
            for path in matches:
                found[path.name] = path
    return found


def _compile_tree(sources: dict[str, Path], root: Path, lines: bool = True) -> dict[str, bytes]:
    files = {}
    for dest, path in sources.items():
        shown = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        files[dest[:-3] + ".mpy"] = compile_py(path, shown, lines=lines)
    return files


def _top_names(paths) -> set[str]:
    return {p.split("/")[0].removesuffix(".mpy") for p in paths}


def _bootloader_sources(bl: dict, port: str) -> list[str]:
    """The bootloader's sources, and its flash port for this platform's port
    ("port_sources" in system/parts.json: the esp32 build carries port_esp32 only)."""
    return [*bl["sources"], *bl.get("port_sources", {}).get(port, [])]


def _dependency(dep: dict, system: int) -> tuple[int, int, int]:
    version = system if dep["version"] == "system" else parse_version(dep["version"])
    return (mf.function_id(dep["function"]), dep["index"], version)


def build_system(platform: str, version: str | None, out_dir: Path, sign=None,
                 trust_keys: list[bytes] | None = None) -> list[Path]:
    """Build the bootloader and every system part; returns the files written. sign:
    a signer (keel.signing.signer) to sign every module with. trust_keys: raw public
    keys the bootloader brings (trust.json in its payload): a board that installs it
    trusts exactly these from then on (key rotation, docs/signing.md)."""
    root = source_root()
    platform_id = check_platform(platform)
    port = PLATFORM_PORTS[platform]
    version = version or system_version()
    system = parse_version(version)
    spec = json.loads((root / SYSTEM_PARTS_FILE).read_text())

    images: list[tuple[str, bytes]] = []
    seen: dict[str, str] = {}
    boards = [b for b in map(load_board, known_boards()) if b.platform == platform]

    def add(label: str, files: dict[str, bytes], info: mf.ModuleInfo, filename: str) -> None:
        for name in _top_names(files):
            if name in seen:
                raise KeelError(f"module '{name}' is in both {seen[name]} and {label}")
            seen[name] = label
        image = mf.build_image(info, make_romfs(files), hashlib.sha256, sign)
        _check_fits(filename, image, info, boards)
        images.append((filename, image))

    bl = spec["bootloader"]
    # The bootloader without line numbers: its slot is 32 KB on the ESP32 and nRF52840
    # boards, and they cost it 2 KB (docs/boot-flow.md, "The bootloader's size").
    bl_files = _compile_tree(_expand_sources(root, _bootloader_sources(bl, port), port), root,
                             lines=False)
    if trust_keys is not None:
        bl_files[trust.BUNDLED] = json.dumps(trust.document(trust_keys)).encode()
    bl_version = parse_version(bootloader_version())
    add(
        "bootloader",
        bl_files,
        mf.ModuleInfo(mf.FUNCTION_BOOTLOADER, 0, bl_version, platform_id),
        f"{platform}-bootloader-{bootloader_version()}.bin",
    )
    for part in spec["parts"]:
        files = _compile_tree(_expand_sources(root, part["sources"], port), root)
        deps = [_dependency(d, system) for d in part.get("depends", [])]
        info = mf.ModuleInfo(mf.FUNCTION_SYSTEM_PART, part["index"], system, platform_id, deps)
        add(
            f"system part {part['index']}",
            files,
            info,
            f"{platform}-system-part{part['index']}-{version}.bin",
        )

    if out_dir.exists() and not out_dir.is_dir():
        raise KeelError(f"{out_dir}: not a directory")
    written = []
    for filename, data in images:
        written.append(_write_atomic(out_dir / filename, data))
    return written


def _check_fits(filename: str, image: bytes, info: mf.ModuleInfo, boards) -> None:
    """Refuse a module a board of the platform has no room for: a bootloader or system
    part that does not fit its slot could never be installed over the air."""
    for board in boards:
        slot = board.slot_for(info.function, info.index)
        if slot is not None and len(image) > slot.size:
            raise KeelError(f"{filename}: {len(image)} bytes do not fit the {slot.label} slot of "
                            f"board {board.name} ({slot.size} bytes)")


def system_module_names(platform: str) -> set[str]:
    """Top-level module names the bootloader and system parts put on sys.path."""
    root = source_root()
    spec = json.loads((root / SYSTEM_PARTS_FILE).read_text())
    port = PLATFORM_PORTS[platform]
    names: set[str] = set()
    bl = spec["bootloader"]
    for sources in [_bootloader_sources(bl, port), *(p["sources"] for p in spec["parts"])]:
        names |= _top_names(p[:-3] for p in _expand_sources(root, sources, port))
    return names


def app_dependencies(target: int) -> list[tuple[int, int, int]]:
    """An app depends on every system part at the version it was built against."""
    spec = json.loads((source_root() / SYSTEM_PARTS_FILE).read_text())
    return [(mf.FUNCTION_SYSTEM_PART, p["index"], target) for p in spec["parts"]]


def build_app(
    src_dir: Path, platform: str, target: str | None, out: Path, app_version: str = "1.0.0",
    sign=None,
) -> Path:
    """Compile an app (main.py plus any other .py) into a user part for target.

    The user part's own version is app_version; its dependencies carry target. sign: a
    signer (keel.signing.signer) to sign the module with."""
    platform_id = check_platform(platform)
    target_version = parse_version(target or system_version())
    own_version = parse_version(app_version)
    src_dir = Path(src_dir)
    if not src_dir.exists():
        raise KeelError(f"{src_dir}: no such folder (give the app's folder, with its main.py)")
    if not src_dir.is_dir():
        raise KeelError(f"{src_dir}: not a folder (give the app's folder, with its main.py)")
    if not (src_dir / "main.py").is_file():
        raise KeelError(f"{src_dir}: no main.py (the app's entry point)")
    sources = {}
    for path in sorted(src_dir.rglob("*.py")):
        rel = path.relative_to(src_dir).as_posix()
        if any(fnmatch.fnmatch(part, ".*") or part == "__pycache__" for part in rel.split("/")):
            continue
        sources[rel] = path
    taken = sorted(_top_names(rel[:-3] for rel in sources) & system_module_names(platform))
    if taken:
        raise KeelError(
            f"{src_dir}: app module(s) {', '.join(taken)} have the names of system modules, "
            "which come first on the device's sys.path; rename them"
        )
    files = {}
    for rel, path in sources.items():
        files[rel[:-3] + ".mpy"] = compile_py(path, rel, str(src_dir / rel))
    info = mf.ModuleInfo(
        mf.FUNCTION_USER_PART, 1, own_version, platform_id, app_dependencies(target_version)
    )
    image = mf.build_image(info, make_romfs(files), hashlib.sha256, sign)
    return _write_atomic(Path(out), image)


def _write_atomic(path: Path, data: bytes) -> Path:
    if path.is_dir():
        raise KeelError(f"{path}: is a directory (give a file name with -o)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as e:
        raise KeelError(f"{path}: cannot write: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
