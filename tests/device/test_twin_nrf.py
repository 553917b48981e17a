"""The nRF52840 twins end to end (issue 12's acceptance for nrf52840_dk, and the Xenon):
Keel built for nrf52840 boots on the VM playing the board, on the flash MicroPython
v1.28.0 built with FS_SIZE=448K leaves (the slots in the ROMFS segment, the filesystem
the port mounts at /flash), with the nrf port's bootloader, stage 0 and HAL; an app for
a newer system enters safe mode and `keel flash --usb` over the console pty heals it, a
power cut during that install leaves a bootable board, a virtual module is refused;
provisioning is in test_provisioning.py, for every board; a VM that dies while the app starts
(a lockup on the chip) counts towards the crash loop; the Xenon's MODE button, which its
firmware's pins do not list, works. The ports' own checks are tests/host/
test_boot_ports.py and test_hal_contract.py."""

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from keel import vdev, vio

from conftest import fs_names
from test_twin_acceptance import HELLO, ROOT, _boot, keel, ok
from test_vdev_pty import Board


DK = pytest.mark.parametrize("board_name", ["nrf52840_dk"], indirect=True)
XENON = pytest.mark.parametrize("board_name", ["particle_xenon"], indirect=True)

# An app for system 1.1.0 whose code takes 17 blocks of the filesystem (every file takes
# a block of its own): with it, the 448K filesystem has no room for a second copy of
# part 1, so installing a newer part 1 replaces the old code in place.
BIG_APP = {f"m{i}.py": "DATA = %r\n" % ("block %d " % i * 100) for i in range(16)}
BIG_APP["main.py"] = "".join(f"import m{i}\n" for i in range(16)) + "print('hello from keel')\n"


def test_the_cli_builds_and_runs_keel_on_the_nrf_twin(tmp_path):
    ok(keel("build", "system", "--platform", "nrf52840", "--version", "1.0.0", "-o", "S",
            cwd=tmp_path))
    ok(keel("build", "app", ROOT / "examples" / "hello", "--platform", "nrf52840", "-o", "A",
            cwd=tmp_path))
    ok(keel("vdev", "create", "D", "--board", "nrf52840_dk", "--system", "S", cwd=tmp_path))
    ok(keel("vdev", "flash", "D", "A", cwd=tmp_path))
    out = ok(keel("vdev", "run", "D", "--seconds", "5", cwd=tmp_path))
    assert HELLO in out
    # a power-on leaves RESETREAS empty: the port says HARD_RESET, Keel "pin-reset"
    assert "keel: system 1.0.0 on nrf52840_dk, reset reason pin-reset" in out
    status = json.loads(ok(keel("vdev", "status", "D", "--json", cwd=tmp_path)))
    board = json.loads((ROOT / "boards" / "nrf52840_dk" / "board.json").read_text())
    assert status["board"] == "nrf52840_dk"
    assert status["device_id"] == (tmp_path / "D" / "uid").read_text().strip()
    assert len(status["device_id"]) == 16  # FICR DEVICEID, 64 bits
    assert abs(status["mem"]["heap_total"] - board["heap"]) <= board["heap"] * 0.02
    assert status["mode"] == "normal" and status["app"] == "running"
    assert {m["platform"] for m in status["modules"]} == {"nrf52840"}
    # where the firmware put them: the slots in the ROMFS segment, the filesystem above
    flash = (tmp_path / "D" / vdev.FLASH_FILE).read_bytes()
    assert flash[0x50000:0x50004] == b"KEEL" and flash[0x69000:0x69004] == b"KEEL"
    assert json.loads((tmp_path / "D" / "firmware.json").read_text())["build"] == "v1.28-fs448k"


@DK
def test_a_virtual_module_is_refused_by_the_twin(tmp_path, device):
    from keel import build

    dev = device("1.1.0")
    virtual_app = build.build_app(ROOT / "examples" / "hello", "virtual", "1.1.0",
                                  tmp_path / "virtual-hello.bin")
    before = hashlib.sha256((dev.path / vdev.FLASH_FILE).read_bytes()).digest()
    proc = keel("vdev", "flash", dev.path, virtual_app)
    assert proc.returncode == 1
    assert "built for platform virtual, this device is nrf52840" in proc.stderr
    assert hashlib.sha256((dev.path / vdev.FLASH_FILE).read_bytes()).digest() == before


