"""A bootloader update that fails keeps the previous bootloader (docs/boot-flow.md,
"Bootloader updates"), on the real VM: a new bootloader that cannot be imported,
raises before it gets to the system, or kills the VM at every boot is taken out by
stage 0, which puts the previous one back and records the new one as rejected. Power
cuts at the flash operations of a good bootloader's install and of stage 0 going back
from a bad one always leave a bootable device."""

import hashlib
import io
import json
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import hostile_images as hostile
from keel import build, vdev
from keel import module_format as mf

from conftest import fs_names

ROOT = Path(__file__).resolve().parents[2]
HELLO = "hello from keel"
GOING_BACK = "did not prove itself"
SOURCE = (ROOT / "bootloader" / "keel_boot.py").read_text()
BROKEN = {
    # its code raises as it is imported
    "import": 'raise RuntimeError("broken at import")\n' + SOURCE,
    # main() raises before the hand-over to the system
    "raises": SOURCE.replace("def main():\n", "def main():\n    raise ValueError('no')\n", 1),
    # the VM dies at every boot (a hard crash: exit status 7, as a panic)
    "crash": SOURCE.replace("def main():\n", "def main():\n    sys.exit(7)\n", 1),
}


def digest(data: bytes) -> str:
    """The SHA-256 a module image declares (of its header and payload)."""
    info = mf.parse_header(data)
    return hashlib.sha256(data[:info.header_size + info.payload_size]).hexdigest()



def read_text(path, name):
    try:
        return vdev.read_file(path, name).decode()
    except FileNotFoundError:
        return None


def run(path, until, seconds=20.0):
    console = vdev.run(path, seconds=seconds, out=io.BytesIO(),
                       stop_when=lambda c: any(c.contains(u) for u in until))
    return console.text.decode(errors="replace")


@pytest.fixture(scope="module")
def template(tmp_path_factory, systems):
    """A device with the hello app installed and booted once; and its images."""
    base = tmp_path_factory.mktemp("bl-fallback")
    app = build.build_app(ROOT / "examples" / "hello", "virtual", "1.1.0", base / "hello.bin")
    path = base / "template"
    vdev.create(path, systems["1.1.0"])
    vdev.flash(path, [app])
    assert HELLO in run(path, [HELLO])
    return path, hostile.load_images(systems["1.1.0"], app)


def copy_of(template, dest):
    shutil.copytree(template, dest, ignore=shutil.ignore_patterns(
        "console.log", "io.log", "io.in", "vm.pid", "faults.*"))
    return dest


def new_bootloader(images, tmp_path, kind=None):
    """The next bootloader (hostile.NEXT_BOOTLOADER): this tree's code, or broken as BROKEN[kind] says."""
    source = BROKEN[kind] if kind else SOURCE
    data = hostile.bootloader_with(images["bootloader"], source, hostile.NEXT_BOOTLOADER, tmp_path)
    path = tmp_path / f"bootloader-{kind or 'good'}.bin"
    path.write_bytes(data)
    return path, data


