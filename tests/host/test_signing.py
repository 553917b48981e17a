"""Signed modules on the host: the signature block in the format, keel keys, keel sign,
keel build --sign, keel inspect's signer, and the check a board trusting keys makes."""

import hashlib
import json
import stat
import struct
import zlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from keel import images, signing
from keel import module_format as mf

KEY_A = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KEY_B = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
RAW_A = signing.raw_public(KEY_A.public_key())
RAW_B = signing.raw_public(KEY_B.public_key())


def unsigned_image(payload=b"payload bytes " * 9):
    info = mf.ModuleInfo(mf.FUNCTION_USER_PART, 1, mf.encode_version("1.0.0"), 1,
                         [(mf.FUNCTION_SYSTEM_PART, 1, mf.encode_version("1.0.0"))])
    return mf.build_image(info, payload, hashlib.sha256)


def parse(data):
    return mf.check_image(mf.bytes_reader(data), len(data), hashlib.sha256)


def recrc(data: bytes) -> bytes:
    """The image with its CRC32 made right again (what an attacker can always do)."""
    body = data[:-4]
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def test_a_signed_image_carries_its_block_between_digest_and_crc():
    data = signing.sign_image(unsigned_image(), KEY_A)
    info, crc_ok, sha_ok = parse(data)
    assert crc_ok and sha_ok and info.signed
    assert info.flags == mf.FLAG_SIGNED
    assert len(data) == info.image_size == info.header_size + info.payload_size + 36 + 96
    body = info.header_size + info.payload_size
    digest = data[body:body + 32]
    assert digest == hashlib.sha256(data[:body]).digest()
    key_id, signature = mf.signature_block(mf.bytes_reader(data), info, bytearray(96))
    assert key_id == hashlib.sha256(RAW_A).digest()
    assert data[body + 32:body + 64] == key_id
    KEY_A.public_key().verify(signature, b"KEELSIG1" + digest)  # raises if wrong
    # The CRC covers the signature block too.
    assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4]) & 0xFFFFFFFF


def test_signing_changes_the_digest_but_not_the_payload():
    plain = unsigned_image()
    signed = signing.sign_image(plain, KEY_A)
    p_info, _, _ = parse(plain)
    s_info, _, _ = parse(signed)
    p_end = p_info.header_size + p_info.payload_size
    assert signed[p_info.header_size:p_end] == plain[p_info.header_size:p_end]
    assert signed[p_end:p_end + 32] != plain[p_end:p_end + 32]  # the flag is in the header


def test_signing_again_replaces_the_signature():
    once = signing.sign_image(unsigned_image(), KEY_A)
    twice = signing.sign_image(once, KEY_B)
    info, crc_ok, sha_ok = parse(twice)
    assert crc_ok and sha_ok and len(twice) == len(once)
    assert signing.check_signature(twice, info, [RAW_B]) is None
    assert signing.check_signature(twice, info, [RAW_A]) == signing.UNTRUSTED


def test_what_a_board_trusting_keys_says():
    plain = unsigned_image()
    signed = signing.sign_image(plain, KEY_A)
    p_info, _, _ = parse(plain)
    s_info, _, _ = parse(signed)
    assert signing.check_signature(plain, p_info, []) is None  # development mode
    assert signing.check_signature(signed, s_info, []) is None
    assert signing.check_signature(plain, p_info, [RAW_A]) == signing.UNSIGNED
    assert signing.check_signature(signed, s_info, [RAW_A]) is None
    assert signing.check_signature(signed, s_info, [RAW_B, RAW_A]) is None
    assert signing.check_signature(signed, s_info, [RAW_B]) == signing.UNTRUSTED


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_changed_byte_with_the_crc_redone_is_refused(data):
    """The attacker changes any byte of a signed image and fixes the CRC (and the SHA-256,
    when the change is in the header or payload): a board trusting the key refuses it."""
    signed = signing.sign_image(unsigned_image(), KEY_A)
    info, _, _ = parse(signed)
    body = info.header_size + info.payload_size
    at = data.draw(st.integers(0, len(signed) - 5))
    if at < 20:  # keep the header readable and signed (else the format itself refuses it)
        at = data.draw(st.integers(20, len(signed) - 5))
    flip = data.draw(st.integers(1, 255))
    mutated = bytearray(signed)
    mutated[at] ^= flip
    if at < body:  # a header or payload byte: give it a matching digest
        mutated[body:body + 32] = hashlib.sha256(bytes(mutated[:body])).digest()
    mutated = recrc(bytes(mutated))
    m_info, crc_ok, sha_ok = parse(mutated)
    if body <= at < body + 32:  # the digest itself: the SHA-256 check sees it
        assert crc_ok and not sha_ok
        return
    assert crc_ok and sha_ok
    assert signing.check_signature(mutated, m_info, [RAW_A]) in (signing.BAD_SIGNATURE,
                                                                 signing.UNTRUSTED)


def test_a_stripped_signature_leaves_an_unsigned_module():
    """Clearing the flag and cutting the block off gives a valid unsigned module, with
    another digest: refused by a board that trusts a key."""
    signed = signing.sign_image(unsigned_image(), KEY_A)
    info, _, _ = parse(signed)
    body = bytearray(signed[:info.header_size + info.payload_size])
    body[7] = 0
    stripped = bytes(body) + hashlib.sha256(bytes(body)).digest()
    stripped = recrc(stripped + b"\0\0\0\0")
    s_info, crc_ok, sha_ok = parse(stripped)
    assert crc_ok and sha_ok and not s_info.signed
    assert signing.check_signature(stripped, s_info, [RAW_A]) == signing.UNSIGNED


