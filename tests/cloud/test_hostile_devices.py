"""The fleet service survives its devices (issue 11): a device with a real certificate
sends malformed and oversized messages on every topic it may use, on the embedded broker
and on Mosquitto. After each, the service still answers `get` and `call` for another,
well-behaved device, the registry stays readable, the drop counter of the hostile device
went up with a reason, and the cloud restarts cleanly. A device also cannot answer a
request that went to another device."""

import json
import logging
import os
import queue
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel_cloud import pki, protocol
from keel_cloud.client import ApiClient
from keel_cloud.config import CloudDir, CloudError
from keel_cloud.serve import Cloud

from conftest import free_port, new_device_id, running_mosquitto

WAIT = 10.0  # bound for anything that should happen
TEMPERATURE = 21.5


def wait_until(predicate, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class FakeDevice:
    """A device's MQTT session, as paho: its certificate, its last will, `online` and a
    describe on every connect; it answers get and call (or, with answer=False, leaves the
    requests in `requests` for the test)."""

    def __init__(self, cloud_dir: CloudDir, host: str, port: int, device_id: str,
                 answer: bool = True):
        self.id = device_id
        self.base = f"devices/{device_id}/"
        self.answer = answer
        self.requests: queue.Queue[dict] = queue.Queue()
        self.connected = threading.Event()
        identity = cloud_dir.ca().issue(device_id)
        folder = cloud_dir.path / "hostile-test"
        folder.mkdir(exist_ok=True)
        cert, key = folder / f"{device_id}.crt", folder / f"{device_id}.key"
        cert.write_bytes(identity.cert_pem)
        key.write_bytes(identity.key_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(cloud_dir.path / pki.CA_CERT))
        ctx.load_cert_chain(str(cert), str(key))
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id,
                        protocol=mqtt.MQTTv311, clean_session=True)
        c.tls_set_context(ctx)
        c.will_set(self.base + "status", b"offline", qos=1, retain=True)
        c.reconnect_delay_set(0.2, 1)
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *a: self.connected.clear()
        c.on_message = self._on_message
        self.client = c
        c.connect(host, port, keepalive=30)
        c.loop_start()
        assert self.connected.wait(WAIT), f"{device_id} did not connect"

    def _on_connect(self, client, userdata, flags, reason, properties):
        if reason.is_failure:
            return
        client.subscribe([(self.base + "get", 1), (self.base + "call", 1)])
        client.publish(self.base + "status", b"online", qos=1, retain=True)
        client.publish(self.base + "describe", json.dumps({
            "platform": "virtual", "mode": "normal", "app": "running", "modules": [],
            "functions": ["led"], "variables": ["temperature"]}), qos=1)
        self.connected.set()

    def _on_message(self, client, userdata, msg):
        try:
            request = json.loads(msg.payload)
            request["id"]
        except (ValueError, TypeError, KeyError):
            return  # what the hostile device sent itself (test_odd_sub_topics)
        if not self.answer:
            self.requests.put(request)
            return
        if msg.topic.endswith("/get"):
            result = TEMPERATURE if request["name"] == "temperature" else None
        else:
            result = len(request.get("arg", ""))
        self.reply({"id": request["id"], "ok": True, "result": result})

    def reply(self, reply: dict) -> None:
        self.client.publish(self.base + "reply", json.dumps(reply), qos=1)

    def publish(self, sub_topic: str, payload: bytes) -> None:
        """Publish under the device's own prefix, acknowledged by the broker."""
        info = self.client.publish(self.base + sub_topic, payload, qos=1)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"{sub_topic}: not acknowledged"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Setup:
    """A running cloud (in-process, as `keel cloud serve` runs it), a good device, a
    hostile one and the API client the keel CLI uses."""

    def __init__(self, kind: str, cloud_dir: CloudDir, broker: str | None, device_address):
        self.kind = kind
        self.dir = cloud_dir
        self.broker = broker
        self.device_address = device_address
        self.cloud: Cloud | None = None
        self.markers = 0

    def start(self) -> None:
        self.cloud = Cloud(self.dir, broker=self.broker)
        self.cloud.start()
        self.api = ApiClient(self.dir)

    def stop(self) -> None:
        if self.cloud is not None:
            self.cloud.stop()
            self.cloud = None

    @property
    def registry(self):
        return self.cloud.registry

    def device(self, name: str, answer: bool = True) -> FakeDevice:
        device_id = new_device_id()
        self.registry.add_device(device_id, name, "virtual")
        device = FakeDevice(self.dir, *self.device_address(), device_id, answer=answer)
        wait_until(lambda: (d := self.registry.device(name)) and d["online"] and d["describe"],
                   f"{name} online and described")
        return device

    def processed(self, device: FakeDevice) -> None:
        """Wait until the service has handled everything the device sent so far: it
        handles a device's messages in order, so a marker event shows it."""
        self.markers += 1
        token = f"marker-{self.markers}"
        device.publish("events/marker", token.encode())
        wait_until(lambda: any(e["data"] == token for e in
                               self.registry.events(0, device.id, limit=100_000)),
                   "the marker event in the registry")

    def still_serving(self) -> None:
        """The service answers for the good device, and the registry reads."""
        assert self.api.get("good", "temperature") == TEMPERATURE
        assert self.api.call("good", "led", "on") == 2
        listed = {d["name"]: d for d in self.api.devices()}  # what keel list shows
        assert listed["good"]["online"] and listed["hostile"]["online"] is not None
        assert len(self.registry.devices()) >= 2


