# Whether a module's payload is what its header claims, checked before anything is
# installed: by the bootloader (accept() below, ota_apply.apply_update), by the OTA
# receiver before it accepts an update (system/core/ota.py), and by the host tools
# before they write anything (keel inspect, keel vdev flash, keel flash --usb: through
# the link tools/keel/module_check.py). One file for the MicroPython VM and CPython. On
# the device it also installs a module's code once accepted (install_code): the
# bootloader imports it only to install, and drops it before the hand-over.
# Rules: docs/boot-flow.md, "What a module must hold" and "Installing a module".
import os
import sys

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


try:
    import module_format as mf
    import romfs
except ImportError:  # the host tools: the keel package
    from keel import module_format as mf
    from keel import romfs

# Why a module is refused (a slot's invalid_reason, an update's failure reason).
INTEGRITY = "integrity"  # malformed: the payload is not a ROMFS image a reader can walk
CONTENT = "content"  # well-formed, but not what the header says (or beyond the bounds)
MPY = "mpy"  # bytecode this VM does not load

# The modules a payload must hold at its top, by function (and index for system parts).
# The bootloader's are the ones stage 0, the system and the host's USB tools import from
# /keel/m/bl (a subset of its sources in system/parts.json, checked by the host tests);
# a system part's or the app's are the one the bootloader (or the system) imports first.
BOOTLOADER_MODULES = (
    "keel_boot", "boot_check", "handover", "flashfs", "romfs", "module_format", "module_check",
    "ota_apply", "keel_files",
)
# The bootloader's flash port by platform id ("port_sources" in parts.json); the virtual
# board's (vboard) is part of the VM.
BOOTLOADER_PORTS = {2: "port_esp32", 3: "port_nrf"}
SYSTEM_MODULES = {1: "keel_system", 2: "keel"}
APP_MODULE = "main"

# .mpy header: b"M", major version, flags (native arch << 2 | sub-version), small-int bits.
MPY_VERSION = const(6)  # what every Keel target's MicroPython loads (1.22 on)
_MPY_MAGIC = const(0x4D)


def required(function, index, platform):
    """The top-level .mpy files a module of this kind must hold (names without .mpy)."""
    if function == mf.FUNCTION_BOOTLOADER:
        port = BOOTLOADER_PORTS.get(platform)
        return BOOTLOADER_MODULES + ((port,) if port else ())
    if function == mf.FUNCTION_SYSTEM_PART:
        name = SYSTEM_MODULES.get(index)
        return (name,) if name else ()
    if function == mf.FUNCTION_USER_PART:
        return (APP_MODULE,)
    return ()


def vm_mpy():
    """What this VM loads (sys.implementation._mpy), or None on CPython (the host)."""
    return getattr(sys.implementation, "_mpy", None)


def mpy_problem(head, vm):
    """Why a VM whose sys.implementation._mpy is vm would refuse a .mpy file starting
    with head (4 bytes), or None. vm None (the host): the major version only, as native
    code depends on the board's CPU."""
    if len(head) < 4 or head[0] != _MPY_MAGIC:
        return "not a .mpy file"
    major = MPY_VERSION if vm is None else vm & 0xFF
    if head[1] != major:
        return "bytecode version %d, the VM loads %d" % (head[1], major)
    arch = head[2] >> 2
    if arch and vm is not None:
        if arch != (vm >> 10) & 0x3F or head[2] & 3 != (vm >> 8) & 3:
            return "native code for another CPU (arch %d.%d)" % (arch, head[2] & 3)
    return None


