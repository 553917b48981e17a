# Installing a module's code: the bootloader imports this only when a slot holds a
# module whose code is not installed yet (keel_boot.ensure_installed), and drops it
# before the hand-over, so a boot with nothing to install keeps none of it on the heap.
# See docs/boot-flow.md, "Installing a module".
import os
import sys
import binascii
import module_format as mf
import flashfs
from keel_boot import BOOTLOADER_TRIAL_FILE, _buf


def refuse(slot, reason, message):
    slot.valid = False
    slot.reason = reason
    version = mf.decode_version(slot.info.version) if slot.info else "?"
    print("keel: refusing %s %s (%s): %s" % (slot.label, version, reason, message))
    return False


def accept(slot):
    """Whether the image in the slot, its SHA-256 checked, may be installed: the one
    place every module passes before its code is written (docs/boot-flow.md)."""
    import module_check

    problem = module_check.check(slot.read, slot.info, slot.function, slot.index)
    del sys.modules["module_check"]
    return refuse(slot, problem[0], problem[1]) if problem else True


def install_code(slot):
    """Verify the SHA-256, accept() the module and extract its payload into its code
    directory.

    Extracts to a new directory and swaps it into place with renames, so a power
    cut leaves the old code, or the new, or a half-written copy that the next boot
    removes and redoes (stage 0 finishes an interrupted swap of the bootloader's own
    code, and keeps the previous bootloader until a new one proves itself)."""
    import hashlib
    import romfs

    _, _, sha_ok = mf.check_image(slot.read, slot.size, hashlib.sha256, _buf)
    slot.sha256_ok = sha_ok
    if not sha_ok:
        return refuse(slot, "integrity", "the SHA-256 does not match")
    if not accept(slot):
        return False
    final = slot.code_dir
    fresh = final + ".new"
    flashfs.remove_tree(fresh)
    flashfs.makedirs(fresh)
    try:
        romfs.extract(slot.read, slot.info.header_size, slot.info.payload_size, fresh, _buf)
    except (ValueError, OSError) as e:
        flashfs.remove_tree(fresh)
        return refuse(slot, "integrity", "cannot extract it (%s)" % e)
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
