"""keel flash --usb and keel update over a board's serial console (the raw REPL), on a
running virtual device whose console is a pty (keel vdev run --pty), as on a board."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from keel_cloud.config import CloudDir

from keel import build, vdev
from keel import module_format as mf

try:
    from test_vdev_pty import Board
except ImportError:  # run from another directory
    from tests.device.test_vdev_pty import Board

BIN = Path(sys.executable).parent
MARK = "flashed over usb"


def keel(*args, cloud=None, timeout=120):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    if cloud:
        env["KEEL_CLOUD"] = str(cloud)
    return subprocess.run(["keel", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def slot_bytes(dev, label):
    flash = (dev.path / vdev.FLASH_FILE).read_bytes()
    part = dev.board().partition(label)
    return flash[part.offset:part.offset + part.size]


def versions(dev):
    return {(m["function"], m["index"]): m["version"] for m in vdev.status(dev.path)["modules"]}


@pytest.fixture
def running(device, hello_app, tmp_path):
    """A device on system 1.0.0 running the hello app, its console at tmp_path/tty."""
    boards = []

    def start(version="1.0.0"):
        dev = device(version)
        dev.flash(hello_app(target=version))
        board = Board(dev, tmp_path / f"tty-{len(boards)}")
        boards.append(board)
        board.wait_for("hello from keel")
        return board

    yield start
    for board in boards:
        board.stop()


def test_flash_usb_installs_an_app_that_runs_after_the_reset(running, make_app):
    board = running("1.0.0")
    app = make_app("usb", {"main.py": f"def setup():\n    print('{MARK}')\n"}, "1.0.0")
    proc = keel("flash", "--usb", app, "--port", board.tty)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "virtual (virtual)" in proc.stdout
    assert "user-part 1.0.0: written to user and verified" in proc.stdout
    assert "reset; the board installs and runs the new modules" in proc.stdout
    assert "100%" in proc.stderr  # the progress bar
    board.wait_for(MARK)
    assert vdev.status(board.dev.path)["reset_reason"] == "update"
    image = app.read_bytes()
    assert slot_bytes(board.dev, "user")[:len(image)] == image
    assert "keel: installing user" in board.console()


def test_a_module_for_another_platform_is_refused_before_anything_is_written(running, tmp_path):
    board = running("1.0.0")
    src = tmp_path / "esp"
    src.mkdir()
    (src / "main.py").write_text("def setup():\n    pass\n")
    esp32_app = build.build_app(src, "esp32", "1.0.0", tmp_path / "esp32-app.bin")
    before = slot_bytes(board.dev, "user")
    proc = keel("flash", "--usb", esp32_app, "--port", board.tty)
    assert proc.returncode != 0
    assert "is for esp32, the board on this port is virtual (virtual): nothing written" in proc.stderr
    assert slot_bytes(board.dev, "user") == before
    board.wait_for("hello from keel", count=2)  # left as found: Keel runs again


def test_a_module_too_big_for_its_slot_is_refused(running, tmp_path):
    board = running("1.0.0")
    info = mf.ModuleInfo(mf.FUNCTION_USER_PART, 1, mf.encode_version("1.0.0"),
                         mf.platform_id("virtual"))
    big = tmp_path / "big.bin"
    app = {"main.mpy": b"M\x06\x00\x1f", "blob.bin": bytes(300 * 1024)}  # an app, too big
    big.write_bytes(mf.build_image(info, build.make_romfs(app), hashlib.sha256))
    before = slot_bytes(board.dev, "user")
    proc = keel("flash", "--usb", big, "--port", board.tty)
    assert proc.returncode != 0
    assert "slot user holds 262144: nothing written" in proc.stderr
    assert slot_bytes(board.dev, "user") == before


def test_several_modules_go_in_dependency_order_with_a_warning(running, systems, make_app):
    """An app for 1.1.0 and system part 2 1.1.0 (which needs part 1 1.1.0) onto a 1.0.0
    board: written part before app, and the board is told it will be in safe mode."""
    board = running("1.0.0")
    app = make_app("usb", {"main.py": f"def setup():\n    print('{MARK}')\n"}, "1.1.0")
    part2 = next(systems["1.1.0"].glob("*-system-part2-*.bin"))
    proc = keel("flash", "--usb", app, part2, "--port", board.tty)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.index("system-part 2 1.1.0: written") < out.index("user-part 1.0.0: written")
    assert "warning: system-part 2 1.1.0 needs system-part 1 >= 1.1.0" in out
    board.wait_for("keel: SAFE MODE (dependency)")


def test_keel_update_brings_the_newest_release_and_then_does_nothing(running, systems, tmp_path):
    cloud = CloudDir(tmp_path / "cloud")
    cloud.init()
    for version in ("1.0.0", "1.1.0"):
        proc = keel("release", "system", systems[version], cloud=cloud.path)
        assert proc.returncode == 0, proc.stderr
    board = running("1.0.0")
    proc = keel("update", "--port", board.tty, cloud=cloud.path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"system 1.1.0; already current: bootloader {build.bootloader_version()}" in proc.stdout
    assert "system-part 1 1.1.0: written to system1 and verified" in proc.stdout
    assert "system-part 2 1.1.0: written to system2 and verified" in proc.stdout
    board.wait_for("keel: system 1.1.0 on virtual")
    board.wait_for("hello from keel", count=2)
    assert versions(board.dev)[("system-part", 1)] == "1.1.0"

    again = keel("update", "--port", board.tty, cloud=cloud.path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already runs system 1.1.0: nothing to do" in again.stdout
    board.wait_for("hello from keel", count=3)  # Keel started again after the look

    down = keel("update", "--port", board.tty, "--version", "1.0.0", cloud=cloud.path)
    assert down.returncode != 0
    assert "would downgrade system-part 1 1.1.0 → 1.0.0" in down.stderr
    assert "--allow-downgrade" in down.stderr
    assert versions(board.dev)[("system-part", 1)] == "1.1.0"


def test_keel_update_takes_a_prerelease_only_by_name(running, tmp_path):
    cloud = CloudDir(tmp_path / "cloud")
    cloud.init()
    pre = tmp_path / "pre"
    build.build_system("virtual", "1.2.0-rc.1", pre)
    assert keel("release", "system", pre, cloud=cloud.path).returncode == 0
    board = running("1.0.0")
    proc = keel("update", "--port", board.tty, cloud=cloud.path)
    assert proc.returncode != 0
    assert "no system release for virtual in the catalog" in proc.stderr
    proc = keel("update", "--port", board.tty, "--version", "1.2.0-rc.1", cloud=cloud.path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "system 1.2.0-rc.1 (prerelease)" in proc.stdout
    board.wait_for("keel: system 1.2.0-rc.1 on virtual")


def test_no_board_on_the_port_is_a_clear_error(tmp_path):
    proc = keel("flash", "--usb", tmp_path / "x.bin", "--port", tmp_path / "nothing")
    assert proc.returncode != 0 and "x.bin" in proc.stderr  # the file is checked first
    app = tmp_path / "app.bin"
    info = mf.ModuleInfo(mf.FUNCTION_USER_PART, 1, mf.encode_version("1.0.0"), 1)
    payload = build.make_romfs({"main.mpy": b"M\x06\x00\x1f"})
    app.write_bytes(mf.build_image(info, payload, hashlib.sha256))
    proc = keel("flash", "--usb", app, "--port", tmp_path / "nothing")
    assert proc.returncode != 0
    assert "cannot open the port" in proc.stderr and "Traceback" not in proc.stderr


def test_without_a_port_the_one_usb_board_is_found(monkeypatch):
    """As mpremote finds a board: a USB serial device (with a vendor and product id);
    none or several is an error that says so."""
    import serial.tools.list_ports

    from keel import usb
    from keel.errors import KeelError

    class Port:
        def __init__(self, device, vid=0x10C4, pid=0xEA60):
            self.device, self.vid, self.pid = device, vid, pid

    found = []
    monkeypatch.setattr(serial.tools.list_ports, "comports", lambda: list(found))
    found[:] = [Port("/dev/ttyS0", None, None)]  # a plain UART: not a USB board
    with pytest.raises(KeelError, match="no board found on USB"):
        usb.find_port()
    found.append(Port("/dev/ttyUSB0"))
    assert usb.find_port() == "/dev/ttyUSB0"
    found.append(Port("/dev/ttyACM0"))
    with pytest.raises(KeelError, match=r"several boards found \(/dev/ttyACM0, /dev/ttyUSB0\)"):
        usb.find_port()
