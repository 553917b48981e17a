# Which modules a board takes: the signature rule (docs/signing.md). A board that trusts
# public keys installs only modules signed by one of them; a board that trusts none is in
# development mode and takes unsigned modules. The keys are the bootloader's own: a file
# in its code directory, written when the board is set up and replaced only by a
# bootloader module (signed, on a board that trusts keys) that brings its own.
# The device loads this only to install; the host tools and the cloud use the same rule
# (tools/keel/trust.py and cloud/keel_cloud/trust.py are links to this file).
import binascii

BUNDLED = "trust.json"  # in a bootloader module's payload: the keys it brings
SIGNED_PREFIX = b"KEELSIG1"  # a signature covers this, then the module's digest

# Why a board refuses a module: a slot's invalid_reason, an update's refusal.
UNSIGNED = "unsigned"  # the board trusts keys; the module carries no signature
UNTRUSTED = "untrusted"  # signed by a key the board does not trust (or no readable keys)
BAD_SIGNATURE = "signature"  # signed under a trusted key's id, but it does not verify


def refusal(block, digest, keys, verify, sha256):
    """Why a board trusting keys (raw 32-byte Ed25519 public keys) refuses a module whose
    signature block is block ((key_id, signature), or None for an unsigned module) over
    its digest; None when it takes it. verify(key, message, signature) -> bool; sha256 is
    a constructor. keys None: the board's keys cannot be read, so it takes nothing."""
    if keys is None:
        return UNTRUSTED
    if not keys:
        return None
    if block is None:
        return UNSIGNED
    key_id, signature = block
    for key in keys:
        if sha256(key).digest() == key_id:
            if verify(key, SIGNED_PREFIX + digest, signature):
                return None
            return BAD_SIGNATURE
    return UNTRUSTED


def parse_keys(doc):
    """The raw keys of a trust document {"keys": ["64 hex digits", ...]}, or None when
    it is malformed."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        return None
    keys = []
    for text in doc["keys"]:
        if not isinstance(text, str) or len(text) != 64:
            return None
        try:
            keys.append(binascii.unhexlify(text))
        except ValueError:
            return None
    return keys


def document(keys):
    """The trust document for raw keys (what the factory and keel build --trust write)."""
    return {"keys": [binascii.hexlify(k).decode() for k in keys]}


def board_keys(path=None):
    """Device: the keys this board trusts ([] in development mode); None when the file is
    there but unreadable, so that a damaged trust file never opens the board."""
    import flashfs

    if path is None:
        from keel_files import TRUST_FILE as path
    if not flashfs.exists(path):
        return []
    return parse_keys(flashfs.read_json(path))


def fingerprints(keys, sha256):
    return [binascii.hexlify(sha256(k).digest()).decode() for k in keys or ()]


def summary(sha256):
    """Device: what the status and the describe say of the board's trust."""
    keys = board_keys()
    if keys is None:
        return {"mode": "enforced", "keys": [], "error": "the trust file is unreadable"}
    return {"mode": "enforced" if keys else "development", "keys": fingerprints(keys, sha256)}


def check(mf, read, info, buf, sha256, keys=-1):
    """Device: why this board refuses the module in read (info: its header), or None.
    buf holds at least mf.SIGNATURE_SIZE bytes. keys: the board's (-1: read them)."""
    if keys == -1:
        keys = board_keys()
    if keys == []:
        return None  # development mode: no signature to check, no verifier to load
    block = mf.signature_block(read, info, buf)
    digest = mf.stored_sha256(read, info, buf)
    import ed25519

    return refusal(block, digest, keys, ed25519.verify, sha256)
