"""Fleets and fleet releases: `keel fleet create/add/remove/list/show`, `keel release app
FILE --fleet NAME [--allow-prerelease]` and its refusals, the rollout by the fleet service
to a fake device (offer, rollbacks in `keel device show` and `keel fleet show`), and end to
end with `keel cloud serve` and two virtual devices on the real VM, one of them healed to a
newer system after the fleet's app lands."""

import hashlib
import json
import shutil
import socket
import sqlite3
import time

import pytest

from keel import build, vio
from keel.cli import main
from keel_cloud.config import CloudDir
from keel_cloud.ota_sender import OtaSender
from keel_cloud.registry import Registry
from keel_cloud.serve import Cloud as InProcessCloud

try:
    from test_cloud_e2e import Cloud, RunningDevice, make_device, wait_until
    from test_ota_sender import FakeDevice
except ImportError:  # run from another directory
    from tests.cloud.test_cloud_e2e import Cloud, RunningDevice, make_device, wait_until
    from tests.cloud.test_ota_sender import FakeDevice

SP = "system-part"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keel(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args) -> str:
    code, out, err = keel(capsys, *args)
    assert code == 1 and err.startswith("keel: error: ") and err.count("\n") == 1, (code, out, err)
    return err


@pytest.fixture(scope="module")
def systems(tmp_path_factory):
    out = {}
    for version in ("1.0.0", "1.1.0", "1.2.0-rc.1"):
        out[version] = tmp_path_factory.mktemp(f"system{version}")
        build.build_system("virtual", version, out[version])
    return out


def app(tmp_path, name, target, platform="virtual", version="2.0.0", marker=None):
    src = tmp_path / f"{name}-src"
    src.mkdir(exist_ok=True)
    (src / "main.py").write_text(f"def setup():\n    print('{marker or name} is running')\n")
    return build.build_app(src, platform, target, tmp_path / f"{name}.bin", app_version=version)


@pytest.fixture
def cloud_dir(tmp_path):
    """A cloud directory whose cloud is not running (its HTTP port is free)."""
    cloud = CloudDir(tmp_path / "cloud")
    cloud.init(mqtt=f"127.0.0.1:{free_port()}", http=f"127.0.0.1:{free_port()}")
    return cloud


def register(cloud_dir, name, platform="virtual") -> str:
    device_id = hashlib.sha256(name.encode()).hexdigest()[:24]
    registry = Registry(cloud_dir.registry_path)
    try:
        registry.add_device(device_id, name, platform)
    finally:
        registry.close()
    return device_id


def app_rows(cloud_dir):
    with sqlite3.connect(cloud_dir.registry_path) as db:
        try:
            return db.execute("SELECT fleet, number, version, allow_prerelease FROM app_releases "
                              "ORDER BY fleet, number").fetchall()
        except sqlite3.OperationalError:  # no table yet
            return []


def stored_apps(cloud_dir):
    root = cloud_dir.path / "releases" / "apps"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# Fleets in the registry, through the CLI (no cloud running)

def test_fleet_commands_and_their_errors(cloud_dir, capsys):
    c = ("--cloud", cloud_dir.path)
    for name in ("v1", "v2"):
        register(cloud_dir, name)
    register(cloud_dir, "e1", "esp32")

    code, out, err = keel(capsys, "fleet", "create", "sensors", "--platform", "virtual", *c)
    assert code == 0 and "created fleet sensors (virtual)" in out, err
    assert keel(capsys, "fleet", "create", "boards", "--platform", "esp32", *c)[0] == 0
    assert "fleet 'sensors' exists already (platform virtual)" in refused(
        capsys, "fleet", "create", "sensors", "--platform", "esp32", *c)
    assert "unknown platform 'avr'" in refused(capsys, "fleet", "create", "x", "--platform", "avr", *c)
    assert "invalid fleet name" in refused(capsys, "fleet", "create", "a/b", "--platform", "virtual", *c)

    code, out, err = keel(capsys, "fleet", "add", "sensors", "v1", "v2", *c)
    assert code == 0 and "added v1, v2 to fleet sensors" in out, err
    assert "Keel Cloud is not running here" in out  # told, and nothing else to do
    code, out, _ = keel(capsys, "fleet", "add", "sensors", "v1", *c)
    assert code == 0 and "already in fleet sensors: v1" in out
    assert "device 'e1' is esp32, fleet 'sensors' is virtual" in refused(
        capsys, "fleet", "add", "sensors", "e1", *c)
    assert "device 'v1' is in fleet 'sensors': keel fleet remove sensors v1 first" in refused(
        capsys, "fleet", "add", "boards", "v1", *c)
    assert "no device 'ghost'" in refused(capsys, "fleet", "add", "boards", "e1", "ghost", *c)
    assert "no fleet 'nope'" in refused(capsys, "fleet", "add", "nope", "v1", *c)
    assert "device 'e1' is not in fleet 'sensors' (in no fleet)" in refused(
        capsys, "fleet", "remove", "sensors", "v2", "e1", *c)

    code, out, _ = keel(capsys, "fleet", "remove", "sensors", "v2", *c)
    assert code == 0 and "removed v2 from fleet sensors" in out
    registry = Registry(cloud_dir.registry_path)
    try:
        assert {d["name"]: d["fleet"] for d in registry.devices()} == {"e1": None, "v1": "sensors", "v2": None}
    finally:
        registry.close()

    # Views of live state need the cloud.
    assert "is 'keel cloud serve' running?" in refused(capsys, "fleet", "list", *c)


