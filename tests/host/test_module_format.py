"""lib/module_format.py: headers, images, names and dependency rules."""

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel import module_format as mf

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
# Encoded versions whose low byte is a real tag (0xC0..0xFE are reserved).
version32 = u32.filter(lambda v: (v & 0xFF) < 0xC0 or (v & 0xFF) == 0xFF)
dependency = st.tuples(u8, u8, version32)


def make_info(function, index, version, platform, deps, flags=0, size=0):
    return mf.ModuleInfo(function, index, version, platform, deps, flags, size)


def check(image, sha256=hashlib.sha256, buf=None):
    return mf.check_image(mf.bytes_reader(image), len(image), sha256, buf)


SAMPLE_DEPS = [
    (mf.FUNCTION_SYSTEM_PART, 1, mf.encode_version("1.2.0")),
    (mf.FUNCTION_SYSTEM_PART, 2, mf.encode_version("1.2.0-rc.3")),
    (mf.FUNCTION_BOOTLOADER, 0, mf.encode_version("1.0.0")),
]


def sample_image(payload=bytes(range(97)), deps=SAMPLE_DEPS):
    info = make_info(mf.FUNCTION_USER_PART, 1, mf.encode_version("2.3.0-beta.1"), 1, deps)
    return mf.build_image(info, payload, hashlib.sha256)


# --- headers -------------------------------------------------------------------------


def test_layout_constants_match_the_struct_formats():
    assert struct.calcsize(mf.HEADER_FMT) == mf.HEADER_SIZE
    assert struct.calcsize(mf.DEP_FMT) == mf.DEP_SIZE
    assert mf.SUFFIX_SIZE == 32 + 4


@pytest.mark.parametrize("ndeps", range(mf.MAX_DEPS + 1))
@settings(max_examples=25, deadline=None)
@given(
    data=st.data(), function=u8, index=u8, flags=st.sampled_from([0, mf.FLAG_SIGNED]),
    version=version32, platform=u16, size=u32
)
def test_header_round_trip(ndeps, data, function, index, flags, version, platform, size):
    deps = data.draw(st.lists(dependency, min_size=ndeps, max_size=ndeps))
    info = make_info(function, index, version, platform, deps, flags, size)
    packed = mf.pack_header(info)
    assert len(packed) == info.header_size == mf.HEADER_SIZE + mf.DEP_SIZE * ndeps
    assert packed[:4] == mf.MAGIC
    # Bytes after the header (the payload) do not disturb parsing.
    trailing = data.draw(st.binary(max_size=40))
    for blob in (packed, packed + trailing, bytearray(packed), memoryview(packed + trailing)):
        parsed = mf.parse_header(blob)
        assert parsed.function == function
        assert parsed.index == index
        assert parsed.flags == flags
        assert parsed.version == version
        assert parsed.platform == platform
        assert parsed.payload_size == size
        assert parsed.dependencies == deps
        assert parsed.header_size == len(packed)
        signature = mf.SIGNATURE_SIZE if flags & mf.FLAG_SIGNED else 0
        assert parsed.image_size == len(packed) + size + mf.SUFFIX_SIZE + signature


@settings(max_examples=30, deadline=None)
@given(deps=st.lists(dependency, min_size=mf.MAX_DEPS + 1, max_size=3 * mf.MAX_DEPS))
def test_pack_header_rejects_too_many_dependencies(deps):
    info = make_info(mf.FUNCTION_USER_PART, 1, 0x010000FF, 1, deps)
    with pytest.raises(mf.FormatError, match="at most %d" % mf.MAX_DEPS):
        mf.pack_header(info)
    with pytest.raises(mf.FormatError):
        mf.build_image(info, b"payload", hashlib.sha256)


