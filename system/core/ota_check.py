# The OTA receiver's checks of a received image, after its SHA-256 matched the offer
# (system/core/ota.py): its header, platform, payload, signature and dependencies.
# Loaded for the check only, with the module format and module_check, and dropped
# again: on a small board the receiver and these do not fit in the heap together with
# the session and the app, and run at the start of the next boot instead
# (docs/protocol.md, "Updates").
import binascii
import module_format as mf
import module_check
import flashfs
from keel_files import BOOTLOADER_REJECTED_FILE


def verify(receiver, read, buf):
    """True when the staged image (read(offset, buf), receiver.size bytes) is what its
    offer said and may go in; otherwise the receiver has failed the transfer."""
    r = receiver
    doc = r.offer
    try:
        info, crc_ok, _ = mf.check_image(read, r.size, None, buf)
    except ValueError:
        return _fail(r, "header")
    if not crc_ok or info.image_size != r.size:
        return _fail(r, "header")
    if info.function != doc["function"] or info.index != doc["index"]:
        return _fail(r, "header")
    if mf.platform_name(info.platform) != r.platform:
        return _fail(r, "platform")
    refused = _refusal(read, info, doc)
    if refused is None and not _signed_as_offered(read, info, doc, buf):
        refused = ("signature", "the image's signature is not the one offered")
    if refused:
        print("keel: ota: %s" % refused[1])
        r._refused({"function": mf.function_name(info.function), "index": info.index,
                    "version": mf.decode_version(info.version), "sha256": doc["sha256"],
                    "reason": refused[0]})
        return _fail(r, refused[0], detail=refused[1][:200])  # (a path can be long)
    missing = dependency_check(info, r.slots)
    if missing:
        return _fail(r, "dependency", missing=missing)
    return True


def _fail(receiver, reason, **keys):
    receiver._failed(reason, **keys)
    return False


def _refusal(read, info, doc):
    """Why the bootloader would refuse the module, or None: its payload must be what
    its header says (module_check: the one rule for the device and the host), and a
    bootloader must not be one stage 0 already went back from."""
    problem = module_check.check(read, info, doc["function"], doc["index"])
    if problem is None and info.function == mf.FUNCTION_BOOTLOADER:
        if flashfs.read_text(BOOTLOADER_REJECTED_FILE) == doc["sha256"]:
            problem = ("rejected", "this bootloader did not start the system when it was "
                       "installed")
    return problem


def _signed_as_offered(read, info, doc, buf):
    """The received image carries the signature block and digest its offer did (the ones
    checked then), or, offered unsigned to a board that took it, no requirement."""
    offered = doc.get("signature")
    if offered is None:
        return True
    block = mf.signature_block(read, info, buf)
    if block is None:
        return False
    if binascii.hexlify(block[0]).decode() != offered["key"] or \
            binascii.hexlify(block[1]).decode() != offered["sig"]:
        return False
    return binascii.hexlify(mf.stored_sha256(read, info, buf)).decode() == offered["digest"]


def dependency_check(info, slots):
    """What the new module would leave unmet: its own dependencies, and (the "full"
    check) those of every other installed module that were met before and would not
    be with the new version in place. An app's own dependencies are not a reason to
    refuse it: the device runs it once they are met, in safe mode until then, and the
    cloud's healer sends the system parts it needs."""
    installed = [s.info for s in slots if s.valid and s.info is not None]
    after = [m for m in installed if not (m.function == info.function and m.index == info.index)]
    after.append(info)
    needed = {}
    for module in after:
        for dep in mf.missing_dependencies(module, after):
            if module is not info and mf.dependency_met(dep, installed):
                pass
            elif module is not info:
                continue  # unmet already: not this update's doing
            elif info.function == mf.FUNCTION_USER_PART:
                continue
            key = (dep[0], dep[1])
            if needed.get(key, 0) < dep[2]:
                needed[key] = dep[2]
    return [mf.dependency_dict((k[0], k[1], v)) for k, v in sorted(needed.items())]
