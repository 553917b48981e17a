"""The embedded broker: amqtt in-process behind the gate, with no listening socket of its
own.

amqtt's listener is of its "external" kind: it opens no socket. The gate (keel_cloud.gate)
is the only way in: it takes TLS connections with a client certificate from the cloud's
CA, and hands each one it accepts to amqtt over a socket pair (socket.socketpair(): two
connected, unnamed sockets that no other process can reach). The in-process fleet service
connects to the gate too, with its own certificate (CN keel-service), like any client. So
amqtt allows anonymous clients: whoever reaches it came through the gate, which did the
authentication (client certificate, client id == CN) and applies the topic ACL. Devices
connect to the gate at the address in the cloud directory's configuration (`mqtt`,
127.0.0.1:8883 by default).
"""

import asyncio
import logging
import socket

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker, BrokerError, BrokerEvents, MachineError
from amqtt.contexts import Action
from amqtt.mqtt.constants import QOS_1, QOS_2

from keel_cloud import pki
from keel_cloud.config import CloudDir, parse_address
from keel_cloud.gate import Gate, server_context

log = logging.getLogger(__name__)

LISTENER = "default"


def amqtt_config() -> dict:
    """amqtt 0.12 broker configuration: one "external" listener (amqtt opens no socket for
    it; connections come in through external_connected), anonymous clients, no $SYS
    topics, no packet logging."""
    return {
        # amqtt skips a listener without 'bind' (even an external one, whose bind it never
        # uses), so it has one that says where its connections come from.
        "listeners": {LISTENER: {"type": "external", "bind": "gate", "max_connections": 0}},
        # Giving 'plugins' replaces amqtt's defaults (event and packet loggers, $SYS).
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
        "timeout_disconnect_delay": 0,
    }


class _GateWriter(StreamWriterAdapter):
    """amqtt's stream writer for one end of a socket pair: the peer amqtt logs (and
    requires) is the gate's client, as an unnamed socket has no address."""

    def __init__(self, writer: asyncio.StreamWriter, peer: tuple[str, int]):
        super().__init__(writer)
        self._peer = peer

    def get_peer_info(self) -> tuple[str, int]:
        return self._peer


class KeelBroker(Broker):
    """amqtt 0.12.1's Broker with its retained-message replay made per-session, and no
    shared dict iterated across an await.

    amqtt's _handle_client_session replays, to every client that connects, the retained
    messages matching *every* client's subscriptions (O(subscriptions x retained) per
    connect: O(N^2) for a fleet of N devices), iterating self._subscriptions across
    awaits, so that a device subscribing meanwhile raises "dictionary changed size during
    iteration" and amqtt drops the connecting client. Here a client that connects gets
    the messages queued for its (persistent) session and, for a resumed session, the
    retained messages matching its own subscriptions; a clean session has none, and gets
    retained messages as MQTT says: when it subscribes (amqtt's _handle_subscription).
    The broadcast loop iterates copies as well."""

    async def _handle_client_session(self, reader, writer, client_session, handler, server,
                                     listener_name) -> None:
        # amqtt 0.12.1's method, but for the retained replay at the end.
        authenticated = await self._authenticate(client_session, self.listeners_config[listener_name])
        if client_session.client_id is None:
            raise BrokerError("Client ID was not correctly created/set.")
        while True:
            try:
                client_session.transitions.connect()
                break
            except (MachineError, ValueError):
                if client_session.transitions.is_connected():
                    self.logger.warning(f"Client {client_session.client_id} is already connected, "
                                        "performing take-over.")
                    old_session = self._sessions[client_session.client_id]
                    await old_session[1].handle_connection_closed()
                    await old_session[1].stop()
                    break
                self.logger.warning(f"Client {client_session.client_id} is reconnecting too quickly, "
                                    "make it wait")
                await asyncio.sleep(1)

        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)
        await handler.mqtt_connack_authorize(authenticated)
        if not authenticated:
            await writer.close()
            return
        await self.plugins_manager.fire_event(BrokerEvents.CLIENT_CONNECTED,
                                              client_id=client_session.client_id,
                                              client_session=client_session)
        await handler.start()
        # Messages queued for the session while it was away (persistent sessions only).
        await self._publish_session_retained_messages(client_session)
        # A resumed session's own subscriptions (a clean session has none yet): a snapshot,
        # taken before any await.
        client_id = client_session.client_id
        own = [(topic_filter, qos) for topic_filter, subscribers in list(self._subscriptions.items())
               for session, qos in list(subscribers) if session.client_id == client_id]
        for subscription in own:
            await self._publish_retained_messages_for_subscription(subscription, client_session)
        await self._client_message_loop(client_session, handler)

    async def _publish_retained_messages_for_subscription(self, subscription, session) -> None:
        """The retained messages matching one filter, to one session: a dict lookup for a
        filter without wildcards, else the topics under the filter's literal prefix (not
        every retained message through amqtt's matcher)."""
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        if "+" not in topic_filter and "#" not in topic_filter:
            found = self._retained_messages.get(topic_filter)
            matching = [found] if found is not None else []
        else:
            cut = min(i for i in (topic_filter.find("+"), topic_filter.find("#")) if i >= 0)
            prefix = topic_filter[:cut]
            matching = [retained for topic, retained in list(self._retained_messages.items())
                        if topic.startswith(prefix) and self._matches(topic, topic_filter)]
        tasks = [asyncio.ensure_future(handler.mqtt_publish(
                    retained.topic, retained.data, min(qos, retained.qos or qos), retain=True))
                 for retained in matching]
        if tasks:
            await asyncio.wait(tasks)

    async def _run_broadcast(self, running_tasks) -> None:
        # amqtt 0.12.1's method, iterating copies of the subscriptions (it awaits inside).
        broadcast = await self._broadcast_queue.get()
        for k_filter, subscriptions in list(self._subscriptions.items()):
            if not self._matches(broadcast["topic"], k_filter):
                continue
            for target_session, sub_qos in list(subscriptions):
                qos = broadcast.get("qos", sub_qos)
                sendable = await self._topic_filtering(target_session, topic=broadcast["topic"],
                                                       action=Action.RECEIVE)
                if not sendable:
                    self.logger.info(f"{target_session.client_id} not allowed to receive messages "
                                     f"from TOPIC {broadcast['topic']}.")
                    continue
                # [MQTT 3.1.2.4] kept for a persistent session that is away, at QoS 1 and 2
                if (target_session.transitions.state != "connected"
                        and not target_session.clean_session
                        and qos in (QOS_1, QOS_2)
                        and not target_session.is_anonymous):
                    await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                if target_session.transitions.state != "connected":
                    continue
                handler = self._get_handler(target_session)
                if handler:
                    running_tasks.append(asyncio.ensure_future(
                        handler.mqtt_publish(broadcast["topic"], broadcast["data"], qos, retain=False)))