@pytest.mark.parametrize("ndeps", [mf.MAX_DEPS + 1, 0x7F, 0xFF])
def test_parse_header_rejects_a_dependency_count_above_max(ndeps):
    packed = bytearray(mf.pack_header(make_info(5, 1, 0x010000FF, 1, [])))
    packed[14] = ndeps  # the dependency-count byte
    with pytest.raises(mf.FormatError, match="dependencies"):
        mf.parse_header(bytes(packed) + bytes(mf.DEP_SIZE * ndeps))


def test_parse_header_rejects_bad_magic_and_format_version():
    packed = mf.pack_header(make_info(5, 1, 0x010000FF, 1, SAMPLE_DEPS))
    with pytest.raises(mf.FormatError, match="magic"):
        mf.parse_header(b"KEEP" + packed[4:])
    bad_format = packed[:4] + bytes([mf.FORMAT_VERSION + 1]) + packed[5:]
    with pytest.raises(mf.FormatError, match="format version"):
        mf.parse_header(bad_format)


def test_parse_header_reports_truncation():
    packed = mf.pack_header(make_info(5, 1, 0x010000FF, 1, SAMPLE_DEPS))
    for n in range(len(packed)):
        with pytest.raises(mf.FormatError, match="truncated"):
            mf.parse_header(packed[:n])


# --- whole images -------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    deps=st.lists(dependency, max_size=mf.MAX_DEPS),
    payload=st.binary(max_size=3000),
    function=st.sampled_from(sorted(mf.FUNCTION_NAMES)),
    version=version32,
    buf_size=st.sampled_from(
        [mf.HEADER_SIZE + mf.DEP_SIZE * mf.MAX_DEPS, 97, 512, 4096]
    ),
)
def test_build_then_check_image_round_trip(deps, payload, function, version, buf_size):
    info = make_info(function, 3, version, 2, deps)
    image = mf.build_image(info, payload, hashlib.sha256)
    assert info.payload_size == len(payload)
    assert len(image) == info.image_size
    header_size = mf.HEADER_SIZE + mf.DEP_SIZE * len(deps)
    assert image[header_size : header_size + len(payload)] == payload
    # The suffix is SHA-256 of header+payload, then CRC32 of everything before it.
    body = image[: header_size + len(payload)]
    assert image[len(body) : len(body) + 32] == hashlib.sha256(body).digest()

    parsed, crc_ok, sha_ok = check(image, buf=bytearray(buf_size))
    assert crc_ok is True
    assert sha_ok is True
    assert (parsed.function, parsed.index, parsed.version, parsed.platform) == (
        function,
        3,
        version,
        2,
    )
    assert parsed.dependencies == deps
    assert parsed.payload_size == len(payload)

    # Without a hash constructor only the CRC is checked.
    _, crc_only, no_sha = check(image, sha256=None)
    assert crc_only is True and no_sha is None

    buf = bytearray(64)
    assert mf.stored_sha256(mf.bytes_reader(image), parsed, buf) == hashlib.sha256(body).digest()


def _assert_rejected(image):
    try:
        _, crc_ok, sha_ok = check(image)
    except mf.FormatError:
        return
    assert not (crc_ok and sha_ok), "a corrupted image passed both checks"


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_flipping_any_single_byte_is_detected(mask):
    image = sample_image()
    assert check(image)[1:] == (True, True)
    for i in range(len(image)):
        corrupt = bytearray(image)
        corrupt[i] ^= mask
        _assert_rejected(bytes(corrupt))


@settings(max_examples=150, deadline=None)
@given(
    payload=st.binary(max_size=600),
    deps=st.lists(dependency, max_size=mf.MAX_DEPS),
    data=st.data(),
)
def test_flipping_a_random_byte_of_a_random_image_is_detected(payload, deps, data):
    image = sample_image(payload, deps)
    i = data.draw(st.integers(0, len(image) - 1), label="position")
    mask = data.draw(st.integers(1, 0xFF), label="mask")
    corrupt = bytearray(image)
    corrupt[i] ^= mask
    _assert_rejected(bytes(corrupt))


