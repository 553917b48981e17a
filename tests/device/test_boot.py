"""Boot, the app loader and safe mode, on the real MicroPython VM: the virtual board,
and (@on_twins) the ESP32 twin, with the esp32 port's bootloader and HAL."""

import json

import pytest

from keel import vdev

from conftest import board_of, fs_names, on_both_paths, on_twins

HELLO = "hello from keel"


@on_both_paths
def test_normal_boot_runs_the_app(device, hello_app, board_name):
    dev = device("1.1.0")
    dev.flash(hello_app("1.1.0"))
    console = dev.run(until=HELLO)
    assert HELLO in console
    assert "SAFE MODE" not in console
    st = dev.status()
    assert st["mode"] == "normal"
    assert st["safe_mode_reason"] is None
    assert st["missing"] == []
    assert st["app"] == "running"
    assert st["reset_reason"] == "power-on"
    assert st["vm"]["name"] == "micropython"
    assert st["vm"]["version"].count(".") == 2
    found = {(m["function"], m["index"]): m for m in st["modules"]}
    assert set(found) == {("bootloader", 0), ("system-part", 1), ("system-part", 2), ("user-part", 1)}
    assert all(m["valid"] and m["crc_ok"] and m["sha256_ok"] for m in found.values())
    assert found[("system-part", 2)]["version"] == "1.1.0"
    assert {m["platform"] for m in found.values()} == {dev.board().platform}
    # The virtual board and stock ESP32 firmware cannot run code in place: it is
    # extracted. An ESP32 firmware with ROMFS (the twin's default) runs the system
    # parts' and the app's from their slots (the bootloader's is always extracted:
    # stage 0 imports it).
    in_place = {m["function"]: m["in_place"] for m in found.values()}
    if board_name == "esp32_generic":
        assert in_place == {"bootloader": False, "system-part": True, "user-part": True}
        names = fs_names(dev.path, "/keel/m")  # the code is stored once: in its slot
        assert not {"s1", "s2", "app"} & set(names), names
    else:
        assert set(in_place.values()) == {False}
    # The board it ran on, and the id it would connect to the cloud as: the uid the
    # board was made with, as its port reads it (hal/device_id.py).
    assert st["board"] == board_of(board_name)
    assert st["device_id"] == (dev.path / "uid").read_text().strip()


def test_heap_matches_the_board(device, hello_app):
    dev = device("1.1.0")
    ram = dev.board().ram
    dev.flash(hello_app())
    dev.run(until=HELLO)
    mem = dev.status()["mem"]
    # The unix port's GC heap is the -X heapsize figure less a little bookkeeping.
    assert ram * 0.95 <= mem["heap_total"] <= ram * 1.05
    assert 0 < mem["heap_free_at_app_start"] < mem["heap_total"]
    # --heap gives the VM less than the board has (Keel and the hello app boot in 100K).
    dev.run(until=HELLO, heap=100 * 1024)
    assert dev.status()["mem"]["heap_total"] <= 100 * 1024


# What the app finds loaded: the boot's code (boot_check, the module format, the
# install and update code) has left the heap; the system keeps handover, its leaf.
LOADED_APP = """
import sys
import keel
print("LOADED", " ".join(sorted(sys.modules)))
print("VERSIONS", keel.system_version(), keel.app_version(), keel.target_version())
"""


@on_twins
def test_the_boot_code_leaves_the_heap_before_the_app_starts(device, make_app):
    dev = device("1.1.0")
    dev.flash(make_app("loaded", {"main.py": LOADED_APP}))
    console = dev.run(until="VERSIONS")
    loaded = set(console.split("LOADED", 1)[1].splitlines()[0].split())
    assert {"handover", "keel_system", "keel", "main"} <= loaded
    gone = {"boot_check", "module_format", "module_check", "ota_apply", "romfs", "trust"}
    assert not gone & loaded, gone & loaded
    # The API's versions come from the slots' headers the system kept (no format code).
    assert console.split("VERSIONS", 1)[1].split()[:3] == ["1.1.0", "1.0.0", "1.1.0"]