def test_provision_into_a_fleet(cloud_dir, systems, tmp_path, capsys):
    from keel import vdev

    c = ("--cloud", cloud_dir.path)
    assert keel(capsys, "fleet", "create", "sensors", "--platform", "virtual", *c)[0] == 0
    assert keel(capsys, "fleet", "create", "boards", "--platform", "esp32", *c)[0] == 0
    vdev.create(tmp_path / "d1", systems["1.1.0"])
    err = refused(capsys, "device", "provision", tmp_path / "d1", "--name", "d1", "--fleet", "boards", *c)
    assert "the device is virtual, fleet 'boards' is esp32" in err
    assert "no fleet 'nope'" in refused(capsys, "device", "provision", tmp_path / "d1", "--fleet", "nope", *c)
    registry = Registry(cloud_dir.registry_path)
    try:
        assert registry.devices() == []  # refused before anything was provisioned
    finally:
        registry.close()
    code, out, err = keel(capsys, "device", "provision", tmp_path / "d1", "--name", "d1", "--fleet", "sensors", *c)
    assert code == 0 and "d1 is in fleet sensors" in out, err
    registry = Registry(cloud_dir.registry_path)
    try:
        assert registry.device("d1")["fleet"] == "sensors"
    finally:
        registry.close()


# keel release app

def test_release_app_refusals_store_nothing(cloud_dir, systems, tmp_path, capsys):
    c = ("--cloud", cloud_dir.path)
    assert keel(capsys, "release", "system", systems["1.1.0"], *c)[0] == 0
    assert keel(capsys, "release", "system", systems["1.2.0-rc.1"], *c)[0] == 0
    assert keel(capsys, "fleet", "create", "sensors", "--platform", "virtual", *c)[0] == 0

    good = app(tmp_path, "good", "1.1.0")
    corrupt = tmp_path / "corrupt.bin"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    esp32 = app(tmp_path, "esp32", "1.1.0", platform="esp32")
    needs_rc = app(tmp_path, "rc", "1.2.0-rc.1")
    needs_newer = app(tmp_path, "newer", "1.3.0")
    part = next(systems["1.1.0"].glob("*-system-part1-*.bin"))

    assert "CRC32 mismatch: the image is corrupt" in refused(
        capsys, "release", "app", corrupt, "--fleet", "sensors", *c)
    assert "the app is built for esp32, fleet 'sensors' is virtual" in refused(
        capsys, "release", "app", esp32, "--fleet", "sensors", *c)
    assert "is system-part 1 1.1.0, not an app" in refused(
        capsys, "release", "app", part, "--fleet", "sensors", *c)
    err = refused(capsys, "release", "app", needs_rc, "--fleet", "sensors", *c)
    assert (f"{needs_rc} not released to fleet sensors: system-part 1 >= 1.2.0-rc.1 needs the "
            "prerelease 1.2.0-rc.1, which the fleet's release does not allow (--allow-prerelease)") in err
    err = refused(capsys, "release", "app", needs_newer, "--fleet", "sensors", *c)
    assert "no release of system-part 1 >= 1.3.0 for virtual (register one with keel release system" in err
    assert "no fleet 'nope'" in refused(capsys, "release", "app", good, "--fleet", "nope", *c)
    assert app_rows(cloud_dir) == [] and stored_apps(cloud_dir) == []