def test_payload_and_suffix_corruption_fail_the_right_check():
    image = sample_image()
    header_size = mf.HEADER_SIZE + mf.DEP_SIZE * len(SAMPLE_DEPS)
    payload_end = len(image) - mf.SUFFIX_SIZE
    # A payload byte: both the SHA-256 and the CRC32 disagree.
    corrupt = bytearray(image)
    corrupt[header_size + 5] ^= 0x10
    assert check(bytes(corrupt))[1:] == (False, False)
    # A byte of the stored CRC: only the CRC disagrees.
    corrupt = bytearray(image)
    corrupt[-1] ^= 0x10
    assert check(bytes(corrupt))[1:] == (False, True)
    # A byte of the stored SHA-256: the SHA-256 disagrees (and so does the CRC over it).
    corrupt = bytearray(image)
    corrupt[payload_end] ^= 0x10
    assert check(bytes(corrupt))[1:] == (False, False)


def test_check_image_reports_truncation():
    image = sample_image()
    for n in range(len(image)):
        with pytest.raises(mf.FormatError, match="truncated"):
            mf.check_image(mf.bytes_reader(image[:n]), n, hashlib.sha256)


# --- names ---------------------------------------------------------------------------


@pytest.mark.parametrize("number", sorted(mf.FUNCTION_NAMES))
def test_function_names_round_trip(number):
    name = mf.function_name(number)
    assert name == mf.FUNCTION_NAMES[number]
    assert mf.function_id(name) == number


def test_known_function_numbers():
    assert mf.function_id("bootloader") == mf.FUNCTION_BOOTLOADER == 2
    assert mf.function_id("system-part") == mf.FUNCTION_SYSTEM_PART == 4
    assert mf.function_id("user-part") == mf.FUNCTION_USER_PART == 5
    assert len(set(mf.FUNCTION_NAMES.values())) == len(mf.FUNCTION_NAMES)


@given(number=u8.filter(lambda n: n not in mf.FUNCTION_NAMES))
def test_unknown_function_number_gets_a_generic_name(number):
    assert mf.function_name(number) == "function-%d" % number


@pytest.mark.parametrize("name", ["", "user", "User-Part", "system_part", "function-5", "mars"])
def test_unknown_function_name_raises(name):
    with pytest.raises(mf.FormatError, match="unknown module function"):
        mf.function_id(name)


@pytest.mark.parametrize("name", sorted(mf.PLATFORMS))
def test_platform_names_round_trip(name):
    number = mf.platform_id(name)
    assert number == mf.PLATFORMS[name]
    assert mf.platform_name(number) == name


def test_platform_ids_are_distinct():
    assert len(set(mf.PLATFORMS.values())) == len(mf.PLATFORMS)
    assert mf.platform_id("virtual") == 1


@given(number=u16.filter(lambda n: n not in mf.PLATFORMS.values()))
def test_unknown_platform_id_gets_a_generic_name(number):
    assert mf.platform_name(number) == "platform-%d" % number


@pytest.mark.parametrize("name", ["mars", "", "Virtual", "esp8266", "platform-1"])
def test_unknown_platform_name_raises_and_lists_known_ones(name):
    with pytest.raises(mf.FormatError) as info:
        mf.platform_id(name)
    message = str(info.value)
    assert "unknown platform '%s'" % name in message
    for known in mf.PLATFORMS:
        assert known in message


# --- dependencies --------------------------------------------------------------------

V = mf.encode_version
SP = mf.FUNCTION_SYSTEM_PART


def installed_modules():
    return [
        make_info(mf.FUNCTION_BOOTLOADER, 0, V("1.0.0"), 1, []),
        make_info(SP, 1, V("1.2.0"), 1, []),
        make_info(SP, 2, V("1.1.0"), 1, []),
    ]


