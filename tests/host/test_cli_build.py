"""`keel build` and `keel inspect` end to end, through the venv's `keel` command and the
real mpy-cross."""

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from keel import images
from keel import module_format as mf


def inspect_json(keel_cli, path):
    proc = keel_cli("inspect", path, "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return json.loads(proc.stdout)


def read_text(repo, rel):
    return (repo / rel).read_text().strip()


def leftovers(directory: Path):
    """Temporary files an interrupted or failed atomic write would leave behind."""
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


# --- keel build app ------------------------------------------------------------------


def test_build_hello_app(keel_cli, repo, tmp_path):
    out = tmp_path / "hello.bin"
    proc = keel_cli(
        "build", "app", repo / "examples" / "hello", "--platform", "virtual",
        "--target", "1.1.0", "-o", out,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert str(out) in proc.stdout
    doc = inspect_json(keel_cli, out)
    assert doc["function"] == "user-part"
    assert doc["platform"] == "virtual"
    assert doc["version"] == "1.0.0"  # the default --app-version
    assert doc["crc_ok"] is True and doc["sha256_ok"] is True
    assert doc["size"] == out.stat().st_size
    parts = json.loads((repo / "system" / "parts.json").read_text())["parts"]
    assert sorted(p["index"] for p in parts) == [1, 2]
    assert doc["dependencies"] == [
        {"function": "system-part", "index": p["index"], "version": "1.1.0"} for p in parts
    ]
    assert leftovers(tmp_path) == []


def test_app_payload_holds_the_compiled_main(keel_cli, repo, tmp_path):
    from keel import romfs

    out = tmp_path / "hello.bin"
    assert keel_cli("build", "app", repo / "examples/hello", "--platform", "virtual",
                    "-o", out).returncode == 0
    image = images.read_image(out)
    info = image.info
    listing = list(romfs.walk(mf.bytes_reader(image.data), info.header_size, info.payload_size))
    assert [path for path, _, _ in listing] == ["main.mpy"]
    _, offset, length = listing[0]
    mpy = image.data[info.header_size + offset :][:length]
    assert mpy[:1] == b"M"  # .mpy magic


def test_app_version_is_recorded(keel_cli, repo, tmp_path):
    out = tmp_path / "app.bin"
    proc = keel_cli(
        "build", "app", repo / "examples/hello", "--platform", "virtual",
        "--target", "1.2.0-rc.3", "--app-version", "2.3.0-beta.1", "-o", out,
    )
    assert proc.returncode == 0, proc.stderr
    doc = inspect_json(keel_cli, out)
    assert doc["version"] == "2.3.0-beta.1"
    assert {d["version"] for d in doc["dependencies"]} == {"1.2.0-rc.3"}
    text = keel_cli("inspect", out)
    assert text.returncode == 0
    assert "2.3.0-beta.1  (prerelease)" in text.stdout


def test_default_target_is_the_system_version(keel_cli, repo, tmp_path):
    out = tmp_path / "app.bin"
    assert keel_cli("build", "app", repo / "examples/hello", "--platform", "virtual",
                    "-o", out).returncode == 0
    version = read_text(repo, "system/VERSION")
    assert {d["version"] for d in inspect_json(keel_cli, out)["dependencies"]} == {version}


@pytest.fixture
def broken_app(tmp_path):
    src = tmp_path / "broken"
    src.mkdir()
    (src / "main.py").write_text("import helper\n\n\ndef setup():\n    helper.go()\n")
    (src / "helper.py").write_text(
        "# helper for the broken app\n"
        "def go():\n"
        "    return 1\n"
        "def oops(:\n"  # line 4: a syntax error
        "    pass\n"
    )
    return src


def test_syntax_error_names_file_and_line(keel_cli, expect_cli_error, broken_app, tmp_path):
    out = tmp_path / "out" / "app.bin"
    line = expect_cli_error(
        keel_cli("build", "app", broken_app, "--platform", "virtual", "-o", out),
        "helper.py:4",
    )
    assert "SyntaxError" in line
    assert not out.exists()


def test_failed_build_leaves_the_old_output_alone(keel_cli, expect_cli_error, broken_app,
                                                  tmp_path):
    out = tmp_path / "app.bin"
    out.write_bytes(b"the previous build")
    expect_cli_error(
        keel_cli("build", "app", broken_app, "--platform", "virtual", "-o", out), "helper.py:4"
    )
    assert out.read_bytes() == b"the previous build"
    assert leftovers(tmp_path) == []


def test_syntax_error_in_main(keel_cli, expect_cli_error, tmp_path):
    src = tmp_path / "app"
    src.mkdir()
    (src / "main.py").write_text("def setup():\n    pass\n\nx = = 1\n")
    out = tmp_path / "app.bin"
    expect_cli_error(keel_cli("build", "app", src, "--platform", "virtual", "-o", out),
                     "main.py:4")
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--target", "--app-version"])
@pytest.mark.parametrize("bad", ["1.x", "1.2", "1.2.3-rc1"])
def test_invalid_version_arguments(keel_cli, expect_cli_error, repo, tmp_path, flag, bad):
    out = tmp_path / "app.bin"
    line = expect_cli_error(
        keel_cli("build", "app", repo / "examples/hello", "--platform", "virtual",
                 flag, bad, "-o", out),
        f"'{bad}'",
    )
    assert "invalid version" in line
    assert not out.exists()


def test_unicode_digit_target_is_a_one_line_error(keel_cli, expect_cli_error, repo, tmp_path):
    out = tmp_path / "app.bin"
    expect_cli_error(
        keel_cli("build", "app", repo / "examples/hello", "--platform", "virtual",
                 "--target", "².0.0", "-o", out),
        "invalid version",
    )
    assert not out.exists()


def test_app_without_main_is_refused(keel_cli, expect_cli_error, tmp_path):
    src = tmp_path / "nomain"
    src.mkdir()
    (src / "helper.py").write_text("x = 1\n")
    out = tmp_path / "app.bin"
    expect_cli_error(keel_cli("build", "app", src, "--platform", "virtual", "-o", out),
                     "main.py", str(src))
    assert not out.exists()


def test_missing_app_dir_is_refused(keel_cli, expect_cli_error, tmp_path):
    out = tmp_path / "app.bin"
    expect_cli_error(
        keel_cli("build", "app", tmp_path / "nowhere", "--platform", "virtual", "-o", out),
        "nowhere: no such folder",
    )
    assert not out.exists()


def test_unknown_platform_is_refused(keel_cli, expect_cli_error, repo, tmp_path):
    out = tmp_path / "app.bin"
    line = expect_cli_error(
        keel_cli("build", "app", repo / "examples/hello", "--platform", "mars", "-o", out),
        "mars",
    )
    assert "virtual" in line  # it lists the known platforms
    assert not out.exists()
    sysdir = tmp_path / "sys"
    expect_cli_error(keel_cli("build", "system", "--platform", "mars", "-o", sysdir), "mars")
    assert not sysdir.exists()


def test_corrupt_app_fails_inspect(keel_cli, repo, tmp_path):
    out = tmp_path / "app.bin"
    assert keel_cli("build", "app", repo / "examples/hello", "--platform", "virtual",
                    "-o", out).returncode == 0
    good = out.read_bytes()
    info = images.parse_image(good).info
    for position, check in [
        (info.header_size + info.payload_size // 2, "CRC32"),  # payload: CRC is checked first
        (len(good) - 1, "CRC32"),  # the stored CRC itself
    ]:
        data = bytearray(good)
        data[position] ^= 0x40
        out.write_bytes(data)
        proc = keel_cli("inspect", out)
        assert "Traceback" not in proc.stdout + proc.stderr
        assert proc.returncode == 1
        lines = proc.stderr.splitlines()
        assert len(lines) == 1, proc.stderr
        assert check in lines[0] and str(out) in lines[0]
        assert "MISMATCH" in proc.stdout
        doc = json.loads(keel_cli("inspect", out, "--json").stdout)
        assert doc["crc_ok"] is False


def test_sha256_only_mismatch_is_named(keel_cli, repo, tmp_path):
    """Payload changed and the CRC recomputed: only the SHA-256 still catches it."""
    import binascii
    import struct

    out = tmp_path / "app.bin"
    assert keel_cli("build", "app", repo / "examples/hello", "--platform", "virtual",
                    "-o", out).returncode == 0
    data = bytearray(out.read_bytes())
    info = images.parse_image(bytes(data)).info
    data[info.header_size] ^= 0x01
    data[-4:] = struct.pack("<I", binascii.crc32(bytes(data[:-4])) & 0xFFFFFFFF)
    out.write_bytes(data)
    proc = keel_cli("inspect", out)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "SHA-256" in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


# --- keel build system ---------------------------------------------------------------


@pytest.fixture(scope="module")
def system_rc(keel_cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("system") / "out"
    proc = keel_cli("build", "system", "--platform", "virtual", "--version", "1.2.0-rc.3",
                    "-o", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def by_function(keel_cli, directory):
    docs = {}
    for path in sorted(directory.iterdir()):
        doc = inspect_json(keel_cli, path)
        assert doc["crc_ok"] is True and doc["sha256_ok"] is True
        assert doc["platform"] == "virtual"
        docs[(doc["function"], doc["index"])] = (path, doc)
    return docs


def test_build_system_writes_three_valid_images(keel_cli, repo, system_rc):
    out, proc = system_rc
    files = sorted(p.name for p in out.iterdir())
    bl_version = read_text(repo, "bootloader/VERSION")
    assert files == sorted([
        f"virtual-bootloader-{bl_version}.bin",
        "virtual-system-part1-1.2.0-rc.3.bin",
        "virtual-system-part2-1.2.0-rc.3.bin",
    ])
    assert len(proc.stdout.splitlines()) == 3
    docs = by_function(keel_cli, out)
    assert set(docs) == {("bootloader", 0), ("system-part", 1), ("system-part", 2)}

    _, bl = docs[("bootloader", 0)]
    assert bl["version"] == bl_version
    assert bl["dependencies"] == []

    parts = {p["index"]: p for p in json.loads((repo / "system/parts.json").read_text())["parts"]}
    _, part1 = docs[("system-part", 1)]
    assert part1["version"] == "1.2.0-rc.3"
    [dep] = part1["dependencies"]
    assert dep["function"] == "bootloader" and dep["index"] == 0
    assert dep["version"] == parts[1]["depends"][0]["version"]

    _, part2 = docs[("system-part", 2)]
    assert part2["version"] == "1.2.0-rc.3"
    assert part2["dependencies"] == [
        {"function": "system-part", "index": 1, "version": "1.2.0-rc.3"}
    ]


def test_built_parts_satisfy_each_other(repo, system_rc, tmp_path):
    from keel import build

    out, _ = system_rc
    infos = [images.read_image(p).info for p in sorted(out.iterdir())]
    for info in infos:
        assert mf.missing_dependencies(info, infos) == []
    # An app built for this system runs on it; one built for the release does not.
    for target, ok in [("1.2.0-rc.3", True), ("1.2.0-rc.2", True), ("1.2.0", False)]:
        app = tmp_path / f"app-{target}.bin"
        build.build_app(repo / "examples/hello", "virtual", target, app)
        missing = mf.missing_dependencies(images.read_image(app).info, infos)
        assert (missing == []) is ok, (target, missing)


def test_system_parts_do_not_share_modules(system_rc):
    from keel import romfs

    out, _ = system_rc
    owners = {}
    for path in sorted(out.iterdir()):
        image = images.read_image(path)
        info = image.info
        for name, offset, _ in romfs.walk(
            mf.bytes_reader(image.data), info.header_size, info.payload_size
        ):
            if "/" not in name:
                assert name not in owners, (name, owners.get(name), path.name)
                owners[name] = path.name
    assert len(set(owners.values())) == 3


def test_default_system_version(keel_cli, repo, tmp_path):
    out = tmp_path / "sys"
    proc = keel_cli("build", "system", "--platform", "virtual", "-o", out)
    assert proc.returncode == 0, proc.stderr
    version = read_text(repo, "system/VERSION")
    docs = by_function(keel_cli, out)
    assert docs[("system-part", 1)][1]["version"] == version
    assert docs[("system-part", 2)][1]["version"] == version
    assert docs[("system-part", 2)][1]["dependencies"][0]["version"] == version
    assert (out / f"virtual-system-part1-{version}.bin").is_file()


def test_build_system_invalid_version(keel_cli, expect_cli_error, tmp_path):
    out = tmp_path / "sys"
    expect_cli_error(
        keel_cli("build", "system", "--platform", "virtual", "--version", "1.x", "-o", out),
        "'1.x'",
    )
    assert not out.exists()


@pytest.mark.parametrize("platform", ["esp32", "nrf52840"])
def test_the_bootloader_fits_every_board_of_its_platform(platform, tmp_path):
    """The 32 KB bootloader slot of the ESP32 and nRF52840 boards, with room for a
    signature, and compiled without line numbers (they would not fit)."""
    from keel import boards, build

    out = tmp_path / platform
    build.build_system(platform, None, out)
    [bl] = out.glob("*-bootloader-*.bin")
    image = images.read_image(bl)
    slots = [boards.load_board(name).slot_for(mf.FUNCTION_BOOTLOADER, 0).size
             for name in boards.known_boards() if boards.load_board(name).platform == platform]
    assert slots and len(image.data) + 256 <= min(slots), (len(image.data), slots)
    with_lines = build.compile_py(build.source_root() / "bootloader/boot_check.py", "b.py")
    assert len(build.compile_py(build.source_root() / "bootloader/boot_check.py", "b.py", lines=False)) \
        < len(with_lines) - 100


def test_a_system_that_does_not_fit_its_boards_is_refused(tmp_path, monkeypatch):
    from keel import boards, build
    from keel.errors import KeelError

    def small_slot(name):  # a board whose bootloader slot is 16 KB
        board = boards.load_board(name)
        parts = [replace(p, size=16384) if p.label == "bootloader" else p for p in board.partitions]
        return replace(board, partitions=parts)

    monkeypatch.setattr(build, "load_board", small_slot)
    out = tmp_path / "sys"
    with pytest.raises(KeelError, match=r"nrf52840-bootloader-.*\.bin: \d+ bytes do not fit the bootloader "
                                        r"slot of board .* \(16384 bytes\)"):
        build.build_system("nrf52840", None, out)
    assert not out.exists()


def test_app_module_named_like_a_system_module_is_refused(tmp_path):
    from keel import build
    from keel.errors import KeelError

    src = tmp_path / "app"
    src.mkdir()
    (src / "main.py").write_text("import log\n")
    (src / "log.py").write_text("x = 1\n")
    out = tmp_path / "app.bin"
    with pytest.raises(KeelError, match="log have the names of system modules"):
        build.build_app(src, "virtual", "1.0.0", out)
    assert not out.exists()
    (src / "log.py").rename(src / "mylog.py")
    (src / "main.py").write_text("import mylog\n")
    build.build_app(src, "virtual", "1.0.0", out)
    assert out.exists()


def test_a_closed_pipe_is_no_traceback(repo, tmp_path):
    """`keel inspect FILE | head -0`: the reader is gone before keel writes. It ends with
    status 141 (as a shell says of SIGPIPE) and says nothing on stderr."""
    import sys

    from keel import build

    image = tmp_path / "hello.bin"
    build.build_app(repo / "examples" / "hello", "virtual", "1.1.0", image)
    read, write = os.pipe()
    os.close(read)  # nobody will read
    keel = Path(sys.executable).parent / "keel"
    proc = subprocess.run([str(keel), "inspect", str(image)], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr
