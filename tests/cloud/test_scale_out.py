"""Several fleet service instances (keel cloud serve --instance) on one Mosquitto and one
PostgreSQL registry: device traffic shared between them, an update sent by the instance
that holds the device's lease, and taken over when that instance is killed mid-transfer.

The devices are simdevice.SimDevice, protocol peers in CPython (the device's own update
code is tested on the MicroPython VM in tests/device): 20 of them in safe mode, their app
needing system 1.1.0 on 1.0.0, each chunk stored slowly enough that transfers are under
way when the instance is killed."""

import collections
import json
import os
import subprocess
import threading
import time

import psycopg
import pytest

from keel_cloud.config import CloudDir

from bench.fleet_scale import stop_process  # (tests/cloud/conftest.py puts the root on the path)

try:
    from conftest import free_port
    from simdevice import provision
    from test_cloud_e2e import BIN
except ImportError:  # run from another directory
    from tests.cloud.conftest import free_port
    from tests.cloud.simdevice import provision
    from tests.cloud.test_cloud_e2e import BIN

SP = "system-part"
NEEDS = [{"function": SP, "index": 1, "version": "1.1.0"}, {"function": SP, "index": 2, "version": "1.1.0"}]
DEVICES = 20


@pytest.fixture
def database(postgres_server):
    """A database of its own on the session's PostgreSQL server."""
    return postgres_server.database("keel_scale")


class Instance:
    def __init__(self, cloud, name, *args):
        self.name = name
        self.http = f"127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            ["keel", "cloud", "serve", "--instance", name, "--http", self.http, "-v", *args],
            env=cloud.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        while f"Keel Cloud instance {name}:" not in (line := self.proc.stdout.readline()):
            self.lines.append(line)  # (its log, with -v)
            assert line, "".join(self.lines)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self):
        stop_process(self.proc)


class ScaledCloud:
    def __init__(self, path, database):
        self.path = path
        self.mqtt_port = free_port()
        directory = CloudDir(path)
        config = directory.init(f"127.0.0.1:{self.mqtt_port}", f"127.0.0.1:{free_port()}")
        config.database = database
        directory.save_config(config)
        self.database = database
        self.env = dict(os.environ, PATH=f"{BIN}{os.pathsep}/usr/sbin{os.pathsep}{os.environ['PATH']}",
                        KEEL_CLOUD=str(path))
        self.instances = {}

    def start(self, name, *args):
        self.instances[name] = Instance(self, name, *args)
        return self.instances[name]

    def keel(self, *args):
        done = subprocess.run(["keel", *map(str, args)], env=self.env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return done

    def rows(self, sql, args=()):
        with psycopg.connect(self.database, autocommit=True) as conn:
            return conn.execute(sql, args).fetchall()

    def stop(self):
        for instance in reversed(list(self.instances.values())):
            instance.stop()


def test_three_instances_heal_20_devices_and_a_killed_owner_is_taken_over(tmp_path, systems, database):
    cloud = ScaledCloud(tmp_path / "cloud", database)
    devices = []
    try:
        # a runs Mosquitto (and is never killed: the broker would go with it); b and c use it.
        cloud.start("a", "--broker", "mosquitto")
        broker = f"mqtts://127.0.0.1:{cloud.mqtt_port}"
        cloud.start("b", "--broker", broker)
        cloud.start("c", "--broker", broker)
        for version in ("1.0.0", "1.1.0"):
            assert "released" in cloud.keel("release", "system", systems[version]).stdout
        status = json.loads(cloud.keel("cloud", "status", "--json").stdout)
        assert status["broker"] == "mosquitto"
        assert sorted(i["name"] for i in status["instances"] if i["alive"]) == ["a", "b", "c"]

        for i in range(DEVICES):
            devices.append(provision(cloud.path, f"sim{i}", tmp_path, app=NEEDS, chunk_delay=0.1))
        for device in devices:
            device.start()

        # Kill an instance (not a) while it owns a transfer, once every device's first
        # describe is in the registry: a message an instance has taken and not committed
        # dies with it (clean sessions; docs/cloud.md, "Several instances").
        deadline = time.monotonic() + 60
        while cloud.rows("SELECT COUNT(*) FROM devices WHERE describe IS NOT NULL")[0][0] < DEVICES:
            assert time.monotonic() < deadline, "the devices' describes did not reach the registry"
            time.sleep(0.05)
        victim = None
        while victim is None:
            assert time.monotonic() < deadline, "no transfer owned by b or c seen"
            owners = collections.Counter(o for (o,) in cloud.rows("SELECT owner FROM leases"))
            victim = next((o for o, _ in owners.most_common() if o in ("b", "c")), None)
            time.sleep(0.05)
        cloud.instances[victim].proc.kill()
        cloud.instances[victim].proc.wait(10)
        # what it held when it died (not yet swept: that takes 9 s)
        assert cloud.rows("SELECT device_id FROM leases WHERE owner = %s", (victim,))

        for device in devices:
            assert device.wait_mode("normal", timeout=120), (device.name, list(device.log)[-20:])
        for device in devices:
            assert device.installs == collections.Counter({(SP, 1, "1.1.0"): 1, (SP, 2, "1.1.0"): 1}), \
                (device.name, device.installs, list(device.log)[-30:])
            # one update at a time, in order: never part 1 offered once part 2 has been
            indexes = [o["index"] for o in device.offers]
            assert indexes == sorted(indexes), (device.name, indexes)
        # The survivors took the dead one's transfers over (its leases were swept).
        took_over = "".join(cloud.instances[n].lines and "".join(cloud.instances[n].lines)
                            for n in ("a", "b", "c") if n != victim)
        assert f"instance {victim} stopped renewing its lease" in took_over
        # Each lease released once the device showed the module installed (well before it
        # would expire and be swept).
        deadline = time.monotonic() + 4
        while (held := cloud.rows("SELECT device_id, owner, work FROM leases")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not held
        status = json.loads(cloud.keel("cloud", "status", "--json").stdout)
        alive = {i["name"]: i["alive"] for i in status["instances"]}
        assert alive == {"a": True, "b": victim != "b", "c": victim != "c"}
        assert status["devices"]["connected"] == DEVICES
    finally:
        for device in devices:
            device.stop()
        cloud.stop()