def test_release_app_history(cloud_dir, systems, tmp_path, capsys):
    c = ("--cloud", cloud_dir.path)
    assert keel(capsys, "release", "system", systems["1.1.0"], *c)[0] == 0
    assert keel(capsys, "release", "system", systems["1.2.0-rc.1"], *c)[0] == 0
    assert keel(capsys, "fleet", "create", "sensors", "--platform", "virtual", *c)[0] == 0
    first = app(tmp_path, "first", "1.1.0", version="2.0.0")
    code, out, err = keel(capsys, "release", "app", first, "--fleet", "sensors", *c)
    assert code == 0, err
    assert ("released app 2.0.0 to fleet sensors as release 1 (needs system-part 1 >= 1.1.0, "
            "system-part 2 >= 1.1.0); 0 device(s) in the fleet") in out
    code, out, _ = keel(capsys, "release", "app", first, "--fleet", "sensors", *c)
    assert code == 0 and "is already release 1 of fleet sensors; nothing to do" in out
    rc = app(tmp_path, "rc", "1.2.0-rc.1", version="3.0.0-beta.1")
    code, out, err = keel(capsys, "release", "app", rc, "--fleet", "sensors", "--allow-prerelease", *c)
    assert code == 0 and "as release 2" in out and "prereleases allowed" in out, err
    # Back to the first app: a new release (the fleet's release is whatever was released last).
    code, out, _ = keel(capsys, "release", "app", first, "--fleet", "sensors", *c)
    assert code == 0 and "as release 3" in out
    assert app_rows(cloud_dir) == [("sensors", 1, "2.0.0", 0), ("sensors", 2, "3.0.0-beta.1", 1),
                                   ("sensors", 3, "2.0.0", 0)]
    assert stored_apps(cloud_dir) == sorted(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}.bin" for p in (first, rc))


def test_offers_of_system_parts_carry_the_trial_limit():
    published = []
    sender = OtaSender(lambda topic, payload, qos: published.append((topic, payload)), silence=0.05, trial_s=42)
    for function in ("system-part", "user-part"):
        with pytest.raises(Exception):
            sender.send("d", b"x" * 10, {"function": function, "index": 1, "version": "1.0.0",
                                         "platform": "virtual"}, timeout=0.2)
    offers = [json.loads(p) for t, p in published if t.endswith("/offer")]
    assert {o["function"]: o.get("trial_s") for o in offers} == {"system-part": 42, "user-part": None}
    assert OtaSender(None).trial_s == 300


# The fleet service, with a fake device

@pytest.fixture
def running(tmp_path):
    cloud = InProcessCloud(CloudDir(tmp_path / "cloud"), mqtt=f"127.0.0.1:{free_port()}",
                           http=f"127.0.0.1:{free_port()}")
    cloud.start()
    yield cloud
    cloud.stop()


def test_rollout_to_a_fake_device_and_its_rollback_shown(running, systems, tmp_path, capsys):
    c = ("--cloud", running.dir.path)
    assert keel(capsys, "release", "system", systems["1.1.0"], *c)[0] == 0
    device = FakeDevice(running, "fake1")
    try:
        wait_until(lambda: running.registry.device("fake1")["online"], what="fake1 online")
        assert keel(capsys, "fleet", "create", "sensors", "--platform", "virtual", *c)[0] == 0
        code, out, _ = keel(capsys, "fleet", "list", "--json", *c)
        assert json.loads(out) == [{"name": "sensors", "platform": "virtual", "members": 0, "release": None,
                                    "signed_by": []}]
        assert keel(capsys, "fleet", "add", "sensors", "fake1", *c)[0] == 0
        image = app(tmp_path, "fleetapp", "1.1.0")
        code, out, err = keel(capsys, "release", "app", image, "--fleet", "sensors", *c)
        assert code == 0 and "not running" not in out, err
        sha = hashlib.sha256(image.read_bytes()).hexdigest()
        # The service sends it at once (the CLI told it), as the fake device's describe
        # shows no app.
        wait_until(lambda: device.done and device.image == image.read_bytes(), what="the app sent")
        assert device.offers[0]["function"] == "user-part" and device.offers[0]["sha256"] == sha
        assert "trial_s" not in device.offers[0]

        code, out, _ = keel(capsys, "fleet", "show", "sensors", "--json", *c)
        shown = json.loads(out)
        assert shown["release"]["number"] == 1 and shown["release"]["sha256"] == sha
        [member] = shown["devices"]
        assert member["name"] == "fake1" and member["state"] == "updating"

        # After its reset: it runs the app (it says so by its SHA-256), and a system part
        # it rolled back.
        describe = {"platform": "virtual", "mode": "normal", "modules": [
            {"function": "user-part", "index": 1, "version": "2.0.0", "sha256": sha, "valid": True},
            {"function": SP, "index": 1, "version": "1.1.0", "valid": True}],
            "rollback": {"function": SP, "index": 2, "version": "1.1.0", "restored": "1.0.0",
                         "reason": "no-cloud", "sha256": "ab" * 32}}
        device.client.publish(f"devices/{device.id}/describe", json.dumps(describe), qos=1)

        def up_to_date():
            fleet = json.loads(keel(capsys, "fleet", "show", "sensors", "--json", *c)[1])
            return fleet["devices"][0]["state"] == "up to date" and fleet
        fleet = wait_until(up_to_date, what="fake1 up to date")
        assert fleet["devices"][0]["app_version"] == "2.0.0"
        assert fleet["devices"][0]["rollbacks"][0]["version"] == "1.1.0"
        code, out, _ = keel(capsys, "fleet", "show", "sensors", *c)
        assert "fleet sensors (virtual), 1 device(s)" in out and "release 1: app 2.0.0" in out
        assert "up to date" in out and "rolled back system-part 2 1.1.0 -> 1.0.0 (no-cloud)" in out
        code, out, _ = keel(capsys, "device", "show", "fake1", *c)
        assert "fleet         sensors" in out
        assert "rolled back   system-part 2 1.1.0 -> 1.0.0 (no-cloud)" in out
        detail = json.loads(keel(capsys, "device", "show", "fake1", "--json", *c)[1])
        assert detail["fleet"] == "sensors" and detail["rollbacks"][0]["reason"] == "no-cloud"
        code, out, _ = keel(capsys, "fleet", "list", *c)
        assert out.startswith("sensors") and "1 device(s)  release 1: app 2.0.0" in out
        assert len(device.offers) == 1  # nothing more was sent

        # A device put in the fleet by another process, which does not tell the cloud:
        # the service's poll notices, and sends it the app.
        late = FakeDevice(running, "fake2")
        try:
            wait_until(lambda: running.registry.device("fake2")["online"], what="fake2 online")
            other = Registry(running.dir.registry_path)
            try:
                other.add_to_fleet("sensors", ["fake2"])
            finally:
                other.close()
            wait_until(lambda: late.done and late.image == image.read_bytes(), timeout=15,
                       what="the app sent to fake2")
        finally:
            late.close()
    finally:
        device.close()


