"""Version strings <-> 32-bit integers (lib/module_format.py)."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel import module_format as mf

byte = st.integers(0, 255)
pre_number = st.integers(0, 63)
kind = st.sampled_from(["alpha", "beta", "rc"])


@st.composite
def versions(draw):
    core = "%d.%d.%d" % (draw(byte), draw(byte), draw(byte))
    if draw(st.booleans()):
        return core
    return "%s-%s.%d" % (core, draw(kind), draw(pre_number))


_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.]+))?$")


def semver_key(text):
    """SemVer 2.0.0 precedence (section 11), written independently of the code under test:
    compare major, minor, patch numerically; a prerelease sorts before its release;
    prerelease identifiers compare numerically when numeric, else in ASCII order, and
    numeric identifiers sort before alphanumeric ones."""
    match = _SEMVER.match(text)
    assert match, text
    core = tuple(int(g) for g in match.group(1, 2, 3))
    pre = match.group(4)
    if pre is None:
        return core + (1, ())
    idents = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return core + (0, idents)


# --- round trip ----------------------------------------------------------------------


@given(major=byte, minor=byte, patch=byte)
def test_release_round_trip(major, minor, patch):
    text = "%d.%d.%d" % (major, minor, patch)
    value = mf.encode_version(text)
    assert 0 <= value <= 0xFFFFFFFF
    assert value >> 24 == major and (value >> 16) & 0xFF == minor and (value >> 8) & 0xFF == patch
    assert mf.decode_version(value) == text
    assert not mf.is_prerelease(value)


@given(major=byte, minor=byte, patch=byte, kind=kind, number=pre_number)
def test_prerelease_round_trip(major, minor, patch, kind, number):
    text = "%d.%d.%d-%s.%d" % (major, minor, patch, kind, number)
    value = mf.encode_version(text)
    assert 0 <= value <= 0xFFFFFFFF
    assert mf.decode_version(value) == text
    assert mf.is_prerelease(value)
    # Same core as the release it precedes.
    release = mf.encode_version("%d.%d.%d" % (major, minor, patch))
    assert value >> 8 == release >> 8
    assert value < release


@given(value=st.integers(0, 0xFFFFFFFF).filter(lambda v: not 0xC0 <= v & 0xFF <= 0xFE))
def test_decode_then_encode_round_trip(value):
    assert mf.encode_version(mf.decode_version(value)) == value


def test_known_encodings():
    # Particle's scheme: alpha.N = N, beta.N = 0x40|N, rc.N = 0x80|N, release = 0xFF.
    assert mf.encode_version("1.2.3") == 0x010203FF
    assert mf.encode_version("1.2.3-alpha.5") == 0x01020305
    assert mf.encode_version("1.2.3-beta.5") == 0x01020345
    assert mf.encode_version("1.2.3-rc.63") == 0x010203BF
    assert mf.encode_version("255.255.255") == 0xFFFFFFFF
    assert mf.encode_version("0.0.0-alpha.0") == 0


# --- ordering ------------------------------------------------------------------------

ORDERED = ["1.2.0-alpha.1", "1.2.0-beta.0", "1.2.0-rc.3", "1.2.0", "1.2.1", "1.3.0-rc.1"]


def test_documented_order():
    values = [mf.encode_version(v) for v in ORDERED]
    for lower, higher in zip(values, values[1:]):
        assert lower < higher
    assert sorted(ORDERED, key=mf.encode_version) == ORDERED
    # The reference key agrees, so it is a fair oracle for the property below.
    assert sorted(reversed(ORDERED), key=semver_key) == ORDERED


@given(a=versions(), b=versions())
def test_integer_order_is_semver_precedence(a, b):
    ea, eb = mf.encode_version(a), mf.encode_version(b)
    ka, kb = semver_key(a), semver_key(b)
    assert (ea < eb) == (ka < kb)
    assert (ea == eb) == (ka == kb) == (a == b)


@settings(max_examples=50)
@given(items=st.lists(versions(), max_size=30))
def test_sorting_by_integer_sorts_by_precedence(items):
    assert sorted(items, key=mf.encode_version) == sorted(items, key=semver_key)


# --- invalid input -------------------------------------------------------------------

INVALID = [
    "1.2",
    "1.2.3.4",
    "01.2.3",
    "1.02.3",
    "1.2.03",
    "1.2.x",
    "256.0.0",
    "1.256.0",
    "1.2.256",
    "1.2.3-rc",
    "1.2.3-rc1",
    "1.2.3-rc.",
    "1.2.3-gamma.1",
    "1.2.3-RC.1",
    "1.2.3-rc.64",
    "1.2.3-rc.01",
    "1.2.3-rc.1.2",
    "1.2.3-",
    "-1.2.3",
    "+1.2.3",
    " 1.2.3",
    "1.2.3 ",
    "1..3",
    "v1.2.3",
    "",
]


@pytest.mark.parametrize("text", INVALID)
def test_invalid_version_strings_raise_a_clear_error(text):
    with pytest.raises(mf.FormatError) as info:
        mf.encode_version(text)
    message = str(info.value)
    assert message.startswith("invalid version '%s': " % text), message
    assert "\n" not in message
    assert len(message) > len("invalid version '%s': " % text) + 5


@pytest.mark.parametrize("value", [None, 123, 1.5, b"1.2.3", ["1", "2", "3"]])
def test_non_strings_raise_format_error(value):
    with pytest.raises(mf.FormatError) as info:
        mf.encode_version(value)
    message = str(info.value)
    assert message.startswith("invalid version %r" % (value,)), message
    assert "string" in message


def test_messages_name_what_is_wrong():
    def message(text):
        with pytest.raises(mf.FormatError) as info:
            mf.encode_version(text)
        return str(info.value)

    assert "MAJOR.MINOR.PATCH" in message("1.2")
    assert "major" in message("256.0.0") and "255" in message("256.0.0")
    assert "patch" in message("1.2.x")
    assert "alpha.N, beta.N or rc.N" in message("1.2.3-gamma.1")
    assert "prerelease number" in message("1.2.3-rc.64") and "63" in message("1.2.3-rc.64")


@settings(max_examples=300)
@given(
    text=st.text(alphabet="0123456789.-abcehlprtx+ ", max_size=16)
    | st.builds("{}.{}.{}".format, st.integers(0, 999), st.integers(0, 999), st.integers(0, 999))
)
def test_any_string_is_encoded_exactly_or_refused(text):
    """Whatever the input, encode_version returns a value that decodes back to the very
    same text, or raises FormatError (never another exception)."""
    try:
        value = mf.encode_version(text)
    except mf.FormatError:
        return
    assert mf.decode_version(value) == text


@pytest.mark.parametrize("text", ["².0.0", "1.2.3-rc.²", "١.2.3", "1.2.3-rc.١"])
def test_non_ascii_digits_are_refused(text):
    with pytest.raises(mf.FormatError):
        mf.encode_version(text)


@given(value=st.integers(0, 0xFFFFFF), tag=st.integers(0xC0, 0xFE))
def test_decode_rejects_reserved_prerelease_tags(value, tag):
    with pytest.raises(mf.FormatError, match="prerelease tag"):
        mf.decode_version((value << 8) | tag)


@pytest.mark.parametrize("value", [-1, 0x100000000, 2**40])
def test_decode_rejects_out_of_range_values(value):
    with pytest.raises(mf.FormatError, match="out of range"):
        mf.decode_version(value)


# --- is_prerelease -------------------------------------------------------------------


@given(text=versions())
def test_is_prerelease_matches_the_string(text):
    assert mf.is_prerelease(mf.encode_version(text)) == ("-" in text)


def test_is_prerelease_examples():
    assert mf.is_prerelease(mf.encode_version("1.0.0-alpha.0"))
    assert mf.is_prerelease(mf.encode_version("1.0.0-rc.63"))
    assert not mf.is_prerelease(mf.encode_version("1.0.0"))
    assert not mf.is_prerelease(mf.encode_version("0.0.0"))
