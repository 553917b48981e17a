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
from keel_cloud import signatures
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
    try:
        m_info, crc_ok, sha_ok = parse(mutated)
    except mf.FormatError:  # a header field made invalid (a dependency's version): refused
        assert at < info.header_size
        return
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


# The rule boards apply (bootloader/trust.py), and setting a board's keys


def test_the_rule_a_board_applies():
    from keel import trust

    digest = hashlib.sha256(b"module").digest()
    key_id = hashlib.sha256(RAW_A).digest()
    good = (key_id, KEY_A.sign(trust.SIGNED_PREFIX + digest))
    refusal = lambda block, keys: trust.refusal(block, digest, keys, signatures.verify,  # noqa: E731
                                                hashlib.sha256)
    assert refusal(None, []) is None and refusal(good, []) is None
    assert refusal(good, [RAW_A]) is None and refusal(good, [RAW_B, RAW_A]) is None
    assert refusal(None, [RAW_A]) == trust.UNSIGNED
    assert refusal(good, [RAW_B]) == trust.UNTRUSTED
    assert refusal((key_id, bytes(64)), [RAW_A]) == trust.BAD_SIGNATURE
    # A signature over another digest (a replayed block) does not verify.
    other = (key_id, KEY_A.sign(trust.SIGNED_PREFIX + hashlib.sha256(b"other").digest()))
    assert refusal(other, [RAW_A]) == trust.BAD_SIGNATURE
    # An unreadable trust file takes nothing, signed or not.
    assert refusal(good, None) == trust.UNTRUSTED and refusal(None, None) == trust.UNTRUSTED


@pytest.mark.parametrize("doc", [None, [], {"keys": "ab"}, {"keys": ["zz" * 32]},
                                 {"keys": ["ab" * 31]}, {"keys": [7]}, {}])
def test_a_malformed_trust_document_reads_as_none(doc):
    from keel import trust

    assert trust.parse_keys(doc) is None


def test_trust_document_round_trip():
    from keel import trust

    assert trust.parse_keys(trust.document([RAW_A, RAW_B])) == [RAW_A, RAW_B]
    assert trust.parse_keys(trust.document([])) == []


def _device_trust(device_dir):
    from keel import vdev

    return json.loads(vdev.read_file(device_dir, "/keel/m/bl/trust.json"))


@pytest.fixture(scope="module")
def keypair(tmp_path_factory):
    base = tmp_path_factory.mktemp("keys")
    signing.generate_key(base / "k")
    signing.generate_key(base / "other")
    return base


@pytest.fixture(scope="module")
def signed_system(keypair, tmp_path_factory):
    from keel import build

    out = tmp_path_factory.mktemp("signed-system")
    key = signing.load_private_key(keypair / "k")
    build.build_system("virtual", "1.0.0", out, signing.signer(key))
    return out


def test_vdev_create_trust_sets_the_boards_keys(keel_cli, keypair, signed_system, tmp_path):
    proc = keel_cli("vdev", "create", tmp_path / "dev", "--system", signed_system,
                    "--trust", keypair / "k.pub")
    assert proc.returncode == 0, proc.stderr
    raw = signing.load_public_key(keypair / "k.pub")
    assert _device_trust(tmp_path / "dev") == {"keys": [raw.hex()]}
    assert "trusts 1 key(s)" in proc.stdout


def test_vdev_create_refuses_modules_the_board_would_refuse(keel_cli, expect_cli_error, keypair,
                                                            signed_system, tmp_path, repo):
    from keel import build

    unsigned = tmp_path / "unsigned"
    build.build_system("virtual", "1.0.0", unsigned)
    expect_cli_error(keel_cli("vdev", "create", tmp_path / "a", "--system", unsigned,
                              "--trust", keypair / "k.pub"), "not signed", "nothing written")
    expect_cli_error(keel_cli("vdev", "create", tmp_path / "b", "--system", signed_system,
                              "--trust", keypair / "other.pub"), "does not trust")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_bootloader_can_bring_keys(keel_cli, keypair, tmp_path):
    """keel build system --trust: the bootloader module carries trust.json (rotation);
    a board made from it trusts those keys."""
    out = tmp_path / "sys"
    proc = keel_cli("build", "system", "--platform", "virtual", "-o", out, "--sign",
                    keypair / "k", "--trust", keypair / "k.pub", "--trust", keypair / "other.pub")
    assert proc.returncode == 0, proc.stderr
    boot = images.load_valid_image(next(out.glob("*bootloader*")))
    from keel import romfs

    names = [p for p, _, _ in romfs.walk(mf.bytes_reader(boot.data), boot.info.header_size,
                                          boot.info.payload_size)]
    assert "trust.json" in names
    assert keel_cli("vdev", "create", tmp_path / "dev", "--system", out).returncode == 0
    raws = [signing.load_public_key(keypair / n).hex() for n in ("k.pub", "other.pub")]
    assert _device_trust(tmp_path / "dev") == {"keys": raws}


def test_image_nrf52840_trust(keel_cli, expect_cli_error, keypair, tmp_path):
    from keel import build

    system = tmp_path / "nsys"
    build.build_system("nrf52840", None, system,
                       signing.signer(signing.load_private_key(keypair / "k")))
    out = tmp_path / "img"
    proc = keel_cli("image", "nrf52840", "--board", "nrf52840_dk", "--system", system,
                    "--trust", keypair / "k.pub", "-o", out)
    assert proc.returncode == 0, proc.stderr
    raw = signing.load_public_key(keypair / "k.pub")
    assert json.loads((out / "fs/keel/m/bl/trust.json").read_text()) == {"keys": [raw.hex()]}
    expect_cli_error(keel_cli("image", "nrf52840", "--board", "nrf52840_dk",
                              "--trust", keypair / "k.pub", "-o", tmp_path / "img2"),
                     "needs a signed system")
