"""The fleet service: a privileged MQTT client that keeps the registry up to date
from what devices send, and carries calls, variable reads and events to them. Its healer
sends each fleet member its fleet's app and the system parts that app needs."""

import json
import logging
import secrets
import ssl
import threading
import time

import paho.mqtt.client as mqtt

from keel_cloud import pki, protocol
from keel_cloud.fleets import Fleets
from keel_cloud.healer import Healer, SharedCatalog, rollback_of
from keel_cloud.ota import TRIAL_S, OtaSender
from keel_cloud.registry import Registry

log = logging.getLogger("keel.cloud.service")
PREFIX = "devices/"
REQUEST_TIMEOUT = 5.0
FLEET_POLL = 5.0  # s between looks at fleet memberships and releases other processes changed
LOGGED_DROPS = 10  # a device's first malformed messages are logged, then every 100th


class DeviceError(Exception):
    """A call or read that failed on the device or did not come back in time."""


class FleetService:
    def __init__(self, registry: Registry, host: str, port: int, tls: ssl.SSLContext | None = None,
                 cloud_path=None, trial_s: int = TRIAL_S, fleet_poll: float = FLEET_POLL):
        self.registry = registry
        self.host = host
        self.port = port
        # Requests waiting for their reply, by (device id, request id): a reply counts only
        # on the reply topic of the device the request went to.
        self._pending: dict[tuple[str, str], dict] = {}
        self._pending_lock = threading.Lock()
        self._events = threading.Condition()
        self._connected = threading.Event()
        self._stopping = False
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=pki.SERVICE_CN, clean_session=True
        )
        if tls is not None:
            self.client.tls_set_context(tls)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 10)
        self.ota = OtaSender(lambda topic, payload, qos: self.client.publish(topic, payload, qos=qos),
                             trial_s=trial_s)
        # The safe mode healer reads the release catalog and the fleets' releases (their
        # images are kept in the cloud directory: the SQLite registry's, unless cloud_path
        # says where).
        cloud_path = cloud_path or (registry.path.parent if registry.path else None)
        self.fleets = Fleets(registry, cloud_path)
        self.healer = Healer(self.ota, SharedCatalog(registry, cloud_path) if cloud_path else None,
                             self.fleets)
        # Fleet changes come from the keel CLI, which writes the registry itself: it asks
        # for a rollout (rollout()), and a poll catches what it could not tell.
        self._fleet_poll = fleet_poll
        self._fleet_print: dict[str, tuple] = {}
        self._fleet_lock = threading.Lock()
        self._stop = threading.Event()

    # Life cycle

    def start(self, wait: float = 10.0) -> None:
        self.rollout()  # what the fleets are now: devices are looked at as they describe
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(wait):
            raise ConnectionError(f"the fleet service cannot reach the broker at {self.host}:{self.port}")
        if self._fleet_poll:
            threading.Thread(target=self._poll_fleets, name="keel-fleet-poll", daemon=True).start()

    def stop(self) -> None:
        self._stopping = True
        self._stop.set()
        self.healer.stop()
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason, properties=None):
        if reason.is_failure:
            log.error("broker refused the service: %s", reason)
            return
        client.subscribe("devices/+/status", qos=1)
        client.subscribe("devices/+/describe", qos=1)
        client.subscribe("devices/+/events/#", qos=1)
        client.subscribe("devices/+/reply", qos=1)
        client.subscribe("devices/+/ota/status", qos=1)
        self._connected.set()
        log.info("fleet service connected to the broker")

    def _on_disconnect(self, client, userdata, flags, reason, properties=None):
        self._connected.clear()
        if not self._stopping:
            log.warning("fleet service lost the broker (%s); reconnecting", reason)

    # Incoming

    def _on_message(self, client, userdata, msg):
        """paho's callback: whatever arrives, nothing may raise into paho's loop (it would
        end the service's MQTT thread). Messages are checked first (keel_cloud.protocol);
        the except below is the last line of defence, for a database failure say."""
        try:
            self._handle(msg.topic, msg.payload)
        except Exception:  # noqa: BLE001 - the service must outlive any one message
            log.exception("a message on %r could not be handled",
                          getattr(msg, "_topic", b"?")[:120])

    def _handle(self, topic: str, payload: bytes) -> None:
        device_id = protocol.device_of(topic)
        if device_id is None:
            log.warning("message on %r ignored: not a device topic", topic[:120])
            return
        if not self.registry.known(device_id):
            log.warning("message from unregistered device %s ignored", device_id)
            return
        try:
            message = protocol.parse(topic, payload)
        except protocol.Invalid as e:
            count = self.registry.count_drop(device_id, str(e))
            if count <= LOGGED_DROPS or count % 100 == 0:  # a device cannot flood the log
                log.warning("device %s: dropped a message (%s); %d dropped so far", device_id, e,
                            count)
            return
        # set_online, set_describe and add_event set last_seen in their own transaction;
        # the other kinds set it here.
        if message.kind == "status":
            self.registry.set_online(device_id, message.value)
            if message.value:
                self.ota.on_online(device_id)
            else:
                self.healer.on_offline(device_id)
        elif message.kind == "describe":
            describe = message.value
            self.registry.set_describe(device_id, describe)
            rollback = rollback_of(describe)
            if rollback and self.registry.add_rollback(device_id, rollback):
                log.warning("device %s rolled back %s %s %s (%s)", device_id, rollback["function"],
                            rollback["index"], rollback["version"], rollback.get("reason"))
            self.healer.on_describe(device_id, describe)  # only schedules: its own threads work
        elif message.kind == "event":
            name, data = message.value
            self.registry.add_event(device_id, name, data)
            with self._events:
                self._events.notify_all()
        elif message.kind == "reply":
            self._on_reply(device_id, message.value)
            self.registry.seen(device_id)
        elif message.kind == "ota_status":
            self.ota.on_status(device_id, message.value)
            self.registry.seen(device_id)

    def _on_reply(self, device_id: str, reply: dict) -> None:
        with self._pending_lock:
            waiter = self._pending.get((device_id, reply["id"]))
        if waiter is None:  # late (after its timeout), or not a request of this device
            log.debug("device %s: a reply to no request of its own waiting, ignored", device_id)
            return
        waiter["reply"] = reply
        waiter["done"].set()

    # Fleets

    def rollout(self) -> int:
        """Look again at the devices whose fleet, or whose fleet's release or signing keys,
        changed since the last look: the healer sends each the fleet's app if it does not
        run it (a device not heard from yet gets it when it describes). Returns how many
        changed."""
        with self._fleet_lock:
            currents = self.fleets.currents()
            signing = self.fleets.signing()
            now = {device_id: (fleet, currents.get(fleet), signing.get(fleet))
                   for device_id, fleet in self.registry.memberships().items()}
            changed = [device_id for device_id in set(now) | set(self._fleet_print)
                       if now.get(device_id) != self._fleet_print.get(device_id)]
            self._fleet_print = now
        for device_id in changed:
            self.healer.poke(device_id)
        return len(changed)

    def _poll_fleets(self) -> None:
        while not self._stop.wait(self._fleet_poll):
            try:
                self.rollout()
            except Exception:  # noqa: BLE001 - a database hiccup: next time
                log.exception("cannot read the fleets")

    # Outgoing

    def request(self, device_id: str, kind: str, name: str, arg=None, timeout: float = REQUEST_TIMEOUT):
        """Send a call or get to a device and wait for its reply."""
        # 64 random bits, as text: unguessable, and no large integer for the device's JSON.
        request_id = secrets.token_hex(8)
        key = (device_id, request_id)
        waiter = {"done": threading.Event(), "reply": None}
        with self._pending_lock:
            self._pending[key] = waiter
        try:
            payload = {"id": request_id, "name": name}
            if kind == "call":
                payload["arg"] = arg if arg is not None else ""
            self.client.publish(f"devices/{device_id}/{kind}", json.dumps(payload), qos=1)
            if not waiter["done"].wait(timeout):
                raise DeviceError(f"the device did not answer within {timeout:g} s")
        finally:
            with self._pending_lock:
                self._pending.pop(key, None)
        reply = waiter["reply"]
        if not reply.get("ok"):
            raise DeviceError(reply.get("error") or "the device refused the request")
        return reply.get("result")

    def send_event(self, name: str, data: str | None, device_ids: list[str]) -> int:
        """A cloud event to devices (their subscriptions get it)."""
        for device_id in device_ids:
            self.client.publish(f"devices/{device_id}/inbox/{name}", data or "", qos=1)
        return len(device_ids)

    def wait_events(self, after: int, device_id: str | None, timeout: float) -> list[dict]:
        if not 0 <= timeout < float("inf"):  # NaN too: it would never end
            raise ValueError(f"wait must be a finite number of seconds >= 0, not {timeout!r}")
        deadline = time.monotonic() + timeout
        with self._events:
            while True:
                found = self.registry.events(after, device_id)
                left = deadline - time.monotonic()
                if found or left <= 0:
                    return found
                self._events.wait(min(left, 1.0))
