"""The embedded broker (amqtt behind the gate) with many devices connecting at once.

amqtt 0.12.1 replays, to every client that connects, the retained messages matching
every client's subscriptions, iterating its subscriptions dict across awaits: with
devices subscribing meanwhile it raised "dictionary changed size during iteration" and
dropped the connecting device (keel_cloud.broker.KeelBroker fixes both). Here 200 TLS
devices, each with its own certificate, connect concurrently the way a device does
(will, retained `online`, one SUBSCRIBE), all must be held, nothing outside a device's
own subscriptions may reach the gate, and retained messages still reach a client that
subscribes after they were published."""

import asyncio
import secrets
import socket
import ssl

from keel_cloud import mqtt_packets as mp
from keel_cloud import pki
from keel_cloud.broker import EmbeddedBroker
from keel_cloud.config import CloudDir

SERVER_NAME = "localhost"
DEVICES = 200
TIMEOUT = 60.0
DEVICE_FILTERS = ("call", "get", "inbox/#", "ota/offer", "ota/chunk")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """A minimal asyncio MQTT 3.1.1 client over TLS."""

    def __init__(self, cn: str, context: ssl.SSLContext):
        self.cn = cn
        self.context = context
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buf = b""
        self.publishes: list[mp.Publish] = []
        self.subacks: dict[int, list[int]] = {}
        self.closed = False
        self._next_id = 0
        self._reading: asyncio.Task | None = None
        self._suback = asyncio.Event()

    def packet_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def connect(self, host: str, port: int, will: str | None = None) -> int:
        self.reader, self.writer = await asyncio.open_connection(
            host, port, ssl=self.context, server_hostname=SERVER_NAME)
        self.writer.write(mp.build_connect(self.cn, keepalive=60, will_topic=will,
                                           will_message=b"offline", will_qos=1,
                                           will_retain=True))
        packet = await self._packet()
        assert packet is not None and packet.type == mp.CONNACK, packet
        code = mp.parse_connack(packet.body)[1]
        if code == 0:
            self._reading = asyncio.ensure_future(self._read())
        return code

    async def _packet(self) -> mp.Packet | None:
        while True:
            packet, used = mp.split_packet(self.buf)
            if packet is not None:
                self.buf = self.buf[used:]
                return packet
            try:
                data = await self.reader.read(65536)
            except (ConnectionError, ssl.SSLError):
                data = b""
            if not data:
                return None
            self.buf += data

    async def _read(self) -> None:
        while (packet := await self._packet()) is not None:
            if packet.type == mp.PUBLISH:
                publish = mp.parse_publish(packet.flags, packet.body)
                self.publishes.append(publish)
                if publish.qos == 1:
                    self.writer.write(mp.build_puback(publish.packet_id))
            elif packet.type == mp.SUBACK:
                packet_id, codes = mp.parse_suback(packet.body)
                self.subacks[packet_id] = codes
                self._suback.set()
        self.closed = True

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.writer.write(mp.build_publish(topic, payload, qos=1, packet_id=self.packet_id(),
                                           retain=retain))

    async def subscribe(self, filters: list[str]) -> list[int]:
        packet_id = self.packet_id()
        self.writer.write(mp.build_subscribe(packet_id, [(f, 1) for f in filters]))
        while packet_id not in self.subacks:
            if self.closed:
                raise ConnectionError(f"{self.cn} was disconnected before its SUBACK")
            self._suback.clear()
            await asyncio.wait_for(self._suback.wait(), TIMEOUT)
        return self.subacks[packet_id]

    async def expect(self, topic: str, retain: bool = True, timeout: float = 5.0) -> mp.Publish:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for publish in self.publishes:
                if publish.topic == topic and publish.retain == retain:
                    return publish
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{self.cn} did not receive {topic}")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self.writer is not None:
            if not self.closed:
                self.writer.write(mp.DISCONNECT_BYTES)
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 2)
            except (OSError, ssl.SSLError, asyncio.TimeoutError):
                pass
        if self._reading is not None:
            self._reading.cancel()


def test_many_devices_connect_at_once(tmp_path):
    cloud = CloudDir(tmp_path / "cloud")
    cloud.init(mqtt=f"127.0.0.1:{free_port()}", http=f"127.0.0.1:{free_port()}")
    ca = cloud.ca()
    ca_file = cloud.path / pki.CA_CERT

    def context(cn: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(ca_file))
        if cn == pki.SERVICE_CN:
            ctx.load_cert_chain(str(cloud.path / pki.SERVICE_PEM))
        else:
            identity = ca.issue(cn)
            pem = tmp_path / f"{cn}.pem"
            pem.write_bytes(identity.cert_pem + identity.key_pem)
            ctx.load_cert_chain(str(pem))
        return ctx

    ids = [secrets.token_hex(12) for _ in range(DEVICES + 1)]
    late_id = ids.pop()
    contexts = {cn: context(cn) for cn in [pki.SERVICE_CN, late_id, *ids]}

    async def main():
        broker = EmbeddedBroker(cloud)
        await broker.start()
        clients: list[Client] = []
        try:
            host, port = broker.public_address
            # The fleet service's subscriptions: with amqtt 0.12.1 every device that
            # connected was sent every retained status matching them.
            service = Client(pki.SERVICE_CN, contexts[pki.SERVICE_CN])
            clients.append(service)
            assert await service.connect(host, port) == 0
            assert await service.subscribe(["devices/+/status", "devices/+/describe"]) == [1, 1]
            # A retained message for a device that is not there yet.
            service.publish(f"devices/{late_id}/inbox/config", b"cfg", retain=True)

            async def device(device_id: str) -> Client:
                client = Client(device_id, contexts[device_id])
                clients.append(client)
                base = f"devices/{device_id}/"
                assert await client.connect(host, port, will=base + "status") == 0
                client.publish(base + "status", b"online", retain=True)
                codes = await client.subscribe([base + f for f in DEVICE_FILTERS])
                assert codes == [1] * len(DEVICE_FILTERS)
                return client

            withheld = broker.gate.stats.withheld_deliveries
            results = await asyncio.wait_for(
                asyncio.gather(*(device(d) for d in ids), return_exceptions=True), TIMEOUT)
            failures = [r for r in results if isinstance(r, BaseException)]
            assert not failures, f"{len(failures)} devices failed, e.g. {failures[0]!r}"

            # Every device held, and the service saw every `online`.
            await asyncio.sleep(1.0)
            dropped = [c.cn for c in results if c.closed]
            assert not dropped, f"{len(dropped)} of {DEVICES} devices dropped"
            deadline = asyncio.get_running_loop().time() + 15
            while True:
                online = {p.topic.split("/")[1] for p in service.publishes
                          if p.topic.endswith("/status") and p.payload == b"online"}
                if set(ids) <= online or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert set(ids) <= online, f"{len(set(ids) - online)} onlines did not reach the service"

            # amqtt no longer sends a connecting device others' retained messages: the gate
            # had nothing to withhold.
            assert broker.gate.stats.withheld_deliveries == withheld

            # A retained message reaches a client that subscribes after it was published.
            late = await device(late_id)
            got = await late.expect(f"devices/{late_id}/inbox/config")
            assert got.payload == b"cfg"
            # ... and a late subscriber to the statuses gets every device's retained one.
            assert await service.subscribe([f"devices/{ids[0]}/status"]) == [1]
            status = await service.expect(f"devices/{ids[0]}/status")
            assert status.payload == b"online"
            assert not any(c.closed for c in clients)
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
            await broker.stop()

    asyncio.run(main())
