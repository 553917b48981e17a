"""Hostile images on the real VM (tests/hostile_images.py: valid images changed as an
attacker would, SHA-256 and CRC32 sealed again). Whichever way one comes (written into
its slot by a tool that checked nothing, staged for the bootloader as an update, over
the air through the OTA receiver, over USB), the device refuses it before installing
it, says why, and boots a valid module set: the system running, or a clear safe mode
(a halt when system part 1 itself is refused), never a crash loop, never without its
bootloader. Also: a boot loop is reported as one, and what an interrupted install left
behind is removed at boot. Host-side refusals: tests/host/test_module_check.py."""

import hashlib
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cloud_session import MOSQUITTO, broker, cloud, pki, provision  # noqa: F401 (fixtures)

import hostile_images as hostile
from keel import build, romfs, vdev

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HELLO = "hello from keel"
STOPS = ["keel: the app is not run", "waiting for firmware", HELLO, "Traceback",
         "vdev: the VM died"]


def run(path, until=STOPS, seconds=20.0):
    console = vdev.run(path, seconds=seconds, out=io.BytesIO(),
                       stop_when=lambda c: any(c.contains(u) for u in until))
    return console.text.decode(errors="replace")


def read_text(path, name):
    try:
        return vdev.read_file(path, name).decode()
    except FileNotFoundError:
        return None


def slot_bytes(path, label):
    device = vdev.VirtualDevice(path)
    part = device.board().partition(label)
    return bytes(device.read_flash()[part.offset:part.offset + part.size])


def write_slot(path, label, data):
    """Write an image into its slot as a programmer that checks nothing would."""
    device = vdev.VirtualDevice(path)
    part = device.board().partition(label)
    flash = device.read_flash()
    flash[part.offset:part.offset + part.size] = b"\xff" * part.size
    flash[part.offset:part.offset + len(data)] = data
    device.write_flash(flash)


def copy_of(template, dest):
    shutil.copytree(template, dest, ignore=shutil.ignore_patterns(
        "console.log", "io.log", "io.in", "vm.pid", "faults.*"))
    return dest


@pytest.fixture(scope="module")
def template(tmp_path_factory, systems):
    """A device running the hello app on system 1.1.0, booted once; the valid images."""
    base = tmp_path_factory.mktemp("hostile")
    app = build.build_app(ROOT / "examples" / "hello", "virtual", "1.1.0", base / "hello.bin")
    path = base / "template"
    vdev.create(path, systems["1.1.0"])
    vdev.flash(path, [app])
    assert HELLO in run(path)
    return path, hostile.load_images(systems["1.1.0"], app)


def assert_a_valid_module_set_boots(path, console):
    """What every case must leave: one boot (no loop, no crash), the status recorded,
    the bootloader in place and the same one as before."""
    assert console.count("vdev: boot ") == 1, console
    assert "Traceback" not in console and "vdev: the VM died" not in console, console
    status = vdev.status(path)
    assert "boot_attempts" not in status and status["mode"] in ("normal", "safe"), status
    assert read_text(path, "/keel/m/bl/.sha256") is not None
    assert vdev.read_file(path, "/keel/m/bl/keel_boot.mpy")[:2] == b"M\x06"
    return status


