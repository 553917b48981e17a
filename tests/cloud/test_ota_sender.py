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

from keel import build
from keel import module_format as mf
from keel.cli import main
from keel_cloud import pki
from keel_cloud.config import CloudDir
from keel_cloud import ota_sender as ota
from keel_cloud.ota_sender import INITIAL_CHUNKS, OtaError, PathEstimate
from keel_cloud.serve import Cloud


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STALL = 2.0  # the device acknowledges when chunks stop coming for this long


def make_image(size: int, platform: str = "virtual", seed: int = 1) -> bytes:
    info = mf.ModuleInfo(mf.FUNCTION_USER_PART, 1, mf.encode_version("2.0.0"), mf.platform_id(platform),
                         [(mf.FUNCTION_SYSTEM_PART, 1, mf.encode_version("1.1.0"))])
    # What keel flash checks before it sends an app: a ROMFS holding main.mpy (its header
    # as mpy-cross writes it; the rest random, of the size asked).
    main_mpy = b"M\x06\x00\x1f" + hashlib.shake_256(seed.to_bytes(4, "big")).digest(size)
    return mf.build_image(info, build.make_romfs({"main.mpy": main_mpy}), hashlib.sha256)


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
                 ack_every: int = 2, say_ack: bool = True, ack_delay: float = 0.0,
                 drop: set[int] = frozenset(), silent_after: int | None = None,
                 refuse: str | None = None, fail: str | None = None):
        self.id = secrets.token_hex(12)
        self.window = window
        self.ack_every = ack_every  # new chunks per acknowledgement
        self.say_ack = say_ack  # False: like firmware before `ack` (every 4, unsaid)
        self.ack_delay = ack_delay  # acknowledgements reach the cloud this much later (a far device)
        self.ahead = 0  # the furthest a chunk came past the `next` of the last ack sent
        self.acked_next = 0
        self.drop = set(drop)  # chunk numbers lost the first time they come
        self.silent_after = silent_after  # stop answering once this chunk is stored, until an offer
        self.refuse, self.fail = refuse, fail
        self.lock = threading.RLock()
        self.offers: list[dict] = []
        self.chunk_bytes = 0  # every chunk byte that reached the device, lost ones included
        self.statuses: list[dict] = []
        self.offer = None
        self.stored: dict[int, bytes] = {}
        self.silent = False
        self.new_since_ack = 0
        self.last_activity = time.monotonic()
        self.stall_acks = 0  # acknowledgements sent because chunks stopped coming
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
        def publish():
            if status["state"] == "receiving":
                with self.lock:  # what the cloud can know: chunks past it are in flight
                    self.acked_next = max(self.acked_next, status["next"])
            self.client.publish(f"devices/{self.id}/ota/status", json.dumps(status), qos=1)

        if self.ack_delay and status["state"] == "receiving":
            threading.Timer(self.ack_delay, publish).start()
        else:
            publish()

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
                    self.stall_acks += 1
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


def test_in_flight_is_bounded(cloud, devices, monkeypatch):
    """Chunks unacknowledged at once: INITIAL_CHUNKS at first, then about the path's
    bandwidth x delay (rate x min RTT + one acknowledgement's chunks), never more than
    the device's window and never fewer than it acknowledges at a time. A near device
    (loopback) gets a few; a far one (acknowledgements 0.3 s late) its whole window,
    reached within a few round trips; a device whose window is 4 no more than 4; older
    firmware that acknowledges every 4 chunks (unsaid) at least 4; a fixed bound
    (OtaSender(in_flight=N)) is kept."""
    module = {"function": "user-part", "index": 1, "version": "2.0.0", "platform": "virtual"}
    sender = cloud.service.ota
    for name, kwargs, fixed, least, most in (
            ("ota-near", {}, None, 2, 8),
            ("ota-far", {"ack_delay": 0.3}, None, 8, 8),
            ("ota-narrow", {"window": 4, "ack_delay": 0.3}, None, 4, 4),
            ("ota-old", {"ack_every": 4, "say_ack": False}, None, 4, 8),
            ("ota-fixed", {"ack_delay": 0.3}, 3 * 1024, 3, 3)):
        monkeypatch.setattr(sender, "in_flight", fixed)
        device = devices(name, **kwargs)
        image = make_image(40_000, seed=4)
        started = time.monotonic()
        result = sender.send(device.id, image, module, timeout=30)
        elapsed = time.monotonic() - started
        assert result["state"] == "pending" and device.image == image
        assert result["bytes_sent"] == len(image) and result["duplicates"] is None
        assert result["resent"] == {"dropped": 0, "gap": 0, "late": 0}
        assert least <= device.ahead <= most, (name, device.ahead, result["path"])
        assert result["path"]["drops"] == 0 and result["path"]["min_rtt"] > 0, result["path"]
        if kwargs.get("ack_delay"):
            assert result["path"]["min_rtt"] >= 0.3, result["path"]
            # 40 chunks, `most` per 0.3 s round trip, plus the start: bounded at twice that
            # (a loaded machine's margin), still under the 12 s that one chunk per round
            # trip takes; the window itself is device.ahead, above.
            assert elapsed < 2 * (40 / most + 3) * 0.3, (name, elapsed)
        assert device.stall_acks == 0, name  # never waited for an idle acknowledgement


