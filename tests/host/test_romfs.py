"""bootloader/romfs.py (keel.romfs): walking and extracting ROMFS images made by
keel.build.make_romfs."""

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel import build, romfs
from keel import module_format as mf

FILES = {
    "main.mpy": b"M\x06\x00\x1f main",
    "README": b"",
    "lib/util.mpy": b"util" * 10,
    "lib/sub/deep.mpy": bytes(range(256)),
    "lib/sub/deeper/leaf.txt": b"leaf\n",
    "pkg/a/b/c/x.bin": b"\x00\xff" * 700,  # long enough for multi-byte lengths
    "zeta.py": b"print('z')\n",
}
DIRS = {"lib", "lib/sub", "lib/sub/deeper", "pkg", "pkg/a", "pkg/a/b", "pkg/a/b/c"}


def dirs_of(files):
    out = set()
    for path in files:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            out.add("/".join(parts[:i]))
    return out


def walk_all(data, base=0, size=None, buf=None):
    size = len(data) - base if size is None else size
    return list(romfs.walk(mf.bytes_reader(data), base, size, buf))


def split(entries, data, base=0):
    files, dirs = {}, []
    for path, offset, length in entries:
        if offset < 0:
            assert length == 0
            dirs.append(path)
        else:
            assert path not in files, path
            files[path] = data[base + offset : base + offset + length]
    return files, dirs


def check_walk(files, data, base=0, buf=None):
    entries = walk_all(data, base, buf=buf)
    found, dirs = split(entries, data, base)
    assert found == files
    assert set(dirs) == dirs_of(files)
    assert len(dirs) == len(set(dirs))
    # Parents come before anything inside them.
    seen = set()
    for path, _, _ in entries:
        parent = path.rpartition("/")[0]
        assert not parent or parent in seen, (path, seen)
        seen.add(path)


def test_dirs_helper():
    assert dirs_of(FILES) == DIRS


def test_walk_finds_every_file_and_directory():
    data = build.make_romfs(FILES)
    assert data[:3] == b"\xd2\xcd\x31"
    check_walk(FILES, data)


def test_walk_at_an_offset_inside_a_larger_image():
    data = build.make_romfs(FILES)
    blob = b"\xaa" * 37 + data + b"\x55" * 11
    entries = walk_all(blob, 37, len(data))
    # Offsets are relative to base.
    assert entries == walk_all(data)
    check_walk(FILES, blob[: 37 + len(data)], base=37)


def test_walk_with_a_small_name_buffer():
    data = build.make_romfs(FILES)
    check_walk(FILES, data, buf=bytearray(16))
    with pytest.raises(romfs.RomfsError, match="name too long"):
        walk_all(build.make_romfs({"a" * 17: b"x"}), buf=bytearray(16))


def test_empty_romfs():
    data = build.make_romfs({})
    assert walk_all(data) == []


def test_extract_writes_the_same_tree(tmp_path):
    data = build.make_romfs(FILES)
    count = romfs.extract(mf.bytes_reader(data), 0, len(data), str(tmp_path))
    assert count == len(FILES)
    for path, content in FILES.items():
        assert (tmp_path / path).read_bytes() == content
    on_disk_files = {
        p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
    }
    on_disk_dirs = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_dir()}
    assert on_disk_files == set(FILES)
    assert on_disk_dirs == DIRS


@pytest.mark.parametrize("buf_size", [1, 7, 64, 4096])
def test_extract_copies_in_chunks_of_any_size(tmp_path, buf_size):
    data = b"\x01" * 13 + build.make_romfs(FILES)
    count = romfs.extract(
        mf.bytes_reader(data), 13, len(data) - 13, str(tmp_path), bytearray(buf_size)
    )
    assert count == len(FILES)
    for path, content in FILES.items():
        assert (tmp_path / path).read_bytes() == content


def test_extract_accepts_every_name_walk_accepts(tmp_path):
    name = "m" * (romfs.MAX_NAME - 4) + ".mpy"
    data = build.make_romfs({name: b"long"})
    [(path, _, length)] = walk_all(data)
    assert (path, length) == (name, 4)
    assert romfs.extract(mf.bytes_reader(data), 0, len(data), str(tmp_path)) == 1
    assert (tmp_path / name).read_bytes() == b"long"


# --- property: any tree round-trips --------------------------------------------------

names = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.",
    min_size=1,
    max_size=24,
).filter(lambda n: n not in (".", ".."))
trees = st.recursive(
    st.binary(max_size=300),
    lambda children: st.dictionaries(names, children, min_size=1, max_size=4),
    max_leaves=12,
)


def flatten(tree, prefix=""):
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, prefix + name + "/"))
        else:
            out[prefix + name] = value
    return out


