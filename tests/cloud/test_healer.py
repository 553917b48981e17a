"""The safe mode healer: the selection (lowest satisfying release, prereleases, order,
no downgrade, blocked, a fleet's prerelease rule, rollbacks), its per-device state machine
against a fake OTA sender (heals, fleet rollouts, rollbacks), and end to end with
`keel cloud serve` and a virtual device healed from system 1.0.0 to 1.1.0."""

import hashlib
import io
import json
import threading
import time
from pathlib import Path

import pytest

from keel import build, vdev, vio
from keel import module_format as mf
from keel_cloud.healer import HealError, Healer, app_matches, image_dependencies, plan, rollback_of
from keel_cloud.ota_sender import OtaError

try:
    from test_cloud_e2e import Cloud, RunningDevice, make_device, wait_until
except ImportError:  # run from another directory
    from tests.cloud.test_cloud_e2e import Cloud, RunningDevice, make_device, wait_until

ROOT = Path(__file__).resolve().parents[2]
SP = "system-part"


# The selection

def release(version, *modules, platform="virtual"):
    return {"version": version, "platform": platform, "prerelease": "-" in version,
            "modules": [{"function": f, "index": i, "version": v} for f, i, v in modules]}


def system(version, bootloader="1.0.0"):
    return release(version, ("bootloader", 0, bootloader), (SP, 1, version), (SP, 2, version))


def deps_of(module):
    """System part 2 needs part 1 of its own version; part 1 needs bootloader 1.0.0."""
    if module["function"] == SP and module["index"] == 2:
        return [{"function": SP, "index": 1, "version": module["version"]}]
    if module["function"] == SP and module["index"] == 1:
        return [{"function": "bootloader", "index": 0, "version": "1.0.0"}]
    return []


def describe(installed="1.0.0", missing=(), bootloader="1.0.0"):
    modules = [{"function": "bootloader", "index": 0, "version": bootloader, "valid": True}]
    if installed:
        modules += [{"function": SP, "index": i, "version": installed, "valid": True} for i in (1, 2)]
    return {"platform": "virtual", "mode": "safe", "safe_mode_reason": "dependency",
            "modules": modules,
            "missing": [{"function": f, "index": i, "version": v} for f, i, v in missing]}


def user_part(version, size=100, target="1.1.0"):
    return {"function": "user-part", "index": 1, "version": version, "size": size, "valid": True,
            "dependencies": [{"function": SP, "index": i, "version": target} for i in (1, 2)]}


def app_release(number=1, version="2.0.0", target="1.1.0", allow_prerelease=False):
    """A fleet's app release as fleets.Fleets.target() gives it."""
    return {"fleet": "f", "number": number, "platform": "virtual", "index": 1, "version": version,
            "size": 100, "sha256": "cc" * 32, "digest": "dd" * 32,
            "dependencies": [{"function": SP, "index": i, "version": target} for i in (1, 2)],
            "allow_prerelease": allow_prerelease, "file": "releases/apps/x.bin",
            "released": "2026-01-01T00:00:00+00:00"}


CATALOG = [system("1.3.0-rc.1"), system("1.2.0"), system("1.1.0"), system("1.0.0"),
           system("1.1.1"), system("1.10.0")]


def labels(steps):
    return [(m["function"], m["index"], m["version"]) for m in steps]


def test_lowest_satisfying_release_dependencies_first():
    d = describe("1.0.0", [(SP, 1, "1.1.0"), (SP, 2, "1.1.0")])
    assert labels(plan(d, CATALOG, deps_of)) == [(SP, 1, "1.1.0"), (SP, 2, "1.1.0")]
    # Integers compare as integers: 1.10.0 > 1.2.0
    d = describe("1.0.0", [(SP, 2, "1.3.0")])
    assert labels(plan(d, CATALOG, deps_of)) == [(SP, 1, "1.10.0"), (SP, 2, "1.10.0")]


def test_a_candidates_own_dependencies_are_added_and_go_first():
    # Only part 2 is missing; its release needs part 1 1.2.0, which goes first.
    d = describe("1.0.0", [(SP, 2, "1.2.0")])
    assert labels(plan(d, CATALOG, deps_of)) == [(SP, 1, "1.2.0"), (SP, 2, "1.2.0")]
    # Listed in the "wrong" order by the dependencies: still part 1 first.
    def reversed_deps(module):
        if module["index"] == 1:
            return [{"function": SP, "index": 2, "version": "1.1.0"}]
        return []
    d = describe("1.0.0", [(SP, 1, "1.1.0")])
    assert labels(plan(d, CATALOG, reversed_deps)) == [(SP, 2, "1.1.0"), (SP, 1, "1.1.0")]


