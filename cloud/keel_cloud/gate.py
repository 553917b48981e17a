"""The broker gate: the TLS front of the embedded broker (docs/protocol.md).

Devices and the fleet service connect here with a client certificate signed by the
cloud's CA. The gate reads the CONNECT itself and refuses (CONNACK 5, then closes) a
client whose id is not its certificate's CN, or whose last will lies outside its own
topic prefix, *before* opening a connection to the broker: amqtt drops an existing
session for a client id before it authenticates anyone, so a refused client must never
reach it. Accepted connections are relayed packet by packet to the broker, over a stream
the gate's `upstream` opener gives it (keel_cloud.broker hands amqtt one end of a socket
pair: the broker has no listening socket of its own), and every packet a device sends is
checked against the topic ACL:

- PUBLISH outside `devices/<cn>/` is dropped (acknowledged by the gate for QoS 1 and 2,
  so the client is not left waiting);
- SUBSCRIBE with any filter outside `devices/<cn>/` is refused as a whole: the gate
  answers SUBACK 0x80 for every filter and the broker never sees it.

Messages from the broker to a device are checked as well: only PUBLISHes under the
device's prefix pass (amqtt 0.12 sends a connecting client the retained messages that
match anybody's subscriptions). The fleet service (CN `keel-service`) is not restricted. The gate also enforces the
keepalive (1.5 x the CONNECT's keepalive without a packet closes the connection, so the
broker publishes the last will; amqtt 0.12 does not do this itself), and a new
connection for a client id closes the previous one first (amqtt does not stop the old
connection on a clean-session takeover, and its later end would publish a stale will).
"""

import asyncio
import contextlib
import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from keel_cloud import mqtt_packets as mp
from keel_cloud import pki

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds for the TLS handshake, then again for the CONNECT
UPSTREAM_TIMEOUT = 5.0
MAX_CONNECT = 64 * 1024  # a CONNECT is small; anything bigger is an attack
MAX_PACKET = 1024 * 1024  # any other client packet (OTA chunks are far smaller)
KEEPALIVE_FACTOR = 1.5
TAKEOVER_WAIT = 2.0

