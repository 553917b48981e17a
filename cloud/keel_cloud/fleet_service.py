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
from keel_cloud.fleet_releases import Fleets
from keel_cloud.adopt import SessionAdoption
from keel_cloud.healer import Healer, SharedCatalog, rollback_of
from keel_cloud.ingest import READ_LIMIT, EventStream, Ingest
from keel_cloud.leases import Leases
from keel_cloud.ota_sender import TRIAL_S, OtaSender
from keel_cloud.registry import Registry, Write

log = logging.getLogger("keel.cloud.service")
PREFIX = "devices/"
REQUEST_TIMEOUT = 5.0
FLEET_POLL = 5.0  # s between looks at fleet memberships and releases other processes changed
SHARE_GROUP = "keel"  # the shared subscriptions' group: $share/keel/devices/+/...
LOGGED_DROPS = 10  # a device's first malformed messages are logged, then every 100th


class DeviceError(Exception):
    """A call or read that failed on the device or did not come back in time."""


class FleetService:
    def __init__(self, registry: Registry, host: str, port: int, tls: ssl.SSLContext | None = None,
                 cloud_path=None, trial_s: int = TRIAL_S, fleet_poll: float = FLEET_POLL,
                 instance: str | None = None, http: str | None = None, persistent: bool = False,
                 on_subscribed=None, ack_after_commit: bool = True, session_tls=None):
        """instance: this is one of several instances sharing the broker and the registry
        (keel cloud serve --instance NAME): device traffic is shared between them and an
        update is sent by the instance holding the device's lease (keel_cloud.leases).
        persistent: a persistent MQTT session (a broker that keeps it, as the Mosquitto
        serve runs does, holds what devices publish while the service reconnects);
        on_subscribed() runs once its subscriptions are acknowledged, at each connect.
        ack_after_commit: a device message is acknowledged to the broker once its write is
        committed (keel_cloud.ingest), so the broker sends it again if this process dies
        first (not worth it with the embedded broker, which dies with the process).
        session_tls(name): the TLS context of instance NAME's certificate, or None when
        this cloud directory lacks it: with it, this instance takes up the MQTT session of
        a dead instance and writes what the broker kept for it (keel_cloud.adopt)."""
        self.registry = registry
        self.host = host
        self.port = port
        self.instance = instance
        # Requests waiting for their reply, by (device id, request id): a reply counts only
        # on the reply topic of the device the request went to.
        self._pending: dict[tuple[str, str], dict] = {}
        self._pending_lock = threading.Lock()
        self._connected = threading.Event()
        self._stopping = False
        self._connection = 0  # counts connections: an acknowledgement goes on its own only
        # An instance's session is persistent: what the broker gives it while it is gone
        # waits in it, for its restart or for another instance (keel_cloud.adopt).
        self.persistent = persistent or bool(instance)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=pki.instance_cn(instance) if instance else pki.SERVICE_CN,
            clean_session=not self.persistent, manual_ack=ack_after_commit
        )
        self._session_tls = session_tls
        self._on_subscribed = on_subscribed
        self._subscribed = threading.Event()
        self._subscribe_mid = None
        if tls is not None:
            self.client.tls_set_context(tls)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(1, 10)
        self.leases = None
        if instance:
            self.leases = Leases(registry, instance, http, on_orphan=self._adopt,
                                 on_dead=self._adopt_session)
        self.ota = OtaSender(lambda topic, payload, qos: self.client.publish(topic, payload, qos=qos),
                             trial_s=trial_s, leases=self.leases)
        # The safe mode healer reads the release catalog and the fleets' releases (their
        # images are kept in the cloud directory: the SQLite registry's, unless cloud_path
        # says where).
        cloud_path = cloud_path or (registry.path.parent if registry.path else None)
        self.fleets = Fleets(registry, cloud_path)
        self.healer = Healer(self.ota, SharedCatalog(registry, cloud_path) if cloud_path else None,
                             self.fleets, state_of=registry.state_of if instance else None)
        # Fleet changes come from the keel CLI, which writes the registry itself: it asks
        # for a rollout (rollout()), and a poll catches what it could not tell.
        self._fleet_poll = fleet_poll
        self._fleet_print: dict[str, tuple] = {}
        self._fleet_lock = threading.Lock()
        self._stop = threading.Event()
        self._unknown: set[str] = set()
        self.events = EventStream(registry.last_event_seq())
        if instance:
            self.events.follow(registry)  # every instance's events, in order
        self.ingest = Ingest(registry, self._committed)

    # Life cycle

    def start(self, wait: float = 10.0) -> None:
        if self.leases:
            self.leases.start()
        self.rollout()  # what the fleets are now: devices are looked at as they describe
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(wait) or not self._subscribed.wait(wait):
            raise ConnectionError(f"the fleet service cannot reach the broker at {self.host}:{self.port}")
        if self._fleet_poll:
            threading.Thread(target=self._poll_fleets, name="keel-fleet-poll", daemon=True).start()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stopping = True
        self._stop.set()
        self.ota.stop()  # a transfer to a device that went quiet would hold the exit
        if self.instance and self._connected.is_set():
            # Out of the shared groups first, then what was taken is written (and
            # acknowledged): the session the broker keeps gathers nothing while stopped.
            self.client.unsubscribe(self.shared_filters())
            self.ingest.flush(5.0)
        self.client.disconnect()
        self.client.loop_stop()
        self.ingest.stop()
        self.events.stop()
        self.healer.stop()
        if self.leases:
            self.leases.stop()

    def _on_connect(self, client, userdata, flags, reason, properties=None):
        if reason.is_failure:
            log.error("broker refused the service: %s", reason)
            return
        # Alone, the service takes every device message. One of several instances takes
        # its share of events (the broker gives each to one member of the group) and
        # every other message (own_filters).
        self._connection += 1
        self._subscribed.clear()
        _, self._subscribe_mid = client.subscribe(
            [(f, 1) for f in self.shared_filters() + self.own_filters()])
        self._connected.set()
        log.info("fleet service%s connected to the broker",
                 f" instance {self.instance}" if self.instance else "")

    def shared_filters(self) -> list[str]:
        """What one of several instances takes its share of: events (most of the traffic,
        and each stands alone)."""
        return [f"$share/{SHARE_GROUP}/devices/+/events/#" if self.instance else "devices/+/events/#"]

    def own_filters(self) -> list[str]:
        """What every instance takes whole. Statuses and describes: each says what the
        device is now, so their order matters; every instance writes them in the order the
        device sent them, and the registry ends with the last (shared, an offline will and
        the online after it, or a describe before an install and the one after, could be
        given to two instances and committed the other way round). Every instance's healer
        sees every describe (the device's lease says which one sends). Replies and update
        statuses: each instance keeps those of its own requests and transfers."""
        return ["devices/+/status", "devices/+/describe", "devices/+/reply", "devices/+/ota/status"]

    def _adopt(self, device_id: str) -> None:
        """A dead instance's update to the device: the healer looks at it again (from
        its describe in the registry) and sends what it still needs."""
        self.healer.poke(device_id)

    def _adopt_session(self, name: str, started: float) -> None:
        """A dead instance's MQTT session: what the broker kept for it is written here
        (keel_cloud.adopt), on a thread of its own."""
        tls = self._session_tls(name) if self._session_tls else None
        if tls is None:
            log.warning("instance %s died: its certificate is not in this cloud directory, so "
                        "what the broker keeps for it waits until it runs again", name)
            self.registry.forget_instance(name, started)
            return
        SessionAdoption(self, name, started, tls).start()

    def _on_subscribe(self, client, userdata, mid, reasons, properties=None):
        if mid != self._subscribe_mid:
            return
        if any(r.is_failure for r in reasons):
            log.error("the broker refused the service's subscriptions: %s", reasons)
            return
        self._subscribed.set()
        if self._on_subscribed:
            try:
                self._on_subscribed()
            except Exception:  # noqa: BLE001 - the service goes on
                log.exception("after subscribing")

    def _on_disconnect(self, client, userdata, flags, reason, properties=None):
        self._connected.clear()
        if not self._stopping:
            log.warning("fleet service lost the broker (%s); reconnecting", reason)

    # Incoming

    def _on_message(self, client, userdata, msg):
        """paho's callback: whatever arrives, nothing may raise into paho's loop (it would
        end the service's MQTT thread). Messages are checked first (keel_cloud.protocol);
        the except below is the last line of defence, for a database failure say."""
        self.take(client, msg, self._connection)

    def take(self, client, msg, connection=None) -> None:
        """A message from `client` (this service's, or the one taking up a dead instance's
        session): handled, and acknowledged once its write is committed (at once when it
        writes nothing). The acknowledgement goes only on the connection it came on: on
        another, its packet id may name another message."""
        def ack():
            if connection is None or connection == self._connection:
                client.ack(msg.mid, msg.qos)

        queued = False
        try:
            queued = self._handle(msg.topic, msg.payload, msg.retain, ack)
        except Exception:  # noqa: BLE001 - the service must outlive any one message
            log.exception("a message on %r could not be handled",
                          getattr(msg, "_topic", b"?")[:120])
        if not queued:
            ack()

    def _handle(self, topic: str, payload: bytes, retained: bool = False, ack=None) -> bool:
        """Check the message and queue its registry write (ingest.Ingest): what it leads
        to (the healer, subscribers) happens once the write is committed, in order, and
        then ack() runs. Returns whether a write was queued."""
        device_id = protocol.device_of(topic)
        if device_id is None:
            log.warning("message on %r ignored: not a device topic", topic[:120])
            return False
        now = time.time()
        try:
            message = protocol.parse(topic, payload)
        except protocol.Invalid as e:
            write = Write("drop", device_id, str(e), now)
        else:
            write = None
            if message.kind == "status":
                if message.value and not retained:  # (a retained one: no news of a reconnection)
                    self.ota.on_online(device_id)  # at once: a transfer re-offers after a reconnect
                write = Write("status", device_id, message.value, now)
            elif message.kind == "describe":
                describe = message.value
                write = Write("describe", device_id, (describe, rollback_of(describe)), now)
            elif message.kind == "event":
                write = Write("event", device_id, message.value, now)
            elif message.kind == "reply":
                if self._on_reply(device_id, message.value):
                    write = Write("seen", device_id, None, now)
            elif message.kind == "ota_status":
                if self.ota.on_status(device_id, message.value):
                    write = Write("seen", device_id, None, now)
        if write is None:
            return False
        self.ingest.put(write, ack)
        return True

    def _committed(self, writes: list, results: list) -> None:
        """After a batch's commit (the ingest thread): the healer, the event stream."""
        events = []
        for write, result in zip(writes, results):
            device_id = write.device_id
            if result is None:
                if device_id not in self._unknown:  # logged once per device
                    self._unknown.add(device_id)
                    log.warning("message from unregistered device %s ignored", device_id)
                continue
            if write.kind == "status":
                if not write.value:
                    self.healer.on_offline(device_id)
            elif write.kind == "describe":
                if result:
                    log.warning("device %s rolled back %s %s %s (%s)", device_id, result["function"],
                                result["index"], result["version"], result.get("reason"))
                self.healer.on_describe(device_id, write.value[0])  # only schedules
            elif write.kind == "event":
                events.append(result)
            elif write.kind == "drop":
                if result <= LOGGED_DROPS or result % 100 == 0:  # a device cannot flood the log
                    log.warning("device %s: dropped a message (%s); %d dropped so far", device_id,
                                write.value, result)
        events.sort(key=lambda e: e["seq"])  # (write_batch numbers them in device order)
        if self.events.following:
            if events:
                self.events.poke()
        else:
            self.events.add(events)

    def _on_reply(self, device_id: str, reply: dict) -> bool:
        with self._pending_lock:
            waiter = self._pending.get((device_id, reply["id"]))
        if waiter is None:  # late (after its timeout), or not a request of this device
            log.debug("device %s: a reply to no request of its own waiting, ignored", device_id)
            return False
        waiter["reply"] = reply
        waiter["done"].set()
        return True

    # The healer's state

    def lease_owners(self) -> dict[str, str]:
        """{device id: instance} for the updates other instances are sending ({} alone)."""
        if not self.leases:
            return {}
        return {d: o for d, o in self.registry.lease_owners().items() if o != self.instance}

    def heal_status(self, device_id: str, owners: dict | None = None) -> dict:
        """The healer's state for the device; with several instances, and another one
        sending it an update, that instance's name and what it sends."""
        status = self.healer.status(device_id)
        owner = (owners if owners is not None else self.lease_owners()).get(device_id)
        if owner and status["state"] not in ("healing", "updating"):
            status = {"state": "updating", "reason": f"instance {owner} is sending it an update",
                      "updated": status.get("updated")}
        if owner:
            status["instance"] = owner
        return status

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
        """Events after `after` (of one device), waiting up to timeout for one: from the
        stream of recent events, or from the registry for older ones."""
        if not 0 <= timeout < float("inf"):  # NaN too: it would never end
            raise ValueError(f"wait must be a finite number of seconds >= 0, not {timeout!r}")
        deadline = time.monotonic() + timeout
        while True:
            found = self.events.read(after, device_id)
            if found is None:  # older than the stream keeps
                found = self.registry.events(after, device_id, READ_LIMIT)
            left = deadline - time.monotonic()
            if found or left <= 0:
                return found
            self.events.wait(self.events.last(), min(left, 1.0))  # for one newer than these

    def last_event_seq(self) -> int:
        return self.events.last()
