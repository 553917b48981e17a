# Installing a verified update (staged by system/core/ota.py) into its slot. The
# bootloader imports this only when an update is pending. The staged image stays
# intact until the copy is verified, and the copy is journaled block by block, so a
# power cut resumes it: the device boots the old module set or the new, never neither.
import binascii
import module_format as mf
import flashfs
from keel_boot import Slot, _buf

OTA_DIR = "/keel/ota"
PENDING_FILE = OTA_DIR + "/pending.json"
APPLY_FILE = OTA_DIR + "/apply.json"
INSTALLED_FILE = OTA_DIR + "/installed.json"
_OTA_STATE = ("/transfer.json", "/bitmap", "/pending.json", "/apply.json")


def _drop_update():
    for name in _OTA_STATE:
        flashfs.remove_tree(OTA_DIR + name)


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


def apply_update(port, board):
    """Copy a verified update (ota.py) from the staging partition into its slot.

    The staged image stays intact until the copy is verified, and the progress is
    journaled after every block, so a power cut resumes the copy. Returns the slot's
    label when an update went in."""
    pending = flashfs.read_json(PENDING_FILE)
    if pending is None:
        if flashfs.exists(PENDING_FILE):
            _drop_update()
        return None
    try:
        label, size, sha = pending["slot"], int(pending["size"]), pending["sha256"]
        dest = port.Partition.find(label)
        staging = port.Partition.find("staging")
        if dest is None or staging is None or size > dest.info()[2]:
            raise ValueError("no slot %s" % label)
    except (KeyError, TypeError, ValueError) as e:
        print("keel: dropping the pending update (%s)" % e)
        _drop_update()
        return None
    if _sha256_of(staging, size) != sha:
        print("keel: the staged update is damaged; keeping the installed firmware")
        _drop_update()
        return None
    journal = flashfs.read_json(APPLY_FILE)
    copied = 0
    if isinstance(journal, dict) and journal.get("sha256") == sha:
        copied = int(journal.get("copied", 0))
    block = dest.ioctl(5, 0)
    copied -= copied % block
    if copied:
        print("keel: resuming the update of %s at byte %d" % (label, copied))
    else:
        print("keel: installing the update into %s" % label)
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
            flashfs.write_json(APPLY_FILE, {"sha256": sha, "copied": copied})
        if _sha256_of(dest, size) == sha:
            break
        print("keel: the copy into %s does not verify; copying again" % label)
        copied = 0
    else:
        print("keel: cannot install the update into %s" % label)
        _drop_update()
        return None
    slot = Slot(dest, label, 0, 0)
    try:
        info, crc_ok, _ = mf.check_image(slot.read, size, None, _buf)
        version = mf.decode_version(info.version)
    except ValueError:
        crc_ok, version = False, None
    if not crc_ok:
        print("keel: the update in %s has a bad CRC" % label)
    flashfs.write_json(INSTALLED_FILE, {"slot": label, "version": version, "sha256": sha})
    _drop_update()
    return label
