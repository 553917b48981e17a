#!/usr/bin/env python3
"""Fleet scale: simulated devices against `keel cloud serve`, with the embedded broker
(amqtt behind the gate), as it starts by default where Mosquitto is installed (it runs
Mosquitto itself), and as two instances (--instance a and b) on one PostgreSQL registry;
and against a bare Mosquitto as the baseline.

    .venv/bin/python bench/fleet_scale.py                       # embedded 1000, mosquitto 10000, instances 10000
    .venv/bin/python bench/fleet_scale.py --smoke               # 20 devices each, one run
    .venv/bin/python bench/fleet_scale.py --setup mosquitto -n 2000 --runs 1 --json out.json

A simulated device is a small asyncio MQTT 3.1.1 client (an asyncio.Protocol over TLS,
one per connection, many per process) with its own key and certificate (CN = its device
id, signed by the cloud's CA), speaking the device side of docs/protocol.md as
system/core/cloud_session.py does: CONNECT with its id and the will `offline` (retained,
QoS 1) on devices/<id>/status; on CONNACK `online` (retained, QoS 1), SUBSCRIBE to its
call, get, inbox/#, ota/offer and ota/chunk, and a describe (QoS 1) the size and shape of a
virtual device's; PINGREQ after a keepalive (30 s) without sending; PUBACK for what it
receives; events at QoS 1, at most 8 in flight per device. The devices run in worker
processes (one per 2,000 devices, at most two: the machine has two cores), driven over
their stdin/stdout.

One run, for each setup:

1. a fresh cloud directory from a cached one (the bench CA, the broker's and service's
   certificates, a registry with the N devices already registered: `Registry.add_device`
   for each, once per N and CA, instead of N `keel device provision` processes; for the
   instances, the same rows inserted into a PostgreSQL registry, bench/postgres.py), then
   `keel cloud serve` (FULL says how), and a real `keel subscribe --json` process;
2. the devices connect at a fixed rate (RAMP devices/s), each sends its describe;
3. a hold (HOLD s); then: devices held = connections still up on the device side, checked
   against the online devices `GET /api/devices` (what `keel list --json` reads) reports;
   describe-to-registry latency per device = the registry row's `last_seen` (the time of
   the commit that stored the describe, taken just before it) minus the wall-clock time
   the device wrote its describe, read once from the registry after the hold;
4. events: EVENTS_RATE events/s in all, round robin over the devices, for EVENTS_S
   seconds; events per second through to `keel subscribe` = events it printed / (its
   last arrival - the first event sent); events not printed within DRAIN s are lost.

The baseline: the same devices, at the same rate, against a bare Mosquitto with Keel's
configuration (TLS, client certificates, the ACL) and, in place of the fleet service, a
plain paho subscriber with the service's certificate and subscriptions (status, describe,
events, reply, ota/status at QoS 1) that only timestamps what arrives: describe latency is
its arrival time minus the device's send time, events/s what it receives. That is the
broker's own capacity on this machine: what Keel's fleet service, registry, HTTP API and
`keel subscribe` (or the embedded broker) cost on top.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench.common import free_port  # noqa: E402

BIN = Path(sys.executable).parent
MOSQUITTO = Path("/usr/sbin/mosquitto")

SERVER_NAME = "localhost"
KEEPALIVE = 30  # the device's keepalive (cloud.json)
MAX_IN_FLIGHT = 8  # app events in flight per device (docs/protocol.md)
PER_WORKER = 2000  # devices per worker process
MAX_WORKERS = 2

# The full figure and the smoke version (used by make test).
# embedded: keel cloud serve --broker embedded; mosquitto: keel cloud serve as it starts by
# default where Mosquitto is installed (it runs Mosquitto itself); instances: two
# instances (serve --instance a, which runs Mosquitto, and b) on one PostgreSQL registry.
FULL = {"embedded": 1000, "mosquitto": 10000, "instances": 10000}
SMOKE = {"embedded": 20, "mosquitto": 20, "instances": 20}
RAMP = 500  # devices connecting per second (10,000 in 20 s: a fleet coming back)
HOLD = 3.0
DESCRIBE_RATE = 100  # steady describes per second (distinct devices, as after state changes)
DESCRIBE_S = 4.0
EVENTS_RATE = 2500  # events/s offered, all devices together (above the 2,000/s goal)
EVENTS_S = 3.0
DRAIN = 10.0  # s at most after the last event sent for the rest to arrive
QUIET = 3.0  # s without a new event at the subscriber: the rest is lost
CONNECT_TIMEOUT = 15.0  # s for TCP, TLS and CONNACK


# --- small helpers ------------------------------------------------------------------

def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def pct(values, p):
    """The p-th percentile (nearest rank) of values, or None."""
    if not values:
        return None
    values = sorted(values)
    k = max(0, min(len(values) - 1, int(round(p / 100 * len(values) + 0.5)) - 1))
    return values[k]


def log(text: str) -> None:
    print(f"  [fleet] {text}", file=sys.stderr, flush=True)


# --- identities (cached) ------------------------------------------------------------

def cache_root() -> Path:
    env = os.environ.get("KEEL_BENCH_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "keel-bench"
    return base / "fleet"


def bench_ca(root: Path):
    """The bench's own CA (kept in the cache, so the device identities it signed can be)."""
    from keel_cloud import pki

    ca_dir = root / "ca"
    if not (ca_dir / pki.CA_KEY).is_file():
        ca_dir.mkdir(parents=True, exist_ok=True)
        pki.CertificateAuthority.create("Keel bench CA").save(ca_dir)
    ca = pki.CertificateAuthority.load(ca_dir)
    fingerprint = hashlib.sha256(ca.cert_der).hexdigest()[:16]
    return ca_dir, fingerprint


