"""Signed modules in the cloud (docs/signing.md): what a board trusting some keys would
say of a module image, with the boards' own rule (trust.py, a link to
bootloader/trust.py) and Ed25519 from `cryptography`."""

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keel_cloud import module_format as mf
from keel_cloud import trust


def verify(raw_public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Ed25519 verification on the host (a board runs bootloader/ed25519.py)."""
    try:
        Ed25519PublicKey.from_public_bytes(raw_public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


def header(data: bytes) -> mf.ModuleInfo:
    """The module's header; ValueError (FormatError) when it is not a whole module."""
    info = mf.parse_header(data)
    if len(data) < info.image_size:
        raise mf.FormatError("truncated module image")
    return info


def signed_by(data: bytes) -> str | None:
    """The fingerprint of the key the module says signed it, or None (unsigned)."""
    info = header(data)
    block = mf.signature_block(mf.bytes_reader(data), info, bytearray(mf.SIGNATURE_SIZE))
    return block[0].hex() if block else None


def digest(data: bytes) -> str:
    """The SHA-256 recorded in the module's suffix (what a device reports), hex."""
    info = header(data)
    end = info.header_size + info.payload_size
    return data[end:end + 32].hex()


def refusal(data: bytes, keys: list[bytes] | None) -> str | None:
    """Why a board trusting keys (raw public keys; [] = development mode) refuses this
    module image: trust.UNSIGNED, UNTRUSTED or BAD_SIGNATURE; None when it takes it."""
    info = header(data)
    buf = bytearray(mf.SIGNATURE_SIZE)
    read = mf.bytes_reader(data)
    block = mf.signature_block(read, info, buf)
    return trust.refusal(block, mf.stored_sha256(read, info, buf), keys, verify, hashlib.sha256)


def fingerprint(raw_public_key: bytes) -> str:
    return hashlib.sha256(raw_public_key).hexdigest()


def refusal_text(reason: str, key_id: str | None, keys: list[bytes]) -> str:
    """A refusal said to a person."""
    names = ", ".join(fingerprint(k)[:16] for k in keys) or "none"
    if reason == trust.UNSIGNED:
        return f"it is not signed, and only modules signed by keys {names} are taken"
    if reason == trust.UNTRUSTED:
        return f"it is signed by key {(key_id or '?')[:16]}, not by one of the keys {names}"
    return f"its signature does not verify with key {(key_id or '?')[:16]}"


def offer_fields(data: bytes) -> dict:
    """What an update offer says of a signed module, so that a board that trusts keys can
    check the signature before it takes a single chunk (docs/protocol.md): {"signature":
    {"key", "digest", "sig"}} (hex), or {} for an unsigned module."""
    try:
        info = header(data)
    except ValueError:
        return {}
    block = mf.signature_block(mf.bytes_reader(data), info, bytearray(mf.SIGNATURE_SIZE))
    if block is None:
        return {}
    return {"signature": {"key": block[0].hex(), "digest": digest(data), "sig": block[1].hex()}}


def send_refusal(data: bytes, fleet_keys: list[bytes], describe: dict | None) -> str | None:
    """Why the cloud does not send this module image to a device, or None: its fleet
    requires modules signed by fleet_keys, or its describe says it trusts only some keys
    (`trust`) and the module is not signed by one of them (the board would refuse it)."""
    board = describe.get("trust") if isinstance(describe, dict) else None
    enforced = isinstance(board, dict) and board.get("mode") == "enforced"
    if not fleet_keys and not enforced:
        return None  # a board in development mode takes what it can check itself
    try:
        key_id = signed_by(data)
    except ValueError as e:
        return f"not a module image ({e})"
    if fleet_keys:
        reason = refusal(data, fleet_keys)
        if reason:
            return f"the device's fleet requires signed modules: {refusal_text(reason, key_id, fleet_keys)}"
    if enforced:
        keys = [k for k in board.get("keys") or [] if isinstance(k, str)]
        names = ", ".join(k[:16] for k in keys) or "none readable"
        if key_id is None:
            return f"the device takes only modules signed by its keys ({names}): it is not signed"
        if key_id not in keys:
            return (f"it is signed by key {key_id[:16]}, which the device does not trust "
                    f"(its keys: {names})")
    return None