def test_prereleases_only_when_the_minimum_is_one():
    # 1.3.0-rc.1 satisfies >= 1.2.1 but is a prerelease: the release 1.10.0 is chosen.
    d = describe("1.0.0", [(SP, 1, "1.2.1"), (SP, 2, "1.2.1")])
    assert labels(plan(d, CATALOG, deps_of)) == [(SP, 1, "1.10.0"), (SP, 2, "1.10.0")]
    d = describe("1.0.0", [(SP, 1, "1.3.0-rc.1"), (SP, 2, "1.3.0-rc.1")])
    assert labels(plan(d, CATALOG, deps_of)) == [(SP, 1, "1.3.0-rc.1"), (SP, 2, "1.3.0-rc.1")]
    only_pre = [system("1.0.0"), system("2.0.0-rc.1")]
    with pytest.raises(HealError, match=r"no release of system-part 1 >= 1\.5\.0 for virtual"):
        plan(describe("1.0.0", [(SP, 1, "1.5.0")]), only_pre, deps_of)


def test_never_a_downgrade():
    # Part 1 is already 1.2.0: only part 2 is sent, and not part 1 1.1.0.
    d = describe("1.0.0", [(SP, 2, "1.1.0")])
    d["modules"][1]["version"] = "1.2.0"
    assert labels(plan(d, CATALOG, deps_of)) == [(SP, 2, "1.1.0")]
    # Everything installed is new enough: nothing to send.
    assert plan(describe("1.2.0", [(SP, 1, "1.1.0")]), CATALOG, deps_of) == []
    # An empty slot (version None: nothing asks for more) gets the lowest release.
    d = describe("1.1.0", [(SP, 2, None)])
    d["modules"] = d["modules"][:2]
    assert labels(plan(d, CATALOG, deps_of)) == [(SP, 2, "1.0.0")]


def test_blocked_when_nothing_satisfies():
    d = describe("1.0.0", [(SP, 1, "1.2.0"), (SP, 2, "1.2.0")])
    with pytest.raises(HealError) as e:
        plan(d, [system("1.0.0"), system("1.1.0")], deps_of)
    assert str(e.value) == "no release of system-part 1 >= 1.2.0 for virtual"
    # Another platform's releases do not count.
    with pytest.raises(HealError, match="for virtual"):
        plan(describe("1.0.0", [(SP, 1, "1.1.0")]), [system("1.1.0") | {"platform": "esp32"}], deps_of)


def test_a_fleet_without_allow_prerelease_never_gets_one():
    catalog = [system("1.0.0"), system("1.2.0-rc.1")]
    d = describe("1.0.0", [(SP, 1, "1.2.0-rc.1"), (SP, 2, "1.2.0-rc.1")])
    rc = [(SP, 1, "1.2.0-rc.1"), (SP, 2, "1.2.0-rc.1")]
    assert labels(plan(d, catalog, deps_of)) == rc  # no fleet: the minimum is a prerelease
    assert labels(plan(d, catalog, deps_of, prerelease=True)) == rc
    with pytest.raises(HealError) as e:
        plan(d, catalog, deps_of, prerelease=False)
    assert str(e.value) == ("system-part 1 >= 1.2.0-rc.1 needs the prerelease 1.2.0-rc.1, which the "
                            "fleet's release does not allow (--allow-prerelease)")
    # A release that satisfies is taken instead of the prerelease.
    assert labels(plan(d, catalog + [system("1.2.0")], deps_of, prerelease=False)) == [
        (SP, 1, "1.2.0"), (SP, 2, "1.2.0")]
    d = describe("1.0.0", [(SP, 1, "1.2.1"), (SP, 2, "1.2.1")])
    assert labels(plan(d, CATALOG, deps_of, prerelease=False)) == [(SP, 1, "1.10.0"), (SP, 2, "1.10.0")]


def test_allow_prerelease_takes_one_only_when_no_release_satisfies():
    catalog = [system("1.0.0"), system("1.2.0"), system("2.0.0-rc.1")]
    d = describe("1.0.0", [(SP, 1, "1.1.0"), (SP, 2, "1.1.0")])
    assert labels(plan(d, catalog, deps_of, prerelease=True)) == [(SP, 1, "1.2.0"), (SP, 2, "1.2.0")]
    d = describe("1.0.0", [(SP, 1, "1.5.0"), (SP, 2, "1.5.0")])
    with pytest.raises(HealError, match="no release of system-part 1 >= 1.5.0"):
        plan(d, catalog, deps_of)  # no fleet: today's rule
    assert labels(plan(d, catalog, deps_of, prerelease=True)) == [
        (SP, 1, "2.0.0-rc.1"), (SP, 2, "2.0.0-rc.1")]


