"""The ESP32 twin end to end (issue 12's acceptance): Keel built for esp32 boots on
the VM playing an ESP32, with the esp32 port's bootloader and HAL, from the keel CLI;
an app built for a newer system enters safe mode, and flashing the newer system over
the console pty with `keel flash --usb` heals it; a power cut during that install
leaves a bootable device; a module for another platform is refused, nothing written."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keel import vdev

try:
    from test_vdev_pty import Board
except ImportError:  # run from another directory
    from tests.device.test_vdev_pty import Board

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HELLO = "hello from keel"


def keel(*args, cwd=None, timeout=120):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["keel", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_cli_builds_and_runs_keel_on_the_esp32_twin(tmp_path):
    ok(keel("build", "system", "--platform", "esp32", "--version", "1.0.0", "-o", "S", cwd=tmp_path))
    ok(keel("build", "app", ROOT / "examples" / "hello", "--platform", "esp32", "-o", "A",
            cwd=tmp_path))  # for the system's version, by default
    ok(keel("vdev", "create", "D", "--board", "esp32_generic", "--system", "S", cwd=tmp_path))
    ok(keel("vdev", "flash", "D", "A", cwd=tmp_path))
    out = ok(keel("vdev", "run", "D", "--seconds", "5", cwd=tmp_path))
    assert HELLO in out
    assert "keel: system 1.0.0 on esp32_generic, reset reason power-on" in out
    status = json.loads(ok(keel("vdev", "status", "D", "--json", cwd=tmp_path)))
    board = json.loads((ROOT / "boards" / "esp32_generic" / "board.json").read_text())
    assert status["board"] == "esp32_generic"
    assert status["device_id"] == (tmp_path / "D" / "uid").read_text().strip()
    assert len(status["device_id"]) == 12  # the hex of machine.unique_id(): 6 bytes
    assert abs(status["mem"]["heap_total"] - board["heap"]) <= board["heap"] * 0.02
    assert status["mode"] == "normal" and status["app"] == "running"
    assert {m["platform"] for m in status["modules"]} == {"esp32"}
    # The build Keel documents by default: ROMFS, the system parts and the app in place.
    text = ok(keel("vdev", "status", "D", cwd=tmp_path))
    assert "twin firmware   v1.28-romfs (ROMFS: Keel's code can run in place)" in text
    assert "module          system-part 1 1.0.0  valid  (in place)" in text


ESP32_TWIN = pytest.mark.parametrize("board_name", ["esp32_generic"], indirect=True)
# Both of the ESP32's paths: a firmware with ROMFS (code in place), stock firmware (extracted)
ESP32_PATHS = pytest.mark.parametrize("board_name", ["esp32_generic", "esp32_stock"], indirect=True)


@ESP32_TWIN
def test_a_virtual_module_is_refused_by_the_twin(tmp_path, device, _app_builds):
    """The esp32 twin takes esp32 modules only: vdev flash refuses the rest before it
    writes anything."""
    from keel import build

    dev = device("1.1.0")
    virtual_app = build.build_app(ROOT / "examples" / "hello", "virtual", "1.1.0",
                                  tmp_path / "virtual-hello.bin")
    before = hashlib.sha256((dev.path / vdev.FLASH_FILE).read_bytes()).digest()
    proc = keel("vdev", "flash", dev.path, virtual_app)
    assert proc.returncode == 1
    assert "built for platform virtual, this device is esp32" in proc.stderr
    assert hashlib.sha256((dev.path / vdev.FLASH_FILE).read_bytes()).digest() == before


@ESP32_PATHS
def test_safe_mode_then_healed_over_the_console_pty(device, board_systems, make_app, tmp_path,
                                                    _system_builds):
    """An app for a newer system: safe mode (dependency); keel flash --usb over the
    twin's console pty refuses a virtual module, then writes the newer system, and the
    twin installs it and runs the app."""
    dev = device("1.0.0")
    dev.flash(make_app("hello-new", src_dir=ROOT / "examples" / "hello", target="1.1.0"))
    board = Board(dev, tmp_path / "tty")
    try:
        board.wait_for("SAFE MODE (dependency)")
        status = vdev.status(dev.path)
        assert (status["mode"], status["safe_mode_reason"]) == ("safe", "dependency")
        virtual = sorted(_system_builds["virtual"]["1.1.0"].glob("*.bin"))
        refused = keel("flash", "--usb", *virtual, "--port", board.tty)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "the board on this port is esp32_generic (esp32): nothing written" in refused.stderr
        newer = sorted(board_systems["1.1.0"].glob("*.bin"))
        out = ok(keel("flash", "--usb", *newer, "--port", board.tty))
        assert "esp32_generic (esp32)" in out
        assert "system-part 1 1.1.0: written to system1 and verified" in out
        board.wait_for(HELLO)
    finally:
        board.stop()
    status = vdev.status(dev.path)
    assert (status["mode"], status["app"], status["missing"]) == ("normal", "running", [])
    assert status["reset_reason"] == "update"
    assert {m["version"] for m in status["modules"] if m["function"] == "system-part"} == {"1.1.0"}


_ENDS = [s.encode() for s in (HELLO, "SAFE MODE", "no usable system", "Traceback",
                               "the VM died")]


def _boot(path, faults, seconds=15.0):
    """One run with fault injection: the boot it covers and, after a cut, the next."""
    (path / vdev.FAULTS_FILE).write_text(json.dumps(faults))

    def done(console):
        with console.lock:
            text = bytes(console.text)
        if "cut_at_write" in faults:
            at = text.find(b"vdev: power cut")
            if at < 0:
                return False
            text = text[at:]
        return any(end in text for end in _ENDS)

    console = vdev.run(path, seconds=seconds, out=io.BytesIO(), stop_when=done)
    count, state = (path / vdev.FAULTS_OUT).read_text().split()
    return console.text.decode(errors="replace"), int(count), state


@ESP32_PATHS
def test_a_power_cut_during_the_install_leaves_a_bootable_twin(device, board_systems, make_app,
                                                               tmp_path, board_name):
    """The newer system written into its slots (as keel flash --usb writes it), then the
    boot that installs it is cut: every 17th of its ~570 flash operations, clean and
    torn in turn, and both at the first and the last (test_power_cut.py sweeps every
    operation of the virtual board's installs; here a sample keeps the time). Each time
    the twin boots again, finishes the install and runs the app. In place (ROMFS) the
    install writes only digests, far fewer operations: every 3rd is cut."""
    dev = device("1.0.0")
    dev.flash(make_app("hello-new", src_dir=ROOT / "examples" / "hello", target="1.1.0"))
    assert "SAFE MODE (dependency)" in dev.run(until="SAFE MODE")
    dev.flash(*sorted(board_systems["1.1.0"].glob("*.bin")))
    template = dev.path

    def copy(name):
        return Path(shutil.copytree(template, tmp_path / name, ignore=shutil.ignore_patterns(
            "console.log", "io.log", "io.in", "vm.pid", "faults.*")))

    console, n, state = _boot(copy("count"), {"count_only": True})
    assert HELLO in console and "keel: installing system1 1.1.0" in console, console
    in_place = board_name == "esp32_generic"
    assert state == "-" * 10 and n > (3 if in_place else 20), (n, state)
    points = [(k, j % 2 == 1) for j, k in enumerate(range(2, n, 3) if in_place else range(12, n, 17))]
    points += [(k, torn) for k in (1, n) for torn in (False, True)]
    failures = []
    for k, torn in points:
        path = copy(f"cut-{k}-{torn}")
        console, counted, state = _boot(path, {"cut_at_write": k, "torn": torn})
        try:
            assert counted == k and state.startswith("torn-" if torn else "cut-"), (k, state)
            assert HELLO in console[console.find("vdev: power cut"):], console[-3000:]
            status = vdev.status(path)
            assert (status["mode"], status["app"]) == ("normal", "running"), status
            assert all(m["valid"] for m in status["modules"]), status["modules"]
            assert {m["version"] for m in status["modules"]
                    if m["function"] == "system-part"} == {"1.1.0"}
        except AssertionError as e:
            failures.append((k, torn, str(e)[:1500]))
        shutil.rmtree(path)
    print(f"\n{n} flash operations in the install; {len(points)} cuts tried")
    assert not failures, failures