# The path estimate (the in-flight limit), on a simulated link with a fake clock

class SimLink:
    """A bottleneck of `rate` bytes/s, `rtt` s away, to a device that acknowledges every
    `ack_every` new chunks, driven by a PathEstimate the way OtaSender uses it: after
    each acknowledgement, chunks go while fewer than the limit (at least ack_every, at
    most `window`) are unacknowledged. Time is simulated (events in order)."""

    def __init__(self, rate, rtt, ack_every=2, window=8, chunk=1024):
        self.rate, self.rtt, self.ack_every, self.window, self.chunk = rate, rtt, ack_every, window, chunk
        self.est = PathEstimate(chunk)
        self.now = 0.0
        self.free_at = 0.0  # when the bottleneck is free
        self.next = 0  # the next new chunk
        self.flying: set[int] = set()
        self.arrived: list[int] = []  # at the device, not yet acknowledged
        self.acks: list[tuple[float, list[int]]] = []  # (when it reaches the sender, chunks)
        self.limits: list[float] = []  # the limit after each acknowledgement
        self.most = 0  # the most chunks unacknowledged at once

    def allowed(self) -> int:
        return max(self.ack_every, min(self.window, round(self.est.limit(self.ack_every) / self.chunk)))

    def fill(self):
        while len(self.flying) < self.allowed():
            n = self.next
            self.next += 1
            self.flying.add(n)
            self.est.sent(n, self.chunk, self.now)
            self.free_at = max(self.now, self.free_at) + self.chunk / self.rate
            arrive = self.free_at + self.rtt / 2
            self.arrived.append(n)
            if len(self.arrived) == self.ack_every:
                self.acks.append((arrive + self.rtt / 2, self.arrived))
                self.arrived = []
        self.most = max(self.most, len(self.flying))

    def run(self, chunks: int):
        self.fill()
        while self.next < chunks or self.flying:
            if not self.acks:
                break
            self.acks.sort()
            self.now, acked = self.acks.pop(0)
            self.flying -= set(acked)
            self.est.acked(acked, self.now)
            self.limits.append(self.est.limit(self.ack_every))
            if self.next < chunks:
                self.fill()
        return self.est


def test_path_estimate_measures_the_bottleneck_and_min_rtt():
    """A 16 KB/s link 300 ms away (the 'cellular' profile): the estimate finds the rate
    and the round trip (plus one chunk's serialisation), leaves startup once the rate
    stops rising, and keeps rate x min RTT in flight plus the chunk that waits on the
    device for its partner (it acknowledges every 2): that keeps the link busy (the
    transfer takes about as long as the link needs, plus a round trip or two)."""
    link = SimLink(rate=16 * 1024, rtt=0.3)
    est = link.run(200)
    serialise = 1024 / (16 * 1024)
    assert est.rate == pytest.approx(16 * 1024, rel=0.05)
    assert est.min_rtt == pytest.approx(0.3 + serialise, abs=0.002)
    assert not est.startup
    assert est.limit(2) == pytest.approx(16 * 1024 * est.min_rtt + 1024, rel=0.05)
    assert link.most <= 8
    ideal = 200 * 1024 / (16 * 1024) + 0.3
    assert ideal < link.now < ideal + 2 * 0.3
    # it started at INITIAL_CHUNKS and grew quickly: the link was full within ~5 RTTs
    assert link.limits[0] >= INITIAL_CHUNKS * 1024
    assert est.delivered == 200 * 1024


