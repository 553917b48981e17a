"""Flashing modules onto a board over its USB serial console, as `particle flash --usb`
does, on mpremote's transport (the raw REPL). See docs/cli.md, "keel flash --usb".

The board is asked what it is first (board, platform, what each slot holds), so a
module for another platform, or one too big for its slot, is refused before anything
is written. Modules go in dependency order, each straight into its slot: the first
block is erased first and written last, so a flash cut short leaves an empty slot,
never a half module that looks whole. Each slot's SHA-256 is then checked on the
board, and the board is reset to run what was flashed."""

import base64
import contextlib
import hashlib
import io
import json

from keel import keel_files
from keel import module_format as mf
from keel.errors import KeelError
from keel.images import Image, load_valid_image, module_label
from keel.vdev import check_signatures
from keel.progress import Progress

_REPL_ATTEMPTS = 3
CHUNK = 2048  # bytes per exec; divides the 4 KB flash block, so no write crosses one

# Board side: run through the raw REPL once per connection. Uses the bootloader's own
# code on the board (/keel/m/bl): its port (the flash partitions of this board) and
# its slot scan, so host and board agree on what a slot holds.
_PRELUDE = "_BL, _BOARD_FILE, _TRUST_FILE = %r, %r, %r\n" % (
    keel_files.BOOTLOADER_DIR, keel_files.BOARD_FILE, keel_files.TRUST_FILE) + """\
import sys, json
if _BL not in sys.path:
    sys.path.insert(0, _BL)
try:  # the bootloader's boot work and its hand-over module (older bootloaders: one)
    import boot_check as _boot
    import handover as _ho
except ImportError:
    import keel_boot as _boot
    _ho = _boot
import module_format as _mf
from binascii import a2b_base64 as _unb64, hexlify as _hex
_PORT = _ho.port() if hasattr(_ho, 'port') else _boot._port()

def _probe():
    board = json.load(open(_BOARD_FILE))
    platform = _mf.platform_id(board['platform'])
    slots = []
    for s in _boot.load_slots(board):
        _boot.scan(s, platform)
        d = (_boot.slot_doc(s) if hasattr(_boot, 'slot_doc') else s.to_dict()) if s.reason != 'empty' else {
            'function': _mf.function_name(s.function), 'index': s.index, 'version': None,
            'valid': False, 'slot': s.label, 'invalid_reason': 'empty'}
        d['capacity'] = s.size
        slots.append(d)
    try:
        trust = json.load(open(_TRUST_FILE))
    except OSError:
        trust = {'keys': []}
    except ValueError:
        trust = None
    print(json.dumps({'board': board['name'], 'platform': board['platform'], 'slots': slots,
                      'trust': trust}))

def _write(label, at, data):
    p = _PORT.Partition.find(label)
    bs = p.ioctl(5, 0)
    if at % bs == 0:
        p.ioctl(6, at // bs)
    p.writeblocks(at // bs, _unb64(data), at % bs)

def _erase(label, block):
    _PORT.Partition.find(label).ioctl(6, block)

def _sha256(label, size):
    import hashlib
    p = _PORT.Partition.find(label)
    bs = p.ioctl(5, 0)
    h = hashlib.sha256()
    buf = memoryview(bytearray(512))
    at = 0
    while at < size:
        n = min(512, size - at)
        p.readblocks(at // bs, buf[:n], at % bs)
        h.update(buf[:n])
        at += n
    print(_hex(h.digest()).decode())
"""

_HAS_KEEL = """\
import os
try:
    os.stat('%s/keel_boot.py')
    print(1)
except OSError:
    try:
        os.stat('%s/keel_boot.mpy')
        print(1)
    except OSError:
        print(0)
""" % (keel_files.BOOTLOADER_DIR, keel_files.BOOTLOADER_DIR)

_FUNCTION_ORDER = {mf.FUNCTION_BOOTLOADER: 0, mf.FUNCTION_SYSTEM_PART: 1, mf.FUNCTION_USER_PART: 2}