def rolled(version="1.1.0", index=2, sha256=None, reason="no-cloud"):
    return {"function": SP, "index": index, "version": version, "sha256": sha256,
            "restored": "1.0.0", "reason": reason}


def test_a_rolled_back_module_is_never_chosen_again():
    d = describe("1.0.0", [(SP, 2, "1.1.0")])
    d["modules"][1]["version"] = "1.1.0"  # part 1 1.1.0 stayed; part 2 1.1.0 was rolled back
    assert labels(plan(d, [system("1.1.0")], deps_of)) == [(SP, 2, "1.1.0")]
    with pytest.raises(HealError) as e:
        plan(d, [system("1.0.0"), system("1.1.0")], deps_of, rolled_back=[rolled()])
    assert str(e.value) == ("system-part 2 1.1.0 was rolled back on this device (no-cloud) and "
                            "nothing else satisfies system-part 2 >= 1.1.0")
    # A higher release that satisfies is taken instead (with its own part 1).
    steps = plan(d, [system("1.1.0"), system("1.1.1"), system("1.2.0")], deps_of, rolled_back=[rolled()])
    assert labels(steps) == [(SP, 1, "1.1.1"), (SP, 2, "1.1.1")]
    # Identified by its SHA-256 when the device gave one: another image of that version is
    # not what failed (the catalog holds one image per version, so this is a hand-built one).
    catalog = [system("1.1.0")]
    catalog[0]["modules"][2]["sha256"] = "bb" * 32
    assert labels(plan(d, catalog, deps_of, rolled_back=[rolled(sha256="aa" * 32)])) == [(SP, 2, "1.1.0")]
    with pytest.raises(HealError, match="rolled back"):
        plan(d, catalog, deps_of, rolled_back=[rolled(sha256="bb" * 32)])


def test_rollback_of_reads_the_describe_field():
    d = {"rollback": {"function": SP, "index": 2, "version": "1.1.0", "restored": "1.0.0",
                      "reason": "no-cloud", "sha256": "AB" * 32}}
    assert rollback_of(d) == {"function": SP, "index": 2, "version": "1.1.0", "restored": "1.0.0",
                              "reason": "no-cloud", "sha256": "ab" * 32}
    assert rollback_of({}) is None
    assert rollback_of({"rollback": {"function": SP, "index": "2", "version": "1.1.0"}}) is None
    assert rollback_of({"rollback": "yes"}) is None


def test_app_matches_by_sha256_or_by_what_the_describe_says():
    release = app_release()
    assert app_matches(user_part("2.0.0"), release)
    assert not app_matches(user_part("2.0.0", size=101), release)
    assert not app_matches(user_part("2.0.0", target="1.0.0"), release)
    assert not app_matches(user_part("3.0.0"), release)
    assert not app_matches(user_part("2.0.0") | {"valid": False}, release)
    assert not app_matches(None, release)
    assert app_matches(user_part("9.9.9") | {"sha256": "dd" * 32}, release)  # the suffix's digest
    assert app_matches(user_part("9.9.9") | {"sha256": "cc" * 32}, release)  # the file's
    assert not app_matches(user_part("2.0.0") | {"sha256": "ee" * 32}, release)


def test_image_dependencies_read_the_module_header():
    info = mf.ModuleInfo(mf.FUNCTION_SYSTEM_PART, 2, mf.encode_version("1.2.0"), mf.platform_id("virtual"),
                         [(mf.FUNCTION_SYSTEM_PART, 1, mf.encode_version("1.2.0-rc.3")),
                          (mf.FUNCTION_BOOTLOADER, 0, mf.encode_version("1.0.0"))])
    image = mf.build_image(info, b"\0" * 64, hashlib.sha256)
    assert image_dependencies(image) == [{"function": SP, "index": 1, "version": "1.2.0-rc.3"},
                                         {"function": "bootloader", "index": 0, "version": "1.0.0"}]


# The state machine, against a fake sender and catalog