@pytest.fixture(scope="module", params=["embedded", "mosquitto"])
def setup(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"hostile-{request.param}")
    cloud_dir = CloudDir(out / "cloud")
    cloud_dir.init(mqtt=f"127.0.0.1:{free_port()}", http=f"127.0.0.1:{free_port()}")
    devices = []
    if request.param == "embedded":
        address = cloud_dir.config().mqtt.rsplit(":", 1)
        made = Setup("embedded", cloud_dir, "embedded", lambda: (address[0], int(address[1])))
        context = None
    else:
        context = running_mosquitto(cloud_dir, out)
        _, port, _ = context.__enter__()
        made = Setup("mosquitto", cloud_dir, f"mqtts://127.0.0.1:{port}", lambda: ("127.0.0.1", port))
    try:
        made.start()
        made.good = made.device("good")
        made.hostile = made.device("hostile")
        devices += [made.good, made.hostile]
        yield made
    finally:
        for device in devices:
            device.close()
        made.stop()
        if context is not None:
            context.__exit__(None, None, None)


def deep(levels: int) -> str:
    return '{"vm": ' * levels + "{}" + "}" * levels


MODULE = {"function": "system-part", "index": 1, "version": "1.0.0"}

# (sub-topic, payload, a word the reason must contain)
HOSTILE = [
    ("status", b"", "status"),
    ("status", b"ONLINE", "status"),
    ("status", b"online\x00", "status"),
    ("status", b"x" * 65536, "status"),
    ("describe", b"[]", "list"),
    ("describe", b"null", "null"),
    ("describe", b'"online"', "string"),
    ("describe", b"42", "number"),
    ("describe", b"{", "not JSON"),
    ("describe", b"\xff\xfe{}", "UTF-8"),
    ("describe", b"NaN", "not JSON"),
    ("describe", b'{"heap_free": Infinity}', "not JSON"),
    ("describe", b'{"modules": "system-part 1"}', "modules"),
    ("describe", b'{"modules": [1, 2]}', "modules[0]"),
    ("describe", json.dumps({"modules": [MODULE] * (protocol.MAX_MODULES + 1)}).encode(), "modules"),
    ("describe", json.dumps({"modules": [dict(MODULE, index="1")]}).encode(), "index"),
    ("describe", json.dumps({"modules": [dict(MODULE, index=300)]}).encode(), "index"),
    ("describe", json.dumps({"modules": [dict(MODULE, index=True)]}).encode(), "index"),
    ("describe", json.dumps({"modules": [dict(MODULE, version=5)]}).encode(), "version"),
    ("describe", json.dumps({"modules": [dict(MODULE, dependencies={})]}).encode(), "dependencies"),
    ("describe", json.dumps({"modules": [dict(MODULE, sha256="xyz")]}).encode(), "sha256"),
    ("describe", json.dumps({"functions": ["f"] * 100}).encode(), "functions"),
    ("describe", json.dumps({"variables": [1]}).encode(), "variables"),
    ("describe", json.dumps({"functions": ["x" * 65]}).encode(), "functions"),
    ("describe", json.dumps({"missing": "everything"}).encode(), "missing"),
    ("describe", json.dumps({"rollback": []}).encode(), "rollback"),
    ("describe", json.dumps({"rollback": {"function": "system-part", "index": 2}}).encode(), "rollback"),
    ("describe", json.dumps({"vm": "micropython"}).encode(), "vm"),
    ("describe", json.dumps({"heap_free": -1}).encode(), "heap_free"),
    ("describe", json.dumps({"mode": ["normal"]}).encode(), "mode"),
    ("describe", json.dumps({"platform": "p" * 100}).encode(), "platform"),
    ("describe", json.dumps({"board": "b" * (protocol.MAX_DESCRIBE + 1)}).encode(), "limit"),
    ("describe", deep(protocol.MAX_DEPTH + 2).encode(), "nested"),
    ("describe", ("[" * 5000 + "]" * 5000).encode(), "not JSON"),
    ("describe", json.dumps({f"k{i}": i for i in range(protocol.MAX_KEYS + 1)}).encode(), "keys"),
    ("events", b"no name", "event name"),
    ("events/" + "n" * 65, b"long name", "event name"),
    ("events/big", b"x" * (protocol.MAX_EVENT_DATA + 1), "limit"),
    ("events/huge", b"x" * (512 * 1024), "limit"),
    ("events/binary", b"\xff\xfe\xfd", "UTF-8"),
    ("reply", b"[]", "list"),
    ("reply", b"null", "null"),
    ("reply", b"{}", "id"),
    ("reply", b'{"id": 5, "ok": true, "result": 1}', "id"),
    ("reply", b'{"id": "abc", "ok": "yes"}', "ok"),
    ("reply", json.dumps({"id": "a" * 65, "ok": True}).encode(), "id"),
    ("reply", b'{"id": "abc", "ok": true, "result": {"a": 1}}', "result"),
    ("reply", b'{"id": "abc", "ok": false, "error": 7}', "error"),
    ("reply", json.dumps({"id": "abc", "ok": True, "result": "r" * protocol.MAX_REPLY}).encode(), "limit"),
    ("ota/status", b"[]", "list"),
    ("ota/status", b"{}", "state"),
    ("ota/status", b'{"state": "bogus"}', "state"),
    ("ota/status", b'{"state": "receiving", "next": -1}', "next"),
    ("ota/status", b'{"state": "receiving", "next": 0, "window": 0}', "window"),
    ("ota/status", b'{"state": "receiving", "next": 0, "bitmap": "zz"}', "bitmap"),
    ("ota/status", b'{"state": "receiving", "next": 0, "bitmap": "abc"}', "bitmap"),
    ("ota/status", b'{"state": "failed", "reason": "x", "missing": 3}', "missing"),
    ("ota/status", b'{"state": "failed", "reason": "' + b"r" * 3000 + b'"}', "limit"),
]


