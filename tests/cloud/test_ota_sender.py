"""The cloud side of updates over the air (docs/protocol.md, "Updates (over the air)"),
against a fake device: a paho client with a device certificate from the cloud's CA,
connected to a running Keel Cloud (embedded broker), that stores chunks and acknowledges
them as the protocol says, and can lose chunks, go silent once, refuse or fail."""

import socket
import hashlib
import json
import os
import secrets
import ssl
import struct
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from keel import module_format as mf
from keel.cli import main
from keel_cloud import pki
from keel_cloud.config import CloudDir
from keel_cloud.ota import IN_FLIGHT, OtaError
from keel_cloud.server import Cloud


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STALL = 2.0  # the device acknowledges when chunks stop coming for this long


def make_image(size: int, platform: str = "virtual", seed: int = 1) -> bytes:
    info = mf.ModuleInfo(mf.FUNCTION_USER_PART, 1, mf.encode_version("2.0.0"), mf.platform_id(platform),
                         [(mf.FUNCTION_SYSTEM_PART, 1, mf.encode_version("1.1.0"))])
    payload = hashlib.shake_256(seed.to_bytes(4, "big")).digest(size)
    return mf.build_image(info, payload, hashlib.sha256)


def wait_until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class FakeDevice:
    """The device side of the protocol, in paho's thread."""

    def __init__(self, cloud: Cloud, name: str, platform: str = "virtual", window: int = 8,
                 ack_every: int = 2, say_ack: bool = True,
                 drop: set[int] = frozenset(), silent_after: int | None = None,
                 refuse: str | None = None, fail: str | None = None):
        self.id = secrets.token_hex(12)
        self.window = window
        self.ack_every = ack_every  # new chunks per acknowledgement
        self.say_ack = say_ack  # False: like firmware before `ack` (every 4, unsaid)
        self.ahead = 0  # the furthest a chunk came past the `next` of the last ack sent
        self.acked_next = 0
        self.drop = set(drop)  # chunk numbers lost the first time they come
        self.silent_after = silent_after  # stop answering once this chunk is stored, until an offer
        self.refuse, self.fail = refuse, fail
        self.lock = threading.Lock()
        self.offers: list[dict] = []
        self.chunk_bytes = 0  # every chunk byte that reached the device, lost ones included
        self.statuses: list[dict] = []
        self.offer = None
        self.stored: dict[int, bytes] = {}
        self.silent = False
        self.new_since_ack = 0
        self.last_activity = time.monotonic()
        self.done = False
        self.image = None

        cloud.registry.add_device(self.id, name, platform)
        identity = cloud.dir.ca().issue(self.id)
        folder = cloud.dir.path / "fake"
        folder.mkdir(exist_ok=True)
        cert, key = folder / f"{self.id}.crt", folder / f"{self.id}.key"
        cert.write_bytes(identity.cert_pem)
        key.write_bytes(identity.key_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(cloud.dir.path / pki.CA_CERT))
        ctx.load_cert_chain(str(cert), str(key))
        self.connected = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.id, protocol=mqtt.MQTTv311,
                        clean_session=True)
        c.tls_set_context(ctx)
        c.will_set(f"devices/{self.id}/status", b"offline", qos=1, retain=True)
        c.on_connect = lambda *a: self.connected.set()
        c.on_message = self._on_message
        self.client = c
        host, port = cloud.config.mqtt.rsplit(":", 1)
        c.connect(host, int(port), keepalive=30)
        c.loop_start()
        assert self.connected.wait(5), "the fake device did not connect"
        c.subscribe(f"devices/{self.id}/ota/#", qos=1)
        c.publish(f"devices/{self.id}/status", b"online", qos=1, retain=True)
        c.publish(f"devices/{self.id}/describe", json.dumps({"platform": platform, "mode": "normal",
                                                               "modules": []}), qos=1)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def close(self):
        self._stop.set()
        self.client.disconnect()
        self.client.loop_stop()

    # Protocol

    def _status(self, **status):
        self.statuses.append(status)
        self.client.publish(f"devices/{self.id}/ota/status", json.dumps(status), qos=1)

    def _count(self):
        return (self.offer["size"] + self.offer["chunk_size"] - 1) // self.offer["chunk_size"]

    def _ack(self):
        count = self._count()
        nxt = 0
        while nxt in self.stored:
            nxt += 1
        bits = bytearray((self.window + 7) // 8)
        for i in range(self.window):
            if nxt + i < count and nxt + i in self.stored:
                bits[i // 8] |= 1 << (i % 8)
        self.new_since_ack = 0
        self.acked_next = nxt
        extra = {"ack": self.ack_every} if self.say_ack else {}
        self._status(state="receiving", next=nxt, bitmap=bits.hex(), window=self.window, **extra)

    def _on_message(self, client, userdata, msg):
        kind = msg.topic.rsplit("/", 1)[1]
        with self.lock:
            self.last_activity = time.monotonic()
            if kind == "offer":
                offer = json.loads(msg.payload)
                self.offers.append(offer)
                self.silent = False
                if self.refuse:
                    return self._status(state="refused", reason=self.refuse)
                if self.offer is None or self.offer["sha256"] != offer["sha256"]:
                    self.offer, self.stored, self.done = offer, {}, False
                self._ack()
            elif kind == "chunk" and self.offer is not None and not self.done:
                tag, n = msg.payload[:8], struct.unpack(">I", msg.payload[8:12])[0]
                data = msg.payload[12:]
                self.chunk_bytes += len(data)
                if tag != bytes.fromhex(self.offer["sha256"])[:8] or n >= self._count():
                    return
                if n in self.drop:
                    self.drop.discard(n)
                    return
                self.ahead = max(self.ahead, n - self.acked_next + 1)
                if n not in self.stored:
                    self.stored[n] = data
                    self.new_since_ack += 1
                if self.silent_after is not None and n == self.silent_after:
                    self.silent_after, self.silent = None, True
                if self.silent:
                    return
                if len(self.stored) == self._count():
                    self._finish()
                elif self.new_since_ack >= self.ack_every:
                    self._ack()

    def _finish(self):
        self.done = True
        self._status(state="verifying")
        self.image = b"".join(self.stored[n] for n in range(self._count()))
        if self.fail:
            return self._status(state="failed", reason=self.fail)
        if hashlib.sha256(self.image).hexdigest() != self.offer["sha256"]:
            return self._status(state="failed", reason="sha256")
        self._status(state="pending")

    def _tick(self):
        while not self._stop.wait(0.1):
            with self.lock:
                if (self.offer and not self.done and not self.silent and self.stored is not None
                        and time.monotonic() - self.last_activity >= STALL
                        and len(self.stored) < self._count()):
                    self.last_activity = time.monotonic()
                    self._ack()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    cloud_dir = CloudDir(tmp_path_factory.mktemp("ota") / "cloud")
    running = Cloud(cloud_dir, mqtt=f"127.0.0.1:{free_port()}", http=f"127.0.0.1:{free_port()}")
    running.start()
    yield running
    running.stop()


@pytest.fixture
def devices(cloud):
    made = []

    def make(name, **kwargs):
        device = FakeDevice(cloud, name, **kwargs)
        made.append(device)
        wait_until(lambda: cloud.registry.device(name)["online"]
                   and cloud.registry.device(name)["platform"] == kwargs.get("platform", "virtual"),
                   what=f"{name} online")
        return device

    yield make
    for device in made:
        device.close()


def test_clean_transfer(cloud, devices):
    device = devices("ota-clean")
    image = make_image(20_000)
    progress = []
    module = {"function": "user-part", "index": 1, "version": "2.0.0", "platform": "virtual"}
    result = cloud.service.ota.send(device.id, image, module, progress.append, timeout=20)
    assert result["state"] == "pending" and result["sha256"] == hashlib.sha256(image).hexdigest()
    assert device.image == image
    assert result["bytes_sent"] == device.chunk_bytes == len(image)
    assert progress == sorted(progress) and progress[-1] == len(image)
    [offer] = device.offers
    assert offer == {"sha256": hashlib.sha256(image).hexdigest(), "function": "user-part", "index": 1,
                     "version": "2.0.0", "platform": "virtual", "size": len(image), "chunk_size": 1024}
    assert [s["state"] for s in device.statuses][-2:] == ["verifying", "pending"]


def test_in_flight_is_bounded(cloud, devices):
    """The sender keeps IN_FLIGHT bytes unacknowledged at most, not the device's whole
    window: what a dropped connection loses. A device that acknowledges less often
    than that (older firmware: every 4, without saying) still gets its 4 at a time."""
    module = {"function": "user-part", "index": 1, "version": "2.0.0", "platform": "virtual"}
    limit = IN_FLIGHT // 1024
    for name, kwargs, most in (("ota-bounded", {}, limit),
                               ("ota-old", {"ack_every": 4, "say_ack": False}, 4)):
        device = devices(name, **kwargs)
        image = make_image(40_000, seed=4)
        started = time.monotonic()
        result = cloud.service.ota.send(device.id, image, module, timeout=20)
        assert result["state"] == "pending" and device.image == image
        assert result["bytes_sent"] == len(image) and result["duplicates"] is None
        assert result["resent"] == {"dropped": 0, "gap": 0, "late": 0}
        assert 1 < device.ahead <= most, (name, device.ahead)
        assert time.monotonic() - started < STALL  # never waited for an idle acknowledgement


def test_lost_chunks_and_silence_resend_only_what_is_missing(cloud, devices):
    image = make_image(100_000, seed=2)
    device = devices("ota-lossy", drop={5, 6, 61}, silent_after=40)
    module = {"function": "user-part", "index": 1, "version": "2.0.0", "platform": "virtual"}
    started = time.monotonic()
    result = cloud.service.ota.send(device.id, image, module, timeout=45)
    assert result["state"] == "pending"
    assert device.image == image
    assert len(device.offers) >= 2  # the silence was answered with a new offer
    assert time.monotonic() - started >= 10  # … after 10 s
    assert device.chunk_bytes > len(image)  # lost chunks were sent again
    assert device.chunk_bytes / len(image) <= 1.1, device.chunk_bytes / len(image)
    assert result["bytes_sent"] == device.chunk_bytes
    assert result["resent"]["gap"] == 3  # the three lost chunks, each once


@pytest.mark.parametrize("mode, message", [
    ({"refuse": "function"}, "the device refused the update: function"),
    ({"fail": "header"}, "the update failed on the device: header"),
])
def test_refused_or_failed_is_an_error(cloud, devices, mode, message):
    device = devices(f"ota-{next(iter(mode))}", **mode)
    with pytest.raises(OtaError) as e:
        cloud.service.ota.send(device.id, make_image(3000), {"function": "user-part", "index": 1,
                                                              "version": "2.0.0", "platform": "virtual"},
                               timeout=10)
    assert str(e.value) == message


def test_keel_flash(cloud, devices, tmp_path, capsys):
    device = devices("ota-cli")
    image_file = tmp_path / "app.bin"
    image_file.write_bytes(make_image(12_000, seed=3))
    code = main(["flash", "ota-cli", str(image_file), "--cloud", str(cloud.dir.path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert device.image == image_file.read_bytes()
    assert "100% 12" in err and "[" in err  # the progress bar, on stderr
    assert "sent user-part 2.0.0 to ota-cli" in out


def test_keel_flash_refuses_a_module_for_another_platform(cloud, devices, tmp_path, capsys):
    device = devices("ota-esp", platform="esp32")
    image_file = tmp_path / "virtual.bin"
    image_file.write_bytes(make_image(5000))
    code = main(["flash", "ota-esp", str(image_file), "--cloud", str(cloud.dir.path)])
    out, err = capsys.readouterr()
    assert code == 1
    assert err.startswith("keel: error: ") and err.count("\n") == 1
    assert "virtual" in err and "esp32" in err
    time.sleep(0.5)
    assert device.offers == [] and device.chunk_bytes == 0
    # The HTTP API refuses it too, for a client that does not check first.
    from keel_cloud.client import ApiClient
    from keel_cloud.config import CloudError

    with pytest.raises(CloudError, match="is for virtual"):
        ApiClient(cloud.dir).flash("ota-esp", image_file.read_bytes(),
                                   {"function": "user-part", "index": 1, "version": "2.0.0",
                                    "platform": "virtual"})
    time.sleep(0.3)
    assert device.offers == []


def test_keel_flash_refused_by_the_device_is_one_line(cloud, devices, tmp_path, capsys):
    devices("ota-busy", refuse="busy")
    image_file = tmp_path / "app.bin"
    image_file.write_bytes(make_image(4000))
    code = main(["flash", "ota-busy", str(image_file), "--cloud", str(cloud.dir.path)])
    _, err = capsys.readouterr()
    assert code == 1
    assert err.splitlines()[-1] == "keel: error: update of 'ota-busy' failed: the device refused the update: busy"