def find_port() -> str:
    """The one USB serial port with a board on it, as mpremote finds it."""
    import serial.tools.list_ports

    ports = sorted(p.device for p in serial.tools.list_ports.comports()
                   if p.vid is not None and p.pid is not None)
    if not ports:
        raise KeelError("no board found on USB: connect one, or give its port with --port")
    if len(ports) > 1:
        raise KeelError(f"several boards found ({', '.join(ports)}): choose one with --port")
    return ports[0]


class BoardLink:
    """A board at its raw REPL, with Keel stopped (a soft reset in raw mode runs
    /boot.py but not /main.py, where Keel starts)."""

    def __init__(self, port: str | None = None):
        from mpremote.transport import TransportError
        from mpremote.transport_serial import SerialTransport

        self.port = port or find_port()
        self._error = TransportError
        try:
            self.transport = SerialTransport(self.port, baudrate=115200)
        except TransportError as e:
            raise KeelError(f"{self.port}: cannot open the port ({e})") from None
        for attempt in range(_REPL_ATTEMPTS):
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # (mpremote prints what it read)
                    self.transport.enter_raw_repl(soft_reset=True)
                break
            except TransportError as e:
                # A board caught mid-reboot reads the Ctrl-C before its REPL runs, and
                # the code it then starts (Keel) runs on: interrupt it again.
                if attempt + 1 == _REPL_ATTEMPTS:
                    self.transport.close()
                    raise KeelError(f"{self.port}: the board does not answer at its REPL "
                                    f"({e}; tried {_REPL_ATTEMPTS} times)") from None
        if self._exec(_HAS_KEEL).strip() != "1":
            self.close()
            raise KeelError(f"{self.port}: Keel is not installed on this board (no bootloader in "
                            f"{keel_files.BOOTLOADER_DIR}): install it first (docs/boards/)")
        self._exec(_PRELUDE)

    def _exec(self, code: str, timeout: float = 30) -> str:
        from mpremote.transport import TransportExecError

        try:
            out, err = self.transport.exec_raw(code, timeout=timeout)
        except self._error as e:
            raise KeelError(f"{self.port}: the board stopped answering ({e})") from None
        if err:
            text = err.decode(errors="replace").strip().splitlines()
            raise KeelError(f"{self.port}: the board reported an error: {text[-1] if text else '?'}")
        return out.decode(errors="replace")

    def probe(self) -> dict:
        return json.loads(self._exec("_probe()"))

    def write(self, label: str, data: bytes, progress: Progress | None = None) -> None:
        """Write data at the start of a slot, the first block last."""
        total = len(data)
        first = min(4096, total)
        self._exec(f"_erase({label!r}, 0)")  # from here the slot reads as empty
        done = first
        for at in range(first, total, CHUNK):
            self._write_chunk(label, at, data[at:at + CHUNK])
            done += len(data[at:at + CHUNK])
            if progress:
                progress.update(done - first, total)
        for at in range(0, first, CHUNK):
            self._write_chunk(label, at, data[at:min(at + CHUNK, first)])
        if progress:
            progress.update(total, total)

    def _write_chunk(self, label: str, at: int, chunk: bytes) -> None:
        self._exec(f"_write({label!r}, {at}, {base64.b64encode(chunk).decode()!r})")

    def sha256(self, label: str, size: int) -> str:
        return self._exec(f"_sha256({label!r}, {size})", timeout=60).strip()

    def reset(self) -> None:
        """Hard-reset the board, recording the reason Keel reports for it (update);
        Keel boots and installs what changed."""
        try:
            self.transport.exec_raw_no_follow("_ho.reset('update')")
        except self._error:
            pass  # the board went away mid-answer: that is the reset

    def restart(self) -> None:
        """Leave the board as it was found: back to the friendly REPL and a soft
        reboot there, which runs /main.py and so Keel (after a refusal or an error)."""
        try:
            self.transport.exit_raw_repl()
            self.transport.serial.write(b"\x04")
        except (self._error, OSError):
            pass

    def close(self) -> None:
        try:
            self.transport.close()
        except OSError:
            pass


