"""Fixtures for the cloud tests: a cloud directory, the embedded broker (amqtt behind the
gate) and a real Mosquitto, both on ephemeral 127.0.0.1 ports, device identities signed
by the cloud's CA, and MQTT clients (paho-mqtt over TLS, and a raw TLS socket for the
cases paho will not produce)."""

import asyncio
import os
import queue
import sys
import secrets
import socket
import ssl
import struct
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from keel_cloud import mqtt_packets as mp
from keel_cloud import pki
from keel_cloud.broker import EmbeddedBroker
from keel_cloud.config import CloudDir
from keel_cloud.mosquitto import write_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.postgres import PostgresError, PostgresServer  # noqa: E402

MOSQUITTO = Path("/usr/sbin/mosquitto")
SERVER_NAME = "localhost"
WAIT = 5.0  # bound for anything that should happen
QUIET = 1.0  # how long "nothing arrives" is watched


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_device_id() -> str:
    return secrets.token_hex(12)


@dataclass
class Ident:
    cn: str
    cert_file: Path
    key_file: Path | None = None  # None: the key is in cert_file


@dataclass
class BrokerUnderTest:
    kind: str  # "embedded" or "mosquitto"
    host: str
    port: int
    cloud: CloudDir
    embedded: EmbeddedBroker | None = None
    loop: asyncio.AbstractEventLoop | None = None
    process: subprocess.Popen | None = None
    log_file: Path | None = None

    @property
    def ca_file(self) -> Path:
        return self.cloud.path / pki.CA_CERT

    @property
    def service(self) -> Ident:
        return Ident(pki.SERVICE_CN, self.cloud.path / pki.SERVICE_PEM)

    def run(self, coro, timeout: float = 10.0):
        """Run a coroutine on the embedded broker's loop (from the test's thread)."""
        assert self.loop is not None, "only the embedded broker has a loop"
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@pytest.fixture(scope="session")
def cloud(tmp_path_factory) -> CloudDir:
    cloud_dir = CloudDir(tmp_path_factory.mktemp("keel") / "cloud")
    cloud_dir.init(mqtt=f"127.0.0.1:{free_port()}", http=f"127.0.0.1:{free_port()}")
    return cloud_dir


@pytest.fixture(scope="session")
def embedded_broker(cloud):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="embedded-broker", daemon=True)
    thread.start()
    broker = EmbeddedBroker(cloud)
    try:
        asyncio.run_coroutine_threadsafe(broker.start(), loop).result(15)
        host, port = broker.public_address
        yield BrokerUnderTest("embedded", host, port, cloud, embedded=broker, loop=loop)
    finally:
        try:
            asyncio.run_coroutine_threadsafe(broker.stop(), loop).result(20)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            if not thread.is_alive():
                loop.close()


@contextmanager
def running_mosquitto(cloud_dir: CloudDir, out: Path):
    """A Mosquitto for the cloud directory (keel_cloud.mosquitto's configuration) on a free
    127.0.0.1 port: yields (process, port, log file)."""
    if not MOSQUITTO.exists():
        pytest.fail(f"{MOSQUITTO} is missing: install Debian's mosquitto (make mosquitto)")
    port = free_port()
    # Started as root, Mosquitto switches to the 'mosquitto' account before it reads the
    # key, which is readable by its owner only.
    user = "root" if os.geteuid() == 0 else None
    conf = write_config(cloud_dir, out, port=port, listen="127.0.0.1", user=user)
    log_file = out / "mosquitto.log"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([str(MOSQUITTO), "-c", str(conf)], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mosquitto exited ({proc.returncode}):\n{log_file.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"mosquitto did not listen on {port}:\n{log_file.read_text()}")
                time.sleep(0.05)
        yield proc, port, log_file
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="session")
def mosquitto_broker(cloud, tmp_path_factory):
    with running_mosquitto(cloud, tmp_path_factory.mktemp("mosquitto")) as (proc, port, log_file):
        yield BrokerUnderTest("mosquitto", "127.0.0.1", port, cloud, process=proc,
                              log_file=log_file)


@pytest.fixture(params=["embedded", "mosquitto"])
def broker(request) -> BrokerUnderTest:
    return request.getfixturevalue(f"{request.param}_broker")


@pytest.fixture(scope="session")
def make_identity(cloud, tmp_path_factory):
    """make_identity(cn=None, ca=None) -> Ident: a key and certificate (CN = cn, or a new
    device id) signed by the cloud's CA, or by another CA."""
    out = tmp_path_factory.mktemp("identities")
    cloud_ca = cloud.ca()

    def make(cn: str | None = None, ca: pki.CertificateAuthority | None = None) -> Ident:
        cn = cn or new_device_id()
        identity = (ca or cloud_ca).issue(cn)
        stem = f"{cn}-{secrets.token_hex(4)}"
        cert_file, key_file = out / f"{stem}.crt", out / f"{stem}.key"
        cert_file.write_bytes(identity.cert_pem)
        key_file.write_bytes(identity.key_pem)
        return Ident(cn, cert_file, key_file)

    return make