# End to end: two virtual devices, one healed

def show(cloud, name):
    return json.loads(cloud.keel("device", "show", name, "--json").stdout)


def fleet_show(cloud, name):
    return json.loads(cloud.keel("fleet", "show", name, "--json").stdout)


def test_fleet_release_end_to_end(tmp_path, systems):
    """dev1 (system 1.1.0) is in the fleet when the app is released; dev2 (system 1.0.0)
    joins later, gets the app, goes into safe mode and is healed to 1.1.0."""
    cloud = Cloud(tmp_path / "cloud")
    cloud.start()
    for version in ("1.0.0", "1.1.0"):
        cloud.keel("release", "system", systems[version])
    cloud.keel("fleet", "create", "sensors", "--platform", "virtual")
    dev1_dir = make_device(tmp_path, systems["1.1.0"], cloud, "dev1", "hello")
    dev2_dir = make_device(tmp_path, systems["1.0.0"], cloud, "dev2", "hello")
    cloud.keel("fleet", "add", "sensors", "dev1")
    image = app(tmp_path, "fleetapp", "1.1.0", marker="the fleet app")
    dev1, dev2 = RunningDevice(dev1_dir), RunningDevice(dev2_dir)
    try:
        wait_until(lambda: all(show(cloud, n)["online"] and show(cloud, n)["mode"] == "normal"
                               for n in ("dev1", "dev2")), timeout=30, what="both online")
        out = cloud.keel("release", "app", image, "--fleet", "sensors").stdout
        assert "as release 1" in out and "not running" not in out

        def running_app(dev_dir):
            return "the fleet app is running" in (dev_dir / vio.CONSOLE_LOG).read_text()

        def member(name):
            return {d["name"]: d for d in fleet_show(cloud, "sensors")["devices"]}.get(name)

        wait_until(lambda: running_app(dev1_dir) and member("dev1")["state"] == "up to date",
                   timeout=60, what="dev1 runs the fleet's app")
        assert not running_app(dev2_dir)  # not in the fleet

        cloud.keel("fleet", "add", "sensors", "dev2")
        seen = []

        def healed():
            m = member("dev2")
            seen.append((m["state"], (m.get("sending") or {}).get("module")))
            return m["state"] == "up to date" and m
        m = wait_until(healed, timeout=120, what="dev2 healed and up to date")
        assert running_app(dev2_dir) and m["system_version"] == "1.1.0" and m["app_version"] == "2.0.0"
        sending = [s[1] for s in seen if s[1]]
        assert sending[0] == "app 2.0.0 (fleet sensors release 1)", seen
        assert "system-part 1 1.1.0" in sending and "system-part 2 1.1.0" in sending, seen
        versions = {(x["function"], x["index"]): x["version"] for x in show(cloud, "dev2")["modules"]}
        assert versions[(SP, 1)] == versions[(SP, 2)] == "1.1.0"
        text = cloud.keel("fleet", "show", "sensors").stdout
        assert text.count("up to date") == 2, text
    finally:
        dev1.stop()
        dev2.stop()
        cloud.stop()