@on_both_paths
def test_app_for_newer_system_enters_safe_mode_then_heals(device, hello_app, board_systems):
    dev = device("1.0.0")
    dev.flash(hello_app("1.1.0"))
    console = dev.run(until="SAFE MODE (dependency)")
    assert HELLO not in console
    st = dev.status()
    assert st["mode"] == "safe"
    assert st["safe_mode_reason"] == "dependency"
    assert st["app"] == "not-run"
    assert {"function": "system-part", "index": 2, "version": "1.1.0"} in st["missing"]
    assert {"function": "system-part", "index": 1, "version": "1.1.0"} in st["missing"]

    dev.flash(*sorted(board_systems["1.1.0"].glob("*.bin")))
    console = dev.run(until=HELLO)
    assert HELLO in console
    st = dev.status()
    assert (st["mode"], st["app"], st["missing"]) == ("normal", "running", [])


def test_one_system_part_behind_is_a_dependency(device, hello_app, systems):
    """Part 2 at 1.1.0 needs part 1 at 1.1.0: the system's own dependencies count."""
    dev = device("1.0.0")
    dev.flash(hello_app("1.0.0"), *systems["1.1.0"].glob("*system-part2*"))
    console = dev.run(until="SAFE MODE")
    assert HELLO not in console
    st = dev.status()
    assert st["safe_mode_reason"] == "dependency"
    assert st["missing"] == [{"function": "system-part", "index": 1, "version": "1.1.0"}]


def test_app_built_for_older_system_runs_on_newer(device, hello_app):
    dev = device("1.1.0")
    dev.flash(hello_app("1.0.0"))
    assert HELLO in dev.run(until=HELLO)
    assert dev.status()["mode"] == "normal"


def test_corrupt_user_part_is_integrity_safe_mode(device, hello_app):
    dev = device("1.1.0")
    dev.flash(hello_app())
    dev.corrupt("user", at=40)
    console = dev.run(until="SAFE MODE")
    assert "SAFE MODE (integrity)" in console
    assert HELLO not in console
    st = dev.status()
    assert (st["mode"], st["safe_mode_reason"], st["app"]) == ("safe", "integrity", "not-run")
    app = [m for m in st["modules"] if m["function"] == "user-part"][0]
    assert app["valid"] is False and app["crc_ok"] is False


def test_app_corrupted_after_install_is_not_run_from_its_old_copy(device, hello_app):
    dev = device("1.1.0")
    dev.flash(hello_app())
    assert HELLO in dev.run(until=HELLO)
    dev.corrupt("user", at=40)
    console = dev.run(until="SAFE MODE")
    assert HELLO not in console
    assert dev.status()["safe_mode_reason"] == "integrity"


def test_corrupt_system_part_2_is_integrity_safe_mode(device, hello_app):
    dev = device("1.1.0")
    dev.flash(hello_app())
    dev.corrupt("system2")
    console = dev.run(until="SAFE MODE")
    assert HELLO not in console
    assert dev.status()["safe_mode_reason"] == "integrity"


def test_corrupt_system_part_1_halts_in_the_bootloader(device, hello_app):
    dev = device("1.1.0")
    dev.flash(hello_app())
    dev.corrupt("system1")
    console = dev.run(until="no usable system")
    assert HELLO not in console
    st = dev.status()
    assert (st["mode"], st["safe_mode_reason"], st["stage"]) == ("safe", "integrity", "bootloader")


CRASHING = {
    "main.py": "import sensor\n\ndef setup():\n    sensor.start()\n",
    "sensor.py": "def start():\n    raise RuntimeError('sensor missing')\n",
}