class FakeCatalog:
    def __init__(self, releases):
        self.list = releases

    def releases(self, platform=None):
        return [r for r in self.list if platform in (None, r["platform"])]

    def image(self, platform, function, index, version):
        deps = deps_of({"function": function, "index": index, "version": version})
        info = mf.ModuleInfo(mf.function_id(function), index, mf.encode_version(version),
                             mf.platform_id(platform),
                             [(mf.function_id(d["function"]), d["index"], mf.encode_version(d["version"]))
                              for d in deps])
        return mf.build_image(info, b"\0" * 100, hashlib.sha256)


class FakeOta:
    def __init__(self):
        self.sent = []
        self.fail = 0
        self.gate = threading.Event()
        self.gate.set()

    def busy(self, device_id):
        return False

    def send(self, device_id, image, module, progress_cb=None, timeout=None, keep_lease=False):
        self.gate.wait(10)
        self.sent.append((module["function"], module["index"], module["version"]))
        if self.fail:
            self.fail -= 1
            raise OtaError("the device stopped answering (4 offers unanswered)")
        progress_cb(len(image))
        return {"state": "pending"}


def settle(healer, device_id, state, timeout=5.0):
    return wait_until(lambda: (s := healer.status(device_id))["state"] == state and
                      not healer._devices[device_id].busy and s, timeout=timeout, what=state)


def test_healer_heals_part_by_part_and_resumes():
    ota = FakeOta()
    healer = Healer(ota, FakeCatalog([system("1.0.0"), system("1.1.0")]), recheck=0, install_grace=0.5)
    try:
        missing = [(SP, 1, "1.1.0"), (SP, 2, "1.1.0")]
        healer.on_describe("d", describe("1.0.0", missing))
        status = settle(healer, "d", "healing")
        assert status["sending"]["module"] == "system-part 1 1.1.0"
        assert status["plan"] == ["system-part 1 1.1.0", "system-part 2 1.1.0"]
        assert ota.sent == [(SP, 1, "1.1.0")]
        # The describe from before the reset is not a reason to send it again.
        healer.on_describe("d", describe("1.0.0", missing))
        time.sleep(0.2)
        assert ota.sent == [(SP, 1, "1.1.0")]
        # After the reset: part 1 is 1.1.0, part 2 still missing.
        after = describe("1.0.0", [(SP, 2, "1.1.0")])
        after["modules"][1]["version"] = "1.1.0"
        healer.on_describe("d", after)
        settle(healer, "d", "healing")
        assert ota.sent == [(SP, 1, "1.1.0"), (SP, 2, "1.1.0")]
        # A reset mid-heal (the same describe again, past the grace): part 2 is sent again.
        time.sleep(0.6)
        healer.on_describe("d", after)
        settle(healer, "d", "healing")
        assert ota.sent[-1] == (SP, 2, "1.1.0") and len(ota.sent) == 3
        healed = describe("1.1.0") | {"mode": "normal", "safe_mode_reason": None}
        healer.on_describe("d", healed)
        assert settle(healer, "d", "healed") == {"state": "healed", "updated": healer.status("d")["updated"]}
        # An app for 1.0.0 on the healed device: normal mode, nothing sent.
        healer.on_describe("d", healed)
        settle(healer, "d", "healed")
        assert len(ota.sent) == 3
    finally:
        healer.stop()


def test_one_transfer_per_device_at_a_time():
    ota = FakeOta()
    ota.gate.clear()
    healer = Healer(ota, FakeCatalog([system("1.0.0"), system("1.1.0")]), recheck=0)
    try:
        d = describe("1.0.0", [(SP, 1, "1.1.0"), (SP, 2, "1.1.0")])
        for _ in range(5):
            healer.on_describe("d", d)
        time.sleep(0.3)
        ota.gate.set()
        settle(healer, "d", "healing")
        assert ota.sent == [(SP, 1, "1.1.0")]
    finally:
        healer.stop()


def test_blocked_is_not_retried_until_the_catalog_changes():
    ota = FakeOta()
    catalog = FakeCatalog([system("1.0.0"), system("1.1.0")])
    healer = Healer(ota, catalog, recheck=0.2)
    try:
        d = describe("1.0.0", [(SP, 1, "1.2.0"), (SP, 2, "1.2.0")])
        healer.on_describe("d", d)
        status = settle(healer, "d", "blocked")
        assert status["reason"] == "no release of system-part 1 >= 1.2.0 for virtual"
        healer.on_describe("d", d)
        time.sleep(0.5)
        assert ota.sent == [] and healer.status("d")["state"] == "blocked"
        catalog.list.append(system("1.2.0"))  # released: the healer notices by itself
        settle(healer, "d", "healing")
        assert ota.sent == [(SP, 1, "1.2.0")]
    finally:
        healer.stop()


