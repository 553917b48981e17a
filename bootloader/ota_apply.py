# Installing a verified update (staged by system/core/ota.py) into its slot, and the
# trial of a new system part. The bootloader imports this only when an update is
# pending or a trial is running. See docs/boot-flow.md, "Updates and rollback".
#
# An app or a part going into an empty slot is copied from the staging partition.
# A system part that replaces one is swapped with it block by block instead, so the
# staging partition ends up holding the previous part: if the new one does not prove
# itself (reach the cloud within its trial), the same swap puts the previous one back.
# Both are journaled after every step: a power cut resumes them, and the device boots
# the old module set or the new, never neither.
import os
import sys
import struct
import binascii
import module_format as mf
import flashfs
from handover import Slot
from boot_check import _buf

from keel_files import (APPLY_FILE, BITMAP_FILE, INSTALLED_FILE, PENDING_FILE, REFUSED_FILE,
                        ROLLBACK_FILE, ROLLED_BACK_FILE, SCRATCH_FILE, TRANSFER_FILE, TRIAL_FILE)
MAX_TRIAL_BOOTS = 3  # boots a new system part gets to reach the cloud
DEFAULT_TRIAL_S = 300
_OTA_STATE = (TRANSFER_FILE, BITMAP_FILE, PENDING_FILE, APPLY_FILE, SCRATCH_FILE)


def _drop_update():
    for path in _OTA_STATE:
        flashfs.remove_tree(path)


