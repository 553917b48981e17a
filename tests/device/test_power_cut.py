"""Power cuts at every flash operation of an install (docs/virtual-board.md, "Fault
injection"), as MCUboot's simulator does, and torn ones too (half a write, half an
erase): after each, the next boot must reach a valid module set and run an app (the
old or the new, never neither), with the app's stored data intact.

Each case starts from a fresh copy of the same device directory made before the
install, boots with `faults.json` cutting the power at operation K (the runner powers
the board on again at once), and checks the boot that follows."""

import hashlib
import io
import json
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from keel import build, vdev
from keel import module_format as mf

OLD, NEW = "OLD-APP-RUNNING", "NEW-APP-RUNNING"
PRECIOUS = {"serial": "K-0042", "calibration": [1.5, -0.25, 3.0], "boots": 7}

# The old app stores its data on the first run only, and prints what it finds before
# that, so a store lost to a cut cannot be hidden by storing it again.
OLD_APP = """\
import json
import keel

def setup():
    value = keel.store.get("precious")
    print("STORE " + json.dumps(value))
    if value is None:
        keel.store.set("precious", %r)
    print("%s")

def loop():
    pass
""" % (PRECIOUS, OLD)

NEW_APP = """\
import json
import keel

def setup():
    print("STORE " + json.dumps(keel.store.get("precious")))
    print("%s")

def loop():
    pass
""" % NEW

WORKERS = 2  # runs at once (each is a VM process, and the runner polling it)


def _blob(n):
    rnd = random.Random(n)
    text = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(n))
    return 'DATA = "%s"\n' % text


# On a WiFi board: the network left to the app (which never brings it up), so that no
# flash write of the connection manager's races the end of the count at the app's marker.
NETWORK_OFF = "import keel\nkeel.system_mode(keel.SEMI_AUTOMATIC)\n"


def _build_apps(base, platform):
    out = {}
    head = NETWORK_OFF if platform == "esp32" else ""
    for name, files, version in (
        ("old", {"main.py": head + OLD_APP}, "1.0.0"),
        # a few blocks, so the bootloader's copy spans block boundaries
        ("new", {"main.py": head + NEW_APP, "blob.py": _blob(9000)}, "2.0.0"),
    ):
        src = base / f"src-{name}-{platform}"
        src.mkdir()
        for filename, text in files.items():
            (src / filename).write_text(text)
        out[name] = build.build_app(src, platform, "1.1.0", base / f"{name}-{platform}.bin",
                                    app_version=version)
    return out


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    return _build_apps(tmp_path_factory.mktemp("power-cut-apps"), "virtual")


def _copy(template, dest):
    shutil.copytree(template, dest, ignore=shutil.ignore_patterns(
        "console.log", "io.log", "io.in", "vm.pid", "faults.*"))
    return dest


ENDS = [s.encode() for s in (OLD, NEW, "keel: SAFE MODE", "keel: no usable system",
                              "keel: app crashed", "vdev: the VM died", "Traceback")]


def _boot(path, faults=None, seconds=8.0, heap=None):
    """One run: with faults, the cut boot and the boot after it. Returns the console
    and what faults.out says (count, state)."""
    if faults is not None:
        (path / vdev.FAULTS_FILE).write_text(json.dumps(faults))

    def done(console):
        with console.lock:
            text = bytes(console.text)
        if faults is not None and "cut_at_write" in faults:
            at = text.find(b"vdev: power cut")
            if at >= 0:
                text = text[at:]
        # an app ran; or a failure that would otherwise take until the deadline to show
        return any(s in text for s in ENDS)

    console = vdev.run(path, seconds=seconds, out=io.BytesIO(), stop_when=done, heap=heap)
    counted = None
    out = path / vdev.FAULTS_OUT
    if out.exists():
        count, state = out.read_text().split()
        counted = (int(count), state)
    return console.text.decode(errors="replace"), counted


def _check_recovered(path, console, expect_store):
    """After the cut: a valid module set in normal mode, an app running, the data kept."""
    cut = console.find("vdev: power cut")
    assert cut >= 0, "the power was never cut:\n" + console
    after = console[cut:]
    ran = [m for m in (OLD, NEW) if m in after]
    assert ran, "no app ran after the cut:\n" + console
    status = vdev.status(path)
    assert status["mode"] == "normal", status
    assert status["app"] == "running", status
    assert status["reset_reason"] in ("power-on", "update", "rollback"), status
    bad = [m for m in status["modules"] if not m["valid"]]
    assert not bad, bad
    stored = [line for line in after.splitlines() if line.startswith("STORE ")]
    assert stored and json.loads(stored[-1][6:]) == expect_store, after
    assert json.loads(vdev.read_file(path, "/keel/data/store.json")) == {"precious": expect_store}
    with pytest.raises(FileNotFoundError):  # an update is finished or dropped, never left half
        vdev.read_file(path, "/keel/ota/pending.json")
    return ran[0]