def _issue_chunk(args):
    ca_dir, out, ids = args
    from keel_cloud import pki

    ca = pki.CertificateAuthority.load(Path(ca_dir))
    for device_id in ids:
        identity = ca.issue(device_id)
        path = Path(out) / f"{device_id}.pem"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(identity.cert_pem + identity.key_pem)
        tmp.replace(path)
    return len(ids)


def identities(n: int, root: Path | None = None) -> tuple[Path, list[str], Path]:
    """(the CA's directory, n device ids, the folder of their PEM files: <id>.pem holds
    the certificate and the key). Issued once per CA, in a process pool, and kept."""
    root = root or cache_root()
    ca_dir, fingerprint = bench_ca(root)
    folder = root / f"ids-{fingerprint}"
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / "ids.txt"
    ids = index.read_text().split() if index.is_file() else []
    if len(ids) < n:
        rng = random.Random(f"{fingerprint}-{len(ids)}")
        ids += [f"{rng.getrandbits(96):024x}" for _ in range(n - len(ids))]
        index.write_text("\n".join(ids) + "\n")
    ids = ids[:n]
    missing = [i for i in ids if not (folder / f"{i}.pem").is_file()]
    if missing:
        started = time.monotonic()
        chunks = [missing[k:k + 500] for k in range(0, len(missing), 500)]
        workers = max(1, min(os.cpu_count() or 1, len(chunks)))
        if workers == 1:
            for chunk in chunks:
                _issue_chunk((str(ca_dir), str(folder), chunk))
        else:
            with concurrent.futures.ProcessPoolExecutor(workers) as pool:
                list(pool.map(_issue_chunk, [(str(ca_dir), str(folder), c) for c in chunks]))
        log(f"issued {len(missing)} device certificates in {time.monotonic() - started:.1f} s "
            f"(cached in {folder})")
    return ca_dir, ids, folder


def registry_template(n: int, ids: list[str], root: Path, fingerprint: str) -> Path:
    """A registry (SQLite) with the n devices registered, made once per n and CA through
    the registry's API (Registry.add_device, as `keel device provision` does), and copied
    into each run's cloud directory."""
    from keel_cloud.registry import Registry

    path = root / f"registry-{fingerprint}-{n}.db"
    if path.is_file():
        return path
    started = time.monotonic()
    tmp = path.with_suffix(".tmp")
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    registry = Registry(tmp)
    try:
        for k, device_id in enumerate(ids):
            registry.add_device(device_id, f"sim{k:05d}", "virtual")
    finally:
        registry.close()
    tmp.replace(path)
    log(f"registered {n} devices in {time.monotonic() - started:.1f} s")
    return path


def make_cloud_dir(where: Path, n: int, mqtt_port: int, http_port: int, broker: str | None):
    """A fresh cloud directory with the bench CA and n registered devices."""
    from keel_cloud import pki
    from keel_cloud.config import CloudDir

    root = cache_root()
    ca_dir, ids, folder = identities(n, root)
    _, fingerprint = bench_ca(root)
    template = registry_template(n, ids, root, fingerprint)
    where.mkdir(parents=True, exist_ok=True)
    for name in (pki.CA_KEY, pki.CA_CERT):
        shutil.copy2(ca_dir / name, where / name)
    cloud = CloudDir(where)
    cloud.init(mqtt=f"127.0.0.1:{mqtt_port}", http=f"127.0.0.1:{http_port}", broker=broker or "")
    shutil.copy2(template, cloud.registry_path)
    return cloud, ids, folder


# --- the simulated device (worker side) ---------------------------------------------

DESCRIBE_MODULES = [
    {"function": "bootloader", "index": 0, "version": "1.0.0", "platform": "virtual", "size": 9120,
     "crc_ok": True, "sha256_ok": True, "valid": True, "dependencies": [],
     "sha256": "9b1c" * 16},
    {"function": "system-part", "index": 1, "version": "1.1.0", "platform": "virtual", "size": 61440,
     "crc_ok": True, "sha256_ok": True, "valid": True,
     "dependencies": [{"function": "bootloader", "index": 0, "version": "1.0.0"}], "sha256": "4e07" * 16},
    {"function": "system-part", "index": 2, "version": "1.1.0", "platform": "virtual", "size": 40960,
     "crc_ok": True, "sha256_ok": True, "valid": True,
     "dependencies": [{"function": "system-part", "index": 1, "version": "1.1.0"}], "sha256": "a3f2" * 16},
    {"function": "user-part", "index": 1, "version": "1.0.0", "platform": "virtual", "size": 2048,
     "crc_ok": True, "sha256_ok": True, "valid": True,
     "dependencies": [{"function": "system-part", "index": 2, "version": "1.1.0"}], "sha256": "07c5" * 16},
]


def describe_doc() -> bytes:
    return json.dumps({
        "platform": "virtual", "board": "virtual", "mode": "normal", "safe_mode_reason": None,
        "missing": [], "reset_reason": "power-on", "vm": {"name": "micropython", "version": "1.29.0"},
        "heap_free": 104512, "app": "running", "modules": DESCRIBE_MODULES,
        "functions": ["led"], "variables": ["temperature"],
    }).encode()