def slot_for(board: dict, image: Image) -> dict:
    """The board's slot for this module, or a KeelError saying why it cannot go on."""
    info = image.info
    if mf.platform_name(info.platform) != board["platform"]:
        raise KeelError(f"{image.path}: {image.name} is for {mf.platform_name(info.platform)}, the "
                        f"board on this port is {board['board']} ({board['platform']}): nothing written")
    if info.function not in _FUNCTION_ORDER:
        raise KeelError(f"{image.path}: a {mf.function_name(info.function)} module cannot be "
                        "flashed into a slot over USB")
    name = mf.function_name(info.function)
    for slot in board["slots"]:
        if slot["function"] == name and (info.function != mf.FUNCTION_SYSTEM_PART or
                                         slot["index"] == info.index):
            if len(image.data) > slot["capacity"]:
                raise KeelError(f"{image.path}: {image.name} is {len(image.data)} bytes, slot "
                                f"{slot['slot']} holds {slot['capacity']}: nothing written")
            return slot
    raise KeelError(f"{image.path}: board {board['board']} has no slot for {image.name}: nothing written")


def _installed(board: dict) -> list[mf.ModuleInfo]:
    out = []
    for slot in board["slots"]:
        if slot.get("valid") and slot.get("version"):
            out.append(mf.ModuleInfo(mf.function_id(slot["function"]), slot["index"],
                                     mf.encode_version(slot["version"]), 0))
    return out


def after_flash_warnings(board: dict, images: list[Image]) -> list[str]:
    """What will not be satisfied once these modules are in (the device will say so
    too, in safe mode): said before writing, like `particle flash` does."""
    replaced = {(i.info.function, i.info.index) for i in images}
    modules = [m for m in _installed(board) if (m.function, m.index) not in replaced]
    modules += [i.info for i in images]
    warnings = []
    for slot in board["slots"]:
        key = (mf.function_id(slot["function"]), slot["index"])
        if key in replaced or not slot.get("valid"):
            continue
        deps = [(mf.function_id(d["function"]), d["index"], mf.encode_version(d["version"]))
                for d in slot.get("dependencies") or []]
        info = mf.ModuleInfo(key[0], key[1], mf.encode_version(slot["version"]), 0, deps)
        for dep in mf.missing_dependencies(info, modules):
            warnings.append(f"the installed {slot['function']} {slot['version']} needs "
                            f"{_dep_text(dep)}: the board will start in safe mode")
    for image in images:
        for dep in mf.missing_dependencies(image.info, modules):
            warnings.append(f"{image.name} needs {_dep_text(dep)}, which the board does not have: "
                            "it will start in safe mode (keel update brings the system)")
    return warnings


def _dep_text(dep) -> str:
    function, index, version = dep
    name = mf.function_name(function) + (f" {index}" if function == mf.FUNCTION_SYSTEM_PART else "")
    return f"{name} >= {mf.decode_version(version)}"


def ordered(images: list[Image]) -> list[Image]:
    """Bootloader, then system parts by index, then the app: each after what it needs."""
    seen = {}
    for image in images:
        key = (image.info.function, image.info.index)
        if key in seen:
            raise KeelError(f"{seen[key].path} and {image.path} are both {mf.function_name(key[0])}"
                            f"{' ' + str(key[1]) if key[0] == mf.FUNCTION_SYSTEM_PART else ''}")
        seen[key] = image
    return sorted(images, key=lambda i: (_FUNCTION_ORDER.get(i.info.function, 9), i.info.index))


def board_keys(board: dict) -> list[bytes] | None:
    """The keys the board trusts (its probe's `trust`): [] in development mode, None when
    its trust file cannot be read (it then takes nothing)."""
    from keel import trust

    doc = board.get("trust", {"keys": []})  # a board whose probe predates signing
    return trust.parse_keys(doc) if doc is not None else None


def flash_images(link: BoardLink, images: list[Image], say=print) -> None:
    """Check every image against the board, then write, verify and reset."""
    board = link.probe()
    images = ordered(images)
    slots = [slot_for(board, image) for image in images]
    check_signatures(images, board_keys(board))
    say(f"{link.port}: {board['board']} ({board['platform']})")
    for warning in after_flash_warnings(board, images):
        say(f"warning: {warning}")
    for image, slot in zip(images, slots):
        progress = Progress(f"{image.name} → {slot['slot']}")
        link.write(slot["slot"], image.data, progress)
        progress.done()
        sha = hashlib.sha256(image.data).hexdigest()
        if link.sha256(slot["slot"], len(image.data)) != sha:
            raise KeelError(f"{image.name}: the board's copy in {slot['slot']} does not verify "
                            "(SHA-256): flash it again")
        say(f"{image.name}: written to {slot['slot']} and verified")
    link.reset()
    say(f"{link.port}: reset; the board installs and runs the new modules")


