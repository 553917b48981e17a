"""Faults the fleet service lives through, with `keel cloud serve` running its Mosquitto:
the broker killed and restarted by the service, PostgreSQL restarted under it, a device
reconnecting while the broker still holds its stale connection. What devices send is not
lost: every event reaches the registry and a `keel subscribe` that was listening, and
the registry ends with each device as it is. (A service instance killed mid-transfer:
test_scale_out.py; many devices connecting at once: tests/bench/test_fleet_smoke.py and
bench figure 6.)

The devices are simdevice.SimDevice, protocol peers that hold their events while offline
and send again what was not acknowledged, as the device does (docs/protocol.md)."""

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from keel_cloud.config import CloudDir

try:
    from simdevice import SimDevice, provision
    from test_cloud_e2e import Cloud
except ImportError:  # run from another directory
    from tests.cloud.simdevice import SimDevice, provision
    from tests.cloud.test_cloud_e2e import Cloud

WAIT = 30


def wait_for(predicate, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


class Subscriber:
    """A real `keel subscribe --json`, its events collected."""

    def __init__(self, cloud):
        self.proc = subprocess.Popen(["keel", "subscribe", "--json"], env=cloud.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.events = []
        threading.Thread(target=self._read, daemon=True).start()
        time.sleep(1.0)  # (its first request, "from now on", has been answered)

    def _read(self):
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def got(self):
        return {(e["device"], e["name"], e["data"]) for e in list(self.events)}

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def online(cloud, names):
    devices = cloud.devices()
    return all(devices[n]["online"] for n in names)


def publish(devices, tag, count=10):
    expected = set()
    for device in devices:
        for i in range(count):
            device.event(tag, str(i))
            expected.add((device.name, tag, str(i)))
    return expected


@pytest.fixture
def running(tmp_path):
    clouds, devices, subscribers = [], [], []
    yield clouds, devices, subscribers
    for subscriber in subscribers:
        subscriber.stop()
    for device in devices:
        device.stop()
    for cloud in clouds:
        cloud.stop()


def start(running, tmp_path, n=4, database=None):
    clouds, devices, subscribers = running
    cloud = Cloud(tmp_path / "cloud", broker="mosquitto")
    if database:
        directory = CloudDir(cloud.data)
        config = directory.init(cloud.mqtt, cloud.http)
        config.database = database
        directory.save_config(config)
    cloud.start()
    clouds.append(cloud)
    for i in range(n):
        devices.append(provision(cloud.data, f"dev{i}", tmp_path, backoff=0.2).start())
    wait_for(lambda: online(cloud, [d.name for d in devices]), "the devices online")
    subscriber = Subscriber(cloud)
    subscribers.append(subscriber)
    return cloud, devices, subscriber


def test_the_broker_killed_and_restarted_loses_no_event(running, tmp_path):
    cloud, devices, subscriber = start(running, tmp_path)
    before = publish(devices, "before")
    wait_for(lambda: subscriber.got() >= before, "the events before")
    pid = int((cloud.data / "mosquitto" / "mosquitto.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not all(d.connected for d in devices), "the devices to see the broker go")
    during = publish(devices, "during")  # held by the devices while the broker is down
    wait_for(lambda: int((cloud.data / "mosquitto" / "mosquitto.pid").read_text()) != pid,
             "the service to start Mosquitto again")
    wait_for(lambda: all(d.events_waiting() == 0 for d in devices), "the held events sent")
    after = publish(devices, "after")
    got = wait_for(lambda: (g := subscriber.got()) >= before | during | after and g, "every event")
    assert got == before | during | after
    wait_for(lambda: online(cloud, [d.name for d in devices]), "the devices online again")
    stored = {(e["device"], e["name"], e["data"]) for e in cloud_events(cloud)}
    assert stored == before | during | after


def cloud_events(cloud):
    out, after = [], 0
    while True:
        reply = api_events(cloud, after)
        out += reply["events"]
        if not reply["events"]:
            return out
        after = reply["last"]


def api_events(cloud, after):
    import urllib.request

    request = urllib.request.Request(f"http://{cloud.http}/api/events?after={after}")
    request.add_header("Authorization", f"Bearer {CloudDir(cloud.data).token()}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_postgresql_restarted_loses_no_event_or_describe(running, tmp_path, postgres_server):
    cloud, devices, subscriber = start(running, tmp_path, database=postgres_server.database("keel_faults"))
    first_boot = devices[0].describe()["reset_reason"]
    postgres_server.stop()  # fast: the service's connection is cut
    try:
        during = publish(devices, "during")
        devices[0].reset()  # it comes back and describes while the registry is down
        wait_for(lambda: devices[0].connections >= 2, "the device to come back")
        time.sleep(1.0)  # (the writes fail and wait)
    finally:
        postgres_server.start()
    got = wait_for(lambda: (g := subscriber.got()) >= during and g, "every event through keel subscribe")
    assert got == during
    stored = {(e["device"], e["name"], e["data"]) for e in cloud_events(cloud)}
    assert stored == during
    show = json.loads(cloud.keel("device", "show", devices[0].name, "--json").stdout)
    assert show["online"] and show["reset_reason"] == devices[0].describe()["reset_reason"] != first_boot


def test_a_device_reconnecting_over_its_stale_connection_ends_online(running, tmp_path):
    cloud, devices, subscriber = start(running, tmp_path, n=1)
    stale = devices[0]
    # Its system loop stops with the socket left open (a device that lost power behind a
    # NAT: the broker sees nothing until the keepalive runs out).
    stale._stop.set()
    stale._thread.join(5)
    fresh = SimDevice(stale.device_id, stale._tls, stale.host, stale.port, name=stale.name).start()
    running[1].append(fresh)
    wait_for(lambda: fresh.connected, "the device connected again")
    events = publish([fresh], "fresh")
    wait_for(lambda: subscriber.got() >= events, "its events")
    time.sleep(1.0)  # (the stale connection's will, if the broker sends it, has arrived)
    assert online(cloud, [fresh.name]), "the registry shows the device offline"
