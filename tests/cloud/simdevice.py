"""A simulated Keel device for cloud tests: a protocol peer, not device code.

SimDevice speaks the device's side of docs/protocol.md in CPython (paho-mqtt), copying
system/core/cloud_session.py and system/core/ota.py, so that cloud tests can run devices
by the dozen (the healer, the OTA sender, the broker) without a MicroPython VM each. The
device code is tested on the VM (tests/device, the cloud tests with virtual devices);
where the two differ, the device is right.

One thread is the device's system loop: paho's client.loop() and the update receiver's
step in turn, a new paho client per connection (as the session makes a new mqtt.Client).
Connections, retries (1 s doubling to 60 s, + up to 50 %), what is sent on connect, the
receiver's acknowledgements and its transfer kept in "flash" across resets and
reconnections (the same offer resumes where it got to) are the device's. A reset (after
`pending`, or reset()) drops the connection without DISCONNECT (a TCP reset: the broker
publishes the will); after boot_delay the "bootloader" installs what was pending, and the
device connects and describes with it. Not simulated: app events, signatures (the board
is in development mode), the dependency check at verify, trials and rollbacks.
"""

import collections
import hashlib
import json
import random
import secrets
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from keel_cloud import module_format as mf
from keel_cloud.releases import version_key

WINDOW, ACK_EVERY = 8, 2  # chunks past `next` the receiver takes; new ones per acknowledgement
IDLE_ACK = 2.0  # s without a chunk, some missing: acknowledge again
RESET_DELAY = 0.5  # s from `pending` to the reset
STABLE = 30.0  # s a connection lasts before the backoff starts again (or it carried an update)
CONNECT_TIMEOUT = 20.0  # s for CONNACK
BACKOFF_MAX = 60.0
TICK = 0.05  # the system loop's longest wait
MAX_SIZE = 1 << 20  # the largest module slot
FUNCTIONS = {"bootloader": 2, "system-part": 4, "user-part": 5}  # (the format's numbers)
TOPICS = ("call", "get", "inbox/#", "ota/offer", "ota/chunk")
_IDLE, _RECEIVING, _VERIFY, _PENDING = "idle", "receiving", "verify", "pending"
# A sim device runs this tree's bootloader (bootloader/VERSION), as one made from it would
BOOTLOADER = (Path(__file__).resolve().parents[2] / "bootloader" / "VERSION").read_text().strip()
DEFAULT_MODULES = [
    {"function": "bootloader", "index": 0, "version": BOOTLOADER},
    {"function": "system-part", "index": 1, "version": "1.0.0",
     "dependencies": [{"function": "bootloader", "index": 0, "version": BOOTLOADER}]},
    {"function": "system-part", "index": 2, "version": "1.0.0",
     "dependencies": [{"function": "system-part", "index": 1, "version": "1.0.0"}]},
]


