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