def test_failed_transfers_are_retried_at_most_three_times_in_a_row():
    ota = FakeOta()
    ota.fail = 10
    healer = Healer(ota, FakeCatalog([system("1.0.0"), system("1.1.0")]), recheck=0)
    try:
        d = describe("1.0.0", [(SP, 1, "1.1.0"), (SP, 2, "1.1.0")])
        for attempt in range(1, 6):
            healer.on_describe("d", d)
            status = settle(healer, "d", "failed")
            assert "stopped answering" in status["reason"]
        assert len(ota.sent) == 3 and status["failures"] == 3
        assert "3 attempts in a row" in status["reason"]
        # Something changed (another describe): a fresh run.
        ota.fail = 0
        d2 = describe("1.0.0", [(SP, 1, "1.1.0"), (SP, 2, "1.1.0")]) | {"reset_reason": "power-on"}
        d2["modules"].append({"function": "user-part", "index": 1, "version": "2.0.0", "valid": True})
        healer.on_describe("d", d2)
        settle(healer, "d", "healing")
        assert len(ota.sent) == 4
    finally:
        healer.stop()


class FakeFleets:
    """target(device) -> the fleet's release; rollbacks as the registry keeps them."""

    def __init__(self):
        self.targets = {}
        self.rolled = {}

    def target(self, device_id):
        return self.targets.get(device_id)

    def app_image(self, release):
        return b"\0" * release["size"]

    def rollbacks(self, device_id):
        return self.rolled.get(device_id, [])


def with_app(d, app):
    d = json.loads(json.dumps(d))
    d["modules"].append(app)
    return d


def normal(installed="1.1.0", app=None):
    d = describe(installed) | {"mode": "normal", "safe_mode_reason": None}
    return with_app(d, app) if app else d


def test_rollout_sends_the_fleets_app_then_heals_what_it_needs():
    ota, fleets = FakeOta(), FakeFleets()
    healer = Healer(ota, FakeCatalog([system("1.0.0"), system("1.1.0")]), fleets, recheck=0,
                    install_grace=0.5)
    try:
        # Not in a fleet yet: its app is left alone.
        old_app = user_part("1.0.0", target="1.0.0")
        healer.on_describe("d", normal("1.0.0", old_app))
        settle(healer, "d", "idle")
        assert ota.sent == []
        # Its fleet gets a release: the service pokes the device, which gets the app.
        fleets.targets["d"] = app_release()
        healer.poke("d")
        status = settle(healer, "d", "updating")
        assert status["sending"] == {"module": "app 2.0.0 (fleet f release 1)", "size": 100,
                                     "acknowledged": 100, "installing": True}
        assert ota.sent == [("user-part", 1, "2.0.0")]
        # The app landed and needs system 1.1.0: safe mode, healed part by part.
        landed = with_app(describe("1.0.0", [(SP, 1, "1.1.0"), (SP, 2, "1.1.0")]), user_part("2.0.0"))
        healer.on_describe("d", landed)
        settle(healer, "d", "healing")
        assert ota.sent[-1] == (SP, 1, "1.1.0")
        half = json.loads(json.dumps(landed))
        half["modules"][1]["version"] = "1.1.0"
        half["missing"] = [{"function": SP, "index": 2, "version": "1.1.0"}]
        healer.on_describe("d", half)
        settle(healer, "d", "healing")
        assert ota.sent[-1] == (SP, 2, "1.1.0")
        healer.on_describe("d", normal("1.1.0", user_part("2.0.0")))
        settle(healer, "d", "healed")
        assert len(ota.sent) == 3
        # A newer app flashed by hand: the fleet's release goes back on.
        time.sleep(0.6)
        healer.on_describe("d", normal("1.1.0", user_part("3.0.0")))
        settle(healer, "d", "updating")
        assert ota.sent[-1] == ("user-part", 1, "2.0.0") and len(ota.sent) == 4
        # A device that reports its app's SHA-256 is compared by it.
        time.sleep(0.6)
        healer.on_describe("d", normal("1.1.0", user_part("2.0.0") | {"sha256": "dd" * 32}))
        settle(healer, "d", "idle")
        assert len(ota.sent) == 4
        # Out of the fleet again: nothing is sent whatever it runs.
        del fleets.targets["d"]
        healer.on_describe("d", normal("1.1.0", user_part("3.0.0")))
        settle(healer, "d", "idle")
        assert len(ota.sent) == 4
    finally:
        healer.stop()