@settings(max_examples=150, deadline=None)
@given(tree=st.dictionaries(names, trees, max_size=5))
def test_any_tree_round_trips(tree):
    files = flatten(tree)
    data = build.make_romfs(files)
    check_walk(files, data)
    with tempfile.TemporaryDirectory() as dest:
        assert romfs.extract(mf.bytes_reader(data), 0, len(data), dest) == len(files)
        for path, content in files.items():
            assert Path(dest, path).read_bytes() == content
        assert {p.relative_to(dest).as_posix() for p in Path(dest).rglob("*")} == set(
            files
        ) | dirs_of(files)


# --- damaged images ------------------------------------------------------------------


def test_romfs_error_is_a_value_error():
    assert issubclass(romfs.RomfsError, ValueError)


def test_every_truncation_raises_romfs_error(tmp_path):
    data = build.make_romfs(FILES)
    full = walk_all(data)
    last_data_offset = max(offset for _, offset, _ in full)
    for n in range(len(data)):
        cut = data[:n]
        with pytest.raises(romfs.RomfsError, match="truncated"):
            walk_all(cut)
        # The size claims more than the reader delivers: walk() notices as soon as it
        # needs a missing byte. It does not read file contents, so a cut inside the last
        # file's data may go unnoticed, but then the listing is the full, right one.
        try:
            entries = list(romfs.walk(mf.bytes_reader(cut), 0, len(data)))
        except romfs.RomfsError as e:
            assert "truncated" in str(e)
        else:
            assert entries == full
            assert n >= last_data_offset
        dest = tmp_path / f"cut{n}"
        dest.mkdir()
        with pytest.raises(romfs.RomfsError, match="truncated"):
            romfs.extract(mf.bytes_reader(cut), 0, n, str(dest))
        # The length check comes first, so nothing was written.
        assert list(dest.iterdir()) == []


def test_a_size_smaller_than_the_image_is_truncation():
    data = build.make_romfs(FILES)
    blob = data + b"\x00" * 64  # bytes are there, but not inside [base, base+size)
    for n in range(len(data)):
        with pytest.raises(romfs.RomfsError, match="truncated"):
            list(romfs.walk(mf.bytes_reader(blob), 0, n))


@pytest.mark.parametrize("header", [b"", b"\xd2", b"\xd2\xcd\x30", b"KEEL", b"\x00\x00\x00\x00"])
def test_bad_header(header):
    with pytest.raises(romfs.RomfsError):
        walk_all(header)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_damaged_romfs_raises_value_error_only(data):
    """The bootloader catches ValueError (and OSError) around extract(); corruption must
    surface as a ValueError, never e.g. an IndexError or an endless loop."""
    image = bytearray(build.make_romfs(FILES))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(image) - 1))
        image[i] ^= data.draw(st.integers(1, 255))
    try:
        entries = walk_all(bytes(image))
    except ValueError:
        return
    for path, offset, length in entries:
        assert path and not path.startswith("/")
        assert all(part not in ("", ".", "..") for part in path.split("/"))
        if offset >= 0:
            assert 0 <= offset and offset + length <= len(image)


@pytest.mark.parametrize("name", [b".", b"..", b"a/b", b""])
def test_bad_names_are_refused(name):
    def record(kind, payload):
        return bytes([kind, len(payload)]) + payload

    body = record(5, bytes([len(name)]) + name + record(2, b"xy"))
    data = b"\xd2\xcd\x31" + bytes([len(body)]) + body
    with pytest.raises(romfs.RomfsError, match="bad name"):
        walk_all(data)
    # And the same record with a good name is read fine (the hand-made encoding is right).
    good = record(5, bytes([1]) + b"f" + record(2, b"xy"))
    ok = b"\xd2\xcd\x31" + bytes([len(good)]) + good
    [(path, offset, length)] = walk_all(ok)
    assert (path, ok[offset : offset + length]) == ("f", b"xy")


def test_extract_refuses_an_existing_tree(tmp_path):
    # extract() uses os.mkdir: it expects a fresh destination, as the bootloader gives it.
    data = build.make_romfs(FILES)
    romfs.extract(mf.bytes_reader(data), 0, len(data), str(tmp_path))
    with pytest.raises(OSError):
        romfs.extract(mf.bytes_reader(data), 0, len(data), str(tmp_path))
    assert os.path.isdir(tmp_path / "lib" / "sub")


# --- bounds: hostile input cannot exhaust the heap, the stack or the filesystem --------

import importlib.util  # noqa: E402
import sys  # noqa: E402