def tls_context(cert, key, ca) -> ssl.SSLContext:
    """A device's TLS context: cert and key PEM files; ca a file, or DER or PEM bytes."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if isinstance(ca, bytes):
        ctx.load_verify_locations(cadata=ca.decode() if ca.startswith(b"-----") else ca)
    else:
        ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def provision(cloud_path, name: str, directory, platform: str = "virtual", device_id=None,
              **kwargs) -> "SimDevice":
    """Register a sim device and issue its identity as `keel device provision` does
    (keel_cloud.provision.identity_files: CN = its id, signed by the cloud's CA), its PEM
    certificate and key written in directory. The SimDevice (kwargs: its), not started."""
    from cryptography.hazmat.primitives import serialization as ser
    from keel_cloud.config import CloudDir
    from keel_cloud import keel_files
    from keel_cloud.provision import identity_files

    device_id = device_id or secrets.token_hex(12)
    files = {k.rsplit("/", 1)[1]: v for k, v in identity_files(
        CloudDir(cloud_path), device_id, name, platform).items() if k.startswith(keel_files.CLOUD_DIR + "/")}
    cert, key = Path(directory) / f"{name}.crt", Path(directory) / f"{name}.key"
    cert.write_text(ssl.DER_cert_to_PEM_cert(files["cert.der"]))
    key.write_bytes(ser.load_der_private_key(files["key.der"], None).private_bytes(
        ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    config = json.loads(files["cloud.json"])
    return SimDevice(device_id, (cert, key, files["ca.der"]), config["host"], config["port"],
                     platform=platform, name=name, **kwargs)


def missing_of(modules: list[dict]) -> list[dict]:
    """Unmet dependencies of the modules, the highest per module (app_loader._missing)."""
    have = {(m["function"], m["index"]): m["version"] for m in modules if m.get("valid", True)}
    need: dict[tuple, str] = {}
    for m in modules:
        for d in m.get("dependencies") or []:
            key, version = (d["function"], d["index"]), d["version"]
            if not (key in have and version_key(have[key]) >= version_key(version)) and \
                    (key not in need or version_key(need[key]) < version_key(version)):
                need[key] = version
    order = sorted(need, key=lambda k: (FUNCTIONS.get(k[0], 99), k[1]))
    return [{"function": f, "index": i, "version": need[(f, i)]} for f, i in order]


class _Transfer:
    """What the device keeps in flash of an update: its offer and the chunks stored."""

    def __init__(self, doc: dict):
        self.doc, self.sha, self.tag = doc, doc["sha256"], bytes.fromhex(doc["sha256"][:16])
        self.size, self.chunk_size = doc["size"], doc["chunk_size"]
        self.count = -(-self.size // self.chunk_size)
        self.chunks: dict[int, bytes] = {}
        self.next = 0


class SimDevice:
    """device_id; tls: an ssl.SSLContext or (cert file, key file, CA file or bytes); the
    broker's host and port; modules: what is installed ([{function, index, version}, perhaps
    with dependencies, size, sha256]; DEFAULT_MODULES: system 1.0.0); app: the app's
    dependencies ([{function, index, version}]; a user part 1 app_version comes with
    them), None for no app. The mode follows: safe (`dependency`, with `missing`) when a
    module's dependency is not installed at its version, else normal.

    For tests, thread-safe: start(), stop(), drop_connection(), reset(), wait_mode(),
    wait_for(predicate), describe(); mode, connected, installs (a Counter of (function,
    index, version) installed over the air), offers (each offer received, parsed),
    resumes (transfers taken up again from "flash"), connections, log (what it did)."""

    def __init__(self, device_id: str, tls, host: str, port: int, *, platform: str = "virtual",
                 modules=None, app=None, app_version: str = "1.0.0", name=None,
                 boot_delay: float = 0.3, backoff: float = 1.0, keepalive: int = 30,
                 chunk_delay: float = 0.0):
        self.device_id, self.name, self.host, self.port = device_id, name or device_id, host, port
        self.chunk_delay = chunk_delay  # s per chunk stored: a slow flash, a long transfer
        self.platform, self.boot_delay, self.keepalive = platform, boot_delay, keepalive
        self.backoff_min = backoff
        self._tls = tls if isinstance(tls, ssl.SSLContext) else tls_context(*tls)
        self._base = f"devices/{device_id}/"
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._stop, self._thread, self._requests = threading.Event(), None, collections.deque()
        self._modules = [self._entry(m) for m in (DEFAULT_MODULES if modules is None else modules)]
        if app is not None:
            self._modules.append(self._entry({"function": "user-part", "index": 1, "version": app_version,
                                              "dependencies": app}))
        self._installs, self._offers = collections.Counter(), []
        self.resumes = self.connections = 0
        # App events: waiting, and in flight by packet id (sent again on the next
        # connection when not acknowledged, as the device does: the cloud may get one twice)
        self._outbox: collections.deque = collections.deque()
        self._in_flight: dict[int, tuple] = {}
        self.events_resent = collections.Counter()  # (name, data) sent again after a lost connection
        self.events_acked = 0
        self.log: collections.deque = collections.deque(maxlen=1000)
        # the session; _boot_at: (when a reset is over, its reason); _report: `installed`
        self._client, self._up, self._useful, self._opened, self._up_at = None, False, False, 0.0, 0.0
        self._boot_at = self._report = None
        # the receiver: in RAM (_rx and what follows), in "flash" (_transfer; _staged: pending)
        self._rx, self._transfer, self._staged = _IDLE, None, None
        self._fresh = self._dups = 0
        self._last_chunk = self._reset_at = 0.0
        self._acked_idle = True
        with self._lock:
            self._boot("power-on")

    def _entry(self, m: dict) -> dict:
        """A module as a describe lists it (the keys of `keel inspect`, and `valid`)."""
        return {"function": m["function"], "index": m["index"], "version": m["version"],
                "platform": m.get("platform", self.platform), "size": m.get("size", 4096),
                "crc_ok": True, "sha256_ok": True, "valid": True,
                "dependencies": [dict(d) for d in m.get("dependencies") or []],
                **({"sha256": m["sha256"]} if m.get("sha256") else {})}

    # For tests

    def start(self) -> "SimDevice":
        self._thread = threading.Thread(target=self._run, name=f"sim-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Power off: the connection drops (the broker publishes the will)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            self._kill()

    def event(self, name: str, data: str) -> None:
        """The app publishes an event (sent at once when connected, else once it is)."""
        with self._lock:
            self._outbox.append((name, data))

    def events_waiting(self) -> int:
        with self._lock:
            return len(self._outbox) + len(self._in_flight)

    def drop_connection(self) -> None:
        """The link drops: the device notices, waits its backoff and connects again."""
        self._requests.append("drop")

    def reset(self) -> None:
        """A reset (no update): the receiver's RAM is lost, its flash stays."""
        self._requests.append("reset")

    @property
    def mode(self) -> str:
        with self._lock:
            return self._mode

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._up

    @property
    def installs(self) -> collections.Counter:
        with self._lock:
            return collections.Counter(self._installs)

    @property
    def offers(self) -> list[dict]:
        with self._lock:
            return list(self._offers)

    def wait_for(self, predicate, timeout: float = 30.0) -> bool:
        """Wait until predicate() (called under the device's lock) is true; False if not in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
            return True

    def wait_mode(self, mode: str, timeout: float = 30.0) -> bool:
        return self.wait_for(lambda: self._mode == mode, timeout)

    def describe(self) -> dict:
        """The describe it sends (the shape of a virtual device's: cloud_session._describe)."""
        with self._lock:
            app = any(m["function"] == "user-part" for m in self._modules)
            app = ("running" if self._mode == "normal" else "not-run") if app else "none"
            return json.loads(json.dumps({
                "platform": self.platform, "board": self.platform, "mode": self._mode,
                "safe_mode_reason": "dependency" if self._missing else None, "missing": self._missing,
                "reset_reason": self._reset_reason, "vm": {"name": "micropython", "version": "1.29.0"},
                "heap_free": 104512, "app": app,
                "modules": self._modules, "functions": [], "variables": [],
                "trust": {"mode": "development", "keys": []}}))

    def _note(self, text: str) -> None:
        self.log.append(f"{time.monotonic():.3f} {text}")

    # The system loop

    def _run(self) -> None:
        while not self._stop.is_set():
            now, client = time.monotonic(), self._client
            if self._boot_at is not None:  # (resetting)
                if now < self._boot_at[0]:
                    self._stop.wait(TICK)
                else:
                    with self._lock:
                        self._boot(self._boot_at[1])
            elif client is None:
                if now < self._retry_at:
                    self._stop.wait(min(TICK, self._retry_at - now))
                else:
                    self._open()
            else:
                rc = client.loop(TICK)  # (paho's callbacks run in here)
                with self._lock:
                    if self._client is client and rc != mqtt.MQTT_ERR_SUCCESS:
                        self._fail(f"lost: {mqtt.error_string(rc)}")
                    elif self._client is client and not self._up and now - self._opened > CONNECT_TIMEOUT:
                        self._fail("no CONNACK")
            with self._lock:
                while self._requests:
                    if self._requests.popleft() == "reset":
                        self._reset("reset")
                    elif self._client is not None:
                        self._fail("link dropped")
                self._service()
                self._cond.notify_all()

    def _open(self) -> None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.device_id,
                             protocol=mqtt.MQTTv311, clean_session=True)
        client.tls_set_context(self._tls)
        client.will_set(self._base + "status", b"offline", qos=1, retain=True)
        client.on_connect, client.on_message = self._on_connect, self._on_message
        client.on_publish = self._on_publish
        with self._lock:
            self._client, self._opened, self._up = client, time.monotonic(), False
        try:
            client.connect(self.host, self.port, keepalive=self.keepalive)  # (CONNACK: in loop())
        except (OSError, ValueError) as e:  # (ssl.SSLError is an OSError)
            with self._lock:
                if self._client is client:
                    self._fail(f"not connected: {e}")

    def _kill(self) -> None:
        """Close the connection as a reset does: no DISCONNECT, a TCP reset."""
        client, self._client, self._up = self._client, None, False
        self._outbox.extendleft(reversed(list(self._in_flight.values())))  # sent again
        self.events_resent.update(self._in_flight.values())  # (the broker may have had them)
        self._in_flight.clear()
        sock = client.socket() if client is not None else None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        if client is not None:
            client._reset_sockets()  # (paho 2: closes the socket and its wake-up pair)

    def _fail(self, why: str) -> None:
        was_up, now = self._up, time.monotonic()
        self._kill()
        if was_up and (self._useful or now - self._up_at >= STABLE):
            self._backoff = self.backoff_min
        delay = self._backoff * (1 + random.random() / 2)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        self._retry_at = now + delay
        self._note(f"cloud {'lost' if was_up else 'not connected'} ({why}); retrying in {delay:.2f} s")

    def _reset(self, reason: str) -> None:
        self._kill()  # (the will goes out)
        self._rx = _IDLE  # the receiver's RAM; its flash (_transfer, _staged) stays
        self._boot_at = (time.monotonic() + self.boot_delay, reason)
        self._note(f"reset ({reason})")

    def _boot(self, reason: str) -> None:
        """The bootloader installs what is pending; the system decides the mode."""
        if self._staged is not None:
            doc, image, info = self._staged
            self._staged = self._transfer = None
            key = (doc["function"], doc["index"])
            version = doc.get("version") or mf.decode_version(info.version)
            self._modules = [m for m in self._modules if (m["function"], m["index"]) != key]
            self._modules.append(self._entry({
                "function": key[0], "index": key[1], "version": version, "size": len(image),
                "sha256": doc["sha256"], "dependencies": [mf.dependency_dict(d) for d in info.dependencies]}))
            self._modules.sort(key=lambda m: (FUNCTIONS.get(m["function"], 99), m["index"]))
            self._installs[(*key, version)] += 1
            self._report = {"state": "installed", "version": version}
            self._note(f"installed {key[0]} {key[1]} {version}")
        self._boot_at, self._reset_reason = None, reason
        self._missing = missing_of(self._modules)
        self._mode = "safe" if self._missing else "normal"
        self._retry_at, self._backoff = 0.0, self.backoff_min  # the first attempt at once
        self._cond.notify_all()

    # The session (paho's callbacks, in the system loop's thread)

    def _publish(self, sub: str, payload, qos: int = 1, retain: bool = False) -> None:
        if self._client is not None and self._up:
            self._client.publish(self._base + sub, payload, qos=qos, retain=retain)

    def _on_connect(self, client, userdata, flags, reason, properties=None) -> None:
        with self._lock:
            if client is not self._client:
                return
            if reason.is_failure:
                return self._fail(f"CONNACK {reason}")
            self._up, self._up_at, self._useful = True, time.monotonic(), False
            self.connections += 1
            self._publish("status", b"online", retain=True)
            client.subscribe([(self._base + t, 1) for t in TOPICS])
            self._publish("describe", json.dumps(self.describe()))
            if self._rx == _RECEIVING:
                self._ack()  # (ota.reconnected: where the transfer stands)
            if self._report:
                self._publish("ota/status", json.dumps(self._report))
                self._report = None
            self._note(f"connected ({self._mode} mode)")

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            if client is not self._client or not msg.topic.startswith(self._base):
                return
            rest = msg.topic[len(self._base):]
            if rest in ("ota/offer", "ota/chunk"):
                self._useful = True
                (self._offer if rest == "ota/offer" else self._chunk)(msg.payload)
            elif rest in ("call", "get"):  # as a device whose app registered nothing
                try:
                    request = json.loads(msg.payload)
                    rid = request["id"]
                except (ValueError, TypeError, KeyError):
                    return
                app = self._mode == "normal" and any(m["function"] == "user-part" for m in self._modules)
                what = "function" if rest == "call" else "variable"
                error = (f"NotFound: no {what} '{request.get('name')}'" if app
                         else f"no app running ({self._mode} mode)")
                self._publish("reply", json.dumps({"id": rid, "ok": False, "error": error}))

    # The update receiver (ota.py)

    def _status(self, state: str, **keys) -> None:
        self._publish("ota/status", json.dumps({"state": state, **keys}))

    def _ack(self) -> None:
        t, self._fresh = self._transfer, 0
        bits = sum(1 << i for i in range(WINDOW) if t.next + i in t.chunks)
        self._publish("ota/status", '{"state": "receiving", "next": %10d, "bitmap": "%02x", "window": %d, '
                      '"ack": %d}' % (t.next, bits, WINDOW, ACK_EVERY), qos=0)

    def _offer(self, payload: bytes) -> None:
        try:
            offer = json.loads(payload)
            sha = str(offer["sha256"]).lower()
            doc = {"sha256": sha, "function": offer["function"], "index": int(offer.get("index", 0)),
                   "version": offer.get("version"), "platform": offer["platform"], "size": int(offer["size"]),
                   "chunk_size": int(offer.get("chunk_size", 1024)), "trial_s": int(offer.get("trial_s", 0))}
            if len(bytes.fromhex(sha)) != 32:
                raise ValueError(sha)
        except (ValueError, TypeError, KeyError, AttributeError):
            return self._note("ignored a malformed offer")
        self._offers.append(offer)
        refusal = ("platform" if doc["platform"] != self.platform else
                   "function" if doc["function"] not in FUNCTIONS else
                   "too-big" if not 0 < doc["size"] <= MAX_SIZE else
                   "chunk_size" if not 64 <= doc["chunk_size"] <= 1024 else None)
        if refusal:
            return self._status("refused", reason=refusal)
        t = self._transfer
        if self._rx != _IDLE and t.sha == sha:  # (verifying: the answer follows)
            if self._rx == _PENDING:
                self._status("pending")
            elif self._rx == _RECEIVING:
                self._ack()
            return
        if self._rx == _PENDING:
            return self._status("refused", reason="busy")
        self._fresh = self._dups = 0
        self._last_chunk, self._acked_idle = time.monotonic(), True
        if t is not None and t.doc == doc:
            self.resumes += 1
            self._note(f"resuming {sha[:16]} at chunk {t.next} of {t.count}")
        else:  # (a different offer replaces an unfinished transfer)
            t = self._transfer = _Transfer(doc)
            self._note(f"receiving {sha[:16]}: {doc['function']} {doc['index']} {doc['version']}")
        self._rx = _VERIFY if len(t.chunks) == t.count else _RECEIVING
        if self._rx == _RECEIVING:
            self._ack()

    def _chunk(self, payload: bytes) -> None:
        t = self._transfer
        if self._rx != _RECEIVING or len(payload) <= 12 or payload[:8] != t.tag:
            return
        n = int.from_bytes(payload[8:12], "big")
        if n >= t.count or len(payload) - 12 != min(t.chunk_size, t.size - n * t.chunk_size):
            return
        self._last_chunk, self._acked_idle = time.monotonic(), False
        if n in t.chunks:
            self._dups += 1  # (sent again before our acknowledgement got there)
            return
        if self.chunk_delay:
            time.sleep(self.chunk_delay)
        t.chunks[n] = bytes(payload[12:])
        self._fresh += 1
        while t.next < t.count and t.next in t.chunks:
            t.next += 1
        if len(t.chunks) == t.count:
            self._ack()
            self._rx = _VERIFY  # (the next pass verifies)
        elif self._fresh >= ACK_EVERY:
            self._ack()

    def _on_publish(self, client, userdata, mid, reason=None, properties=None) -> None:
        with self._lock:
            if client is self._client and self._in_flight.pop(mid, None) is not None:
                self.events_acked += 1

    def _service(self) -> None:
        now = time.monotonic()
        while self._client is not None and self._up and self._outbox and len(self._in_flight) < 8:
            name, data = self._outbox.popleft()
            info = self._client.publish(self._base + "events/" + name, data, qos=1)
            self._in_flight[info.mid] = (name, data)
        if self._rx == _RECEIVING and not self._acked_idle and now - self._last_chunk >= IDLE_ACK:
            self._acked_idle = True
            self._ack()
        elif self._rx == _VERIFY:
            self._verify()
        elif self._rx == _PENDING and now >= self._reset_at:
            self._reset("update")

    def _verify(self) -> None:
        t = self._transfer
        self._status("verifying", duplicates=self._dups)
        image = b"".join(t.chunks[n] for n in range(t.count))
        if hashlib.sha256(image).hexdigest() != t.sha:
            return self._failed("sha256")
        try:  # (ota_check.verify's header checks)
            info, crc_ok, _ = mf.check_image(mf.bytes_reader(image), len(image))
        except ValueError:
            return self._failed("header")
        same = (mf.function_name(info.function), info.index) == (t.doc["function"], t.doc["index"])
        failed = None if crc_ok and info.image_size == t.size and same else "header"
        if not failed and mf.platform_name(info.platform) != self.platform:
            failed = "platform"
        if failed:
            return self._failed(failed)
        self._staged = (t.doc, image, info)  # (pending.json: the bootloader installs it)
        self._status("pending")
        self._note(f"{t.doc['function']} {t.doc['index']} {t.doc['version']} verified; pending install")
        self._rx, self._reset_at = _PENDING, time.monotonic() + RESET_DELAY

    def _failed(self, reason: str) -> None:
        self._note(f"update failed ({reason})")
        self._status("failed", reason=reason)
        self._rx, self._transfer = _IDLE, None