class EmbeddedBroker:
    def __init__(self, cloud_dir: CloudDir, *, public_host: str | None = None,
                 public_port: int | None = None, **gate_options):
        """public_host/public_port override the configured `mqtt` address (port 0: any
        free port); gate_options go to Gate (connect_timeout, authorize, ...)."""
        self.cloud_dir = cloud_dir
        self._public = (public_host, public_port)
        self._gate_options = gate_options
        self.amqtt: Broker | None = None
        self.gate: Gate | None = None
        self._sessions: set[asyncio.Task] = set()

    async def start(self) -> None:
        config = self.cloud_dir.config()
        host, port = parse_address(config.mqtt, 8883)
        host = host.strip("[]")  # [::1]:8883
        if self._public[0] is not None:
            host = self._public[0]
        if self._public[1] is not None:
            port = self._public[1]

        self.amqtt = KeelBroker(amqtt_config())
        await self.amqtt.start()
        try:
            context = server_context(self.cloud_dir.path / pki.CA_CERT,
                                     self.cloud_dir.path / pki.SERVER_PEM)
            self.gate = Gate(context, self.open_upstream, pki.SERVICE_CN, **self._gate_options)
            await self.gate.start(host, port)
        except BaseException:
            await self.amqtt.shutdown()
            self.amqtt = None
            raise
        log.info("embedded broker: amqtt in-process, gate on %s:%d", *self.gate.address)

    async def open_upstream(self, cn: str,
                            peer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new connection into amqtt for a client the gate accepted: the gate's end of a
        socket pair; amqtt serves the other end as a connection on its listener."""
        if self.amqtt is None:
            raise ConnectionError("the embedded broker is not running")
        gate_end, broker_end = socket.socketpair()
        try:
            reader, writer = await asyncio.open_connection(sock=broker_end)
            up_reader, up_writer = await asyncio.open_connection(sock=gate_end)
        except BaseException:
            gate_end.close()
            broker_end.close()
            raise
        if isinstance(peer, tuple) and len(peer) >= 2:
            peer = (str(peer[0]), int(peer[1]))
        else:
            peer = (cn, 0)
        session = asyncio.create_task(self.amqtt.external_connected(
            StreamReaderAdapter(reader), _GateWriter(writer, peer), LISTENER))
        self._sessions.add(session)
        session.add_done_callback(self._session_done)
        return up_reader, up_writer

    def _session_done(self, task: asyncio.Task) -> None:
        self._sessions.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("embedded broker: a session ended with %r", task.exception())

    async def stop(self) -> None:
        if self.gate is not None:
            await self.gate.stop()
            self.gate = None
        if self.amqtt is not None:
            await self.amqtt.shutdown()
            self.amqtt = None
        sessions = list(self._sessions)
        for task in sessions:
            task.cancel()
        if sessions:
            await asyncio.gather(*sessions, return_exceptions=True)

    async def __aenter__(self) -> "EmbeddedBroker":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def public_address(self) -> tuple[str, int]:
        """Where the gate listens (devices connect here)."""
        if self.gate is None:
            raise RuntimeError("the embedded broker is not running")
        return self.gate.address

    @property
    def service_address(self) -> tuple[str, int]:
        """Where the in-process fleet service connects: the gate, on loopback when it
        listens on every address."""
        host, port = self.public_address
        return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port