@DK
def test_safe_mode_then_healed_over_the_console_pty(device, board_systems, make_app, tmp_path,
                                                    _system_builds):
    """An app for a newer system: safe mode (dependency). keel flash --usb over the
    twin's console pty (its raw REPL, after /boot.py moved the filesystem from /flash
    to /) refuses virtual modules, then writes the newer system; the bootloader installs
    it (on 1.28 its code runs in place from the slots: nothing is extracted) and the app
    runs."""
    dev = device("1.0.0")
    dev.flash(make_app("big", BIG_APP, target="1.1.0"))
    board = Board(dev, tmp_path / "tty")
    try:
        board.wait_for("SAFE MODE (dependency)")
        status = vdev.status(dev.path)
        assert (status["mode"], status["safe_mode_reason"]) == ("safe", "dependency")
        virtual = sorted(_system_builds["virtual"]["1.1.0"].glob("*.bin"))
        refused = keel("flash", "--usb", *virtual, "--port", board.tty)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "the board on this port is nrf52840_dk (nrf52840): nothing written" in \
            refused.stderr
        newer = sorted(board_systems["1.1.0"].glob("*.bin"))
        out = ok(keel("flash", "--usb", *newer, "--port", board.tty))
        assert "system-part 1 1.1.0: written to system1 and verified" in out
        board.wait_for(HELLO)
    finally:
        board.stop()
    console = (dev.path / "console.log").read_text(errors="replace")
    assert "replacing it" not in console
    status = vdev.status(dev.path)
    assert (status["mode"], status["app"], status["missing"]) == ("normal", "running", [])
    assert status["reset_reason"] == "update"
    assert {m["slot"]: m["in_place"] for m in status["modules"]} == {
        "bootloader": False, "system1": True, "system2": True, "user": True}
    names = fs_names(dev.path, "/keel/m")  # the code is stored once: in its slot
    assert "s1" not in names and "s2" not in names and "app" not in names, names
    assert {m["version"] for m in status["modules"] if m["function"] == "system-part"} == {"1.1.0"}


@DK
@pytest.mark.parametrize("firmware", ["v1.28-fs448k", "v1.27-fs448k"])
def test_a_power_cut_during_the_install_leaves_a_bootable_twin(device, board_systems, make_app,
                                                               tmp_path, firmware):
    """The newer system in its slots, then the boot that installs it cut, on both paths:
    code in place (1.28: only the digests are written) and extracted (1.27: ~800 flash
    operations, which take in the cuts while part 1's old code is removed and the new
    extracted in its place). A sample of the operations (every 23rd when extracted,
    every 3rd in place, clean and torn in turn, and the first and last). Each time the
    twin boots again, finishes the install and runs the app."""
    in_place = firmware.startswith("v1.28")
    dev = device("1.0.0", firmware=firmware)
    dev.flash(make_app("big", BIG_APP, target="1.1.0"))
    assert "SAFE MODE (dependency)" in dev.run(until="SAFE MODE")
    dev.flash(*sorted(board_systems["1.1.0"].glob("*.bin")))
    template = dev.path

    def copy(name):
        return Path(shutil.copytree(template, tmp_path / name, ignore=shutil.ignore_patterns(
            "console.log", "io.log", "io.in", "vm.pid", "faults.*", "reset_cause")))

    console, n, state = _boot(copy("count"), {"count_only": True})
    assert HELLO in console and ("replacing it" in console) is not in_place, console
    assert state == "-" * 10 and n > 20, (n, state)
    points = [(k, j % 2 == 1) for j, k in enumerate(range(2 if in_place else 9, n, 3 if in_place else 23))]
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


@DK
def test_a_dying_vm_while_the_app_starts_counts_as_a_crash(device, make_app):
    """The VM killed while the app starts: on the chip, a fault the CPU cannot take locks
    it up and it resets from LOCKUP. machine.reset_cause() is then LOCKUP_RESET, which
    bootloader/port_nrf.py reads as "panic": three of them and the app is in safe mode."""
    dying = {"main.py": "import os\n\ndef setup():\n    os.system('kill -9 $PPID')\n"}
    dev = device("1.1.0")
    dev.flash(make_app("dying", dying))
    console = dev.run(until="SAFE MODE")
    assert console.count("the VM died") == 3
    assert "SAFE MODE (app-crash)" in console
    status = dev.status()
    assert (status["reset_reason"], status["safe_mode_reason"]) == ("panic", "app-crash")
    state = json.loads(vdev.read_file(dev.path, "/keel/app_state.json"))
    assert state["crashes"] == 3


@XENON
def test_the_xenon_runs_keel_and_its_mode_button(device, make_app):
    """The Xenon's firmware lists no P0.11 (machine.Pin(11) raises ValueError): the HAL
    reads its MODE button through the GPIO registers. A press from the host reaches
    the app as the button event."""
    dev = device("1.1.0")
    dev.flash(make_app("button", src_dir=ROOT / "examples" / "button"))
    pressed = threading.Event()

    def press_once(console):
        if not pressed.is_set() and console.contains("keel: system 1.1.0 on particle_xenon"):
            pressed.set()
            vio.send(dev.path, {"op": "press", "button": "MODE", "ms": 150})
        return console.contains("button pressed for")

    text = vdev.run(dev.path, seconds=20, out=io.BytesIO(), stop_when=press_once).text.decode()
    assert "button pressed for" in text, text
    held = int(text.split("button pressed for ")[1].split()[0])
    assert 100 <= held <= 1000, held
    status = dev.status()
    assert (status["board"], status["mode"], status["app"]) == ("particle_xenon", "normal",
                                                                 "running")