def exhaustive():
    """Both cuts at every operation when KEEL_POWER_CUT_EVERY=1 (a soak run, about
    8 minutes: docs/virtual-board.md, "Fault injection"); make test takes one operation
    in three, which keeps it within its time."""
    return os.environ.get("KEEL_POWER_CUT_EVERY") == "1"


def every_point(k, n):
    """Both cuts at every operation."""
    return (False, True)


def one_in_three(k, n):
    """A deterministic sample, to stay within the time budget: every third operation
    (k = 1 mod 3), cut clean and torn in turn, and both at the last."""
    if k == n:
        return (False, True)
    if k % 3 != 1:
        return ()
    return (True,) if k // 3 % 2 else (False,)


def _sweep(tmp_path, template, scenario, expect_store, select, check=None, heap=None):
    # 1. count the flash operations of an uninterrupted boot up to the app's marker
    counting = _copy(template, tmp_path / f"{scenario}-count")
    console, counted = _boot(counting, {"count_only": True}, heap=heap)
    assert NEW in console or OLD in console, console
    n = counted[0]
    again = _copy(template, tmp_path / f"{scenario}-count2")
    assert _boot(again, {"count_only": True}, heap=heap)[1][0] == n, \
        "the operation count is not repeatable"
    assert n > 20, n

    # 2. cuts (clean and torn) at the operations select() picks, each from a fresh copy
    tried = [(k, torn) for k in range(1, n + 1) for torn in select(k, n)]
    started = time.monotonic()
    results = {}

    def one(point):
        k, torn = point
        path = _copy(template, tmp_path / f"{scenario}-{k}-{'torn' if torn else 'cut'}")
        console, counted = _boot(path, {"cut_at_write": k, "torn": torn}, heap=heap)
        try:
            assert counted is not None and counted[0] == k, (counted, console[-1500:])
            ran = _check_recovered(path, console, expect_store)
            if check is not None:
                check(path)
            results[point] = ("ok", ran, counted[1])
        except AssertionError as e:
            results[point] = ("FAIL", str(e)[:2000], counted)
        shutil.rmtree(path, ignore_errors=True)

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(one, tried))
    failures = {p: r for p, r in results.items() if r[0] != "ok"}
    kinds = {}
    for r in results.values():
        if r[0] == "ok":
            kinds[r[2]] = kinds.get(r[2], 0) + 1
    ran = {m: sum(1 for r in results.values() if r[0] == "ok" and r[1] == m) for m in (OLD, NEW)}
    print(f"\n{scenario}: {n} flash operations up to the app; {len(tried)} of {2 * n} "
          f"cases tried ({len({k for k, _ in tried})} cut points, clean and torn) in "
          f"{time.monotonic() - started:.0f} s; cuts by kind {kinds}; then ran {ran}; "
          f"{len(failures)} failed")
    for p, r in sorted(failures.items())[:5]:
        print(f"  cut at {p[0]} ({'torn' if p[1] else 'clean'}): {r[1][:600]}")
    return n, tried, failures


