"""A new system part proves itself or goes back (docs/boot-flow.md, "Updates and
rollback"): the bootloader swaps a system part with the staging partition, so the
previous part waits there during the trial; a part that does not reach the cloud in
time, keeps resetting, or fails to start is swapped back, and the device says so.

The updates are staged the way system/core/ota.py leaves a verified one (the image in
the staging partition, /keel/ota/pending.json), on the real MicroPython VM; a part
that boots, and one that fails to start, on the ESP32 twin too (@on_twins)."""

import hashlib
import json
import socket

import pytest
from keel_cloud.pki import CertificateAuthority

from keel import build, vdev
from keel import module_format as mf
from keel.paths import source_root

from conftest import on_both_paths

ROOT = source_root()
HELLO = "hello from keel"


@pytest.fixture(scope="module")
def _systems(tmp_path_factory):
    """System builds made for these tests, by (version, platform, broken)."""
    return tmp_path_factory, {}


def _build(systems, version, platform, broken=False):
    import shutil

    factory, cache = systems
    key = (version, platform, broken)
    if key not in cache:
        out = factory.mktemp(f"system-{version}-{platform}")
        if not broken:
            build.build_system(platform, version, out)
        else:  # its part 1 fails as it starts (a bug that only shows on the device)
            tree = factory.mktemp("broken-tree")
            for name in ("bootloader", "app_loader", "system", "hal", "lib", "boards"):
                shutil.copytree(ROOT / name, tree / name, symlinks=True)
            core = tree / "system" / "core" / "keel_system.py"
            core.write_text(core.read_text().replace(
                "def start(board, slots, reset_reason):\n",
                "def start(board, slots, reset_reason):\n    raise RuntimeError('boom in 1.1.2')\n"))
            mp = pytest.MonkeyPatch()
            mp.setenv("KEEL_ROOT", str(tree))
            try:
                build.build_system(platform, version, out)
            finally:
                mp.undo()
        cache[key] = out
    return cache[key]


@pytest.fixture
def next_system(_systems, platform):
    """System 1.1.1: its part 1 runs with the 1.1.0 part 2 (which needs part 1 >= 1.1.0)."""
    return _build(_systems, "1.1.1", platform)


@pytest.fixture
def broken_system(_systems, platform):
    """System 1.1.2 whose part 1 fails as it starts."""
    return _build(_systems, "1.1.2", platform, broken=True)


def part(system_dir, index):
    return next(system_dir.glob(f"*-system-part{index}-*.bin")).read_bytes()


def stage(dev, image, trial_s=None):
    """A verified system part 1 update, as system/core/ota.py leaves it."""
    extra = {} if trial_s is None else {"trial_s": trial_s}
    dev.stage_update("system1", image, **extra)


def slot_image(dev, label, size):
    flash = (dev.path / vdev.FLASH_FILE).read_bytes()
    at = dev.slot_offset(label)
    return flash[at:at + size]