Authorize = Callable[[str], bool | Awaitable[bool]]
# upstream(cn, peer) -> (reader, writer): a new connection to the broker for an accepted
# client (its certificate's CN, and its address).
Upstream = Callable[[str, object], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


def server_context(ca_file: Path | str, server_pem: Path | str,
                   key_file: Path | str | None = None) -> ssl.SSLContext:
    """The gate's TLS context: TLS >= 1.2, a client certificate signed by the CA is
    required. server_pem holds the broker's certificate and (unless key_file) its key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_file))
    ctx.load_cert_chain(str(server_pem), str(key_file) if key_file else None)
    return ctx


def device_prefix(cn: str) -> str:
    return f"devices/{cn}/"


def safe_identity(cn: str | None) -> bool:
    """A CN that can be a client id and a topic level: no wildcards, separators or NUL."""
    return bool(cn) and not any(c in cn for c in "/+#\x00") and len(cn) <= 256


def may_publish(cn: str, topic: str) -> bool:
    return mp.valid_topic_name(topic) and topic.startswith(device_prefix(cn))


def may_subscribe(cn: str, topic_filter: str) -> bool:
    # The prefix has no wildcards (safe_identity), so a filter starting with it can only
    # match topics under it: 'devices/+/x', '#' and 'devices/#' all fail here.
    return mp.valid_topic_filter(topic_filter) and topic_filter.startswith(device_prefix(cn))


def peer_common_name(writer: asyncio.StreamWriter) -> str | None:
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        return pki.common_name(der)
    except (IndexError, ValueError):
        return None


@dataclass
class GateStats:
    connections: int = 0  # TLS connections accepted (the handshake succeeded)
    active: int = 0  # connections open now
    relayed: int = 0  # connections passed on to the broker
    refused: int = 0  # connections closed before reaching the broker
    dropped_publishes: int = 0
    refused_subscribes: int = 0
    withheld_deliveries: int = 0  # broker -> client messages it did not subscribe to
    takeovers: int = 0


class _Connection:
    def __init__(self, cn: str, peer):
        self.cn = cn
        self.peer = peer
        self.task: asyncio.Task | None = None
        self.subscriptions: set[str] = set()  # the filters passed on to the broker


class Gate:
    def __init__(self, ssl_context: ssl.SSLContext, upstream: Upstream,
                 service_cn: str = pki.SERVICE_CN, *, connect_timeout: float = CONNECT_TIMEOUT,
                 max_packet: int = MAX_PACKET, authorize: Authorize | None = None):
        """upstream(cn, peer) opens the connection to the broker for an accepted client;
        authorize(cn), if given, is asked before a connection is relayed (for example: is
        this device in the registry and not revoked?)."""
        self.ssl_context = ssl_context
        self.upstream = upstream
        self.service_cn = service_cn
        self.connect_timeout = connect_timeout
        self.max_packet = max_packet
        self.authorize = authorize
        self.stats = GateStats()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._by_client: dict[str, _Connection] = {}

    # --- lifecycle ----------------------------------------------------------------

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (0: any free port); returns the address bound."""
        self._server = await asyncio.start_server(
            self._handle, host, port, ssl=self.ssl_context,
            ssl_handshake_timeout=self.connect_timeout, reuse_address=True,
        )
        log.info("gate listening on %s:%d", *self.address)
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the gate is not running")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def port(self) -> int:
        return self.address[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # --- one connection -----------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.stats.connections += 1
        self.stats.active += 1
        peer = writer.get_extra_info("peername")
        try:
            await self._session(reader, writer, peer)
        except asyncio.CancelledError:
            pass
        except Exception:  # one connection must never take the gate down
            log.exception("gate: connection from %s failed", peer)
        finally:
            self.stats.active -= 1
            self._tasks.discard(task)
            await _close(writer)

    def _refuse(self, peer, cn: str | None, reason: str) -> None:
        self.stats.refused += 1
        log.warning("gate: refused %s (certificate CN %r): %s", _fmt(peer), cn, reason)

    async def _session(self, reader, writer, peer) -> None:
        cn = peer_common_name(writer)
        if cn is None:  # the TLS layer already insists on a certificate; belt and braces
            self._refuse(peer, cn, "no client certificate")
            return
        try:
            packet = await asyncio.wait_for(mp.read_packet(reader, MAX_CONNECT), self.connect_timeout)
        except asyncio.TimeoutError:
            self._refuse(peer, cn, f"no CONNECT within {self.connect_timeout:g} s")
            return
        except (mp.PacketError, OSError) as exc:
            self._refuse(peer, cn, f"unreadable first packet: {exc}")
            return
        if packet is None:
            self._refuse(peer, cn, "closed before CONNECT")
            return
        if packet.type != mp.CONNECT:
            self._refuse(peer, cn, f"first packet is {packet.name}, not CONNECT")
            return
        try:
            connect = mp.parse_connect(packet.body)
        except mp.PacketError as exc:
            self._refuse(peer, cn, f"malformed CONNECT: {exc}")
            return

        async def answer(code: int, reason: str) -> None:
            self._refuse(peer, cn, reason)
            writer.write(mp.build_connack(code))
            with contextlib.suppress(OSError):
                await writer.drain()

        if connect.protocol_name != "MQTT" or connect.protocol_level != 4:
            await answer(mp.CONNACK_BAD_PROTOCOL,
                         f"protocol {connect.protocol_name!r} level {connect.protocol_level}, "
                         "only MQTT 3.1.1 is served")
            return
        if not safe_identity(cn):
            await answer(mp.CONNACK_NOT_AUTHORIZED, "certificate CN unusable as a client id")
            return
        if connect.client_id != cn:
            await answer(mp.CONNACK_NOT_AUTHORIZED,
                         f"client id {connect.client_id!r} is not the certificate's CN")
            return
        device = cn != self.service_cn
        if device and connect.has_will and not may_publish(cn, connect.will_topic):
            await answer(mp.CONNACK_NOT_AUTHORIZED,
                         f"will topic {connect.will_topic!r} outside {device_prefix(cn)}")
            return
        if self.authorize is not None:
            allowed = self.authorize(cn)
            if inspect.isawaitable(allowed):
                allowed = await allowed
            if not allowed:
                await answer(mp.CONNACK_NOT_AUTHORIZED, "not authorised by the registry")
                return

        me = _Connection(cn, peer)
        me.task = asyncio.current_task()
        await self._take_over(cn, me)
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(self.upstream(cn, peer),
                                                              UPSTREAM_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                await answer(mp.CONNACK_UNAVAILABLE, f"broker unreachable: {exc}")
                return
            self.stats.relayed += 1
            log.info("gate: %s connected from %s", cn, _fmt(peer))
            try:
                up_writer.write(packet.encode())
                await up_writer.drain()
                reason = await self._relay(me, connect, reader, writer, up_reader, up_writer)
            finally:
                await _shutdown_upstream(up_reader, up_writer)
            log.info("gate: %s disconnected (%s)", cn, reason)
        finally:
            if self._by_client.get(cn) is me:
                del self._by_client[cn]

    async def _take_over(self, cn: str, me: _Connection) -> None:
        old = self._by_client.get(cn)
        self._by_client[cn] = me
        if old is None or old.task is None or old.task.done():
            return
        self.stats.takeovers += 1
        log.info("gate: %s connected again from %s, closing its connection from %s",
                 cn, _fmt(me.peer), _fmt(old.peer))
        old.task.cancel()
        # Its upstream is closed in its finally (the broker publishes its will) before
        # the new CONNECT goes up, so a stale will cannot follow the new 'online'.
        await asyncio.wait({old.task}, timeout=TAKEOVER_WAIT)

    async def _relay(self, me, connect, reader, writer, up_reader, up_writer) -> str:
        up = asyncio.create_task(self._client_to_broker(me, connect, reader, writer, up_writer))
        down = asyncio.create_task(self._broker_to_client(me, up_reader, writer, up_writer))
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
        finished = done.pop()
        if finished.cancelled():
            return "cancelled"
        if finished.exception() is not None:
            return f"error: {finished.exception()!r}"
        return finished.result()

    async def _client_to_broker(self, me, connect, reader, writer, up_writer) -> str:
        cn = me.cn
        device = cn != self.service_cn
        timeout = connect.keepalive * KEEPALIVE_FACTOR if connect.keepalive else None
        own_qos2: set[int] = set()  # QoS 2 publishes the gate dropped and acknowledged
        while True:
            try:
                packet = await asyncio.wait_for(mp.read_packet(reader, self.max_packet), timeout)
            except asyncio.TimeoutError:
                return f"no packet within {timeout:g} s (keepalive {connect.keepalive} s)"
            except mp.PacketError as exc:
                log.warning("gate: %s sent a malformed packet, closing: %s", cn, exc)
                return f"malformed packet: {exc}"
            except (OSError, ssl.SSLError) as exc:
                return f"connection lost: {exc!r}"
            if packet is None:
                return "connection closed by the client"
            if packet.type == mp.CONNECT:
                log.warning("gate: %s sent a second CONNECT, closing", cn)
                return "second CONNECT"
            if device:
                try:
                    answer = self._check(cn, packet, own_qos2)
                except mp.PacketError as exc:
                    log.warning("gate: %s sent a malformed %s, closing: %s", cn, packet.name, exc)
                    return f"malformed packet: {exc}"
                if answer is not None:
                    if answer:
                        writer.write(answer)
                        await writer.drain()
                    continue
            if packet.type in (mp.SUBSCRIBE, mp.UNSUBSCRIBE):
                try:
                    _track(me.subscriptions, packet)
                except mp.PacketError as exc:
                    log.warning("gate: %s sent a malformed %s, closing: %s", cn, packet.name, exc)
                    return f"malformed packet: {exc}"
            up_writer.write(packet.encode())
            await up_writer.drain()
            if packet.type == mp.DISCONNECT:
                return "DISCONNECT"

    async def _broker_to_client(self, me, up_reader, writer, up_writer) -> str:
        """Relay whole packets, so that the gate's own answers never land inside one.
        A client is only sent PUBLISHes matching its own subscriptions (and a device only
        under its own prefix): amqtt 0.12 sends a client that connects the retained
        messages matching *every* client's subscriptions, so without this a device would
        receive, say, every other device's retained status while the service subscribes
        to devices/+/status."""
        own_qos2: set[int] = set()  # broker QoS 2 publishes the gate dropped
        while True:
            try:
                packet = await mp.read_packet(up_reader)
            except mp.PacketError as exc:
                return f"malformed packet from the broker: {exc}"
            except OSError as exc:
                return f"broker connection lost: {exc!r}"
            if packet is None:
                return "closed by the broker"
            if packet.type in (mp.PUBLISH, mp.PUBREL):
                answer = self._check_delivery(me, packet, own_qos2)
                if answer is not None:
                    if answer:
                        up_writer.write(answer)
                        await up_writer.drain()
                    continue
            writer.write(packet.encode())
            await writer.drain()

    def _check_delivery(self, me: _Connection, packet: mp.Packet,
                        own_qos2: set[int]) -> bytes | None:
        """Like _check, for a packet from the broker to the client; the answer goes
        back to the broker."""
        if packet.type == mp.PUBLISH:
            publish = mp.parse_publish(packet.flags, packet.body)
            device = me.cn != self.service_cn
            wanted = any(mp.topic_matches(f, publish.topic) for f in me.subscriptions)
            if wanted and (not device or publish.topic.startswith(device_prefix(me.cn))):
                return None
            self.stats.withheld_deliveries += 1
            # Not the client's doing (see above), hence only a debug line.
            log.debug("gate: withheld a message on %r from %s (not subscribed)",
                      publish.topic, me.cn)
            return _swallow(publish, own_qos2)
        if packet.type == mp.PUBREL:
            return _release(packet, own_qos2)
        return None

    def _check(self, cn: str, packet: mp.Packet, own_qos2: set[int]) -> bytes | None:
        """None to forward the packet; else the bytes the gate answers instead (b"" for
        nothing). Raises PacketError for a malformed packet."""
        if packet.type == mp.PUBLISH:
            publish = mp.parse_publish(packet.flags, packet.body)
            if may_publish(cn, publish.topic):
                return None
            self.stats.dropped_publishes += 1
            log.warning("gate: %s may not publish to %r: dropped", cn, publish.topic)
            return _swallow(publish, own_qos2)
        if packet.type == mp.PUBREL:
            return _release(packet, own_qos2)
        if packet.type == mp.SUBSCRIBE:
            subscribe = mp.parse_subscribe(packet.body)
            refused = [f for f, _ in subscribe.filters if not may_subscribe(cn, f)]
            if not refused:
                return None
            self.stats.refused_subscribes += 1
            log.warning("gate: %s may not subscribe to %s: refused the SUBSCRIBE of %s",
                        cn, ", ".join(repr(f) for f in refused),
                        ", ".join(repr(f) for f, _ in subscribe.filters))
            return mp.build_suback(subscribe.packet_id,
                                   [mp.SUBACK_FAILURE] * len(subscribe.filters))
        return None


def _track(subscriptions: set[str], packet: mp.Packet) -> None:
    if packet.type == mp.SUBSCRIBE:
        subscriptions.update(f for f, _ in mp.parse_subscribe(packet.body).filters)
    else:
        subscriptions.difference_update(mp.parse_unsubscribe(packet.body).filters)


async def _shutdown_upstream(up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
    """Half-close towards the broker and wait (briefly) until it closes its side: by
    then it has handled the end of the session, including publishing the last will."""
    try:
        if up_writer.can_write_eof():
            up_writer.write_eof()
        async with asyncio.timeout(TAKEOVER_WAIT):
            while await up_reader.read(65536):
                pass
    except (OSError, asyncio.TimeoutError, asyncio.CancelledError):
        pass
    finally:
        await _close(up_writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        async with asyncio.timeout(1.0):
            await writer.wait_closed()
    except (OSError, asyncio.TimeoutError, ssl.SSLError, asyncio.CancelledError):
        pass
    except Exception:  # noqa: BLE001 - closing must not raise
        pass


def _fmt(peer) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _swallow(publish, own_qos2: set[int]) -> bytes:
    """Answer a PUBLISH the gate drops as the broker would, so the sender is not stuck:
    PUBACK for QoS 1, PUBREC for QoS 2 (its PUBREL is then answered by _release)."""
    if publish.qos == 1:
        return mp.build_puback(publish.packet_id)
    if publish.qos == 2:
        own_qos2.add(publish.packet_id)
        return mp.build_pubrec(publish.packet_id)
    return b""


def _release(packet, own_qos2: set[int]) -> bytes | None:
    """PUBCOMP for the PUBREL of a QoS 2 message the gate swallowed; None to forward."""
    packet_id = mp.parse_packet_id(packet.body, "PUBREL")
    if packet_id in own_qos2:
        own_qos2.discard(packet_id)
        return mp.build_pubcomp(packet_id)
    return None