@pytest.mark.parametrize(
    "dep, met",
    [
        ((SP, 1, V("1.2.0")), True),  # exactly the installed version
        ((SP, 1, V("1.2.0-rc.3")), True),  # an older (prerelease) requirement
        ((SP, 1, V("1.1.9")), True),
        ((SP, 1, V("1.2.1")), False),  # newer than installed
        ((SP, 1, V("1.3.0-alpha.0")), False),
        ((SP, 2, V("1.2.0")), False),  # part 1 has 1.2.0, but part 2 is what's needed
        ((SP, 2, V("1.1.0")), True),
        ((SP, 3, V("0.0.0-alpha.0")), False),  # absent module
        ((mf.FUNCTION_USER_PART, 1, V("0.0.0-alpha.0")), False),  # absent function
        ((mf.FUNCTION_BOOTLOADER, 1, V("1.0.0")), False),  # bootloader index 0 only
        ((mf.FUNCTION_BOOTLOADER, 0, V("1.0.0")), True),
        ((mf.FUNCTION_BOOTLOADER, 0, V("1.0.1")), False),
    ],
)
def test_dependency_met(dep, met):
    assert mf.dependency_met(dep, installed_modules()) is met
    app = make_info(mf.FUNCTION_USER_PART, 1, V("1.0.0"), 1, [dep])
    assert mf.missing_dependencies(app, installed_modules()) == ([] if met else [dep])


def test_nothing_installed_means_everything_is_missing():
    app = make_info(mf.FUNCTION_USER_PART, 1, V("1.0.0"), 1, SAMPLE_DEPS)
    assert mf.missing_dependencies(app, []) == SAMPLE_DEPS
    assert mf.missing_dependencies(make_info(5, 1, V("1.0.0"), 1, []), []) == []


def test_missing_dependencies_keeps_order_and_only_the_unmet():
    deps = [
        (SP, 2, V("1.2.0")),  # unmet
        (SP, 1, V("1.0.0")),  # met
        (SP, 7, V("1.0.0")),  # absent
        (mf.FUNCTION_BOOTLOADER, 0, V("0.9.0")),  # met
    ]
    app = make_info(mf.FUNCTION_USER_PART, 1, V("1.0.0"), 1, deps)
    assert mf.missing_dependencies(app, installed_modules()) == [deps[0], deps[2]]


small = st.integers(0, 3)


@settings(max_examples=200, deadline=None)
@given(
    installed=st.dictionaries(st.tuples(small, small), u32, max_size=8),
    deps=st.lists(st.tuples(small, small, u32), max_size=mf.MAX_DEPS),
)
def test_dependency_rule_matches_a_reference(installed, deps):
    modules = [make_info(f, i, v, 1, []) for (f, i), v in installed.items()]

    def reference(dep):
        function, index, version = dep
        return (function, index) in installed and installed[(function, index)] >= version

    for dep in deps:
        assert mf.dependency_met(dep, modules) is reference(dep)
    app = make_info(mf.FUNCTION_USER_PART, 1, 0, 1, deps)
    assert mf.missing_dependencies(app, modules) == [d for d in deps if not reference(d)]


@pytest.mark.parametrize("tag", [0xC0, 0xD7, 0xFE])
def test_reserved_version_tags_are_refused_in_headers(tag):
    info = make_info(mf.FUNCTION_USER_PART, 1, 0x01000000 | tag, 1, [])
    with pytest.raises(mf.FormatError, match="invalid version"):
        mf.pack_header(info)
    good = mf.pack_header(make_info(mf.FUNCTION_USER_PART, 1, mf.encode_version("1.0.0"), 1, []))
    bad = bytearray(good)
    bad[8] = tag
    with pytest.raises(mf.FormatError, match="invalid version"):
        mf.parse_header(bad)
    dep = bytearray(
        mf.pack_header(
            make_info(mf.FUNCTION_USER_PART, 1, mf.encode_version("1.0.0"), 1, [(4, 1, 0x010000FF)])
        )
    )
    dep[mf.HEADER_SIZE + 4] = tag
    with pytest.raises(mf.FormatError, match="invalid dependency version"):
        mf.parse_header(dep)