def test_app_crashing_at_start_up_three_boots_in_a_row(device, make_app):
    dev = device("1.1.0")
    dev.flash(make_app("crashing", CRASHING))
    console = dev.run(until="SAFE MODE")
    assert console.count("keel: app crashed") == 3
    assert "SAFE MODE (app-crash)" in console
    # The traceback names the app's own file and line, and is kept for safe mode.
    assert 'File "sensor.py", line 2, in start' in console.split("SAFE MODE")[1]
    assert "RuntimeError: sensor missing" in console.split("SAFE MODE")[1]
    st = dev.status()
    assert (st["mode"], st["safe_mode_reason"], st["app"]) == ("safe", "app-crash", "crashed")
    assert st["reset_reason"] == "app-crash"

    # Still in safe mode on the next power-on: the app is not retried blindly.
    console = dev.run(until="SAFE MODE")
    assert "keel: app crashed" not in console
    assert dev.status()["safe_mode_reason"] == "app-crash"


def test_flashing_a_fixed_app_leaves_crash_safe_mode(device, make_app, hello_app):
    dev = device("1.1.0")
    dev.flash(make_app("crashing", CRASHING))
    dev.run(until="SAFE MODE")
    dev.flash(hello_app())
    assert HELLO in dev.run(until=HELLO)
    assert dev.status()["mode"] == "normal"


def test_app_that_crashes_once_then_starts_is_not_in_safe_mode(device, make_app):
    flaky = {
        "main.py": (
            "import os\n"
            "def setup():\n"
            "    try:\n"
            "        os.stat('/flaky-once')\n"
            "    except OSError:\n"
            "        open('/flaky-once', 'w').close()\n"
            "        raise ValueError('first boot only')\n"
            "    print('flaky app up')\n"
        )
    }
    dev = device("1.1.0")
    dev.flash(make_app("flaky", flaky))
    console = dev.run(until="flaky app up")
    assert console.count("keel: app crashed") == 1
    assert dev.status()["mode"] == "normal"


def test_crash_in_loop_counts_too(device, make_app):
    looping = {"main.py": "def setup():\n    pass\n\ndef loop():\n    raise OSError(5)\n"}
    dev = device("1.1.0")
    dev.flash(make_app("loop-crash", looping))
    console = dev.run(until="SAFE MODE")
    assert "SAFE MODE (app-crash)" in console


def test_system_with_no_app(device):
    dev = device("1.1.0")
    console = dev.run(until="no app installed")
    assert "no app installed" in console
    st = dev.status()
    assert (st["mode"], st["app"]) == ("normal", "none")


def test_status_is_json_from_the_device_itself(device, hello_app):
    """The host reads what the VM wrote into the LittleFS partition of the flash."""
    dev = device("1.1.0")
    dev.flash(hello_app())
    dev.run(until=HELLO)
    raw = json.loads(vdev.read_file(dev.path, "/keel/status.json"))
    assert raw["mode"] == "normal"
    assert raw["vm"]["name"] == "micropython"


def test_prerelease_system_orders_before_its_release(tmp_path, device, make_app):
    from keel import build

    build.build_system("virtual", "1.2.0-rc.3", tmp_path / "rc")
    dev = device(system_dir=tmp_path / "rc")
    dev.flash(make_app("rc-app", {"main.py": "print('rc app up')\n"}, "1.2.0-rc.3"))
    assert "rc app up" in dev.run(until="rc app up")

    dev.flash(make_app("release-app", {"main.py": "print('release app up')\n"}, "1.2.0"))
    console = dev.run(until="SAFE MODE")
    assert "release app up" not in console
    assert {"function": "system-part", "index": 2, "version": "1.2.0"} in dev.status()["missing"]


def test_power_cut_while_installing_modules_recovers(device, hello_app):
    """Cut power at several points of the first boot (while modules are being
    extracted); every later boot must still reach the app."""
    dev = device("1.1.0")
    dev.flash(hello_app())
    for cut_after in (0.02, 0.05, 0.08, 0.12, 0.2):
        dev.run(seconds=cut_after)
    console = dev.run(until=HELLO)
    assert HELLO in console
    st = dev.status()
    assert st["mode"] == "normal"
    assert all(m["valid"] for m in st["modules"])