def test_nothing_is_sent_to_an_offline_device_until_it_describes():
    ota, fleets = FakeOta(), FakeFleets()
    healer = Healer(ota, FakeCatalog([system("1.1.0")]), fleets, recheck=0)
    try:
        healer.on_describe("d", normal("1.1.0", user_part("1.0.0")))
        settle(healer, "d", "idle")
        healer.on_offline("d")
        fleets.targets["d"] = app_release()
        healer.poke("d")
        time.sleep(0.3)
        assert ota.sent == [] and not healer._devices["d"].busy
        healer.on_describe("d", normal("1.1.0", user_part("1.0.0")))
        settle(healer, "d", "updating")
        assert ota.sent == [("user-part", 1, "2.0.0")]
        healer.poke("nobody")  # never described: nothing to decide from
        assert "nobody" not in healer._devices
    finally:
        healer.stop()


def test_with_several_instances_each_look_starts_from_the_registry():
    """state_of: another instance committed the device's describe, or its offline status:
    the healer goes by the registry, not only by what reached this instance; but a
    describe that has just come says the device is online (its online status may have
    gone to another instance and not be committed yet)."""
    ota, fleets = FakeOta(), FakeFleets()
    registry = {"d": (normal("1.1.0", user_part("1.0.0")), False)}
    healer = Healer(ota, FakeCatalog([system("1.1.0")]), fleets, recheck=0,
                    state_of=lambda device_id: registry.get(device_id, (None, False)))
    try:
        fleets.targets["d"] = fleets.targets["e"] = app_release()
        healer.poke("d")  # described to another instance only: read from the registry
        time.sleep(0.3)
        assert ota.sent == [] and not healer._devices["d"].busy  # offline, says the registry
        registry["d"] = (normal("1.1.0", user_part("1.0.0")), True)
        healer.poke("d")
        settle(healer, "d", "updating")
        assert ota.sent == [("user-part", 1, "2.0.0")]
        registry["e"] = (normal("1.1.0", user_part("1.0.0")), False)  # (its status not yet in)
        healer.on_describe("e", normal("1.1.0", user_part("1.0.0")))
        settle(healer, "e", "updating")
        assert ota.sent == [("user-part", 1, "2.0.0")] * 2
    finally:
        healer.stop()


def test_prerelease_gating_for_fleet_devices():
    ota, fleets = FakeOta(), FakeFleets()
    catalog = FakeCatalog([system("1.0.0"), system("1.2.0-rc.1")])
    healer = Healer(ota, catalog, fleets, recheck=0)
    try:
        app = user_part("2.0.0", target="1.2.0-rc.1")
        d = with_app(describe("1.0.0", [(SP, 1, "1.2.0-rc.1"), (SP, 2, "1.2.0-rc.1")]), app)
        fleets.targets["fleet-dev"] = app_release(target="1.2.0-rc.1")
        healer.on_describe("fleet-dev", d)
        status = settle(healer, "fleet-dev", "blocked")
        assert "1.2.0-rc.1" in status["reason"] and "--allow-prerelease" in status["reason"]
        # The same device in no fleet: today's rule sends the prerelease.
        healer.on_describe("lone-dev", d)
        settle(healer, "lone-dev", "healing")
        assert ota.sent == [(SP, 1, "1.2.0-rc.1")]
        # Released again with --allow-prerelease: the fleet's devices get it too.
        fleets.targets["fleet-dev"] = app_release(number=2, target="1.2.0-rc.1", allow_prerelease=True)
        healer.poke("fleet-dev")
        settle(healer, "fleet-dev", "healing")
        assert ota.sent == [(SP, 1, "1.2.0-rc.1")] * 2
    finally:
        healer.stop()


def rolled_back_describe(reason="no-cloud"):
    """Part 1 1.1.0 stayed, part 2 1.1.0 failed its trial: back on 1.0.0, in safe mode."""
    d = with_app(describe("1.0.0", [(SP, 2, "1.1.0")]), user_part("2.0.0"))
    d["modules"][1]["version"] = "1.1.0"
    d["rollback"] = {"function": SP, "index": 2, "version": "1.1.0", "restored": "1.0.0",
                     "reason": reason, "sha256": "ab" * 32}
    return d


