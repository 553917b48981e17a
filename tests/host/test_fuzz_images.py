"""keel.images.parse_image on arbitrary, truncated and padded input, and `keel inspect`
on files that are not valid images."""

import hashlib
import zlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel import images
from keel import module_format as mf
from keel.errors import KeelError

DEPS = [
    (mf.FUNCTION_SYSTEM_PART, 1, mf.encode_version("1.1.0")),
    (mf.FUNCTION_SYSTEM_PART, 2, mf.encode_version("1.1.0")),
]

dependency_lists = st.lists(
    st.tuples(
        st.integers(0, 255),
        st.integers(0, 255),
        st.integers(0, 2**32 - 1).filter(lambda v: (v & 0xFF) < 0xC0 or (v & 0xFF) == 0xFF),
    ),
    max_size=mf.MAX_DEPS,
)


def small_image(payload=b"hello, keel " * 5, deps=DEPS):
    info = mf.ModuleInfo(mf.FUNCTION_USER_PART, 1, mf.encode_version("1.0.0"), 1, deps)
    return mf.build_image(info, payload, hashlib.sha256)


def parse_or_keel_error(data):
    """parse_image must return an Image or raise KeelError; anything else fails the test."""
    try:
        image = images.parse_image(data, "fuzz.bin")
    except KeelError as e:
        message = str(e)
        assert message.startswith("fuzz.bin: ")
        assert "\n" not in message
        return None
    assert isinstance(image, images.Image)
    assert isinstance(image.crc_ok, bool) and isinstance(image.sha256_ok, bool)
    assert image.info.image_size == len(data)
    return image


# --- arbitrary input -----------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=400))
def test_random_bytes(data):
    parse_or_keel_error(data)


@settings(max_examples=500, deadline=None)
@given(
    head=st.sampled_from([mf.MAGIC, mf.MAGIC + bytes([mf.FORMAT_VERSION])]),
    rest=st.binary(max_size=300),
)
def test_random_bytes_after_a_valid_magic(head, rest):
    parse_or_keel_error(head + rest)


@st.composite
def mutated_images(draw):
    deps = draw(dependency_lists)
    payload = draw(st.binary(max_size=200))
    original = small_image(payload, deps)
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=16))
    return original, bytes(data)


@settings(max_examples=500, deadline=None)
@given(case=mutated_images())
def test_mutated_valid_images(case):
    original, data = case
    image = parse_or_keel_error(data)
    if image is not None and image.ok:
        # Only mutations that cancelled out (e.g. setting a byte to its own value)
        # may leave an image that passes both checks.
        assert data == original


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(max_size=500), deps=dependency_lists)
def test_valid_images_parse_ok(payload, deps):
    data = small_image(payload, deps)
    image = images.parse_image(data)
    assert image.crc_ok and image.sha256_ok
    assert image.info.dependencies == deps
    assert image.data == data
    # Intact, but random bytes are no app: refused for what they hold, not as corrupt.
    assert not image.ok and image.refusal is not None
    assert "the payload is not what the header says" in image.problem


# --- truncation ----------------------------------------------------------------------


def assert_every_truncation_is_reported(data):
    image = images.parse_image(data)
    assert image.crc_ok and image.sha256_ok
    header_size = image.info.header_size
    for n in range(len(data)):
        with pytest.raises(KeelError) as info:
            images.parse_image(data[:n], "cut.bin")
        message = str(info.value)
        assert "truncated" in message, (n, message)
        assert message.startswith("cut.bin: "), message
        if n <= header_size:
            # Even without a whole header the error is a truncation, not "bad magic".
            assert "magic" not in message, (n, message)


def test_every_truncation_of_a_small_image():
    assert_every_truncation_is_reported(small_image())


@pytest.mark.parametrize("ndeps", [0, 1, mf.MAX_DEPS])
def test_every_truncation_with_different_header_sizes(ndeps):
    deps = [(mf.FUNCTION_SYSTEM_PART, i, 0x010000FF) for i in range(ndeps)]
    assert_every_truncation_is_reported(small_image(b"\x00" * 40, deps))