@pytest.mark.parametrize("sub_topic, payload, reason", HOSTILE,
                         ids=[f"{t[:12]}-{i}" for i, (t, _, _) in enumerate(HOSTILE)])
def test_a_malformed_message_is_dropped_counted_and_harmless(setup, sub_topic, payload, reason):
    before = setup.registry.drops(setup.hostile.id)["count"]
    setup.hostile.publish(sub_topic, payload)
    drops = wait_until(lambda: (d := setup.registry.drops(setup.hostile.id))["count"] > before and d,
                       "the drop counted")
    setup.processed(setup.hostile)
    assert setup.registry.drops(setup.hostile.id)["count"] == before + 1
    assert reason in drops["reason"], drops["reason"]
    assert time.time() - 60 < drops["ts"] <= time.time()
    setup.still_serving()
    shown = setup.api.device("hostile")  # what keel device show prints
    assert shown["dropped"]["count"] == before + 1 and shown["dropped"]["reason"] == drops["reason"]
    # Nothing of it was stored: the last describe that validated stands.
    assert shown["functions"] == ["led"] and shown["describe_error"] is None


def test_odd_sub_topics_do_not_disturb_the_service(setup):
    for sub_topic in ("foo", "status/extra", "describe/x", "ota/other", "reply/1", "call",
                      "get", "inbox/x", "ota/status/more", "events/a/b/c", "x" * 200):
        setup.hostile.publish(sub_topic, b'["odd"]')
    setup.processed(setup.hostile)
    setup.still_serving()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25)