def _sha256_of(part, size):
    import hashlib

    block = part.ioctl(5, 0)
    h = hashlib.sha256()
    view = memoryview(_buf)
    offset = 0
    while offset < size:
        n = min(len(_buf), size - offset)
        part.readblocks(offset // block, view[:n], offset % block)
        h.update(view[:n])
        offset += n
    return binascii.hexlify(h.digest()).decode()


def _module_in(part):
    """The header of the valid (CRC-checked) module image in part, or None."""
    slot = Slot(part, "", 0, 0)
    try:
        info, crc_ok, _ = mf.check_image(slot.read, slot.size, None, _buf)
    except ValueError:
        return None
    return info if crc_ok else None


def _system_slot(board, label):
    for p in board["flash"]["partitions"]:
        if p["label"] == label:
            return p.get("module") == "system-part"
    return False


def _refusal(board, label, staging, size):
    """Why the staged image may not go into slot `label`, or None: its header must
    name that slot's module and this platform, and its payload hold what such a
    module holds (module_check, the same rule the scan applies before installing)."""
    entry = [p for p in board["flash"]["partitions"] if p["label"] == label]
    if not entry or not entry[0].get("module"):
        return "integrity", "%s is not a module slot" % label
    staged = Slot(staging, "staging", mf.function_id(entry[0]["module"]), entry[0].get("index", 0))
    try:
        info, crc_ok, _ = mf.check_image(staged.read, size, None, _buf)
    except ValueError as e:
        return "integrity", str(e)
    if not crc_ok or info.image_size != size:
        return "integrity", "the staged image is damaged"
    if info.platform != mf.platform_id(board["platform"]):
        return "platform", "built for %s" % mf.platform_name(info.platform)
    import module_check

    problem = module_check.signature_problem(staged.read, info)
    if problem is None:
        problem = module_check.check(staged.read, info, staged.function, staged.index)
    del sys.modules["module_check"]
    return problem


# Copy (a module with nothing to go back to)


def _copy(dest, staging, size, sha, journal):
    copied = 0
    if journal.get("op") == "copy" and journal.get("sha256") == sha:
        copied = int(journal.get("copied", 0))
    block = dest.ioctl(5, 0)
    copied -= copied % block
    if copied:
        print("keel: resuming the update at byte %d" % copied)
    view = memoryview(_buf)
    for attempt in (0, 1):
        while copied < size:
            b = copied // block
            dest.ioctl(6, b)
            end = min(copied + block, size)
            at = copied
            while at < end:
                n = min(len(_buf), end - at)
                staging.readblocks(at // block, view[:n], at % block)
                dest.writeblocks(b, view[:n], at % block)
                at += n
            copied = end
            flashfs.write_json(APPLY_FILE, {"op": "copy", "sha256": sha, "copied": copied})
        if _sha256_of(dest, size) == sha:
            return True
        print("keel: the copy does not verify; copying again")
        copied = 0
    return False


# Swap (a system part replacing another, and its rollback)


def _write_scratch(number, data):
    tmp = SCRATCH_FILE + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<I", number))
        f.write(data)
    os.rename(tmp, SCRATCH_FILE)


def _read_scratch(number, data):
    """Fill data from the scratch file if it holds block `number`."""
    try:
        with open(SCRATCH_FILE, "rb") as f:
            tag = f.read(4)
            if len(tag) != 4 or struct.unpack("<I", tag)[0] != number:
                return False
            return f.readinto(data) == len(data)
    except OSError:
        return False


def _swap(dest, staging, journal):
    """Exchange the first journal["count"] blocks of dest and staging, resuming at
    the journal's block and step. For each block: the slot's block goes to the
    scratch file, the staged block to the slot, then the scratch to staging."""
    block = dest.ioctl(5, 0)
    data = bytearray(block)
    count = journal["count"]
    b, step = journal["block"], journal["step"]
    while b < count:
        if step == 0:
            if not _read_scratch(b, data):
                dest.readblocks(b, data)
                _write_scratch(b, data)
            staging.readblocks(b, data)
            dest.ioctl(6, b)
            dest.writeblocks(b, data, 0)
            step = 1
            journal["step"] = 1
            flashfs.write_json(APPLY_FILE, journal)
        if not _read_scratch(b, data):
            raise OSError("the swap's scratch block is lost")
        staging.ioctl(6, b)
        staging.writeblocks(b, data, 0)
        b, step = b + 1, 0
        journal["block"], journal["step"] = b, 0
        flashfs.write_json(APPLY_FILE, journal)
    flashfs.remove_tree(SCRATCH_FILE)


def _start_swap(op, sha, count, old=None):
    flashfs.remove_tree(SCRATCH_FILE)  # a scratch block from an earlier swap
    journal = {"op": op, "sha256": sha, "count": count, "block": 0, "step": 0}
    if old is not None:
        journal["old"] = old
    flashfs.write_json(APPLY_FILE, journal)
    return journal


def apply_update(port, board):
    """Install a verified update (ota.py) from the staging partition into its slot.
    Returns the slot's label when an update went in."""
    pending = flashfs.read_json(PENDING_FILE)
    if pending is None:
        if flashfs.exists(PENDING_FILE):
            _drop_update()
        return None
    try:
        label, size, sha = pending["slot"], int(pending["size"]), pending["sha256"]
        trial_s = int(pending.get("trial_s") or DEFAULT_TRIAL_S)
        dest = port.Partition.find(label)
        staging = port.Partition.find("staging")
        if dest is None or staging is None or size > dest.info()[2]:
            raise ValueError("no slot %s" % label)
    except (KeyError, TypeError, ValueError) as e:
        print("keel: dropping the pending update (%s)" % e)
        _drop_update()
        return None
    journal = flashfs.read_json(APPLY_FILE)
    if not isinstance(journal, dict) or journal.get("sha256") != sha:
        journal = {}
    if not journal:  # a fresh install: copy, or swap when there is a part to go back to
        if _sha256_of(staging, size) != sha:
            print("keel: the staged update is damaged; keeping the installed firmware")
            _drop_update()
            return None
        refused = _refusal(board, label, staging, size)
        if refused:
            print("keel: refusing the update for %s (%s): %s; keeping the installed firmware"
                  % (label, refused[0], refused[1]))
            entry = ([p for p in board["flash"]["partitions"] if p["label"] == label] or [{}])[0]
            flashfs.write_json(REFUSED_FILE, {
                "function": entry.get("module") or "?", "index": entry.get("index", 0),
                "sha256": sha, "reason": refused[0], "via": "install"})
            _drop_update()
            return None
        old = _module_in(dest) if _system_slot(board, label) else None
        if old is not None:
            block = dest.ioctl(5, 0)
            count = (max(size, old.image_size) + block - 1) // block
            if count * block <= staging.info()[2]:
                backup = {"size": old.image_size, "sha256": _sha256_of(dest, old.image_size),
                          "version": mf.decode_version(old.version)}
                journal = _start_swap("swap", sha, count, backup)
    swapped = journal.get("op") == "swap"
    if swapped:
        print("keel: installing the update into %s (swap, block %d of %d)"
              % (label, journal["block"], journal["count"]))
        _swap(dest, staging, journal)
        installed = _sha256_of(dest, size) == sha
    else:
        print("keel: installing the update into %s (copy)" % label)
        installed = _copy(dest, staging, size, sha, journal)
        if not installed:
            print("keel: cannot install the update into %s" % label)
            _drop_update()
            return None
    info = _module_in(dest)
    version = mf.decode_version(info.version) if info else None
    if swapped:
        trial = {"slot": label, "version": version, "sha256": sha, "size": size,
                 "function": "system-part", "index": info.index if info else None,
                 "backup": journal["old"], "count": journal["count"],
                 "trial_s": trial_s, "boots": 0}
        flashfs.write_json(TRIAL_FILE, trial)
        if not installed:  # the flash did not take it: back at once
            print("keel: the update in %s does not verify" % label)
            flashfs.write_atomic(ROLLBACK_FILE, "install-verify")
    flashfs.write_json(INSTALLED_FILE, {"slot": label, "version": version, "sha256": sha})
    flashfs.remove_tree(ROLLED_BACK_FILE)
    flashfs.remove_tree(REFUSED_FILE)
    _drop_update()
    return label


# Trial


def check_trial(port, reset_reason):
    """Count a boot of a system part on trial, or roll it back when it asked to be
    (ROLLBACK_FILE), kept resetting, or failed to start. Returns "rollback" when the
    previous part went back in."""
    trial = flashfs.read_json(TRIAL_FILE)
    if not isinstance(trial, dict):
        flashfs.remove_tree(TRIAL_FILE)
        return None
    try:
        backup = trial["backup"]
        dest = port.Partition.find(trial["slot"])
        staging = port.Partition.find("staging")
        count = int(trial["count"])
    except (KeyError, TypeError, ValueError):
        dest = None
    if dest is None or staging is None:
        print("keel: dropping a trial that names no slot")
        flashfs.remove_tree(TRIAL_FILE)
        return None
    journal = flashfs.read_json(APPLY_FILE)
    going_back = (isinstance(journal, dict) and journal.get("op") == "rollback"
                  and journal.get("sha256") == backup["sha256"])
    reason = flashfs.read_text(ROLLBACK_FILE)
    if not going_back and reason is None:
        if reset_reason != "app-crash":  # the app's own crashes are the app loader's
            trial["boots"] = int(trial.get("boots", 0)) + 1
        if trial["boots"] <= MAX_TRIAL_BOOTS:
            flashfs.write_json(TRIAL_FILE, trial)
            print("keel: %s %s on trial (boot %d of %d)"
                  % (trial["slot"], trial["version"], trial["boots"], MAX_TRIAL_BOOTS))
            return None
        reason = "boot-loop"
    if not going_back:
        print("keel: %s %s did not prove itself (%s); rolling back to %s"
              % (trial["slot"], trial["version"], reason, backup["version"]))
        if _sha256_of(staging, backup["size"]) != backup["sha256"]:
            print("keel: the previous %s is damaged; keeping %s" % (trial["slot"], trial["version"]))
            for path in (TRIAL_FILE, ROLLBACK_FILE):
                flashfs.remove_tree(path)
            return None
        journal = _start_swap("rollback", backup["sha256"], count)
        journal["reason"] = reason
        flashfs.write_json(APPLY_FILE, journal)
    _swap(dest, staging, journal)
    if _sha256_of(dest, backup["size"]) != backup["sha256"]:
        print("keel: the rollback of %s does not verify" % trial["slot"])
    flashfs.write_json(ROLLED_BACK_FILE, {
        "function": trial.get("function", "system-part"), "index": trial.get("index"),
        "version": trial["version"], "sha256": trial["sha256"],
        "restored": backup["version"], "reason": journal.get("reason") or reason,
    })
    for path in (TRIAL_FILE, ROLLBACK_FILE, APPLY_FILE):
        flashfs.remove_tree(path)
    print("keel: %s is back on %s" % (trial["slot"], backup["version"]))
    return "rollback"