def assert_no_trial_left(path):
    assert read_text(path, "/keel/bl_trial") is None
    assert fs_names(path, "/keel/m") == ["app", "bl", "s1", "s2"]


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_failing_new_bootloader_is_replaced_by_the_previous_one(template, tmp_path, kind):
    path = copy_of(template[0], tmp_path / "dev")
    images = template[1]
    old_digest = read_text(path, "/keel/m/bl/.sha256")
    image, data = new_bootloader(images, tmp_path, kind)
    vdev.flash(path, [image])  # content a board accepts: only running it shows the fault

    console = run(path, ["keel: SAFE MODE", "no usable system"])
    assert "keel: bootloader updated, resetting" in console
    assert "keel: new bootloader on trial (boot 1 of 3)" in console
    going_back = [line for line in console.splitlines() if GOING_BACK in line]
    assert len(going_back) == 1, console
    if kind == "crash":  # no Python exception to see: three boots, then back
        assert "(boot 3 of 3)" in console
        assert "3 boots did not get to the system" in going_back[0]
        assert console.count("vdev: the VM died (exit status 7)") == 3
    else:  # at once, with the reason
        assert "(boot 2 of 3)" not in console
        said = "RuntimeError: broken at import" if kind == "import" else "ValueError: no"
        assert said in going_back[0]
    assert digest(data)[:16] in going_back[0]

    # The previous bootloader runs the system; the slot's image is marked rejected.
    assert read_text(path, "/keel/m/bl/.sha256") == old_digest
    assert read_text(path, "/keel/bl_rejected") == digest(data)
    status = vdev.status(path)
    assert status["stage"] == "system" and "boot_attempts" not in status
    assert status["reset_reason"] == "rollback"
    boot = next(m for m in status["modules"] if m["slot"] == "bootloader")
    assert (boot["version"], boot["valid"], boot["invalid_reason"]) == (hostile.NEXT_BOOTLOADER, False, "rejected")
    # system part 1 needs a bootloader (system/parts.json) and the slot holds none it can use
    assert (status["mode"], status["safe_mode_reason"]) == ("safe", "dependency")
    needs = json.loads((build.source_root() / "system/parts.json").read_text())["parts"][0]["depends"][0]
    assert needs in status["missing"]
    assert_no_trial_left(path)

    # It is never installed again: the next boot goes straight to the system.
    console = run(path, ["keel: SAFE MODE"])
    assert "bootloader updated" not in console and GOING_BACK not in console
    assert "did not start the system when it was installed; keeping the one before it" in console
    assert console.count("vdev: boot ") == 1

    # A good bootloader flashed over it installs, proves itself and runs the app.
    good, good_data = new_bootloader(images, tmp_path)
    vdev.flash(path, [good])
    console = run(path, [HELLO])
    assert "keel: the new bootloader proved itself" in console
    assert read_text(path, "/keel/m/bl/.sha256") == digest(good_data)
    assert vdev.status(path)["mode"] == "normal"
    assert_no_trial_left(path)


def test_a_good_new_bootloader_proves_itself_at_its_first_boot(template, tmp_path):
    path = copy_of(template[0], tmp_path / "dev")
    image, data = new_bootloader(template[1], tmp_path)
    vdev.flash(path, [image])
    console = run(path, [HELLO])
    assert console.index("new bootloader on trial (boot 1 of 3)") < console.index(
        "keel: the new bootloader proved itself") < console.index(HELLO)
    assert read_text(path, "/keel/m/bl/.sha256") == digest(data)
    assert_no_trial_left(path)
    assert "new bootloader" not in run(path, [HELLO])


# Power cuts (docs/virtual-board.md, "Fault injection")

WORKERS = 2


def _boot(path, faults, until):
    (path / vdev.FAULTS_FILE).write_text(json.dumps(faults))
    ends = [u.encode() for u in until] + [b"Traceback", b"vdev: the VM died"]

    def done(console):
        with console.lock:
            text = bytes(console.text)
        at = text.find(b"vdev: power cut")
        if "cut_at_write" in faults and at < 0:
            return False
        return any(end in text[max(at, 0):] for end in ends)

    console = vdev.run(path, seconds=20, out=io.BytesIO(), stop_when=done)
    count, state = (path / vdev.FAULTS_OUT).read_text().split()
    return console.text.decode(errors="replace"), int(count), state


