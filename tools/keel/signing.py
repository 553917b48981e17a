"""Signing keys and signed modules on the host: keel keys, keel sign, keel build --sign,
and checking a module against the keys a board trusts (docs/signing.md).

Keys are Ed25519. The private key is a PEM file (PKCS#8) kept by whoever releases
firmware; KEYFILE.pub is its public key (PEM, SubjectPublicKeyInfo), which boards are
told to trust. A key is named by its fingerprint: the SHA-256 of the raw 32-byte public
key, in hex, which is also the key id written into every module it signs."""

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from keel_cloud import signatures

from keel import module_format as mf
from keel import trust
from keel.errors import KeelError
from keel.trust import BAD_SIGNATURE, UNSIGNED, UNTRUSTED  # noqa: F401 - the reasons


def fingerprint(raw_public_key: bytes) -> str:
    return hashlib.sha256(raw_public_key).hexdigest()


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_key(path: Path | str, force: bool = False) -> str:
    """Write a new private key to path (mode 0600) and its public key to path.pub.
    Returns the key's fingerprint."""
    path = Path(path)
    pub = public_path(path)
    if not force:
        for existing in (path, pub):
            if existing.exists():
                raise KeelError(f"{existing} exists: not overwriting a key (--force to replace it)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(tmp, path)
    public = key.public_key()
    pub.write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    return fingerprint(raw_public(public))


def public_path(path: Path | str) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".pub")


def _read(path: Path | str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise KeelError(f"{path}: {e.strerror}") from None


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    data = _read(path)
    if b"PUBLIC KEY" in data:
        raise KeelError(f"{path} is a public key: sign with the private key file "
                        "(the one without .pub)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeelError(f"{path}: not a private key made by keel keys generate ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeelError(f"{path}: not an Ed25519 key (keel keys generate makes one)")
    return key


def load_public_key(path: Path | str) -> bytes:
    """The raw 32-byte public key in a .pub file (a board is told to trust this)."""
    data = _read(path)
    if b"PRIVATE KEY" in data:
        raise KeelError(f"{path} is a private key: give the public key ({public_path(path).name}); "
                        "a private key never goes near a board")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise KeelError(f"{path}: not a public key made by keel keys generate ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeelError(f"{path}: not an Ed25519 public key (keel keys generate makes one)")
    return raw_public(key)


def signer(key: Ed25519PrivateKey):
    """sign(message) -> (key_id, signature), for module_format.build_image."""
    key_id = bytes.fromhex(fingerprint(raw_public(key.public_key())))

    def sign(message: bytes) -> tuple[bytes, bytes]:
        return key_id, key.sign(message)

    return sign


def sign_image(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """The module image signed with key: the signed flag set in its header (so its
    SHA-256 changes), the digest signed, CRC recomputed. An image signed before is signed
    again (the old signature is replaced). The image must be intact."""
    try:
        info, crc_ok, sha_ok = mf.check_image(mf.bytes_reader(data), len(data), hashlib.sha256)
    except mf.FormatError as e:
        raise KeelError(str(e)) from None
    if not (crc_ok and sha_ok):
        raise KeelError("the image is corrupt (CRC32 or SHA-256 mismatch): not signing it")
    if len(data) != info.image_size:
        raise KeelError(f"{len(data) - info.image_size} bytes after the end of the module")
    payload = data[info.header_size:info.header_size + info.payload_size]
    info.flags &= ~mf.FLAG_SIGNED
    return mf.build_image(info, payload, hashlib.sha256, signer(key))


def check_signature(data: bytes, info: mf.ModuleInfo, trusted: list[bytes]) -> str | None:
    """Why a board trusting these raw public keys refuses the module (UNSIGNED,
    UNTRUSTED, BAD_SIGNATURE), or None when it takes it: the board's own rule
    (bootloader/trust.py). No keys: development mode, every module is taken."""
    buf = bytearray(mf.SIGNATURE_SIZE)
    read = mf.bytes_reader(data)
    block = mf.signature_block(read, info, buf)
    digest = mf.stored_sha256(read, info, buf)
    return trust.refusal(block, digest, trusted, signatures.verify, hashlib.sha256)


def refusal_text(reason: str, key_id: str | None, trusted: list[bytes]) -> str:
    """A refusal said to a person."""
    keys = ", ".join(fingerprint(k)[:16] for k in trusted)
    if reason == UNSIGNED:
        return f"the module is not signed, and the board trusts only signed modules (keys {keys})"
    if reason == UNTRUSTED:
        return f"the module is signed by key {key_id[:16]}, which the board does not trust (keys {keys})"
    return f"the module's signature does not verify with key {(key_id or '?')[:16]}"