# One of each kind: (the image, the outcome: halt, safe mode, or a refused bootloader)
CASES = {
    "app-as-bootloader": "bootloader",
    "bootloader-without-keel_boot": "bootloader",
    "system2-as-system1": "halt",
    "system1-mpy-not-mpy": "halt",
    "system1-as-system2": "safe",
    "app-nested-very-deep": "safe",
    "app-thousands-of-entries": "safe",
    "app-with-sha256-marker": "safe",
    "native-app": "safe",  # passes the host; only the board knows its CPU
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_image_written_into_its_slot_is_refused_at_install(template, tmp_path, name):
    path = copy_of(template[0], tmp_path / "dev")
    images = template[1]
    if name == "native-app":
        data, reason = hostile.native_app(images), "mpy"
    else:
        make, reasons = hostile.HOSTILE[name]
        data, reason = make(images), next(iter(reasons))
    label = hostile.slot_label(data)
    bootloader_before = read_text(path, "/keel/m/bl/.sha256")
    write_slot(path, label, data)

    console = run(path)
    assert f"keel: refusing {label} " in console and f"({reason}): " in console, console
    status = assert_a_valid_module_set_boots(path, console)
    assert read_text(path, "/keel/m/bl/.sha256") == bootloader_before
    module = next(m for m in status["modules"] if m["slot"] == label)
    assert (module["valid"], module["invalid_reason"]) == (False, reason)
    outcome = CASES[name]
    if outcome == "halt":  # no system part 1 to hand over to: the bootloader waits
        assert (status["mode"], status["stage"], status["safe_mode_reason"]) == (
            "safe", "bootloader", reason)
        assert f"keel: no usable system ({reason}); waiting for firmware" in console
    elif outcome == "safe":
        assert (status["mode"], status["stage"], status["safe_mode_reason"]) == (
            "safe", "system", reason)
        assert f"keel: SAFE MODE ({reason})" in console
    else:  # a refused bootloader: the installed one goes on; the system needs a valid one
        assert "bootloader updated" not in console
        assert (status["mode"], status["safe_mode_reason"]) == ("safe", "dependency")
    if label == "user":  # no code of a refused app is left to run
        with pytest.raises(FileNotFoundError):
            vdev.read_file(path, "/keel/m/app/main.mpy")

    # Fixed by flashing the module that belongs there.
    good = tmp_path / "good.bin"
    good.write_bytes(images[{"user": "app"}.get(label, label)])
    vdev.flash(path, [good])
    console = run(path)
    assert HELLO in console, console
    assert vdev.status(path)["mode"] == "normal"


# Staged updates: ota_apply checks them before it copies or swaps anything


@pytest.mark.parametrize("label, name, reason", [
    ("system1", "system2-as-system1", "content"),
    ("user", "app-nested-deep", "content"),
    ("user", "app-mpy-version-5", "mpy"),
    ("system1", "valid-system2", "integrity"),  # a good module, for another slot
])
def test_a_staged_update_is_refused_before_it_is_copied(template, tmp_path, label, name, reason):
    path = copy_of(template[0], tmp_path / "dev")
    images = template[1]
    data = images["system2"] if name == "valid-system2" else hostile.HOSTILE[name][0](images)
    dev_slot = slot_bytes(path, label)
    # as system/core/ota.py leaves an update, without its checks (Device.stage_update)
    device = vdev.VirtualDevice(path)
    flash = device.read_flash()
    at = device.board().partition("staging").offset
    flash[at:at + len(data)] = data
    device.write_flash(flash)
    pending = {"slot": label, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    vdev.write_files(path, {"/keel/ota/pending.json": json.dumps(pending).encode()})

    console = run(path)
    assert f"keel: refusing the update for {label} ({reason})" in console, console
    assert "installing the update" not in console and HELLO in console
    assert_a_valid_module_set_boots(path, console)
    assert slot_bytes(path, label) == dev_slot
    assert vdev.status(path)["mode"] == "normal"
    with pytest.raises(FileNotFoundError):
        vdev.read_file(path, "/keel/ota/pending.json")


# Over the air: the OTA receiver refuses them before it writes pending.json


@pytest.mark.skipif(not MOSQUITTO.is_file(), reason="needs Mosquitto")
def test_the_ota_receiver_refuses_hostile_images(device, broker, cloud, pki,  # noqa: F811
                                                 template):
    from test_ota import Updater

    images = template[1]
    dev = device("1.1.0")
    app = dev.path.parent / "hello.bin"
    app.write_bytes(images["app"])
    dev.flash(app)
    uid = provision(dev, pki, broker.port)
    broker.start()
    service = cloud(broker)
    up = Updater(service, uid)
    cases = [
        ("app-as-bootloader", "bootloader", 0, "content"),
        ("system2-as-system1", "system-part", 1, "content"),
        ("app-mpy-version-5", "user-part", 1, "mpy"),
        ("app-thousands-of-entries", "user-part", 1, "content"),
    ]
    with dev.start(seconds=90) as running:
        running.wait_for(HELLO)
        service.describes(uid)
        time.sleep(0.3)  # (the subscriptions)
        for name, function, index, reason in cases:
            data = hostile.HOSTILE[name][0](images)
            ack = up.offer(data, function=function, index=index, version="9.0.0")
            assert ack["state"] == "receiving", (name, ack)
            assert up.send(ack)["state"] == "verifying", name
            failed = up.next_status()
            assert (failed["state"], failed["reason"]) == ("failed", reason), (name, failed)
            assert failed["detail"], failed
        time.sleep(0.7)  # (a pending update would reset the device 0.5 s after verifying)
        console = running.console()
    assert console.count("vdev: boot ") == 1, console  # never reset to install any
    assert console.count("keel: ota: update failed") == len(cases)
    with pytest.raises(FileNotFoundError):
        vdev.read_file(dev.path, "/keel/ota/pending.json")
    assert vdev.status(dev.path)["mode"] == "normal"


# Over USB: keel flash --usb on the board's console (tests/device/test_usb_flash.py)


def test_keel_flash_usb_refuses_them_and_the_board_refuses_what_the_host_cannot_see(
        device, template, tmp_path):
    from test_usb_flash import keel, slot_bytes as usb_slot_bytes
    from test_vdev_pty import Board

    images = template[1]
    dev = device("1.1.0")
    app = tmp_path / "hello.bin"
    app.write_bytes(images["app"])
    dev.flash(app)
    board = Board(dev, tmp_path / "tty")
    try:
        board.wait_for(HELLO)
        for name in ("app-as-bootloader", "system2-as-system1", "app-nested-very-deep"):
            path = tmp_path / f"{name}.bin"
            path.write_bytes(hostile.HOSTILE[name][0](images))
            label = hostile.slot_label(path.read_bytes())
            before = usb_slot_bytes(dev, label)
            proc = keel("flash", "--usb", path, "--port", board.tty)
            assert proc.returncode == 1, proc.stdout + proc.stderr
            assert "the payload is not what the header says (content)" in proc.stderr
            assert usb_slot_bytes(dev, label) == before  # nothing written
        # Native code for another CPU: the host cannot tell, the board can.
        native = tmp_path / "native.bin"
        native.write_bytes(hostile.native_app(images))
        proc = keel("flash", "--usb", native, "--port", board.tty)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        board.wait_for("keel: refusing user 1.0.0 (mpy): main.mpy: native code for another CPU")
        board.wait_for("keel: SAFE MODE (mpy)")
        status = vdev.status(dev.path)
        assert (status["mode"], status["safe_mode_reason"]) == ("safe", "mpy")
        # still a board keel flash --usb can talk to: the good app goes back on
        proc = keel("flash", "--usb", app, "--port", board.tty)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        board.wait_for(HELLO, count=2)
    finally:
        board.stop()


# A boot loop, reported as one


def test_a_boot_loop_is_reported_as_one(template, tmp_path):
    path = copy_of(template[0], tmp_path / "dev")
    images = template[1]
    # A system part 1 whose entry module is there (the bootloader takes it) but fails
    broken = tmp_path / "broken-part1.bin"
    broken.write_bytes(hostile.with_module_source(
        images["system1"], "keel_system", 'raise RuntimeError("part 1 is broken")\n', tmp_path))
    vdev.flash(path, [broken])
    console = run(path, ["vdev: boot 4"])
    assert console.count("RuntimeError: part 1 is broken") >= 3

    status = vdev.status(path)
    assert status["mode"] == "boot-loop", status
    assert status["boot_attempts"] >= 3
    assert status["boot_error"] == "RuntimeError: part 1 is broken"
    assert status["recorded_mode"] == "normal"  # what the last recorded status said
    assert any("part 1 is broken" in line for line in status["console"])
    keel = BIN / "keel"
    text = subprocess.run([str(keel), "vdev", "status", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("mode            boot-loop (")
    assert "error         RuntimeError: part 1 is broken" in text.stdout
    assert "the last status recorded, before the loop:\nmode            normal" in text.stdout
    as_json = subprocess.run([str(keel), "vdev", "status", "--json", str(path)],
                             capture_output=True, text=True, timeout=60)
    assert json.loads(as_json.stdout)["mode"] == "boot-loop"

    good = tmp_path / "part1.bin"
    good.write_bytes(images["system1"])
    vdev.flash(path, [good])
    assert HELLO in run(path)
    status = vdev.status(path)
    assert status["mode"] == "normal" and "boot_attempts" not in status
    assert "boot_error" not in status


def test_a_boot_that_records_its_status_is_no_loop(template, tmp_path):
    path = copy_of(template[0], tmp_path / "dev")
    for _ in range(3):
        assert HELLO in run(path)
        assert "boot_attempts" not in vdev.status(path)


# Leftovers of interrupted installs


def test_what_an_interrupted_install_left_is_removed_at_boot(template, tmp_path):
    path = copy_of(template[0], tmp_path / "dev")
    deep = "/keel/m/s1.new/" + "/".join(["d"] * 60)
    vdev.write_files(path, {
        deep + "/half.mpy": b"M\x06",
        "/keel/m/s1.new/keel_system.mpy": b"M\x06\x00\x1f",
        "/keel/m/app.old/main.mpy": b"M\x06\x00\x1f",
        "/keel/m/s2.new/.sha256": b"0" * 64,
        "/keel/m/bl.prev/keel_boot.mpy": b"stale",  # no trial: a stale copy
    })
    console = run(path)
    assert HELLO in console, console
    for name in ("s1.new", "app.old", "s2.new", "bl.prev"):
        assert f"keel: removing /keel/m/{name}, left over from an install" in console
    device = vdev.VirtualDevice(path)
    fs = device.open_fs(device.read_flash(), device.board())
    fs.mount()
    assert sorted(fs.listdir("/keel/m")) == ["app", "bl", "s1", "s2"]
    assert "installing" not in console  # the code in place was never touched
    assert_a_valid_module_set_boots(path, console)


# The bounded walk and the iterative remove_tree on the VM itself

VM_CHECK = """\
import sys, os
sys.path[:0] = [%(bl)r, %(lib)r]
import romfs, flashfs
data = open(%(image)r, "rb").read()
def read(offset, buf):
    chunk = data[offset:offset + len(buf)]
    buf[:len(chunk)] = chunk
    return len(chunk)
try:
    print("walked", len(list(romfs.walk(read, 0, len(data)))))
except romfs.RomfsLimitError as e:
    print("refused", e)
top = %(tree)r
path = top
os.mkdir(path)
for i in range(400):
    path += "/d"
    os.mkdir(path)
    with open(path + "/f", "w") as f:
        f.write("x")
flashfs.remove_tree(top)
print("removed", not flashfs.exists(top))
"""


def test_the_walk_and_remove_tree_on_the_vm_with_a_small_heap(tmp_path):
    """A ROMFS nested 5000 deep and a tree 400 deep: the recursive walk and remove_tree
    they replace ran out of memory on these (in a 64 KB heap)."""
    image = tmp_path / "deep.romfs"
    image.write_bytes(hostile.nested_romfs(5000))
    script = tmp_path / "check.py"
    script.write_text(VM_CHECK % {"bl": str(ROOT / "bootloader"), "lib": str(ROOT / "lib"),
                                  "image": str(image), "tree": str(tmp_path / "tree")})
    micropython = BIN / "micropython"
    proc = subprocess.run([str(micropython), "-X", "heapsize=64K", str(script)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        "refused romfs: directories nested deeper than %d" % romfs.MAX_DEPTH, "removed True"]