def client_context(broker: BrokerUnderTest, ident: Ident | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(broker.ca_file))
    if ident is not None:
        ctx.load_cert_chain(str(ident.cert_file), str(ident.key_file) if ident.key_file else None)
    return ctx


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class PahoClient:
    """A paho-mqtt client over TLS, its network loop in paho's thread; records what it
    receives and whether it was disconnected."""

    def __init__(self, broker: BrokerUnderTest, ident: Ident, client_id: str | None = None,
                 will: tuple[str, bytes] | None = None, keepalive: int = 30):
        self.ident = ident
        self.messages: queue.Queue[Message] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connect_result = None
        self._subacks: dict[int, list] = {}
        self._suback_event = threading.Condition()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or ident.cn,
                        protocol=mqtt.MQTTv311, clean_session=True)
        c.tls_set_context(client_context(broker, ident))
        if will:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.client = c
        c.connect(broker.host, broker.port, keepalive=keepalive)
        c.loop_start()
        if not self.connected.wait(WAIT):
            c.loop_stop()
            raise AssertionError(f"{ident.cn} did not connect: {self.connect_result}")
        if self.connect_result.is_failure:
            c.loop_stop()
            raise AssertionError(f"{ident.cn} was refused: {self.connect_result}")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connect_result = reason_code
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnected.set()

    def _on_message(self, client, userdata, msg):
        self.messages.put(Message(msg.topic, msg.payload, bool(msg.retain), msg.qos))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._suback_event:
            self._subacks[mid] = [rc.value for rc in reason_codes]
            self._suback_event.notify_all()

    def subscribe(self, topic_filter: str, qos: int = 1) -> list[int]:
        """Subscribe and wait for the SUBACK; its return codes."""
        with self._suback_event:
            result, mid = self.client.subscribe(topic_filter, qos)
            assert result == mqtt.MQTT_ERR_SUCCESS
            ok = self._suback_event.wait_for(lambda: mid in self._subacks, WAIT)
        assert ok, f"no SUBACK for {topic_filter}"
        return self._subacks.pop(mid)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(WAIT)
            assert info.is_published(), f"{topic}: not acknowledged"

    def expect(self, topic: str, timeout: float = WAIT) -> Message:
        """The next message on topic (others received meanwhile are kept aside)."""
        deadline = time.monotonic() + timeout
        aside = []
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.ident.cn}: nothing on {topic} within {timeout} s"
                                         f" (got {[m.topic for m in aside]})")
                try:
                    msg = self.messages.get(timeout=left)
                except queue.Empty:
                    continue
                if msg.topic == topic:
                    return msg
                aside.append(msg)
        finally:
            for msg in aside:
                self.messages.put(msg)

    def received(self, within: float = QUIET) -> list[Message]:
        """Everything received within the next `within` seconds (and before)."""
        time.sleep(within)
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


class RawClient:
    """A bare TLS socket speaking MQTT bytes, for the cases a library will not produce."""

    def __init__(self, broker: BrokerUnderTest, ident: Ident | None, timeout: float = WAIT,
                 context: ssl.SSLContext | None = None, port: int | None = None):
        ctx = context or client_context(broker, ident)
        sock = socket.create_connection((broker.host, port or broker.port), timeout=timeout)
        try:
            self.sock = ctx.wrap_socket(sock, server_hostname=SERVER_NAME)
        except BaseException:
            sock.close()
            raise
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_packet(self, timeout: float = WAIT) -> mp.Packet | None:
        """The next packet; None when the connection closed (EOF, reset, TLS alert).
        socket.timeout (TimeoutError) if nothing arrives in time."""
        deadline = time.monotonic() + timeout
        while True:
            packet, used = mp.split_packet(self.buf)
            if packet is not None:
                self.buf = self.buf[used:]
                return packet
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no packet")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (ConnectionError, ssl.SSLError):
                return None
            if not data:
                return None
            self.buf += data

    def connect(self, client_id: str, timeout: float = WAIT, **kwargs) -> int | None:
        """Send CONNECT; the CONNACK return code, or None if the connection closed."""
        self.send(mp.build_connect(client_id, **kwargs))
        packet = self.read_packet(timeout)
        if packet is None:
            return None
        assert packet.type == mp.CONNACK, packet
        return mp.parse_connack(packet.body)[1]

    def closed_within(self, timeout: float) -> bool:
        """True if the peer closes the connection within timeout (packets are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                if self.read_packet(left) is None:
                    return True
            except TimeoutError:
                return False

    def kill(self) -> None:
        """Drop the connection the hard way: a TCP reset, no DISCONNECT, no TLS close."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Clients:
    broker: BrokerUnderTest
    make_identity: object
    opened: list = field(default_factory=list)
    _service: PahoClient | None = None

    def paho(self, ident: Ident, **kwargs) -> PahoClient:
        client = PahoClient(self.broker, ident, **kwargs)
        self.opened.append(client)
        return client

    def device(self, **kwargs) -> PahoClient:
        return self.paho(self.make_identity(), **kwargs)

    def service(self) -> PahoClient:
        """The fleet service's client (one per test: every connection of the service has
        the client id keel-service, and a second one would take the first one over)."""
        if self._service is None:
            self._service = self.paho(self.broker.service)
        return self._service

    def raw(self, ident: Ident | None, **kwargs) -> RawClient:
        client = RawClient(self.broker, ident, **kwargs)
        self.opened.append(client)
        return client

    def close_all(self) -> None:
        for client in reversed(self.opened):
            try:
                client.close()
            except Exception:  # noqa: BLE001 - teardown goes on
                pass
        self.opened.clear()
        self._service = None


@pytest.fixture
def clients(broker, make_identity):
    """Clients for the `broker` under test, closed after the test."""
    made = Clients(broker, make_identity)
    yield made
    made.close_all()


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for this session (bench/postgres.py)."""
    try:
        server = PostgresServer()
        server.start()
    except PostgresError as e:
        pytest.fail(str(e))
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def postgres_url(postgres_server):
    """The URL of a database on the session's PostgreSQL server."""
    return postgres_server.database("keel_registry")


@pytest.fixture(scope="session")
def systems(tmp_path_factory):
    """System 1.0.0 and 1.1.0 for the virtual board, built once: {version: directory}."""
    from keel import build

    out = {}
    for version in ("1.0.0", "1.1.0"):
        out[version] = tmp_path_factory.mktemp(f"system{version}")
        build.build_system("virtual", version, out[version])
    return out