@pytest.mark.parametrize("flags", [mf.FLAG_COMPRESSED, 0x04, 0x80, mf.FLAG_SIGNED | 1])
def test_unknown_flags_are_refused(flags):
    data = bytearray(unsigned_image())
    data[7] = flags
    with pytest.raises(mf.FormatError, match="unsupported module flags"):
        mf.parse_header(bytes(data))
    info = mf.ModuleInfo(5, 1, mf.encode_version("1.0.0"), 1, flags=flags)
    with pytest.raises(mf.FormatError, match="unsupported module flags"):
        mf.pack_header(info)


def test_a_truncated_signature_block_is_truncated():
    signed = signing.sign_image(unsigned_image(), KEY_A)
    with pytest.raises(mf.FormatError, match="truncated"):
        parse(signed[:-50])


def test_sign_refuses_a_corrupt_image():
    data = bytearray(unsigned_image())
    data[30] ^= 1
    with pytest.raises(Exception, match="corrupt"):
        signing.sign_image(bytes(data), KEY_A)


# The CLI


def test_keys_generate_writes_a_private_and_a_public_key(keel_cli, tmp_path):
    key = tmp_path / "release-key"
    proc = keel_cli("keys", "generate", key)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    raw = signing.load_public_key(tmp_path / "release-key.pub")
    fp = signing.fingerprint(raw)
    assert fp in proc.stdout
    assert signing.raw_public(signing.load_private_key(key).public_key()) == raw
    shown = keel_cli("keys", "show", tmp_path / "release-key.pub")
    assert fp in shown.stdout


def test_keys_generate_does_not_overwrite(keel_cli, expect_cli_error, tmp_path):
    key = tmp_path / "k"
    assert keel_cli("keys", "generate", key).returncode == 0
    before = key.read_bytes()
    expect_cli_error(keel_cli("keys", "generate", key), "exists")
    assert key.read_bytes() == before
    assert keel_cli("keys", "generate", key, "--force").returncode == 0
    assert key.read_bytes() != before


def test_build_sign_inspect_round_trip(keel_cli, expect_cli_error, tmp_path, repo):
    key = tmp_path / "k"
    other = tmp_path / "other"
    keel_cli("keys", "generate", key)
    keel_cli("keys", "generate", other)
    app = tmp_path / "app.bin"
    proc = keel_cli("build", "app", repo / "examples/hello", "--platform", "virtual",
                    "--target", "1.0.0", "-o", app, "--sign", key)
    assert proc.returncode == 0, proc.stderr
    fp = signing.fingerprint(signing.load_public_key(tmp_path / "k.pub"))
    doc = json.loads(keel_cli("inspect", app, "--json").stdout)
    assert doc["signed_by"] == fp and doc["crc_ok"] and doc["sha256_ok"]
    assert f"signed by     {fp}" in keel_cli("inspect", app).stdout
    ok = keel_cli("inspect", app, "--json", "--trust", tmp_path / "k.pub")
    assert ok.returncode == 0 and json.loads(ok.stdout)["signature_ok"] is True
    refused = keel_cli("inspect", app, "--trust", tmp_path / "other.pub")
    expect_cli_error(refused, "does not trust")

    plain = tmp_path / "plain.bin"
    keel_cli("build", "app", repo / "examples/hello", "--platform", "virtual", "-o", plain)
    assert json.loads(keel_cli("inspect", plain, "--json").stdout)["signed_by"] is None
    expect_cli_error(keel_cli("inspect", plain, "--trust", tmp_path / "k.pub"), "not signed")
    signed = tmp_path / "signed.bin"
    assert keel_cli("sign", plain, "--key", other, "-o", signed).returncode == 0
    assert images.read_image(plain).signed_by is None  # -o leaves the source alone
    assert images.read_image(signed).signed_by == signing.fingerprint(
        signing.load_public_key(tmp_path / "other.pub"))
    assert keel_cli("sign", plain, "--key", key).returncode == 0  # in place
    assert images.read_image(plain).signed_by == fp


def test_build_system_sign_signs_every_module(keel_cli, tmp_path):
    key = tmp_path / "k"
    keel_cli("keys", "generate", key)
    proc = keel_cli("build", "system", "--platform", "virtual", "--version", "1.0.0",
                    "-o", tmp_path / "sys", "--sign", key)
    assert proc.returncode == 0, proc.stderr
    raw = signing.load_public_key(tmp_path / "k.pub")
    files = sorted((tmp_path / "sys").glob("*.bin"))
    assert len(files) == 3
    for path in files:
        image = images.load_valid_image(path)
        assert signing.check_signature(image.data, image.info, [raw]) is None


def test_keys_are_not_mixed_up(keel_cli, expect_cli_error, tmp_path, hello_image):
    key = tmp_path / "k"
    keel_cli("keys", "generate", key)
    expect_cli_error(keel_cli("sign", hello_image, "--key", tmp_path / "k.pub"), "public key")
    expect_cli_error(keel_cli("inspect", hello_image, "--trust", key), "private key")
    expect_cli_error(keel_cli("sign", hello_image, "--key", tmp_path / "missing"), "missing")
    (tmp_path / "junk").write_text("not a key")
    expect_cli_error(keel_cli("sign", hello_image, "--key", tmp_path / "junk"), "not a private key")