class SimDevice(asyncio.Protocol):
    def __init__(self, worker: "Worker", device_id: str, pem: Path):
        self.w = worker
        self.id = device_id
        self.pem = pem
        self.base = f"devices/{device_id}/"
        self.transport = None
        self.buf = b""
        self.connack: asyncio.Future | None = None
        self.up = False
        self.lost_reason: str | None = None
        self.last_sent = 0.0
        self.next_id = 0
        self.in_flight: set[int] = set()
        self.describe_t: float | None = None
        self.closed: asyncio.Future | None = None
        self.connections = 0
        self.ctx: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        """Its TLS context (made before the ramp: ~0.8 ms of CPU each, not the cloud's)."""
        if self.ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_verify_locations(cadata=self.w.ca_der)
            ctx.load_cert_chain(str(self.pem))
            self.ctx = ctx
        return self.ctx

    def packet_id(self) -> int:
        self.next_id = self.next_id % 65535 + 1
        return self.next_id

    def send(self, data: bytes) -> None:
        self.transport.write(data)
        self.last_sent = time.monotonic()

    # asyncio.Protocol
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        from keel_cloud import mqtt_packets as mp

        self.buf += data
        while True:
            try:
                packet, used = mp.split_packet(self.buf)
            except mp.PacketError as exc:
                self.lost_reason = f"malformed packet: {exc}"
                self.transport.close()
                return
            if packet is None:
                return
            self.buf = self.buf[used:]
            t = packet.type
            if t == mp.CONNACK:
                if self.connack and not self.connack.done():
                    self.connack.set_result(mp.parse_connack(packet.body)[1])
            elif t == mp.PUBACK:
                pid = mp.parse_packet_id(packet.body)
                if pid in self.in_flight:
                    self.in_flight.discard(pid)
                    self.w.events_acked += 1
            elif t == mp.PUBLISH:
                publish = mp.parse_publish(packet.flags, packet.body)
                self.w.received += 1
                if publish.qos == 1:
                    self.send(mp.build_puback(publish.packet_id))

    def connection_lost(self, exc):
        if self.up:
            self.w.lost += 1
            reason = self.lost_reason or (repr(exc)[:120] if exc else "closed by the broker")
            self.w.lost_reasons[reason] = self.w.lost_reasons.get(reason, 0) + 1
        self.up = False
        self.in_flight.clear()  # (a real device sends them again: not needed here)
        if self.connack and not self.connack.done():
            self.connack.set_exception(ConnectionError(repr(exc) if exc else "closed before CONNACK"))
        if self.closed and not self.closed.done():
            self.closed.set_result(None)

    async def life(self, host: str, port: int, timeout: float, first: asyncio.Future) -> None:
        """The device's session (docs/protocol.md): connect; when the connection fails or
        drops, wait the backoff (1 s doubling to 60 s, plus up to 50 % jitter; back to 1 s
        after 30 s up) and connect again. `first` gets the first attempt's outcome."""
        backoff = 1.0
        while not self.w.stopping:
            t0 = time.monotonic()
            self.lost_reason = None
            try:
                await self.connect(host, port, timeout)
                self.connections += 1
                if self.connections > 1:
                    self.w.reconnects += 1
                if not first.done():
                    first.set_result(time.monotonic() - t0)
                up_at = time.monotonic()
                await self.closed
                if time.monotonic() - up_at >= 30:
                    backoff = 1.0
            except (OSError, asyncio.TimeoutError, ConnectionError, ssl.SSLError) as exc:
                reason = (type(exc).__name__ + (f": {exc}" if str(exc) else ""))[:120]
                if not first.done():
                    first.set_result(reason)
                else:
                    self.w.retry_failures[reason] = self.w.retry_failures.get(reason, 0) + 1
                if self.transport is not None:
                    self.transport.abort()
            if self.w.stopping:
                return
            await asyncio.sleep(backoff * (1 + random.random() / 2))
            backoff = min(backoff * 2, 60.0)

    async def connect(self, host: str, port: int, timeout: float) -> None:
        from keel_cloud import mqtt_packets as mp

        loop = asyncio.get_running_loop()
        self.transport = None
        self.buf = b""
        self.closed = loop.create_future()
        ctx = self.context()
        self.connack = loop.create_future()
        await asyncio.wait_for(loop.create_connection(
            lambda: self, host, port, ssl=ctx, server_hostname=SERVER_NAME,
            ssl_handshake_timeout=timeout), timeout)
        self.send(mp.build_connect(self.id, keepalive=KEEPALIVE, will_topic=self.base + "status",
                                   will_message=b"offline", will_qos=1, will_retain=True))
        code = await asyncio.wait_for(self.connack, timeout)
        if code != 0:
            self.transport.close()
            raise ConnectionError(f"CONNACK {code}")
        self.up = True
        self.send(mp.build_publish(self.base + "status", b"online", qos=1, packet_id=self.packet_id(),
                                   retain=True))
        self.send(mp.build_subscribe(self.packet_id(), [(self.base + s, 1) for s in (
            "call", "get", "inbox/#", "ota/offer", "ota/chunk")]))
        self.describe_t = time.time()
        self.send(mp.build_publish(self.base + "describe", self.w.describe, qos=1, packet_id=self.packet_id()))

    def redescribe(self) -> float | None:
        from keel_cloud import mqtt_packets as mp

        if not self.up:
            return None
        self.describe_t = time.time()
        self.send(mp.build_publish(self.base + "describe", self.w.describe, qos=1, packet_id=self.packet_id()))
        return self.describe_t

    def event(self, seq: int) -> bool:
        from keel_cloud import mqtt_packets as mp

        if not self.up or len(self.in_flight) >= MAX_IN_FLIGHT:
            return False
        pid = self.packet_id()
        self.in_flight.add(pid)
        payload = b'{"s":%d,"t":%.6f}' % (seq, time.time())
        self.send(mp.build_publish(self.base + "events/bench", payload, qos=1, packet_id=pid))
        return True


