"""The embedded broker: amqtt in-process on an internal 127.0.0.1 port, behind the gate.

Only the gate (and the in-process fleet service) reach amqtt, so amqtt itself allows
anonymous clients; authentication (client certificate, client id == CN) and the topic
ACL are the gate's job (keel_cloud.gate). Devices connect to the gate at the address in
the cloud directory's configuration (`mqtt`, 127.0.0.1:8883 by default).
"""

import logging

from amqtt.broker import Broker

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

        self.amqtt = Broker(amqtt_config("127.0.0.1:0"))
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