def test_a_rollback_blocks_the_same_module_and_a_higher_release_unblocks():
    ota = FakeOta()
    catalog = FakeCatalog([system("1.0.0"), system("1.1.0")])
    healer = Healer(ota, catalog, FakeFleets(), recheck=0.2, install_grace=30)
    try:
        first = with_app(describe("1.0.0", [(SP, 1, "1.1.0"), (SP, 2, "1.1.0")]), user_part("2.0.0"))
        healer.on_describe("d", first)
        settle(healer, "d", "healing")
        half = rolled_back_describe()
        del half["rollback"]  # part 1 1.1.0 installed, part 2 still missing
        healer.on_describe("d", half)
        settle(healer, "d", "healing")
        assert ota.sent == [(SP, 1, "1.1.0"), (SP, 2, "1.1.0")]
        # Part 2 failed its trial: the describe says so at once, no grace to wait out.
        healer.on_describe("d", rolled_back_describe())
        status = settle(healer, "d", "blocked", timeout=3)
        assert status["reason"] == ("system-part 2 1.1.0 was rolled back on this device (no-cloud) "
                                    "and nothing else satisfies system-part 2 >= 1.1.0")
        assert "failures" not in status and len(ota.sent) == 2
        healer.on_describe("d", rolled_back_describe())  # again: still blocked, nothing sent
        time.sleep(0.3)
        assert healer.status("d")["state"] == "blocked" and len(ota.sent) == 2
        catalog.list.append(system("1.1.1"))  # a fix is released: the healer notices
        settle(healer, "d", "healing")
        assert ota.sent[2:] == [(SP, 1, "1.1.1")]
    finally:
        healer.stop()


def test_a_rollback_recorded_in_the_registry_counts_without_the_describe_field():
    ota, fleets = FakeOta(), FakeFleets()
    fleets.rolled["d"] = [rolled()]
    healer = Healer(ota, FakeCatalog([system("1.1.0")]), fleets, recheck=0)
    try:
        d = rolled_back_describe()
        del d["rollback"]
        healer.on_describe("d", d)
        assert "was rolled back on this device (no-cloud)" in settle(healer, "d", "blocked")["reason"]
        assert ota.sent == []
    finally:
        healer.stop()


# End to end

def app(tmp_path, name, marker, target):
    src = tmp_path / name
    src.mkdir()
    (src / "main.py").write_text(f"def setup():\n    print('{marker}')\n")
    return build.build_app(src, "virtual", target, tmp_path / f"{name}.bin", app_version="2.0.0")


def show(cloud, name):
    return json.loads(cloud.keel("device", "show", name, "--json").stdout)


def test_healer_end_to_end(tmp_path, systems):
    cloud = Cloud(tmp_path / "cloud")
    cloud.start()
    for version in ("1.0.0", "1.1.0"):
        assert "released" in cloud.keel("release", "system", systems[version]).stdout
    dev_dir = make_device(tmp_path, systems["1.0.0"], cloud, "dev1", "hello")
    new = app(tmp_path, "new", "app for 1.1.0 is running", "1.1.0")
    old = app(tmp_path, "old", "app for 1.0.0 is running", "1.0.0")
    console = dev_dir / vio.CONSOLE_LOG
    device = RunningDevice(dev_dir)
    try:
        wait_until(lambda: (d := show(cloud, "dev1"))["online"] and d["mode"] == "normal", what="dev1 online")
        assert show(cloud, "dev1")["heal"]["state"] == "idle"
        # The app needs a newer system: the device takes it, goes to safe mode, is healed.
        cloud.keel("flash", "dev1", new)
        seen = []

        def healed():
            d = show(cloud, "dev1")
            seen.append((d["mode"], d["system_version"], d["heal"]["state"],
                         (d["heal"].get("sending") or {}).get("module")))
            return d["heal"]["state"] == "healed" and d["mode"] == "normal" and d
        d = wait_until(healed, timeout=60, what="dev1 healed")
        assert "app for 1.1.0 is running" in console.read_text()
        assert d["system_version"] == "1.1.0"
        versions = {(m["function"], m["index"]): m["version"] for m in d["modules"]}
        assert versions[(SP, 1)] == versions[(SP, 2)] == "1.1.0"
        assert versions[("bootloader", 0)] == build.bootloader_version()  # (not sent: both systems have it)
        sending = [s[3] for s in seen if s[3]]
        assert "system-part 1 1.1.0" in sending and sending.index("system-part 1 1.1.0") == 0
        assert ("safe", "1.0.0", "healing", "system-part 1 1.1.0") in seen or any(
            s[0] == "safe" for s in seen)
        text = console.read_text()
        # A reset between the parts: part 1 installed, then part 2.
        assert text.count("verified; pending install") >= 2
        line = [ln for ln in cloud.keel("device", "show", "dev1").stdout.splitlines() if "heal" in ln]
        assert line == ["  heal          healed"]

        # An app for 1.0.0 runs on 1.1.0 and nothing is downgraded.
        cloud.keel("flash", "dev1", old)
        wait_until(lambda: "app for 1.0.0 is running" in console.read_text(), timeout=30, what="old app")
        wait_until(lambda: (d := show(cloud, "dev1"))["mode"] == "normal" and any(
            m["function"] == "user-part" and m["version"] == "2.0.0" for m in d["modules"]) and d,
            what="normal mode")
        time.sleep(1.0)
        d = show(cloud, "dev1")
        assert d["system_version"] == "1.1.0" and d["heal"]["state"] in ("healed", "idle")
        assert {(m["function"], m["index"]): m["version"] for m in d["modules"]}[(SP, 2)] == "1.1.0"

        # An app for 1.2.0: no such release, the healer says so.
        newer = app(tmp_path, "newer", "app for 1.2.0 is running", "1.2.0")
        cloud.keel("flash", "dev1", newer)
        d = wait_until(lambda: (d := show(cloud, "dev1"))["heal"]["state"] == "blocked" and d,
                       timeout=30, what="blocked")
        assert d["heal"]["reason"] == "no release of system-part 1 >= 1.2.0 for virtual"
        out = cloud.keel("device", "show", "dev1").stdout
        assert "heal          blocked: no release of system-part 1 >= 1.2.0 for virtual" in out
        assert "app for 1.2.0 is running" not in console.read_text()
    finally:
        device.stop()
        cloud.stop()