def check(read, info, function, index, mpy=-1):
    """None when the payload of the image in read (info: its header) may be installed
    into the slot for (function, index), else (reason, message). The caller has checked
    the image's CRC32 and SHA-256. mpy: what the VM loads (default: this VM's)."""
    if info.function != function or info.index != index:
        return (INTEGRITY, "a %s %d module, not one for this slot" % (
            mf.function_name(info.function), info.index))
    if function not in (mf.FUNCTION_BOOTLOADER, mf.FUNCTION_SYSTEM_PART, mf.FUNCTION_USER_PART):
        return None  # no ROMFS payload to look into
    names = required(function, index, info.platform)
    if mpy == -1:
        mpy = vm_mpy()
    found = []
    head = bytearray(4)
    base = info.header_size
    try:
        for path, offset, length in romfs.walk(read, base, info.payload_size):
            name = path[path.rfind("/") + 1 :]
            if name[0] == ".":
                # Keel's own markers (.sha256) live beside the code: a payload has none.
                return (CONTENT, "%s: hidden files are not module code" % path)
            if offset < 0 or not name.endswith(".mpy"):
                continue
            got = read(base + offset, head) if length >= 4 else 0
            why = mpy_problem(head if got == 4 else b"", mpy)
            if why:
                return (MPY, "%s: %s" % (path, why))
            if "/" not in path and name[:-4] in names:
                found.append(name[:-4])
    except romfs.RomfsLimitError as e:
        return (CONTENT, str(e))
    except ValueError as e:  # RomfsError, or a name that is not UTF-8
        return (INTEGRITY, str(e) or "romfs: unreadable")
    for name in names:
        if name not in found:
            return (CONTENT, "no %s.mpy: not %s" % (name, _kind(function, index)))
    return None


def _kind(function, index):
    if function == mf.FUNCTION_SYSTEM_PART:
        return "system part %d" % index
    return "an app" if function == mf.FUNCTION_USER_PART else "a bootloader"


# Installing (the device only: the host tools never call these)


def refuse(slot, reason, message):
    slot.valid = False
    slot.reason = reason
    version = mf.decode_version(slot.info.version) if slot.info else "?"
    print("keel: refusing %s %s (%s): %s" % (slot.label, version, reason, message))
    return False


# Why a board that trusts keys refuses a module's signature (docs/signing.md), said.
_SIGNATURE_TEXT = {
    "unsigned": "not signed, and this board takes only signed modules",
    "untrusted": "not signed by a key this board trusts",
    "signature": "its signature does not verify",
}


def signature_problem(read, info, keys=-1):
    """Device: (reason, message) when this board's trusted keys (trust.py; -1: read
    them) refuse the module's signature, else None. The verifier is loaded only for a
    board that trusts keys, and dropped again."""
    import hashlib
    import trust

    if keys == -1:
        keys = trust.board_keys()
    why = trust.check(mf, read, info, bytearray(mf.SIGNATURE_SIZE), hashlib.sha256, keys)
    for name in ("trust", "ed25519"):
        sys.modules.pop(name, None)
    if why is None:
        return None
    text = _SIGNATURE_TEXT.get(why, why)
    if keys is None:
        text = "this board's trust file cannot be read, so it takes nothing"
    return (why, text)


def accept(slot):
    """Whether the bootloader may install the module in a handover.Slot, its SHA-256
    checked: the one place every module passes before its code is written. Its
    signature first (the board's keys), then its payload."""
    problem = signature_problem(slot.read, slot.info)
    if problem is None:
        problem = check(slot.read, slot.info, slot.function, slot.index)
    return refuse(slot, problem[0], problem[1]) if problem else True


def _keep_trust(slot, fresh):
    """A new bootloader brings its keys (trust.json in its payload: they must read), or
    keeps the board's: the keys live in the bootloader's code directory."""
    import flashfs
    import trust
    from keel_files import TRUST_FILE

    try:
        if flashfs.exists(fresh + "/" + trust.BUNDLED):
            if trust.parse_keys(flashfs.read_json(fresh + "/" + trust.BUNDLED)) is None:
                return refuse(slot, CONTENT, "its trust.json is not a list of keys")
            print("keel: the new bootloader brings the keys this board trusts from now on")
        elif flashfs.exists(TRUST_FILE):
            flashfs.write_atomic(fresh + "/" + trust.BUNDLED, flashfs.read_text(TRUST_FILE))
        return True
    finally:
        sys.modules.pop("trust", None)