def test_every_truncation_of_a_real_app(hello_image):
    data = hello_image.read_bytes()
    assert images.parse_image(data).info.function == mf.FUNCTION_USER_PART
    assert_every_truncation_is_reported(data)


@settings(max_examples=100, deadline=None)
@given(extra=st.binary(min_size=1, max_size=64))
def test_trailing_bytes_are_refused(extra):
    data = small_image()
    with pytest.raises(KeelError, match="%d bytes after the end" % len(extra)):
        images.parse_image(data + extra)


def test_a_second_image_appended_is_refused(hello_image):
    data = hello_image.read_bytes()
    with pytest.raises(KeelError, match="after the end"):
        images.parse_image(data + data)


def test_read_image_of_a_missing_file(tmp_path):
    with pytest.raises(KeelError, match="nope.bin"):
        images.read_image(tmp_path / "nope.bin")


# --- keel inspect on bad files -------------------------------------------------------


def test_inspect_a_valid_image(keel_cli, hello_image):
    proc = keel_cli("inspect", hello_image)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "user-part" in proc.stdout


def test_inspect_truncated_files(keel_cli, expect_cli_error, hello_image, tmp_path):
    data = hello_image.read_bytes()
    header_size = images.parse_image(data).info.header_size
    cuts = {0, 3, mf.HEADER_SIZE - 1, mf.HEADER_SIZE, header_size - 1, header_size, len(data) - 1}
    for n in sorted(cuts):
        path = tmp_path / f"cut{n}.bin"
        path.write_bytes(data[:n])
        line = expect_cli_error(keel_cli("inspect", path), "truncated")
        assert str(path) in line


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_inspect_random_bytes(keel_cli, expect_cli_error, tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "random.bin"
    path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000))))
    expect_cli_error(keel_cli("inspect", path), str(path))
    expect_cli_error(keel_cli("inspect", "--json", path), str(path))


def test_inspect_random_bytes_behind_a_valid_magic(keel_cli, expect_cli_error, tmp_path):
    rng = random.Random(7)
    path = tmp_path / "magic.bin"
    path.write_bytes(mf.MAGIC + bytes([mf.FORMAT_VERSION]) + rng.randbytes(500))
    expect_cli_error(keel_cli("inspect", path), str(path))


def test_inspect_padded_file(keel_cli, expect_cli_error, hello_image, tmp_path):
    path = tmp_path / "padded.bin"
    path.write_bytes(hello_image.read_bytes() + b"\xff" * 10)
    expect_cli_error(keel_cli("inspect", path), "10 bytes after the end")


def _with_version_tag(tag, reseal):
    info = mf.ModuleInfo(mf.FUNCTION_USER_PART, 1, mf.encode_version("1.0.0"), 1, DEPS)
    data = bytearray(mf.build_image(info, b"payload", hashlib.sha256))
    data[8] = tag  # low byte of the little-endian version field: corrupts the image
    if reseal:  # recompute the suffix so only the header's meaning is wrong
        body = bytes(data[: -mf.SUFFIX_SIZE])
        digest = hashlib.sha256(body).digest()
        crc = zlib.crc32(body + digest)
        data = bytearray(body + digest + crc.to_bytes(4, "little"))
    return bytes(data)


@pytest.mark.parametrize("reseal", [False, True], ids=["corrupt", "resealed"])
@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
def test_inspect_reserved_version_tag_without_traceback(keel_cli, tmp_path, reseal, json_flag):
    path = tmp_path / "tag.bin"
    path.write_bytes(_with_version_tag(0xC5, reseal))
    proc = keel_cli("inspect", *json_flag, path)
    assert "Traceback" not in proc.stdout + proc.stderr
    if reseal:
        # Intact but unreadable version: showing it raw (exit 0) or refusing it are both fine.
        assert proc.returncode in (0, 1)
    else:
        assert proc.returncode == 1
    if proc.returncode:
        assert len(proc.stderr.splitlines()) == 1
