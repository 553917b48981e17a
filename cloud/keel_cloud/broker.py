"""The embedded broker: amqtt in-process on an internal 127.0.0.1 port, behind the gate.

Only the gate (and the in-process fleet service) reach amqtt, so amqtt itself allows
anonymous clients; authentication (client certificate, client id == CN) and the topic
ACL are the gate's job (keel_cloud.gate). Devices connect to the gate at the address in
the cloud directory's configuration (`mqtt`, 127.0.0.1:8883 by default).
"""

import asyncio
import logging

from amqtt.broker import Broker, BrokerError, BrokerEvents, MachineError
from amqtt.contexts import Action
from amqtt.mqtt.constants import QOS_1, QOS_2

from keel_cloud import pki
from keel_cloud.config import CloudDir, parse_address
from keel_cloud.gate import Gate, server_context

log = logging.getLogger(__name__)

LISTENER = "default"


def amqtt_config(bind: str = "127.0.0.1:0") -> dict:
    """amqtt 0.12 broker configuration: one plain TCP listener, anonymous clients, no
    $SYS topics, no packet logging."""
    return {
        "listeners": {LISTENER: {"type": "tcp", "bind": bind, "max_connections": 0}},
        # Giving 'plugins' replaces amqtt's defaults (event and packet loggers, $SYS).
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
        "timeout_disconnect_delay": 0,
    }


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
        self._internal_port: int | None = None

    async def start(self) -> None:
        config = self.cloud_dir.config()
        host, port = parse_address(config.mqtt, 8883)
        host = host.strip("[]")  # [::1]:8883
        if self._public[0] is not None:
            host = self._public[0]
        if self._public[1] is not None:
            port = self._public[1]

        self.amqtt = KeelBroker(amqtt_config("127.0.0.1:0"))
        await self.amqtt.start()
        try:
            self._internal_port = self._bound_port(self.amqtt)
            context = server_context(self.cloud_dir.path / pki.CA_CERT,
                                     self.cloud_dir.path / pki.SERVER_PEM)
            self.gate = Gate(context, "127.0.0.1", self._internal_port, pki.SERVICE_CN,
                             **self._gate_options)
            await self.gate.start(host, port)
        except BaseException:
            await self.amqtt.shutdown()
            self.amqtt = None
            raise
        log.info("embedded broker: amqtt on 127.0.0.1:%d, gate on %s:%d",
                 self._internal_port, *self.gate.address)

    @staticmethod
    def _bound_port(broker: Broker) -> int:
        # amqtt 0.12 has no public accessor for the address a listener bound; with port 0
        # in 'bind' the asyncio server's socket is the only place to read it.
        server = broker._servers[LISTENER].instance  # noqa: SLF001
        return server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.gate is not None:
            await self.gate.stop()
            self.gate = None
        if self.amqtt is not None:
            await self.amqtt.shutdown()
            self.amqtt = None

    async def __aenter__(self) -> "EmbeddedBroker":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def internal_port(self) -> int:
        """amqtt's plain-TCP port on 127.0.0.1 (for the in-process service)."""
        if self._internal_port is None:
            raise RuntimeError("the embedded broker is not running")
        return self._internal_port

    @property
    def public_address(self) -> tuple[str, int]:
        """Where the gate listens (devices connect here)."""
        if self.gate is None:
            raise RuntimeError("the embedded broker is not running")
        return self.gate.address