def test_power_cut_during_an_update_install(tmp_path, device, apps):
    """A verified update staged from the host: the bootloader's journaled copy into the
    user slot, then the extraction of the new app's code, cut at the sampled operations
    (every one with KEEL_POWER_CUT_EVERY=1, one in three in make test)."""
    dev = device("1.1.0")
    dev.flash(apps["old"])
    console = dev.run(until=OLD)
    assert "STORE null" in console  # the old app stored its data on this first run
    dev.stage_update("user", apps["new"].read_bytes())

    n, tried, failures = _sweep(tmp_path, dev.path, "update", PRECIOUS,
                                every_point if exhaustive() else one_in_three)
    assert len(tried) >= (2 * n if exhaustive() else n // 3)
    assert not failures, failures


def one_in_four(k, n):
    """A sparser sample, for a twin (each of its boots costs more): the clean cut at
    k = 1 (mod 4), the torn one at k = 3 (mod 4), both at the last."""
    if k == n:
        return (False, True)
    return {1: (False,), 3: (True,)}.get(k % 4, ())


@pytest.mark.parametrize("board_name", ["esp32_generic", "esp32_stock"], indirect=True)
def test_power_cut_during_an_update_install_on_the_esp32_twin(tmp_path, device, platform):
    """The same install on the ESP32 twin, through esp32.Partition over the ESP-IDF
    partition table, cut on the twin's NOR flash (a write over unerased bytes ANDs):
    a sample of its operations, clean and torn, at the board's own heap; with ROMFS
    (the code in place) and with stock firmware (the code extracted)."""
    apps = _build_apps(tmp_path, platform)
    dev = device("1.1.0")
    dev.flash(apps["old"])
    console = dev.run(until=OLD)
    assert "STORE null" in console
    dev.stage_update("user", apps["new"].read_bytes())

    n, tried, failures = _sweep(tmp_path, dev.path, "update", PRECIOUS, one_in_four)
    assert len(tried) >= n // 2
    assert not failures, failures


def test_power_cut_during_a_first_boot(tmp_path, device, apps):
    """A device just flashed at the factory: the first boot extracts system parts 1 and
    2 and the app, cut at each operation sampled (every one with KEEL_POWER_CUT_EVERY=1;
    one in three in make test: one_in_three). The app's data was written by the host."""
    dev = device("1.1.0")
    dev.flash(apps["old"])
    vdev.write_files(dev.path, {"/keel/data/store.json": json.dumps({"precious": PRECIOUS}).encode()})

    n, tried, failures = _sweep(tmp_path, dev.path, "first-boot", PRECIOUS,
                                every_point if exhaustive() else one_in_three)
    assert not failures, failures


def _next_part2(systems):
    """System part 2 1.1.1: the 1.1.0 payload under a new version (two flash blocks, so
    the sweep stays exhaustive), still satisfied by part 1 1.1.0."""
    image = next(systems["1.1.0"].glob("*-system-part2-*.bin")).read_bytes()
    info = mf.parse_header(image)
    payload = image[info.header_size:info.header_size + info.payload_size]
    info.version = mf.encode_version("1.1.1")
    return mf.build_image(info, payload, hashlib.sha256)


def _stage_system_part(dev, image, trial_s=None):
    dev.stage_update("system2", image, trial_s=trial_s)


def _part2_version(path):
    return {(m["function"], m["index"]): m["version"]
            for m in vdev.status(path)["modules"]}[("system-part", 2)]


def test_power_cut_during_a_system_part_swap(tmp_path, device, apps, systems):
    """A system part replacing another is swapped with the staging partition (so that it
    can be rolled back): cut at the sampled operations (as above) of the swap, the
    extraction of its code and the end of its trial (this device has no cloud: booting
    proves it)."""
    dev = device("1.1.0")
    dev.flash(apps["old"])
    assert "STORE null" in dev.run(until=OLD)
    _stage_system_part(dev, _next_part2(systems))

    n, tried, failures = _sweep(tmp_path, dev.path, "system-swap", PRECIOUS,
                                every_point if exhaustive() else one_in_three)
    assert len(tried) >= (2 * n if exhaustive() else n // 3)
    assert not failures, failures


def test_power_cut_during_a_rollback(tmp_path, device, apps, systems):
    """A system part on trial that asked to go back: cut at every operation of the swap
    that restores the previous part. Every case ends on a valid module set, and once the
    rollback has begun, on the previous part."""
    dev = device("1.1.0")
    dev.flash(apps["old"])
    assert "STORE null" in dev.run(until=OLD)
    image = _next_part2(systems)
    _stage_system_part(dev, image, trial_s=600)
    from keel_cloud import pki  # (a required part: installed with the tools)

    ca = pki.CertificateAuthority.create()
    ident = ca.issue("0123456789abcdef01234567")
    vdev.write_files(dev.path, {  # a cloud it cannot reach: the trial stays open
        "/keel/cloud/key.der": ident.key_der, "/keel/cloud/cert.der": ident.cert_der,
        "/keel/cloud/ca.der": ca.cert_der,
        "/keel/cloud/cloud.json": json.dumps({"host": "127.0.0.1", "port": 9}).encode()})
    console = dev.run(until=OLD)
    assert "system2 1.1.1 on trial (boot 1 of 3)" in console
    assert _part2_version(dev.path) == "1.1.1"
    vdev.write_files(dev.path, {"/keel/ota/rollback": b"no-cloud"})

    def back_on_the_previous_part(path):
        assert _part2_version(path) == "1.1.0"
        assert json.loads(vdev.read_file(path, "/keel/ota/rolled_back.json"))["restored"] == "1.1.0"

    n, tried, failures = _sweep(tmp_path, dev.path, "rollback", PRECIOUS,
                                every_point if exhaustive() else one_in_three,
                                back_on_the_previous_part)
    assert len(tried) >= (2 * n if exhaustive() else n // 3)
    assert not failures, failures