def test_path_estimate_grows_fast_and_is_bounded_by_the_window():
    """A fast, long link (wifi-like but farther away): startup grows the limit by half per
    round trip; the caller's window of 8 is what bounds it."""
    link = SimLink(rate=500 * 1024, rtt=0.05)
    est = link.run(40)
    assert est.startup or est.rate < 500 * 1024  # window-limited: the link was never full
    assert link.most == 8
    # from 3 chunks to the window in a few acknowledgements
    assert next(i for i, limit in enumerate(link.limits) if limit >= 8 * 1024) <= 6


def test_path_estimate_short_link_keeps_little_in_flight():
    """A 64 KB/s link 10 ms away: about rate x RTT + 1 chunk (the RTT includes the
    second chunk of a pair waiting behind the first), far below the window, and the
    link is kept busy."""
    link = SimLink(rate=64 * 1024, rtt=0.010)
    est = link.run(300)
    assert not est.startup
    assert 0.010 + 1 / 64 <= est.min_rtt <= 0.010 + 2 / 64 + 0.001
    assert est.limit(2) == pytest.approx(64 * 1024 * est.min_rtt + 1024, rel=0.05)
    assert est.limit(2) <= 3 * 1024  # (startup may have gone up to the window on its way)
    ideal = 300 * 1024 / (64 * 1024) + 0.01
    assert ideal <= link.now < ideal + 0.1


def test_path_estimate_after_a_drop():
    """A reconnection keeps the estimate (no new startup from 3 chunks); chunks that
    were on the way count a drop, and after drops the limit is at most DROP_BUDGET of
    the chunk bytes that go between two drops."""
    link = SimLink(rate=16 * 1024, rtt=0.3)
    est = link.run(100)
    rate, rtt, before = est.rate, est.min_rtt, est.limit(2)
    est.sent(100, 1024, link.now + 0.01)
    est.reconnected(link.now + 2.0)
    assert (est.rate, est.min_rtt, est.startup) == (rate, rtt, False)
    assert est.drops == 1
    assert est.limit(2) == pytest.approx(min(before, ota.DROP_BUDGET * est.bytes_sent / 2))
    assert est.limit(2) < before
    est.reconnected(link.now + 3.0)  # nothing on its way: not a drop
    assert est.drops == 1


def test_path_estimate_ignores_ack_bursts_and_resent_chunks():
    """Two acknowledgements that arrive together (queued behind a stall) do not make a
    rate sample of the time between them; a chunk sent again gives no RTT sample."""
    est = PathEstimate(1024)
    for n in range(4):
        est.sent(n, 1024, 0.1 * n)  # 10 KB/s sending
    est.acked([0, 1], 1.0)
    est.acked([2, 3], 1.0001)  # the same instant
    assert est.rate <= 2048 / 0.2 + 1  # not 2048 / 0.0001
    assert est.min_rtt == pytest.approx(0.7, abs=0.001)  # chunk 3, sent at 0.3
    est.sent(4, 1024, 1.1, again=True)
    est.acked([4], 1.15)
    assert est.min_rtt == pytest.approx(0.7, abs=0.001)


def test_path_estimate_min_rtt_per_connection():
    """The min RTT is the lowest on the current connection, however long ago (a queued
    chunk's longer round trip does not replace it); a new connection's first sample
    replaces it (another route), then the lowest again."""
    est = PathEstimate(1024)
    t = 0.0
    for n, rtt in enumerate([0.12, 0.1, 0.15] + [0.2] * 100):
        est.sent(n, 1024, t)
        t += rtt
        est.acked([n], t)
    assert est.min_rtt == pytest.approx(0.1)
    est.reconnected(t)
    for n, rtt in enumerate([0.45, 0.4, 0.5], start=200):
        est.sent(n, 1024, t)
        t += rtt
        est.acked([n], t)
    assert est.min_rtt == pytest.approx(0.4)
    assert est.drops == 0


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
