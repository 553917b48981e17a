# The bootloader's work at every boot (keel_boot.main runs it, then hands over):
# validates every module in flash, installs (extracts) the code of modules that
# changed, and leaves the system what it found (handover.py). See docs/boot-flow.md.
import sys
import os
import gc
import binascii
import json
import module_format as mf
import flashfs

from keel_files import (BOARD_FILE, BOOTLOADER_DIR, BOOTLOADER_REJECTED_FILE, BOOTLOADER_TRIAL_FILE,
                        MODULE_ROOT, PENDING_FILE, RESET_REASON_FILE, STATUS_FILE, TRIAL_FILE)
from handover import INSTALLED, MODULES, SLOTS, Slot, give_up_trial, note_boot, reset, vm_info
from handover import port as _port

_buf = bytearray(512)



def _code_name(function, index):
    if function == mf.FUNCTION_BOOTLOADER:
        return "bl"
    if function == mf.FUNCTION_USER_PART:
        return "app"
    return "s%d" % index


def slot_doc(slot):
    """The slot as the status reports it (one of its "modules")."""
    if slot.info is None:
        # Something that is not a readable module: report the slot itself.
        return {
            "function": mf.function_name(slot.function),
            "index": slot.index,
            "version": None,
            "valid": False,
            "crc_ok": False,
            "sha256_ok": None,
            "slot": slot.label,
            "invalid_reason": slot.reason,
        }
    doc = slot.info.to_dict()
    doc["size"] = slot.info.image_size
    doc["crc_ok"] = slot.crc_ok
    doc["sha256_ok"] = slot.sha256_ok
    doc["valid"] = slot.valid
    doc["slot"] = slot.label
    doc["in_place"] = slot.view is not None
    if slot.digest is not None:  # the digest the image declares (its suffix)
        doc["sha256"] = binascii.hexlify(slot.digest).decode()
    if not slot.valid:
        doc["invalid_reason"] = slot.reason
    return doc


def load_slots(board):
    """The board's slots. Where the firmware maps a slot's flash (port.rom_view), a
    system part's or the app's code runs in place from it; the bootloader's is always
    extracted (stage 0 imports it from its directory)."""
    port = _port()
    rom_view = getattr(port, "rom_view", None)
    slots = []
    for p in board["flash"]["partitions"]:
        function = p.get("module")
        if function:
            part = port.Partition.find(p["label"])
            fid, index = mf.function_id(function), p.get("index", 0)
            view = None
            if part is not None and rom_view is not None and fid != mf.FUNCTION_BOOTLOADER:
                view = rom_view(p["label"])
            slots.append(Slot(part, p["label"], fid, index, _code_name(fid, index), view))
    return slots


def mount_in_place(slots):
    """Mount the payload of every checked module that runs in place at its code_dir."""
    import vfs

    for slot in slots:
        if slot.view is not None and slot.valid and slot.sha256_ok:
            start = slot.info.header_size
            try:
                vfs.umount(slot.code_dir)
            except OSError:
                pass
            vfs.mount(vfs.VfsRom(slot.view[start : start + slot.info.payload_size]), slot.code_dir)


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
        flashfs.remove_tree(slot.code_dir if slot.view is None else slot.marker)
    return tried


def take_reset_reason(port):
    """The reason the system recorded before its last reset, else the port's cause."""
    reason = flashfs.read_text(RESET_REASON_FILE)
    if reason is not None:
        os.remove(RESET_REASON_FILE)
        return reason
    return port.reset_cause()


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
        "modules": [slot_doc(s) for s in slots if s.reason != "empty"],
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


def boot():
    """Check every slot and install what changed; halts when there is no system to
    run. Leaves the slots in handover.SLOTS; returns (attempts, board, reset reason)."""
    port = _port()
    # What an install cut short left goes first: it may be what fills the filesystem.
    clean_leftovers()
    attempts = note_boot()
    board = flashfs.read_json(BOARD_FILE)
    platform = mf.platform_id(board["platform"])
    reset_reason = take_reset_reason(port)
    if hasattr(port, "layout_error"):  # the firmware or the table may leave no room for the slots
        why = port.layout_error(board)
        if why:
            halt([], reset_reason, "layout", [], why)
    INSTALLED[0] = False  # did this boot install (its work leaves the heap used)
    if flashfs.exists(PENDING_FILE) or flashfs.exists(TRIAL_FILE):
        import ota_apply  # only for an update or a trial: kept off the heap otherwise

        if ota_apply.apply_update(port, board):
            reset_reason = "update"
            INSTALLED[0] = True
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
            INSTALLED[0] = True
    mount_in_place(slots)
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
    SLOTS[:] = slots
    MODULES[0] = json.dumps([slot_doc(s) for s in slots if s.reason != "empty"]).encode()
    return attempts, board, reset_reason
