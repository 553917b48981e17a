"""SimDevice (simdevice.py) against `keel cloud serve`: two simulated devices in safe mode,
their app needing system 1.1.0 on system 1.0.0, are healed by the fleet service (the
healer and the OTA sender), one part per update, each part installed once."""

import collections
import json

from keel_cloud.protocol import check_describe

try:
    from simdevice import provision
    from test_cloud_e2e import Cloud, wait_until
except ImportError:  # run from another directory
    from tests.cloud.simdevice import provision
    from tests.cloud.test_cloud_e2e import Cloud, wait_until

SP = "system-part"
NEEDS = [{"function": SP, "index": 1, "version": "1.1.0"}, {"function": SP, "index": 2, "version": "1.1.0"}]


def test_sim_devices_are_healed(tmp_path, systems):
    cloud = Cloud(tmp_path / "cloud")
    cloud.start()
    devices = []
    try:
        for version in ("1.0.0", "1.1.0"):
            assert "released" in cloud.keel("release", "system", systems[version]).stdout
        for name in ("sim1", "sim2"):
            device = provision(cloud.data, name, tmp_path, app=NEEDS)
            describe = check_describe(device.describe())
            assert device.mode == describe["mode"] == "safe" and describe["missing"] == NEEDS
            devices.append(device.start())
        for device in devices:
            assert device.wait_mode("normal", timeout=30), list(device.log)
        for device in devices:
            show = wait_until(lambda: (d := json.loads(cloud.keel("device", "show", device.name, "--json").stdout))
                              ["heal"]["state"] == "healed" and d, what=f"{device.name} healed")
            assert show["mode"] == "normal" and show["online"]
            versions = {(m["function"], m["index"]): m["version"] for m in show["modules"]}
            assert versions[(SP, 1)] == versions[(SP, 2)] == "1.1.0"
            assert device.installs == collections.Counter({(SP, 1, "1.1.0"): 1, (SP, 2, "1.1.0"): 1})
            assert [o["index"] for o in device.offers] == [1, 2]
            check_describe(device.describe())
    finally:
        for device in devices:
            device.stop()
        cloud.stop()