_ENOSPC = const(28)


def _install_in_place(slot):
    """Its code runs from the slot (mounted by the bootloader): nothing is written but
    the digest that says it was checked; an extracted copy from before goes (the code
    is stored once)."""
    import binascii
    import flashfs
    from keel_files import MODULE_ROOT

    flashfs.remove_tree(MODULE_ROOT + "/" + slot.code_dir.rsplit("/", 1)[1])
    flashfs.makedirs(slot.marker.rsplit("/", 1)[0])
    flashfs.write_atomic(slot.marker, binascii.hexlify(slot.digest).decode())
    return True


def _extract(slot, fresh, buf):
    import flashfs

    flashfs.remove_tree(fresh)
    flashfs.makedirs(fresh)
    romfs.extract(slot.read, slot.info.header_size, slot.info.payload_size, fresh, buf)


def install_code(slot):
    """Verify the SHA-256, accept() the module and extract its payload into its code
    directory.

    Extracts to a new directory and swaps it into place with renames, so a power
    cut leaves the old code, or the new, or a half-written copy that the next boot
    removes and redoes (stage 0 finishes an interrupted swap of the bootloader's own
    code, and keeps the previous bootloader until a new one proves itself)."""
    import binascii
    import hashlib
    import flashfs
    from keel_files import BOOTLOADER_TRIAL_FILE
    from boot_check import _buf

    _, _, sha_ok = mf.check_image(slot.read, slot.size, hashlib.sha256, _buf)
    slot.sha256_ok = sha_ok
    if not sha_ok:
        return refuse(slot, INTEGRITY, "the SHA-256 does not match")
    if not accept(slot):
        return False
    if slot.view is not None:
        return _install_in_place(slot)
    final = slot.code_dir
    fresh = final + ".new"
    try:
        _extract(slot, fresh, _buf)
    except OSError as e:
        if e.errno != _ENOSPC or slot.function == mf.FUNCTION_BOOTLOADER:
            flashfs.remove_tree(fresh)
            return refuse(slot, INTEGRITY, "cannot extract it (%s)" % e)
        # No room for the new code beside the old (the nRF52840's filesystem holds one
        # copy of part 1, not two). The old code is of no use once its slot holds
        # another module, and the slot keeps this one: it goes first. A power cut from
        # here leaves no code, and the next boot extracts it from the slot again.
        print("keel: no room for %s beside its old code; replacing it" % slot.label)
        flashfs.remove_tree(final)
        try:
            _extract(slot, fresh, _buf)
        except (ValueError, OSError) as e:
            flashfs.remove_tree(fresh)
            return refuse(slot, INTEGRITY, "cannot extract it (%s)" % e)
    except ValueError as e:
        flashfs.remove_tree(fresh)
        return refuse(slot, INTEGRITY, "cannot extract it (%s)" % e)
    if slot.function == mf.FUNCTION_BOOTLOADER and not _keep_trust(slot, fresh):
        flashfs.remove_tree(fresh)
        return False
    flashfs.write_atomic(fresh + "/.sha256", binascii.hexlify(slot.digest).decode())
    # Two renames swap the directories; there is always a whole copy to boot from.
    old = final + ".old"
    flashfs.remove_tree(old)
    keep = slot.function == mf.FUNCTION_BOOTLOADER
    if keep:
        prev = final + ".prev"
        if flashfs.exists(BOOTLOADER_TRIAL_FILE) and flashfs.exists(prev):
            keep = False  # the running one is on trial: the proven copy stays
        else:
            # Stage 0 keeps this (proven) bootloader until the new one proves itself.
            # The trial file goes first: stage 0 drops one with no previous copy.
            flashfs.remove_tree(prev)
            old = prev
        flashfs.write_atomic(BOOTLOADER_TRIAL_FILE, "0")
    if flashfs.exists(final):
        os.rename(final, old)
    os.rename(fresh, final)
    if not keep:
        flashfs.remove_tree(old)
    return True