def flash(files: list, port: str | None = None, say=print) -> list[Image]:
    """keel flash --usb FILE...: every file is checked before the board is touched."""
    if not files:
        raise KeelError("no module files given")
    images = [load_valid_image(p) for p in files]
    ordered(images)
    link = BoardLink(port)
    try:
        flash_images(link, images, say)
    except KeelError:
        link.restart()
        raise
    finally:
        link.close()
    return images


# keel update


def choose_release(releases: list[dict], platform: str, version: str | None) -> dict:
    """The newest release for the platform that is not a prerelease, or the one asked for
    (a prerelease only by its exact version)."""
    mine = [r for r in releases if r["platform"] == platform]
    if version:
        for r in mine:
            if r["version"] == version:
                return r
        known = ", ".join(r["version"] for r in mine) or "none"
        raise KeelError(f"no system release {version} for {platform} in the catalog (released: {known})")
    stable = [r for r in mine if not r["prerelease"]]
    if not stable:
        raise KeelError(f"no system release for {platform} in the catalog: add one with "
                        "keel release system DIR")
    return stable[0]  # the catalog lists the newest first


def declared_sha256(image: Image) -> str:
    """The SHA-256 an image declares in its suffix (what the board reports per slot)."""
    end = image.info.header_size + image.info.payload_size
    return image.data[end:end + 32].hex()


def release_images(catalog, platform: str, release: dict) -> list[Image]:
    from keel.images import parse_image

    out = []
    for module in release["modules"]:
        data = catalog.image(platform, module["function"], module["index"], module["version"])
        name = f"{module['function']}-{module['index']}-{module['version']}.bin"
        if data is None:
            raise KeelError(f"the catalog has lost the image {name}")
        image = parse_image(data, name)
        if not image.ok:
            raise KeelError(f"catalog image {name}: {image.problem}")
        out.append(image)
    return out


def update_plan(board: dict, images: list[Image], allow_downgrade: bool) -> tuple[list[Image], list[str]]:
    """The release's modules the board needs (not already current), and those current."""
    installed = {(mf.function_id(s["function"]), s["index"]): s for s in board["slots"] if s.get("valid")}
    needed, current, downgrades = [], [], []
    for image in images:
        have = installed.get((image.info.function, image.info.index))
        if have and have.get("sha256") == declared_sha256(image):
            current.append(image.name)
            continue
        if have and have.get("version") and mf.encode_version(have["version"]) > image.info.version:
            label = image.name.rsplit(" ", 1)[0]
            downgrades.append(f"{label} {have['version']} → {mf.decode_version(image.info.version)}")
        needed.append(image)
    if downgrades and not allow_downgrade:
        raise KeelError("this would downgrade " + ", ".join(downgrades) +
                        ": nothing written (--allow-downgrade to do it anyway)")
    return needed, current


def update(catalog, port: str | None = None, version: str | None = None,
           allow_downgrade: bool = False, say=print) -> list[str]:
    """keel update: the newest system release (or `version`) onto the board over USB,
    skipping modules already current. Returns the names of the modules written."""
    link = BoardLink(port)
    try:
        board = link.probe()
        release = choose_release(catalog.releases(board["platform"]), board["platform"], version)
        images = release_images(catalog, board["platform"], release)
        needed, current = update_plan(board, images, allow_downgrade)
        if not needed:
            say(f"{link.port}: {board['board']} already runs system {release['version']}: nothing to do")
            link.restart()
            return []
        say(f"system {release['version']}" + (" (prerelease)" if release["prerelease"] else "") +
            (f"; already current: {', '.join(current)}" if current else ""))
        flash_images(link, needed, say)
        return [i.name for i in needed]
    except KeelError:
        link.restart()
        raise
    finally:
        link.close()