@on_twins
def test_vm_dying_during_start_up_counts_as_a_crash(device, make_app):
    """No Python exception to catch: the VM process itself is killed, as a hard
    fault would end it; the runner restarts it as after a panic. On the ESP32 twin the
    port then reads HARD_RESET, as after a real panic, with no reason recorded by Keel:
    that is a panic too (bootloader/port_esp32.py), and it counts."""
    dying = {"main.py": "import os\n\ndef setup():\n    os.system('kill -9 $PPID')\n"}
    dev = device("1.1.0")
    dev.flash(make_app("dying", dying))
    console = dev.run(until="SAFE MODE")
    assert console.count("the VM died") == 3
    assert "SAFE MODE (app-crash)" in console
    assert dev.status()["reset_reason"] == "panic"


def test_app_calling_sys_exit_is_a_crash_not_the_end_of_the_system(device, make_app):
    exiting = {"main.py": "import sys\n\ndef setup():\n    sys.exit(0)\n"}
    dev = device("1.1.0")
    dev.flash(make_app("exiting", exiting))
    console = dev.run(until="SAFE MODE")
    assert "SystemExit" in console
    assert "the VM exited" not in console
    assert dev.status()["safe_mode_reason"] == "app-crash"


def test_main_py_at_the_filesystem_root_does_not_shadow_the_app(device, make_app):
    """/main.py, which starts Keel, is run by the port as a script; imported as the
    app's `main` module it would print the impostor line."""
    dev = device("1.1.0")
    dev.flash(make_app("real", {"main.py": "print('the real app')\n"}))
    flash = vdev.VirtualDevice(dev.path)
    data, board = flash.read_flash(), flash.board()
    fs = flash.open_fs(data, board)
    fs.mount()
    with fs.open("/main.py", "r") as f:
        starter = f.read()
    with fs.open("/main.py", "w") as f:
        f.write("if __name__ != '__main__':\n    print('an impostor')\n" + starter)
    flash.store_fs(data, board, fs)
    flash.write_flash(data)
    console = dev.run(until="the real app")
    assert "the real app" in console and "an impostor" not in console


def test_crash_traceback_belongs_to_the_current_app(device, make_app):
    dev = device("1.1.0")
    dev.flash(make_app("crashing", CRASHING))
    dev.run(until="SAFE MODE")
    killer = {"main.py": "import os\n\ndef setup():\n    os.system('kill -9 $PPID')\n"}
    dev.flash(make_app("killer", killer))
    console = dev.run(until="SAFE MODE")
    assert "sensor missing" not in console
    assert "no traceback" in console


def test_user_slot_with_a_damaged_header_is_integrity_not_empty(device, hello_app):
    dev = device("1.1.0")
    dev.flash(hello_app())
    dev.corrupt("user", at=0)  # the magic itself
    console = dev.run(until="SAFE MODE")
    assert "SAFE MODE (integrity)" in console
    app = [m for m in dev.status()["modules"] if m["function"] == "user-part"][0]
    assert (app["valid"], app["version"], app["invalid_reason"]) == (False, None, "integrity")


@pytest.mark.parametrize("board_name", ["esp32_generic", "nrf52840_dk"], indirect=True)
def test_an_exception_out_of_main_py_leaves_a_twin_at_its_repl(device, hello_app):
    """As the ports' main loops (ports/esp32/main.c, ports/nrf/main.c at v1.28.0): the
    traceback is printed and the REPL runs, no reset; with nobody on the console the
    board waits, where the virtual board's VM would end."""
    dev = device("1.1.0")
    dev.flash(hello_app())
    vdev.write_files(dev.path, {"/main.py": b"raise OSError(5)\n"})
    console = dev.run(seconds=4)
    assert "OSError: [Errno 5] EIO" in console
    assert console.count("vdev: boot") == 1 and "the VM died" not in console, console