def _sweep(tmp_path, template, name, until, check, sample=None):
    """Count the flash operations of one boot from template (the boots after it are not
    counted: faults.json holds for one boot), then cut the power there, clean and torn
    (at every one, or at `sample` of them, chosen at random but the same every run), each
    from a fresh copy, and check() what the boots after the cut left. Returns the failures."""
    counting = copy_of(template, tmp_path / f"{name}-count")
    console, n, _ = _boot(counting, {"count_only": True}, until)
    assert any(u in console for u in until), console
    points = [(k, torn) for k in range(1, n + 1) for torn in (False, True)]
    if sample is not None and sample < len(points):
        points = sorted(random.Random(name).sample(points, sample) + [(1, False), (n, True)])
    failures = {}

    def one(point):
        k, torn = point
        path = copy_of(template, tmp_path / f"{name}-{k}-{torn}")
        console, counted, state = _boot(path, {"cut_at_write": k, "torn": torn}, until)
        try:
            assert counted == k and state != "----------", (counted, state)
            after = console[console.index("vdev: power cut"):]
            assert any(u in after for u in until), console[-2500:]
            assert "Traceback" not in after and "vdev: the VM died" not in after, after
            check(path, after)
        except (AssertionError, ValueError) as e:
            failures[point] = str(e)[:1500]
        shutil.rmtree(path, ignore_errors=True)

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(one, sorted(set(points))))
    print(f"\n{name}: {n} flash operations in the boot; {len(set(points))} cuts (clean and "
          f"torn); {len(failures)} failed")
    return n, failures


def _after_the_install(template, tmp_path, name, image):
    """The device once its bootloader installed the new one and reset (it is on trial)."""
    path = copy_of(template, tmp_path / name)
    vdev.flash(path, [image])
    console = run(path, ["keel: bootloader updated, resetting"])
    assert "keel: bootloader updated, resetting" in console
    vdev.write_files(path, {"/keel/reset_reason": b"update"})  # (were it stopped first)
    assert read_text(path, "/keel/bl_trial") == "0"
    return path


def test_power_cuts_while_a_good_bootloader_installs_itself(template, tmp_path):
    """Cut at the install's operations (extraction, trial file, renames, the reset; a
    third of them) and at every one of the new bootloader's first boot (stage 0's count,
    the proof, removing the previous copy): the device always ends on the new bootloader,
    proven, running the app."""
    image, data = new_bootloader(template[1], tmp_path)
    installing = copy_of(template[0], tmp_path / "installing")
    vdev.flash(installing, [image])
    on_trial = _after_the_install(template[0], tmp_path, "on-trial", image)

    def check(path, after):
        status = vdev.status(path)
        assert (status["mode"], status["app"]) == ("normal", "running"), status
        assert all(m["valid"] for m in status["modules"]), status["modules"]
        assert read_text(path, "/keel/m/bl/.sha256") == digest(data)
        assert_no_trial_left(path)

    n, failures = _sweep(tmp_path, installing, "install", [HELLO], check, sample=36)
    assert n > 100 and not failures, failures
    n, failures = _sweep(tmp_path, on_trial, "first-trial-boot", [HELLO], check)
    assert n > 10 and not failures, failures


def test_power_cuts_while_stage_0_goes_back_from_a_bad_bootloader(template, tmp_path):
    """A new bootloader that cannot be imported, on trial: cut at every operation of its
    boot (stage 0's count, /main.py noting the failure) and of the next (stage 0's
    records and renames, the previous bootloader's start). The device always ends on
    the previous bootloader, with the new one rejected, never without a bootloader."""
    old_digest = read_text(template[0], "/keel/m/bl/.sha256")
    image, data = new_bootloader(template[1], tmp_path, "import")
    failing = _after_the_install(template[0], tmp_path, "failing", image)
    going_back = copy_of(failing, tmp_path / "going-back")
    vdev.write_files(going_back, {"/keel/bl_trial": b"RuntimeError: broken at import"})

    def check(path, after):
        assert read_text(path, "/keel/m/bl/.sha256") == old_digest
        assert read_text(path, "/keel/bl_rejected") == digest(data)
        status = vdev.status(path)
        assert (status["mode"], status["safe_mode_reason"], status["stage"]) == (
            "safe", "dependency", "system"), status
        boot = next(m for m in status["modules"] if m["slot"] == "bootloader")
        assert boot["invalid_reason"] == "rejected"
        assert_no_trial_left(path)

    until = ["keel: SAFE MODE"]
    n, failures = _sweep(tmp_path, failing, "failing-trial-boot", until, check)
    assert n >= 2 and not failures, failures
    n, failures = _sweep(tmp_path, going_back, "going-back", until, check)
    assert n > 10 and not failures, failures