class Worker:
    """Devices in one process, driven by JSON lines on stdin; answers on stdout."""

    def __init__(self, host, port, ca_file, folder, ids):
        self.host, self.port, self.ca_file = host, port, ca_file
        self.ca_der = ssl.PEM_cert_to_DER_cert(Path(ca_file).read_text())
        self.describe = describe_doc()
        self.devices = [SimDevice(self, i, Path(folder) / f"{i}.pem") for i in ids]
        self.lost = 0
        self.lost_reasons: dict[str, int] = {}
        self.received = 0
        self.events_acked = 0
        self.reconnects = 0
        self.retry_failures: dict[str, int] = {}
        self.stopping = False
        self.sessions: list[asyncio.Task] = []

    async def ramp(self, rate: float, timeout: float) -> dict:
        """Start every device's session, `rate` per second; wait for each one's first
        attempt."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        firsts = []
        for k, dev in enumerate(self.devices):
            delay = started + k / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            first = loop.create_future()
            firsts.append(first)
            self.sessions.append(asyncio.create_task(dev.life(self.host, self.port, timeout, first)))
        launched = time.monotonic() - started
        outcomes = await asyncio.gather(*firsts)
        connect_times = [o for o in outcomes if isinstance(o, float)]
        failures: dict[str, int] = {}
        for o in outcomes:
            if isinstance(o, str):
                failures[o] = failures.get(o, 0) + 1
        return {"connected": len(connect_times), "failures": failures,
                "launch_s": launched, "ramp_s": time.monotonic() - started,
                "connect_s": connect_times}

    async def keepalive(self):
        from keel_cloud import mqtt_packets as mp

        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for dev in self.devices:
                if dev.up and now - dev.last_sent >= KEEPALIVE:
                    dev.send(mp.PINGREQ_BYTES)

    async def events(self, rate: float, seconds: float, seq0: int, stride: int) -> dict:
        started = time.monotonic()
        sent = held = 0
        seq = seq0
        k = 0
        n = len(self.devices)
        first = time.time()
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= seconds:
                break
            due = int(elapsed * rate) - (sent + held)
            for _ in range(due):
                dev = self.devices[k % n]
                k += 1
                if dev.event(seq):
                    sent += 1
                    seq += stride
                else:
                    held += 1
            await asyncio.sleep(0.005)
        return {"sent": sent, "held": held, "t_first": first, "t_last": time.time(),
                "offered_s": time.monotonic() - started}

    async def describes(self, rate: float, seconds: float) -> dict:
        """Describes (as after a state change) from distinct devices, `rate` per second."""
        started = time.monotonic()
        sent: dict[str, float] = {}
        k = 0
        while time.monotonic() - started < seconds and k < len(self.devices):
            due = int((time.monotonic() - started) * rate) - len(sent)
            while due > 0 and k < len(self.devices):
                dev = self.devices[k]
                k += 1
                t = dev.redescribe()
                if t is not None:
                    sent[dev.id] = t
                    due -= 1
            await asyncio.sleep(0.005)
        return {"describe_t": sent}

    def status(self) -> dict:
        return {"up": sum(1 for d in self.devices if d.up), "lost": self.lost,
                "lost_reasons": self.lost_reasons, "events_acked": self.events_acked,
                "received": self.received, "reconnects": self.reconnects,
                "retry_failures": self.retry_failures,
                "describe_t": {d.id: d.describe_t for d in self.devices if d.up and d.describe_t}}


def worker_main(argv: list[str]) -> int:
    """`fleet_scale.py _devices HOST PORT CA FOLDER IDS_FILE`: devices on JSON lines."""
    host, port, ca_file, folder, ids_file = argv
    raise_nofile()
    ids = Path(ids_file).read_text().split()
    worker = Worker(host, int(port), ca_file, folder, ids)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    commands: asyncio.Queue = asyncio.Queue()

    def read_stdin():
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(commands.put_nowait, {"cmd": "stop"})

    threading.Thread(target=read_stdin, daemon=True).start()

    def answer(doc):
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    for dev in worker.devices:
        dev.context()

    async def main():
        pinger = asyncio.create_task(worker.keepalive())
        answer({"ready": True})
        while True:
            cmd = await commands.get()
            what = cmd["cmd"]
            if what == "ramp":
                answer(await worker.ramp(cmd["rate"], cmd["timeout"]))
            elif what == "status":
                answer(worker.status())
            elif what == "describes":
                answer(await worker.describes(cmd["rate"], cmd["seconds"]))
            elif what == "events":
                answer(await worker.events(cmd["rate"], cmd["seconds"], cmd["seq0"], cmd["stride"]))
            elif what == "stop":
                worker.stopping = True
                pinger.cancel()
                for dev in worker.devices:
                    if dev.transport is not None:
                        dev.transport.abort()
                answer({"stopped": True})
                return

    loop.run_until_complete(main())
    sys.stdout.flush()
    os._exit(0)


class Workers:
    """The device worker processes (orchestrator side)."""

    def __init__(self, host, port, ca_file, folder, ids, scratch: Path):
        count = max(1, min(MAX_WORKERS, -(-len(ids) // PER_WORKER)))
        self.procs = []
        for w in range(count):
            ids_file = scratch / f"ids-{w}.txt"
            ids_file.write_text("\n".join(ids[w::count]) + "\n")
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "_devices", host, str(port), str(ca_file),
                 str(folder), str(ids_file)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=raise_nofile)
            self.procs.append(proc)
        for proc in self.procs:
            self._read(proc)

    def _read(self, proc, timeout: float = 120.0):
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a device worker exited ({proc.wait()})")
        return json.loads(line)

    def ask(self, cmd: dict, per_worker=None) -> list[dict]:
        for k, proc in enumerate(self.procs):
            doc = dict(cmd)
            if per_worker:
                doc.update(per_worker(k, len(self.procs)))
            proc.stdin.write(json.dumps(doc) + "\n")
            proc.stdin.flush()
        return [self._read(proc) for proc in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.write('{"cmd": "stop"}\n')
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# --- the baseline's subscriber ------------------------------------------------------

def subscriber_main(argv: list[str]) -> int:
    """`fleet_scale.py _subscriber HOST PORT CA PEM`: a paho client with the fleet
    service's identity and subscriptions that timestamps what arrives. Prints "ready",
    then on "report" (stdin) a JSON line of {describe: {id: t}, events: [[t_recv, t_sent]]}."""
    import paho.mqtt.client as mqtt

    host, port, ca_file, pem = argv
    raise_nofile()
    describes: dict[str, float] = {}
    events: list[tuple[float, float]] = []
    connected = threading.Event()

    def on_connect(client, userdata, flags, reason, properties=None):
        for topic in ("status", "describe", "events/#", "reply", "ota/status"):
            client.subscribe(f"devices/+/{topic}", qos=1)
        connected.set()

    def on_message(client, userdata, msg):
        now = time.time()
        parts = msg.topic.split("/", 3)
        if len(parts) < 3:
            return
        if parts[2] == "describe":
            describes[parts[1]] = now  # the latest
        elif parts[2] == "events":
            try:
                events.append((now, json.loads(msg.payload)["t"]))
            except (ValueError, KeyError):
                pass

    from keel_cloud import pki

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=pki.SERVICE_CN, clean_session=True)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.load_cert_chain(pem)
    client.tls_set_context(ctx)
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(host, int(port), keepalive=30)
    client.loop_start()
    if not connected.wait(10):
        print(json.dumps({"error": "not connected"}), flush=True)
        return 1
    time.sleep(0.3)  # the SUBACKs
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "report":
            print(json.dumps({"describe": dict(describes), "events": list(events)}), flush=True)
        elif cmd["cmd"] == "count":
            print(json.dumps({"events": len(events), "last": events[-1][0] if events else None}), flush=True)
        elif cmd["cmd"] == "stop":
            break
    client.disconnect()
    client.loop_stop()
    return 0


class Subscriber:
    """The baseline's subscriber process."""

    def __init__(self, host, port, ca_file, pem):
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_subscriber", host, str(port), str(ca_file), str(pem)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = json.loads(self.proc.stdout.readline() or '{"error": "exited"}')
        if not ready.get("ready"):
            raise RuntimeError(f"baseline subscriber: {ready}")

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self):
        try:
            self.proc.stdin.write('{"cmd": "stop"}\n')
            self.proc.stdin.flush()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(5)