DESCRIBE_KEYS = ("platform", "board", "mode", "safe_mode_reason", "missing", "reset_reason", "vm",
                 "heap_free", "app", "modules", "functions", "variables", "rollback")
HOSTILE_DESCRIBE = st.dictionaries(st.sampled_from(DESCRIBE_KEYS), JSON, max_size=6) | st.fixed_dictionaries(
    {"modules": st.lists(st.dictionaries(
        st.sampled_from(("function", "index", "version", "valid", "dependencies", "sha256", "size")),
        JSON, max_size=6), max_size=4)})
HOSTILE_REPLY = st.dictionaries(st.sampled_from(("id", "ok", "result", "error")), JSON, max_size=4)
HOSTILE_OTA = st.dictionaries(st.sampled_from(("state", "next", "window", "ack", "bitmap", "reason",
                                               "missing", "duplicates", "version")), JSON, max_size=5)


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.one_of(
    st.tuples(st.sampled_from(("describe", "reply", "ota/status")), JSON),
    st.tuples(st.just("describe"), HOSTILE_DESCRIBE),
    st.tuples(st.just("reply"), HOSTILE_REPLY),
    st.tuples(st.just("ota/status"), HOSTILE_OTA),
))
def test_hostile_json_shapes(setup, message):
    sub_topic, value = message
    before = setup.registry.drops(setup.hostile.id)["count"]
    setup.hostile.publish(sub_topic, json.dumps(value).encode())
    setup.processed(setup.hostile)
    after = setup.registry.drops(setup.hostile.id)["count"]
    if not isinstance(value, dict):
        assert after == before + 1
    else:
        assert after in (before, before + 1)
    setup.still_serving()
    assert setup.api.device("hostile")["describe_error"] is None  # what is stored validated


def test_a_database_failure_loses_nothing_and_a_bad_write_is_dropped_alone(setup, monkeypatch,
                                                                          caplog):
    """The database failing while it stores an event (a disk error, PostgreSQL restarting):
    the batch is written again once it answers, so the event is not lost. An error nobody
    foresaw in one write (a bug) drops that write alone, logged, and the service goes on."""
    write_batch = setup.registry.write_batch
    failures = []

    def failing_twice(writes):
        if any(w.kind == "event" and w.value[0] == "kept" for w in writes) and len(failures) < 2:
            failures.append(len(writes))
            raise sqlite3.OperationalError("disk I/O error")
        return write_batch(writes)

    monkeypatch.setattr(setup.registry, "write_batch", failing_twice)
    with caplog.at_level(logging.WARNING, logger="keel.cloud.ingest"):
        setup.hostile.publish("events/kept", b"not lost")
        wait_until(lambda: any(e["name"] == "kept" for e in setup.registry.events(0, setup.hostile.id)),
                   "the event stored once the database answers")
    assert len(failures) == 2
    assert sum("the registry failed" in r.getMessage() for r in caplog.records) >= 2
    assert [e["data"] for e in setup.registry.events(0, setup.hostile.id)
            if e["name"] == "kept"] == ["not lost"]  # once

    def poisoned(writes):
        if any(w.kind == "event" and w.value[0] == "poison" for w in writes):
            raise ValueError("a bug")
        return write_batch(writes)

    monkeypatch.setattr(setup.registry, "write_batch", poisoned)
    with caplog.at_level(logging.ERROR, logger="keel.cloud.ingest"):
        setup.hostile.publish("events/poison", b"x")
        wait_until(lambda: any("could not be written; dropped" in r.getMessage() for r in caplog.records),
                   "the bad write logged")
    monkeypatch.undo()
    setup.processed(setup.hostile)
    setup.still_serving()
    assert not any(e["name"] == "poison" for e in setup.registry.events(0, setup.hostile.id))