import hostile_images as hostile  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_nesting_up_to_the_limit_is_read_beyond_it_refused():
    files = {"/".join(["d"] * romfs.MAX_DEPTH) + "/x.mpy": b"x"}
    entries = walk_all(build.make_romfs(files))
    assert entries[-1][0] == "/".join(["d"] * romfs.MAX_DEPTH) + "/x.mpy"
    deeper = {"/".join(["d"] * (romfs.MAX_DEPTH + 1)) + "/x.mpy": b"x"}
    with pytest.raises(romfs.RomfsLimitError, match="nested deeper than %d" % romfs.MAX_DEPTH):
        walk_all(build.make_romfs(deeper))


def test_nesting_far_beyond_any_recursion_limit_is_refused_not_a_crash():
    data = hostile.nested_romfs(sys.getrecursionlimit() * 5)
    with pytest.raises(romfs.RomfsLimitError):
        walk_all(data)


def test_the_walk_keeps_no_stack_for_siblings():
    """Directories one after the other (not inside each other) are not nesting."""
    files = {f"d{i}/x{j}.mpy": b"x" for i in range(20) for j in range(5)}
    assert len(walk_all(build.make_romfs(files))) == 20 * 6


@pytest.mark.parametrize("extra, refused", [(0, False), (1, True), (3000, True)])
def test_entries_up_to_the_limit(extra, refused):
    # main.mpy + count files: MAX_ENTRIES in all, then more
    data = hostile.wide_romfs(romfs.MAX_ENTRIES - 1 + extra)
    if refused:
        limit = "more than %d entries" % romfs.MAX_ENTRIES
        with pytest.raises(romfs.RomfsLimitError, match=limit):
            walk_all(data)
    else:
        assert len(walk_all(data)) == romfs.MAX_ENTRIES


def test_directories_count_as_entries():
    files = {f"d{i}/x.mpy": b"x" for i in range(romfs.MAX_ENTRIES // 2 + 1)}
    with pytest.raises(romfs.RomfsLimitError, match="entries"):
        walk_all(build.make_romfs(files))


def test_names_up_to_the_limit():
    walk_all(build.make_romfs({"n" * romfs.MAX_NAME: b""}))
    with pytest.raises(romfs.RomfsLimitError, match="longer than %d bytes" % romfs.MAX_NAME):
        walk_all(build.make_romfs({"n" * (romfs.MAX_NAME + 1): b""}))
    with pytest.raises(romfs.RomfsLimitError):  # a length no name buffer could hold
        walk_all(hostile.romfs_image(hostile.romfs_file("n" * 100000, b"")))


def test_a_name_running_past_its_record_is_malformed():
    raw = hostile.romfs_file("abc", b"data")
    # the record says it is 3 bytes long: its name (and data) run past it
    bad = raw[:1] + bytes([3]) + raw[2:]
    with pytest.raises(romfs.RomfsError):
        walk_all(hostile.romfs_image(bad))


def test_limit_errors_are_romfs_errors():
    assert issubclass(romfs.RomfsLimitError, romfs.RomfsError)


def test_extract_stops_at_the_limits_too(tmp_path):
    data = hostile.nested_romfs(romfs.MAX_DEPTH + 1)
    with pytest.raises(romfs.RomfsLimitError):
        romfs.extract(mf.bytes_reader(data), 0, len(data), str(tmp_path))
    assert sum(1 for p in tmp_path.rglob("*") if p.is_dir()) == romfs.MAX_DEPTH


# --- flashfs.remove_tree --------------------------------------------------------------


def _flashfs():
    source = REPO / "bootloader" / "flashfs.py"
    spec = importlib.util.spec_from_file_location("keel_flashfs", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_remove_tree_of_a_tree_deeper_than_the_recursion_limit(tmp_path):
    flashfs = _flashfs()
    depth = sys.getrecursionlimit() + 200
    path = tmp_path / "top"
    leaf = str(path)
    os.mkdir(leaf)
    for _ in range(depth):  # (os.makedirs recurses)
        leaf += "/d"
        os.mkdir(leaf)
    with open(os.path.join(leaf, "f"), "w") as f:
        f.write("x")
    (path / "d" / "g").write_text("y")
    flashfs.remove_tree(str(path))
    assert not path.exists()
    assert tmp_path.exists()


def test_remove_tree_of_a_wide_tree_a_file_and_nothing(tmp_path):
    flashfs = _flashfs()
    for i in range(30):
        (tmp_path / "w" / f"d{i}" / "e").mkdir(parents=True)
        (tmp_path / "w" / f"d{i}" / "e" / "f").write_bytes(b"x")
        (tmp_path / "w" / f"f{i}").write_bytes(b"x")
    (tmp_path / "keep").write_bytes(b"x")
    flashfs.remove_tree(str(tmp_path / "w"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    flashfs.remove_tree(str(tmp_path / "keep"))
    flashfs.remove_tree(str(tmp_path / "absent"))
    assert list(tmp_path.iterdir()) == []
