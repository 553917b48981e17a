# Keel bootloader: validates every module in flash, installs (extracts) the code
# of modules that changed, and hands over to the system. See docs/boot-flow.md.
import sys
import os
import gc
import binascii
import module_format as mf
import flashfs

MODULE_ROOT = "/keel/m"
BOOTLOADER_DIR = MODULE_ROOT + "/bl"
BOARD_FILE = "/keel/board.json"
STATUS_FILE = "/keel/status.json"
RESET_REASON_FILE = "/keel/reset_reason"
# Boots since the last one that recorded its status: the bootloader adds one to the
# count in the recorded status at every start, the system's next record has none.
BOOT_ATTEMPTS = "boot_attempts"
# A new bootloader on trial: stage 0 (/boot.py) counts its boots here and goes back to
# the previous copy, kept in BOOTLOADER_DIR + ".prev", unless it proves itself.
BOOTLOADER_TRIAL_FILE = "/keel/bl_trial"
BOOTLOADER_REJECTED_FILE = "/keel/bl_rejected"  # the digest of the one stage 0 gave up

_buf = bytearray(512)


_ports = []


def _port():
    # The flash and reset primitives of the board's port: `vboard` on the virtual
    # board, else the port module the bootloader was built with for its platform
    # (bootloader/port_esp32.py or port_nrf.py, "port_sources" in system/parts.json).
    if not _ports:
        for name in ("vboard", "port_esp32", "port_nrf"):
            try:
                _ports.append(__import__(name))
                break
            except ImportError:
                pass
        else:
            raise RuntimeError("keel: no flash port for this board")
    return _ports[0]