def provision_nowhere(dev):
    """Cloud credentials for a broker that never answers (a closed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ca = CertificateAuthority.create()
    ident = ca.issue("0123456789abcdef01234567")
    vdev.write_files(dev.path, {
        "/keel/cloud/key.der": ident.key_der,
        "/keel/cloud/cert.der": ident.cert_der,
        "/keel/cloud/ca.der": ca.cert_der,
        "/keel/cloud/cloud.json": json.dumps({"host": "127.0.0.1", "port": port}).encode(),
    })


def versions(status):
    return {(m["function"], m["index"]): m["version"] for m in status["modules"]}


def old_device(device, hello_app):
    dev = device("1.1.0")
    dev.flash(hello_app())
    assert HELLO in dev.run(until=HELLO)
    return dev


def test_a_part_that_never_reaches_the_cloud_goes_back(device, hello_app, next_system):
    dev = old_device(device, hello_app)
    provision_nowhere(dev)
    old = slot_image(dev, "system1", 64 * 1024)
    new = part(next_system, 1)
    stage(dev, new, trial_s=2)
    with dev.start(seconds=60) as run:
        run.wait_for("system1 1.1.1 on trial (boot 1 of 3)")
        run.wait_for("swap, block 0 of")
        run.wait_for("did not reach the cloud within 2 s", timeout=20)
        run.wait_for("system1 is back on 1.1.0", timeout=20)
        run.wait_for(HELLO, count=2)  # on trial, and after the rollback
    status = dev.status()
    assert status["reset_reason"] == "rollback"
    assert versions(status)[("system-part", 1)] == "1.1.0"
    assert all(m["valid"] for m in status["modules"])
    rollback = status["rollback"]
    assert rollback == {"function": "system-part", "index": 1, "version": "1.1.1",
                        "sha256": hashlib.sha256(new).hexdigest(), "restored": "1.1.0",
                        "reason": "no-cloud"}
    # the previous part is back byte for byte, and the rejected one sits in staging
    assert slot_image(dev, "system1", 64 * 1024) == old
    assert slot_image(dev, "staging", len(new)) == new
    for name in ("trial.json", "rollback", "apply.json", "pending.json", "scratch"):
        with pytest.raises(FileNotFoundError):
            vdev.read_file(dev.path, f"/keel/ota/{name}")


@on_both_paths
def test_a_part_that_fails_to_start_goes_back_at_once(device, hello_app, broken_system):
    dev = old_device(device, hello_app)
    stage(dev, part(broken_system, 1))
    console = dev.run(until="system1 is back on 1.1.0", seconds=30)
    console += dev.run(until=HELLO)
    assert "the system part on trial failed: RuntimeError: boom in 1.1.2" in console
    status = dev.status()
    assert versions(status)[("system-part", 1)] == "1.1.0"
    assert status["rollback"]["reason"] == "RuntimeError: boom in 1.1.2"
    assert status["rollback"]["version"] == "1.1.2"


def test_a_part_that_keeps_resetting_goes_back_after_three_boots(device, hello_app, next_system):
    """A part that takes the device down before it can reach the cloud (here: the
    power, cut by the host at each boot's first app line) gets three boots."""
    dev = old_device(device, hello_app)
    provision_nowhere(dev)
    stage(dev, part(next_system, 1), trial_s=600)
    console = ""
    for boot in (1, 2, 3):
        console += dev.run(until=HELLO)
        assert f"system1 1.1.1 on trial (boot {boot} of 3)" in console
    console += dev.run(until=HELLO)
    assert "did not prove itself (boot-loop); rolling back to 1.1.0" in console
    status = dev.status()
    assert versions(status)[("system-part", 1)] == "1.1.0"
    assert status["rollback"]["reason"] == "boot-loop"


def test_app_crashes_do_not_count_against_the_part(device, make_app, next_system):
    """An app that crashes at every boot is the app loader's business (safe mode after
    three crashes), not a reason to take the new system part out."""
    crasher = make_app("crasher", {"main.py": "def setup():\n    raise ValueError('app bug')\n"})
    dev = device("1.1.0")
    dev.flash(crasher)
    provision_nowhere(dev)
    stage(dev, part(next_system, 1), trial_s=600)
    console = dev.run(until="keel: SAFE MODE", seconds=40)
    assert console.count("keel: app crashed:") == 3
    assert console.count("system1 1.1.1 on trial (boot 1 of 3)") == 4
    assert "rolling back" not in console
    status = dev.status()
    assert status["safe_mode_reason"] == "app-crash"
    assert versions(status)[("system-part", 1)] == "1.1.1"
    assert status["trial"] == {"slot": "system1", "version": "1.1.1", "previous": "1.1.0"}


@on_both_paths
def test_an_unprovisioned_device_keeps_a_part_that_boots(device, hello_app, next_system):
    dev = old_device(device, hello_app)
    stage(dev, part(next_system, 1))
    console = dev.run(until=HELLO)
    assert "system1 1.1.1 booted; this device has no cloud to reach: it stays" in console
    status = dev.status()
    assert versions(status)[("system-part", 1)] == "1.1.1"
    assert "rollback" not in status and status.get("trial") is None
    with pytest.raises(FileNotFoundError):
        vdev.read_file(dev.path, "/keel/ota/trial.json")
    # and the part it replaced is in staging, whole, until the next update
    before = mf.parse_header(slot_image(dev, "staging", 64))
    assert mf.decode_version(before.version) == "1.1.0"


def test_an_app_update_is_copied_not_swapped(device, hello_app, make_app):
    dev = old_device(device, hello_app)
    image = make_app("other", {"main.py": "def setup():\n    print('other app')\n"}).read_bytes()
    dev.stage_update("user", image)
    console = dev.run(until="other app")
    assert "installing the update into user (copy)" in console and "on trial" not in console
