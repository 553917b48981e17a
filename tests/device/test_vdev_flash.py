"""vdev flash refuses bad modules and changes nothing when it does."""

import hashlib
import subprocess

import pytest

from keel import build, vdev
from keel import module_format as mf
from keel.errors import KeelError


def flash_digest(dev):
    return hashlib.sha256((dev.path / vdev.FLASH_FILE).read_bytes()).hexdigest()


def test_corrupt_module_is_refused_and_nothing_changes(device, hello_app, tmp_path):
    dev = device("1.0.0")
    good = hello_app("1.0.0")
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data)
    before = flash_digest(dev)
    with pytest.raises(KeelError, match="mismatch"):
        dev.flash(good, bad)  # the good one is not written either
    assert flash_digest(dev) == before


def test_truncated_module_is_refused(device, hello_app, tmp_path):
    dev = device("1.0.0")
    data = hello_app("1.0.0").read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[:-10])
    before = flash_digest(dev)
    with pytest.raises(KeelError, match="truncated"):
        dev.flash(cut)
    assert flash_digest(dev) == before


def test_module_for_another_platform_is_refused(device, tmp_path):
    dev = device("1.0.0")
    other = build.build_app(
        build.source_root() / "examples/hello", "esp32", "1.0.0", tmp_path / "esp32.bin"
    )
    before = flash_digest(dev)
    with pytest.raises(KeelError, match="platform esp32"):
        dev.flash(other)
    assert flash_digest(dev) == before


def test_module_that_does_not_fit_is_refused(device, tmp_path):
    dev = device("1.0.0")
    slot = dev.board().partition("user")
    info = mf.ModuleInfo(mf.FUNCTION_USER_PART, 1, mf.encode_version("1.0.0"), 1)
    big = tmp_path / "big.bin"
    app = {"main.mpy": b"M\x06\x00\x1f", "blob.bin": bytes(slot.size)}  # an app, too big
    big.write_bytes(mf.build_image(info, build.make_romfs(app), hashlib.sha256))
    before = flash_digest(dev)
    with pytest.raises(KeelError, match="do not fit"):
        dev.flash(big)
    assert flash_digest(dev) == before


def test_two_modules_for_one_slot_are_refused(device, hello_app, make_app):
    dev = device("1.0.0")
    other = make_app("other", {"main.py": "print(1)\n"}, "1.0.0")
    with pytest.raises(KeelError, match="same slot"):
        dev.flash(hello_app("1.0.0"), other)


def test_flash_is_refused_while_running(device, hello_app):
    dev = device("1.0.0")
    (dev.path / vdev.PID_FILE).write_text(str(__import__("os").getpid()))
    with pytest.raises(KeelError, match="running"):
        dev.flash(hello_app("1.0.0"))


def test_cli_reports_refusal_on_one_line(device, tmp_path, keel_env):
    dev = device("1.0.0")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a module at all" * 10)
    proc = subprocess.run(
        ["keel", "vdev", "flash", str(dev.path), str(junk)],
        capture_output=True, text=True, env=keel_env,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("keel: error:")
    assert "bad magic" in proc.stderr


def test_create_refuses_a_system_dir_without_system_parts(tmp_path, systems):
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in systems["1.0.0"].glob("*bootloader*"):
        (partial / f.name).write_bytes(f.read_bytes())
    with pytest.raises(KeelError, match="no system-part 1"):
        vdev.create(tmp_path / "dev", partial)
    assert not (tmp_path / "dev" / vdev.FLASH_FILE).exists()


def test_create_refuses_an_existing_device(device, systems):
    dev = device("1.0.0")
    with pytest.raises(KeelError, match="already there"):
        vdev.create(dev.path, systems["1.0.0"])


def test_create_refuses_two_images_for_one_slot(tmp_path, systems):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for version in ("1.0.0", "1.1.0"):
        for f in systems[version].glob("*.bin"):
            (mixed / f.name).write_bytes(f.read_bytes())
    with pytest.raises(KeelError, match="same slot"):
        vdev.create(tmp_path / "dev", mixed)


def test_cli_flashes_a_folder_of_modules_in_dependency_order(device, board_systems, tmp_path, keel_env):
    """`keel vdev flash DEV DIR`: every module in the folder (keel build system -o DIR),
    the bootloader first, then the system parts by index."""
    dev = device("1.0.0")
    proc = subprocess.run(["keel", "vdev", "flash", str(dev.path), str(board_systems["1.1.0"])],
                          capture_output=True, text=True, env=keel_env)
    assert proc.returncode == 0, proc.stderr
    flashed = [line.split(" (")[0] for line in proc.stdout.splitlines()]
    assert flashed == [f"flashed bootloader {build.bootloader_version()}", "flashed system-part 1 1.1.0",
                       "flashed system-part 2 1.1.0"]
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(["keel", "vdev", "flash", str(dev.path), str(empty), str(tmp_path / "nope")],
                          capture_output=True, text=True, env=keel_env)
    assert proc.returncode == 1 and "no module images" in proc.stderr