class Slot:
    """A flash partition that holds one module, and what the last scan found in it."""

    def __init__(self, part, label, function, index):
        self.part = part
        self.label = label
        self.function = function
        self.index = index
        self.size = part.info()[2] if part else 0
        self.block = part.ioctl(5, 0) if part else 4096
        self.info = None
        self.crc_ok = False
        self.sha256_ok = None
        self.valid = False
        self.reason = "empty"
        self.digest = None

    def read(self, offset, buf):
        count = min(len(buf), self.size - offset)
        if count <= 0:
            return 0
        view = memoryview(buf)[:count] if count < len(buf) else buf
        self.part.readblocks(offset // self.block, view, offset % self.block)
        return count

    @property
    def code_dir(self):
        if self.function == mf.FUNCTION_BOOTLOADER:
            return BOOTLOADER_DIR
        if self.function == mf.FUNCTION_USER_PART:
            return MODULE_ROOT + "/app"
        return MODULE_ROOT + "/s%d" % self.index

    def installed_digest(self):
        return flashfs.read_text(self.code_dir + "/.sha256")

    def to_dict(self):
        if self.info is None:
            # Something that is not a readable module: report the slot itself.
            return {
                "function": mf.function_name(self.function),
                "index": self.index,
                "version": None,
                "valid": False,
                "crc_ok": False,
                "sha256_ok": None,
                "slot": self.label,
                "invalid_reason": self.reason,
            }
        doc = self.info.to_dict()
        doc["size"] = self.info.image_size
        doc["crc_ok"] = self.crc_ok
        doc["sha256_ok"] = self.sha256_ok
        doc["valid"] = self.valid
        doc["slot"] = self.label
        if self.digest is not None:  # the digest the image declares (its suffix)
            doc["sha256"] = binascii.hexlify(self.digest).decode()
        if not self.valid:
            doc["invalid_reason"] = self.reason
        return doc


def load_slots(board):
    port = _port()
    slots = []
    for p in board["flash"]["partitions"]:
        function = p.get("module")
        if function:
            part = port.Partition.find(p["label"])
            slots.append(Slot(part, p["label"], mf.function_id(function), p.get("index", 0)))
    return slots


def scan(slot, platform):
    """Check a slot's header and CRC (every boot; SHA-256 only when installing)."""
    if slot.part is None:
        return
    slot.read(0, _buf)
    if _buf[:4] == b"\xff\xff\xff\xff":
        return  # erased: no module here
    if _buf[:4] != mf.MAGIC:
        slot.reason = "integrity"
        return
    try:
        slot.info, slot.crc_ok, _ = mf.check_image(slot.read, slot.size, None, _buf)
    except ValueError:
        slot.reason = "integrity"
        return
    slot.digest = mf.stored_sha256(slot.read, slot.info, _buf)
    if not slot.crc_ok:
        slot.reason = "integrity"
    elif slot.info.platform != platform:
        slot.reason = "platform"
    elif slot.info.function != slot.function or slot.info.index != slot.index:
        slot.reason = "integrity"  # a module in another module's slot
    else:
        slot.valid = True
        slot.reason = None
        hexdigest = binascii.hexlify(slot.digest).decode()
        if slot.installed_digest() == hexdigest:
            slot.sha256_ok = True
        elif slot.function == mf.FUNCTION_BOOTLOADER:
            if flashfs.read_text(BOOTLOADER_REJECTED_FILE) == hexdigest:
                slot.valid = False  # it failed to start once: never installed again
                slot.reason = "rejected"


def install_code(slot):
    """Install the slot's module (module_check.py, loaded only for this)."""
    import module_check

    return module_check.install_code(slot)


def ensure_installed(slot):
    """Install the slot's code if it is not; True when it tried."""
    tried = slot.valid and not slot.sha256_ok
    if tried:
        print("keel: installing %s %s" % (slot.label, mf.decode_version(slot.info.version)))
        install_code(slot)  # (a refusal makes the slot invalid)
    if not slot.valid and slot.function == mf.FUNCTION_USER_PART:
        # Never run app code that no longer matches a valid module (nor one refused).
        flashfs.remove_tree(slot.code_dir)
    return tried


def take_reset_reason(port):
    """The reason the system recorded before its last reset, else the port's cause."""
    reason = flashfs.read_text(RESET_REASON_FILE)
    if reason is not None:
        os.remove(RESET_REASON_FILE)
        return reason
    return port.reset_cause()


def reset(reason):
    flashfs.write_atomic(RESET_REASON_FILE, reason)
    _port().reset()


def resetting():
    """True while the port resets or sleeps by unwinding the stack (the virtual
    board exits the VM): that SystemExit is not an app crash."""
    return getattr(_port(), "exiting", False)


def vm_info():
    version = ".".join(str(v) for v in sys.implementation.version[:3])
    return {"name": sys.implementation.name, "version": version}


def halt(slots, reset_reason, reason, missing, layout_error=None):
    """No usable system: record why and wait for new firmware (like DFU mode)."""
    import hashlib
    import trust

    gc.collect()
    status = {
        "mode": "safe",
        "safe_mode_reason": reason,
        "missing": missing,
        "reset_reason": reset_reason,
        "vm": vm_info(),
        "modules": [s.to_dict() for s in slots if s.reason != "empty"],
        "app": "not-run",
        "mem": {"heap_total": gc.mem_free() + gc.mem_alloc(), "heap_free_at_app_start": None},
        "stage": "bootloader",
        "trust": trust.summary(hashlib.sha256),
    }
    if layout_error:
        status["layout_error"] = layout_error
        print(layout_error)
    flashfs.write_json(STATUS_FILE, status)
    print("keel: no usable system (%s); waiting for firmware" % reason)
    bootloader_proved()
    import time

    while True:
        time.sleep(1)


OTA_PENDING_FILE = "/keel/ota/pending.json"  # written by system/core/ota.py
INSTALLED = [False]  # this boot installed code (the system's app start reads it)
TRIAL_FILE = "/keel/ota/trial.json"  # a new system part on trial (ota_apply.py)
ROLLBACK_FILE = "/keel/ota/rollback"


def give_up_trial(reason):
    """The system part on trial cannot run: reset, and let ota_apply put the
    previous one back. Returns only when there is no trial."""
    if flashfs.exists(TRIAL_FILE):
        print("keel: the system part on trial failed: %s" % reason)
        flashfs.write_atomic(ROLLBACK_FILE, reason)
        reset("rollback")


def note_boot(count=0, why=None):
    """Count this boot in the last status recorded (BOOT_ATTEMPTS: the boots since it,
    none of which recorded its own; the system's next record has no count); or, with
    why, keep this one counted because the system failed to start. Returns the count."""
    doc = flashfs.read_json(STATUS_FILE)
    if not isinstance(doc, dict):
        doc = {}
    if why is None:
        count = doc.get(BOOT_ATTEMPTS)
        count = count + 1 if isinstance(count, int) else 1
    else:
        doc["boot_error"] = why
    doc[BOOT_ATTEMPTS] = count
    flashfs.write_json(STATUS_FILE, doc)
    return count


def clean_leftovers():
    """Remove what an interrupted install left in MODULE_ROOT (<dir>.new, <dir>.old:
    every name with a dot), but the previous bootloader a trial keeps: nothing left
    half-written can get in the way of a later install."""
    keep = BOOTLOADER_DIR + ".prev" if flashfs.exists(BOOTLOADER_TRIAL_FILE) else None
    try:
        names = os.listdir(MODULE_ROOT)
    except OSError:
        return
    for name in names:
        path = MODULE_ROOT + "/" + name
        if "." in name and path != keep:
            print("keel: removing %s, left over from an install" % path)
            try:
                flashfs.remove_tree(path)
            except OSError as e:
                print("keel: cannot remove %s (%s)" % (path, e))


def bootloader_proved():
    """This bootloader scanned every slot and got to the system, or to its halt: one on
    trial has proved itself, and the previous copy stage 0 kept can go."""
    if flashfs.exists(BOOTLOADER_TRIAL_FILE):
        os.remove(BOOTLOADER_TRIAL_FILE)
        flashfs.remove_tree(BOOTLOADER_DIR + ".prev")
        print("keel: the new bootloader proved itself")


def _start_system(board, slots, reset_reason):
    # (its own frame: once it has failed, nothing of the system stays referenced here)
    import keel_system

    gc.collect()
    keel_system.start(board, slots, reset_reason)


def main():
    attempts, board, slots, reset_reason, installed = _boot()
    _drop_boot_code()
    _run(attempts, board, slots, reset_reason, installed)


# What only the boot needs: once it is done, these functions' code is freed (the
# system keeps this module for its paths, Slot, reset() and what an update needs).
_BOOT_ONLY = ("_boot", "load_slots", "scan", "install_code", "ensure_installed",
              "take_reset_reason", "halt", "clean_leftovers", "bootloader_proved",
              "_drop_boot_code")
# The module format's host side (making images, parsing version text): never on a board.
_HOST_ONLY = ("build_image", "pack_header", "bytes_reader", "encode_version", "_number",
              "is_prerelease")


def _drop_boot_code():
    g = globals()
    for name in _BOOT_ONLY:
        g.pop(name, None)
    for name in _HOST_ONLY:
        if hasattr(mf, name):
            delattr(mf, name)
    gc.collect()


def _boot():
    port = _port()
    attempts = note_boot()
    board = flashfs.read_json(BOARD_FILE)
    platform = mf.platform_id(board["platform"])
    reset_reason = take_reset_reason(port)
    if hasattr(port, "layout_error"):  # nrf: the firmware may leave no room for the slots
        why = port.layout_error(board)
        if why:
            halt([], reset_reason, "layout", [], why)
    clean_leftovers()
    installed = INSTALLED[0] = False  # did this boot install (its work leaves the heap used)
    if flashfs.exists(OTA_PENDING_FILE) or flashfs.exists(TRIAL_FILE):
        import ota_apply  # only for an update or a trial: kept off the heap otherwise

        if ota_apply.apply_update(port, board):
            reset_reason = "update"
            installed = INSTALLED[0] = True
        if flashfs.exists(TRIAL_FILE):
            reset_reason = ota_apply.check_trial(port, reset_reason) or reset_reason
        del sys.modules["ota_apply"]
    slots = load_slots(board)
    for slot in slots:
        scan(slot, platform)
    for slot in slots:
        if slot.function == mf.FUNCTION_BOOTLOADER and slot.valid and not slot.sha256_ok:
            if install_code(slot):
                print("keel: bootloader updated, resetting")
                reset("update")
        elif slot.reason == "rejected":
            print("keel: the bootloader in its slot did not start the system when it was "
                  "installed; keeping the one before it")
        elif ensure_installed(slot):
            installed = INSTALLED[0] = True
    core = [s for s in slots if s.function == mf.FUNCTION_SYSTEM_PART and s.index == 1]
    if not core or not core[0].valid:
        give_up_trial("system part 1 is not valid (%s)" % (core[0].reason if core else "none"))
        if core and core[0].reason != "empty":
            halt(slots, reset_reason, core[0].reason, [])
        halt(slots, reset_reason, "dependency", [{"function": "system-part", "index": 1, "version": None}])
    # Module code only: a stray /main.py at the filesystem root must not shadow the app.
    sys.path[:] = [core[0].code_dir, BOOTLOADER_DIR, ".frozen", "/lib"]
    bootloader_proved()
    for name in ("module_check", "romfs"):  # what installing loaded: freed before the
        sys.modules.pop(name, None)  # system comes in, when the heap is fullest
    return attempts, board, slots, reset_reason, installed


def _run(attempts, board, slots, reset_reason, installed):
    gc.collect()
    loaded = list(sys.modules)
    try:
        _start_system(board, slots, reset_reason)
    except MemoryError:
        if not installed:
            raise
        # What installing left in the heap (interned names, fragments) leaves the system
        # too little on a small board (an ESP32's 110 KB): start it on a fresh heap; the
        # next boot has nothing to install.
        for name in [n for n in sys.modules if n not in loaded]:
            del sys.modules[name]
        gc.collect()
        print("keel: not enough memory to start the system after installing; resetting")
        reset("update")
    except Exception as e:  # noqa: BLE001 - the system itself failed (apps' errors end in it)
        why = "%s: %s" % (type(e).__name__, e)
        for name in [n for n in sys.modules if n not in loaded]:
            del sys.modules[name]  # the system's heap back, for recording why
        gc.collect()
        note_boot(attempts, why)
        give_up_trial(why)
        raise