def test_a_device_cannot_answer_a_request_meant_for_another(setup):
    victim = setup.device("victim", answer=False)
    try:
        answers = queue.Queue()
        threading.Thread(target=lambda: answers.put(_get(setup.api, "victim")), daemon=True).start()
        request = victim.requests.get(timeout=WAIT)
        assert isinstance(request["id"], str) and len(request["id"]) >= 16  # 64 random bits
        # The hostile device knows the id (say it guessed it) and answers first, on its
        # own reply topic: the only one it may publish to.
        forged = {"id": request["id"], "ok": True, "result": "forged"}
        setup.hostile.publish("reply", json.dumps(forged).encode())
        setup.processed(setup.hostile)
        with pytest.raises(queue.Empty):
            answers.get(timeout=0.2)  # still waiting for the victim
        victim.reply({"id": request["id"], "ok": True, "result": TEMPERATURE})
        assert answers.get(timeout=WAIT) == TEMPERATURE
        # A reply to no request (of its own) is not a malformed message: not counted.
        assert setup.api.device("victim")["dropped"]["count"] == 0
    finally:
        victim.close()


def _get(api, name):
    try:
        return api.get(name, "temperature")
    except CloudError as e:
        return e


def test_the_cloud_restarts_cleanly_after_it_all(setup):
    """Last in the module (after everything above, when the whole module runs): one bad
    message of each kind more, a describe written by hand (or an older version) in the
    registry too; the cloud must come up and serve."""
    before = setup.registry.drops(setup.hostile.id)["count"]
    kinds = {}
    for sub_topic, payload, _ in HOSTILE:
        kinds.setdefault(sub_topic.split("/")[0], (sub_topic, payload))
    for sub_topic, payload in kinds.values():
        setup.hostile.publish(sub_topic, payload)
    wait_until(lambda: setup.registry.drops(setup.hostile.id)["count"] == before + len(kinds),
               "every kind counted")
    poisoned = new_device_id()
    setup.registry.add_device(poisoned, "poisoned", "virtual")
    setup.registry.query("UPDATE devices SET describe = ? WHERE id = ?",  # noqa: SLF001
                          ('{"modules": [1, {"function": 5}]}', poisoned))
    dropped = setup.registry.drops(setup.hostile.id)["count"]
    setup.stop()
    setup.start()
    wait_until(lambda: setup.registry.device("good")["online"], "the good device back online")
    setup.still_serving()
    assert setup.registry.drops(setup.hostile.id)["count"] == dropped  # kept across the restart
    listed = {d["name"]: d for d in setup.api.devices()}
    assert listed["poisoned"]["describe_error"] and listed["poisoned"]["system_version"] is None
    assert setup.api.device("poisoned")["modules"] == []
    # ... and the CLI prints it all.
    env = dict(os.environ, KEEL_CLOUD=str(setup.dir.path))
    keel = [str(Path(sys.executable).parent / "keel")]
    shown = subprocess.run(keel + ["device", "show", "hostile"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    line = [x for x in shown.stdout.splitlines() if x.strip().startswith("dropped")]
    assert line and f"{dropped} message(s), the last at" in line[0], shown.stdout
    listing = subprocess.run(keel + ["list"], env=env, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert [x for x in listing.stdout.splitlines() if x.startswith("poisoned")][0].endswith(
        "(describe unreadable)")
    shown = subprocess.run(keel + ["device", "show", "poisoned"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0 and "describe      unknown: the stored one is unusable" in shown.stdout