def test_the_healer_heals_an_esp32_twin_over_wifi(tmp_path):
    """The same heal on the ESP32 twin, online through its WiFi (keel device provision
    --wifi, an access point on the air): an app for 1.1.0 on system 1.0.0, safe mode,
    the two parts sent over the air one at a time, the app runs. At the board's own
    heap, the twin playing the firmware Keel documents, with ROMFS (Keel's code runs in
    place: with stock firmware the OTA receiver does not fit beside the session,
    docs/boards/esp32.md)."""
    esp32 = {}
    for version in ("1.0.0", "1.1.0"):
        esp32[version] = tmp_path / f"esp32-{version}"
        build.build_system("esp32", version, esp32[version])
    cloud = Cloud(tmp_path / "cloud")
    cloud.start()
    try:
        _heal_an_esp32_twin(tmp_path, cloud, esp32)
    finally:
        cloud.stop()


def _heal_an_esp32_twin(tmp_path, cloud, esp32):
    for version in ("1.0.0", "1.1.0"):
        assert "released" in cloud.keel("release", "system", esp32[version]).stdout
    path = tmp_path / "e1"
    vdev.create(path, esp32["1.0.0"], "esp32_generic")
    vdev.flash(path, [build.build_app(ROOT / "examples" / "hello", "esp32", None,
                                      tmp_path / "hello-esp32.bin")])
    out = cloud.keel("device", "provision", path, "--name", "e1", "--wifi", "home",
                     "--password", "home-pass-1")
    assert "joining home" in out.stdout, out.stdout + out.stderr
    cloud.keel("vdev", "wifi", path, "--ap", "home", "--password", "home-pass-1")
    src = tmp_path / "new"
    src.mkdir()
    (src / "main.py").write_text("def setup():\n    print('app for 1.1.0 is running')\n")
    new = build.build_app(src, "esp32", "1.1.0", tmp_path / "new.bin", app_version="2.0.0")
    stop = threading.Event()
    runner = threading.Thread(target=vdev.run, args=(path,), daemon=True, kwargs={
        "seconds": 240, "out": io.BytesIO(), "stop_when": lambda c: stop.is_set()})
    runner.start()
    console = path / vio.CONSOLE_LOG
    try:
        d = wait_until(lambda: (d := show(cloud, "e1"))["online"] and d["mode"] == "normal" and d,
                       timeout=60, what="e1 online")
        assert d["platform"] == "esp32" and d["network"]["ssid"] == "home"
        cloud.keel("flash", "e1", new)
        d = wait_until(lambda: (d := show(cloud, "e1"))["heal"]["state"] == "healed"
                       and d["mode"] == "normal" and d, timeout=180, what="e1 healed")
        assert "app for 1.1.0 is running" in console.read_text()
        versions = {(m["function"], m["index"]): m["version"] for m in d["modules"]}
        assert versions[(SP, 1)] == versions[(SP, 2)] == "1.1.0"
        assert console.read_text().count("keel: network: joined home") >= 3  # a boot per part
    finally:
        stop.set()
        runner.join(15)
