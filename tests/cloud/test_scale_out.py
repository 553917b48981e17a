"""Several fleet service instances (keel cloud serve --instance) on one Mosquitto and one
PostgreSQL registry: device traffic shared between them, an update sent by the instance
that holds the device's lease, and taken over when that instance is killed mid-transfer;
the events the broker gave the killed instance (taken and not committed, or queued for its
session after it died) are written by the instance that takes up its session.

The devices are simdevice.SimDevice, protocol peers in CPython (the device's own update
code is tested on the MicroPython VM in tests/device): 20 of them in safe mode, their app
needing system 1.1.0 on 1.0.0, each chunk stored slowly enough that transfers are under
way when the instance is killed."""

import collections
import json
import os
import re
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
    def __init__(self, cloud, name, *args, http=None):
        self.name = name
        for attempt in range(3):
            # (a port free_port() saw free can be taken meanwhile by a client's ephemeral
            # port: then another one)
            self.http = http or f"127.0.0.1:{free_port()}"
            self.proc = subprocess.Popen(
                ["keel", "cloud", "serve", "--instance", name, "--http", self.http, "-v", *args],
                env=cloud.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            self.lines = []
            while f"Keel Cloud instance {name}:" not in (line := self.proc.stdout.readline()):
                self.lines.append(line)  # (its log, with -v)
                if not line:
                    break
            if line:
                break
            self.proc.wait(10)
            assert "Address already in use" in "".join(self.lines) and attempt < 2 and not http, \
                "".join(self.lines)
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
        self.http = f"127.0.0.1:{free_port()}"  # the cloud's API (instance a's): keel subscribe's
        directory = CloudDir(path)
        config = directory.init(f"127.0.0.1:{self.mqtt_port}", self.http)
        config.database = database
        directory.save_config(config)
        self.database = database
        self.env = dict(os.environ, PATH=f"{BIN}{os.pathsep}/usr/sbin{os.pathsep}{os.environ['PATH']}",
                        KEEL_CLOUD=str(path))
        self.instances = {}

    def start(self, name, *args, http=None):
        self.instances[name] = Instance(self, name, *args, http=http)
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
    subscriber = None
    try:
        # a runs Mosquitto (and is never killed: the broker would go with it); b and c use it.
        cloud.start("a", "--broker", "mosquitto", http=cloud.http)
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
        # Events all along: before the kill, while the victim's session is orphaned, after.
        subscriber = subprocess.Popen(["keel", "subscribe", "--json"], env=cloud.env,
                                      stdout=subprocess.PIPE, text=True)
        heard = []
        threading.Thread(target=lambda: heard.extend(json.loads(line) for line in subscriber.stdout),
                         daemon=True).start()
        deadline = time.monotonic() + 30
        while not heard:  # the subscriber listens
            assert time.monotonic() < deadline, "keel subscribe heard nothing"
            devices[0].event("hello", "")
            time.sleep(0.2)
        sent = collections.Counter()
        sending = threading.Event()
        sending.set()

        def send_events():
            n = 0
            while sending.is_set():
                for device in devices:
                    device.event("tick", str(n))
                    sent[(device.device_id, str(n))] += 1
                n += 1
                time.sleep(0.2)

        sender = threading.Thread(target=send_events, daemon=True)
        sender.start()

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
        survivors = [cloud.instances[n] for n in ("a", "b", "c") if n != victim]
        deadline = time.monotonic() + 30
        while not any(f"instance {victim}: " in "".join(i.lines) for i in survivors):
            assert time.monotonic() < deadline, "nobody took up the dead instance's session"
            time.sleep(0.1)
        time.sleep(1)  # and some events after it
        sending.clear()
        sender.join()

        for device in devices:
            assert device.wait_mode("normal", timeout=120), (device.name, list(device.log)[-20:])
        for device in devices:
            assert device.installs == collections.Counter({(SP, 1, "1.1.0"): 1, (SP, 2, "1.1.0"): 1}), \
                (device.name, device.installs, list(device.log)[-30:])
            # one update at a time, in order: never part 1 offered once part 2 has been
            indexes = [o["index"] for o in device.offers]
            assert indexes == sorted(indexes), (device.name, indexes)
        # The survivors took the dead one's transfers over (its leases were swept), and
        # its session: what the broker kept for it is written.
        took_over = "".join("".join(i.lines) for i in survivors)
        assert f"instance {victim} stopped renewing its lease" in took_over
        adopted = re.search(rf"instance {victim}: (\d+) messages the broker kept for it", took_over)
        assert adopted and int(adopted[1]) > 0, took_over[-3000:]
        # Every event sent is in the registry once, and reached the subscriber once.
        for device in devices:
            assert device.wait_for(lambda d=device: not d._outbox and not d._in_flight, 30), device.name
        deadline = time.monotonic() + 30
        while (count := cloud.rows("SELECT COUNT(*) FROM events WHERE name = 'tick'")[0][0]) < len(sent):
            assert time.monotonic() < deadline, f"{count} of {len(sent)} events in the registry"
            time.sleep(0.2)
        # Once each, or more for an event the device sent again (a reset with it unacknowledged:
        # MQTT's at least once, which the service cannot tell from two events).
        resent = collections.Counter({(d.device_id, data): n for d in devices
                                      for (name, data), n in d.events_resent.items() if name == "tick"})
        stored = collections.Counter(cloud.rows("SELECT device_id, data FROM events WHERE name = 'tick'"))
        assert set(stored) == set(sent)
        assert not [k for k in stored if stored[k] > sent[k] + resent[k]], (stored - sent, resent)
        deadline = time.monotonic() + 30
        while sum(e["name"] == "tick" for e in heard) < sum(stored.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        ticks = collections.Counter((e["id"], e["data"]) for e in heard if e["name"] == "tick")
        assert ticks == stored
        # Each lease released once the device showed the module installed (well before it
        # would expire and be swept).
        deadline = time.monotonic() + 4
        while (held := cloud.rows("SELECT device_id, owner, work FROM leases")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not held
        status = json.loads(cloud.keel("cloud", "status", "--json").stdout)
        # (the dead one is forgotten once its session is taken up)
        assert sorted(i["name"] for i in status["instances"] if i["alive"]) == sorted(i.name for i in survivors)
        assert status["devices"]["connected"] == DEVICES
    finally:
        if subscriber is not None:
            subscriber.kill()
        for device in devices:
            device.stop()
        cloud.stop()


def test_an_instance_stopped_or_killed_and_restarted_loses_no_event(tmp_path, database):
    """Stopped cleanly, an instance leaves the shared group first (the broker gathers
    nothing for it); killed and started again before anyone takes up its session, it
    writes what the broker kept for it itself."""
    cloud = ScaledCloud(tmp_path / "cloud", database)
    devices = []
    try:
        cloud.start("a", "--broker", "mosquitto")
        broker = f"mqtts://127.0.0.1:{cloud.mqtt_port}"
        cloud.start("b", "--broker", broker)
        devices = [provision(cloud.path, f"sim{i}", tmp_path).start() for i in range(4)]
        sent = collections.Counter()

        def send(label, rounds=10):
            for n in range(rounds):
                for device in devices:
                    device.event("tick", f"{label}{n}")
                    sent[(device.device_id, f"{label}{n}")] += 1
                time.sleep(0.05)
            for device in devices:
                assert device.wait_for(lambda d=device: not d._outbox and not d._in_flight, 30)

        def stored():
            deadline = time.monotonic() + 20
            while True:
                rows = collections.Counter(cloud.rows(
                    "SELECT device_id, data FROM events WHERE name = 'tick'"))
                if set(rows) >= set(sent) or time.monotonic() > deadline:
                    return rows
                time.sleep(0.1)

        deadline = time.monotonic() + 30
        while cloud.rows("SELECT COUNT(*) FROM devices WHERE online = 1")[0][0] < len(devices):
            assert time.monotonic() < deadline, "the devices are not online"
            time.sleep(0.05)
        send("x")  # shared between a and b
        cloud.instances["b"].stop()  # SIGTERM: a clean stop
        send("y")  # all a's: none waits for b
        rows = stored()
        assert set(rows) == set(sent), sorted(set(sent) - set(rows))[:5]
        assert cloud.rows("SELECT name FROM instances") == [("a",)]  # b forgot itself

        b = cloud.start("b", "--broker", broker)
        send("z")
        b.proc.kill()
        b.proc.wait(10)
        send("k")  # b's share waits in its session...
        time.sleep(0.5)
        cloud.start("b", "--broker", broker)  # ...which b, back within the lease time, writes
        rows = stored()
        assert set(rows) == set(sent), sorted(set(sent) - set(rows))[:5]
        resent = collections.Counter({(d.device_id, data): n for d in devices
                                      for (name, data), n in d.events_resent.items() if name == "tick"})
        assert not [k for k in rows if rows[k] > sent[k] + resent[k]]
    finally:
        for device in devices:
            device.stop()
        cloud.stop()