# --- keel subscribe, counted --------------------------------------------------------

class KeelSubscribe:
    """A real `keel subscribe --json` process; each printed event is timestamped."""

    def __init__(self, cloud_path: Path):
        env = dict(os.environ, KEEL_CLOUD=str(cloud_path))
        self.proc = subprocess.Popen([str(BIN / "keel"), "subscribe", "--json"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events: list[tuple[float, float]] = []  # (t printed, t sent)
        self.bad = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for raw in self.proc.stdout:
            now = time.time()
            try:
                event = json.loads(raw)
                self.events.append((now, json.loads(event["data"])["t"]))
            except (ValueError, KeyError, TypeError):
                self.bad += 1

    def stop(self):
        stop_process(self.proc, 5)


# --- the servers ------------------------------------------------------------------

class Mosquitto:
    def __init__(self, cloud, scratch: Path):
        from keel_cloud.mosquitto import write_config

        if not MOSQUITTO.exists():
            raise RuntimeError(f"{MOSQUITTO} is missing: install Debian's mosquitto (make mosquitto)")
        self.port = free_port()
        user = "root" if os.geteuid() == 0 else None
        conf = write_config(cloud, scratch / "mosquitto", port=self.port, listen="127.0.0.1", user=user)
        self.log_file = scratch / "mosquitto.log"
        with open(self.log_file, "wb") as out:
            self.proc = subprocess.Popen([str(MOSQUITTO), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=raise_nofile)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_file.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not listen")
                time.sleep(0.05)

    def stop(self):
        stop_process(self.proc)
        if os.environ.get("FLEET_DEBUG"):
            shutil.copy(self.log_file, os.environ["FLEET_DEBUG"] + ".mosquitto")


class CloudServe:
    """`keel cloud serve` in a child process (instance NAME of several, with instance)."""

    def __init__(self, cloud, broker: str | None, instance: str | None = None, http: str | None = None):
        from keel_cloud.config import parse_address

        cmd = [str(BIN / "keel"), "cloud", "serve", "--data", str(cloud.path)]
        if broker:
            cmd += ["--broker", broker]
        if instance:
            cmd += ["--instance", instance]
        if http:
            cmd += ["--http", http]
        if os.environ.get("FLEET_DEBUG"):
            cmd.append("-v")
        self.cloud = cloud
        self.started = time.monotonic()
        # (the default finds Mosquitto in /usr/sbin, which a user's PATH may not have)
        env = dict(os.environ, KEEL_MOSQUITTO=str(MOSQUITTO))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     preexec_fn=raise_nofile, start_new_session=True, env=env)
        self.output: list[str] = []
        for line in self.proc.stdout:
            self.output.append(line)
            if line.startswith("Keel Cloud") and "devices connect to" in line:
                break
        else:
            stop_process(self.proc)
            raise RuntimeError(f"keel cloud serve did not start: {''.join(self.output)[-3000:]}")
        self.start_s = time.monotonic() - self.started
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()
        host, port = parse_address(http or cloud.config().http, 8780)
        self.api = f"http://{host}:{port}/api"
        self.token = cloud.token()
        self.spy = None
        if os.environ.get("FLEET_PYSPY"):  # profiling: `py-spy record` of the cloud, raw stacks
            out = Path(os.environ["FLEET_PYSPY"]) / f"cloud-{os.getpid()}-{self.proc.pid}.txt"
            self.spy = subprocess.Popen([os.environ.get("PYSPY", "py-spy"), "record", "--threads", "--format", "raw",
                                         "-r", "50", "-o", str(out), "-p", str(self.proc.pid)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def devices(self) -> list[dict]:
        request = urllib.request.Request(self.api + "/devices")
        request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def stop(self):
        if self.spy is not None:
            self.spy.send_signal(signal.SIGINT)
            try:
                self.spy.wait(30)
            except subprocess.TimeoutExpired:
                self.spy.kill()
        stop_process(self.proc)
        if os.environ.get("FLEET_DEBUG"):
            Path(os.environ["FLEET_DEBUG"]).write_text("".join(self.output))


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- one run ----------------------------------------------------------------------

def read_registry(cloud) -> dict[str, tuple]:
    """{device id: (last_seen, online, has describe)} from the registry (SQLite read-only,
    or the PostgreSQL database cloud.json names)."""
    sql = "SELECT id, last_seen, online, describe IS NOT NULL FROM devices"
    database = cloud.config().database
    if database:
        import psycopg

        with psycopg.connect(database, autocommit=True) as conn:
            rows = conn.execute(sql).fetchall()
    else:
        db = sqlite3.connect(f"file:{cloud.registry_path}?mode=ro", uri=True, timeout=30)
        try:
            rows = db.execute(sql).fetchall()
        finally:
            db.close()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def registry_in_postgres(cloud, ids: list[str], url: str) -> None:
    """The n devices registered in a PostgreSQL registry (the schema the registry makes,
    the rows in one transaction: what Registry.add_device writes for each), named in
    cloud.json."""
    import psycopg

    from keel_cloud.registry import Registry

    started = time.monotonic()
    Registry(url).close()
    now = time.time()
    with psycopg.connect(url) as conn, conn.cursor() as cursor:
        cursor.executemany("INSERT INTO devices (id, name, platform, online, created) "
                           "VALUES (%s, %s, 'virtual', 0, %s)",
                           [(device_id, f"sim{k:05d}", now) for k, device_id in enumerate(ids)])
    config = cloud.config()
    config.database = url
    cloud.save_config(config)
    log(f"registered {len(ids)} devices in PostgreSQL in {time.monotonic() - started:.1f} s")


def one_run(setup: str, n: int, scratch: Path, *, ramp: float = RAMP, hold: float = HOLD,
            events_rate: float = EVENTS_RATE, events_s: float = EVENTS_S, drain: float = DRAIN,
            describe_rate: float = DESCRIBE_RATE, describe_s: float = DESCRIBE_S, say=log) -> dict:
    """One run of `setup` ('embedded', 'mosquitto', 'instances': keel cloud serve, see
    FULL; 'bare': the baseline) with n devices. Returns the measurements."""
    from keel_cloud import pki

    raise_nofile()
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    mqtt_port, http_port = free_port(), free_port()
    cloud, ids, folder = make_cloud_dir(scratch / "cloud", n, mqtt_port, http_port, None)
    out: dict = {"setup": setup, "devices": n, "ramp_rate": ramp, "hold_s": hold}
    mosquitto = serve = second = sub = ksub = workers = postgres = None
    try:
        host, port = "127.0.0.1", mqtt_port
        if setup == "bare":
            mosquitto = Mosquitto(cloud, scratch)
            port = mosquitto.port
            sub = Subscriber(host, port, cloud.path / pki.CA_CERT, cloud.path / pki.SERVICE_PEM)
        elif setup == "instances":
            try:
                from bench.postgres import PostgresServer
            except ImportError:  # run as a script: bench/ is on the path
                from postgres import PostgresServer

            postgres = PostgresServer().start()
            registry_in_postgres(cloud, ids, postgres.database("keel_fleet"))
            serve = CloudServe(cloud, None, instance="a")  # runs Mosquitto, on mqtt_port
            second = CloudServe(cloud, f"mqtts://127.0.0.1:{mqtt_port}", instance="b",
                                http=f"127.0.0.1:{free_port()}")
        else:  # the embedded broker asked for; else the default: Mosquitto, run by serve
            serve = CloudServe(cloud, "embedded" if setup == "embedded" else None)
        if serve is not None:
            out["cloud_start_s"] = round(serve.start_s, 2)
            ksub = KeelSubscribe(cloud.path)
        workers = Workers(host, port, cloud.path / pki.CA_CERT, folder, ids, scratch)

        # Connect, hold, count.
        t0 = time.monotonic()
        ramps = workers.ask({"cmd": "ramp", "timeout": CONNECT_TIMEOUT}, lambda k, m: {"rate": ramp / m})
        connected = sum(r["connected"] for r in ramps)
        failures: dict[str, int] = {}
        for r in ramps:
            for reason, count in r["failures"].items():
                failures[reason] = failures.get(reason, 0) + count
        connect_s = [x for r in ramps for x in r["connect_s"]]
        out.update(connected=connected, connect_failures=failures,
                   ramp_s=round(max(r["ramp_s"] for r in ramps), 2),
                   connect_p50_ms=_ms(pct(connect_s, 50)), connect_p99_ms=_ms(pct(connect_s, 99)))
        say(f"{setup} {n}: {connected} connected in {out['ramp_s']} s"
            + (f", failures {failures}" if failures else ""))
        time.sleep(hold)
        status = workers.ask({"cmd": "status"})
        held = sum(s["up"] for s in status)
        lost: dict[str, int] = {}
        for s in status:
            for reason, count in list(s["lost_reasons"].items()) + list(s["retry_failures"].items()):
                lost[reason] = lost.get(reason, 0) + count
        out.update(held=held, dropped=sum(s["lost"] for s in status),
                   reconnects=sum(s["reconnects"] for s in status), lost=lost)
        # the describe each device still up sent last
        sent_t = {k: v for s in status for k, v in s["describe_t"].items()}

        # Describe latency: the describes of the connect ramp, then steady describes.
        if serve is not None:
            listed = serve.devices()
            out["online_listed"] = sum(1 for d in listed if d["online"])

        def latencies(sent_t: dict, prefix: str) -> None:
            now = time.time()
            if serve is not None:
                rows = read_registry(cloud)
                recorded = {i: rows[i][0] for i, t in sent_t.items()
                            if i in rows and rows[i][2] and rows[i][0] and rows[i][0] >= t}
            else:
                seen = sub.ask("report")["describe"]
                recorded = {i: seen[i] for i, t in sent_t.items() if i in seen and seen[i] >= t}
            # A describe not recorded yet counts as (now - sent): a lower bound. A
            # percentile that lands on one of those is a lower bound too ("censored").
            lat = sorted(((recorded[i] if i in recorded else now) - t, i in recorded)
                         for i, t in sent_t.items()) or [(float("nan"), True)]
            p50, p99 = pct(lat, 50), pct(lat, 99)
            out[f"{prefix}describes"] = len(sent_t)
            out[f"{prefix}recorded"] = len(recorded)
            out[f"{prefix}p50_ms"] = _ms(p50[0])
            out[f"{prefix}p99_ms"] = _ms(p99[0])
            out[f"{prefix}p99_censored"] = not p99[1]
            out[f"{prefix}max_ms"] = _ms(lat[-1][0])
            say(f"{setup} {n}: {prefix.replace('_', ' ')}p50 {out[prefix + 'p50_ms']} ms p99 "
                f"{'>= ' if not p99[1] else ''}{out[prefix + 'p99_ms']} ms ({len(recorded)}/{len(sent_t)} recorded)")

        say(f"{setup} {n}: held {held} ({out['dropped']} dropped, {out['reconnects']} reconnected)")
        latencies(sent_t, "ramp_describe_")
        steady = workers.ask({"cmd": "describes", "seconds": describe_s},
                             lambda k, m: {"rate": describe_rate / m})
        steady_t = {k: v for r in steady for k, v in r["describe_t"].items()}
        time.sleep(1.0)  # the last ones' way through
        out["steady_rate"] = describe_rate
        out["steady_s"] = describe_s
        if serve is not None:  # the registry is read after the HTTP API is asked
            listed = serve.devices()
        latencies(steady_t, "describe_")

        # Events.
        before = len(ksub.events) if ksub else sub.ask("count")["events"]
        results = workers.ask({"cmd": "events", "seconds": events_s},
                              lambda k, m: {"rate": events_rate / m, "seq0": k, "stride": m})
        sent = sum(r["sent"] for r in results)
        first_sent = min(r["t_first"] for r in results)
        last_sent = max(r["t_last"] for r in results)

        def arrived():
            if ksub:
                return len(ksub.events) - before
            return sub.ask("count")["events"] - before

        deadline = time.monotonic() + drain
        count, still = arrived(), time.monotonic()
        while count < sent and time.monotonic() < deadline:
            time.sleep(0.25)
            now_count = arrived()
            if now_count != count:
                count, still = now_count, time.monotonic()
            elif time.monotonic() - still > QUIET:
                break  # nothing more for a while: the rest is lost
        evs = ksub.events[before:] if ksub else sub.ask("report")["events"][before:]
        got = len(evs)
        last_arrival = max((e[0] for e in evs), default=None)
        window = (last_arrival - first_sent) if last_arrival else None
        ev_lat = [e[0] - e[1] for e in evs]
        out.update(events_offered_rate=events_rate, events_s=events_s, events_sent=sent,
                   events_held_back=sum(r["held"] for r in results),
                   events_sent_rate=round(sent / max(1e-9, last_sent - first_sent), 1),
                   events_received=got,
                   events_per_s=round(got / window, 1) if window else 0.0,
                   event_p50_ms=_ms(pct(ev_lat, 50)), event_p99_ms=_ms(pct(ev_lat, 99)))
        say(f"{setup} {n}: events {got}/{sent} through, {out['events_per_s']}/s "
            f"(sent at {out['events_sent_rate']}/s), latency p50 {out['event_p50_ms']} ms")
        out["held_end"] = sum(s["up"] for s in workers.ask({"cmd": "status"}))
        if serve is not None:  # describes that reached the registry late, or never
            rows = read_registry(cloud)
            out["ramp_recorded_end"] = sum(1 for i in sent_t if i in rows and rows[i][2])
        else:
            seen = sub.ask("report")["describe"]
            out["ramp_recorded_end"] = sum(1 for i in sent_t if i in seen)
    finally:
        # The cloud first, so that it does not write 10,000 offline states as it stops.
        for part in (ksub, second, serve, sub, workers, mosquitto):
            if part is not None:
                try:
                    part.stop()
                except Exception as exc:  # noqa: BLE001 - teardown goes on
                    say(f"stopping {type(part).__name__}: {exc}")
        if postgres is not None:
            postgres.remove()
    out["run_s"] = round(time.monotonic() - started, 1)
    return out


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000, 1)


# --- the figure ---------------------------------------------------------------------

def phases(smoke: bool) -> dict:
    """one_run's options for the figure, or for the smoke run."""
    if smoke:
        return dict(ramp=RAMP, hold=0.5, describe_rate=20, describe_s=0.5, events_rate=100, events_s=1.0,
                    drain=5.0)
    return dict(ramp=RAMP, hold=HOLD, describe_rate=DESCRIBE_RATE, describe_s=DESCRIBE_S,
                events_rate=EVENTS_RATE, events_s=EVENTS_S, drain=DRAIN)


def measure(setups: dict[str, int], runs: int, scratch: Path, say=log, **options) -> dict:
    """For each setup (embedded, mosquitto: N devices), `runs` runs of Keel interleaved
    with runs of the baseline (bare Mosquitto, same N). {setup: {"keel": [...], "baseline": [...]}}"""
    results = {}
    for setup, n in setups.items():
        results[setup] = {"keel": [], "baseline": []}
        for k in range(runs):
            for kind, which in (("keel", setup), ("baseline", "bare")):
                where = Path(tempfile.mkdtemp(prefix=f"fleet-{which}-", dir=scratch))
                try:
                    results[setup][kind].append(one_run(which, n, where, say=say, **options))
                finally:
                    shutil.rmtree(where, ignore_errors=True)
    return results


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_devices":
        return worker_main(argv[1:])
    if argv and argv[0] == "_subscriber":
        return subscriber_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="20 devices per setup, one run, short phases")
    parser.add_argument("--setup", choices=list(FULL), action="append",
                        help="only this setup (repeatable)")
    parser.add_argument("-n", "--devices", type=int, help="devices (instead of 1000 / 10000)")
    parser.add_argument("--runs", type=int, help="runs of each (default 3; 1 with --smoke)")
    parser.add_argument("--only", choices=["keel", "bare"], help="one side only (no interleaving)")
    parser.add_argument("--ramp", type=float, default=RAMP)
    parser.add_argument("--hold", type=float)
    parser.add_argument("--events-rate", type=float)
    parser.add_argument("--events-s", type=float)
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    setups = {s: args.devices or sizes[s] for s in (args.setup or list(FULL))}
    options = phases(args.smoke)
    options["ramp"] = args.ramp
    if args.hold is not None:
        options["hold"] = args.hold
    if args.events_rate is not None:
        options["events_rate"] = args.events_rate
    if args.events_s is not None:
        options["events_s"] = args.events_s
    runs = args.runs or (1 if args.smoke else 3)
    scratch = Path(tempfile.mkdtemp(prefix="keel-fleet-"))
    started = time.monotonic()
    try:
        if args.only:
            results = {}
            for setup, n in setups.items():
                which = setup if args.only == "keel" else "bare"
                results[setup] = {args.only: [one_run(which, n, scratch / f"{setup}-{k}", **options)
                                              for k in range(runs)]}
        else:
            results = measure(setups, runs, scratch, **options)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for setup, sides in results.items():
        for side, rs in sides.items():
            for r in rs:
                print(json.dumps({"side": side, **{k: v for k, v in r.items() if k != "connect_failures"},
                                  "connect_failures": r.get("connect_failures")}))
    log(f"total {time.monotonic() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
