"""Taking up the MQTT session of a fleet service instance that died.

An instance's MQTT session is persistent (keel_cloud.fleet_service), and it acknowledges a
device message only once its write is committed (keel_cloud.ingest). When it dies, the
broker keeps its session: the messages it had been given and had not acknowledged, and
its share of the shared subscriptions given to it since (Mosquitto 2.0 goes on queueing
a share for an offline member of the group). Nothing there is lost, but nothing reaches
the registry either until someone holds that session again.

An instance that claims the dead one (Leases: once it has not beaten for TTL_S) connects
with that instance's certificate, so the broker gives it the same session: it writes
each message as if it were its own, leaves the shared groups, and once nothing has come
for QUIET_S and all is committed and acknowledged, disconnects and ends the session (a
clean connection under the same name), then forgets the instance. If the instance starts
again meanwhile, it takes its session back (the broker drops this connection) and the
adoption stops: what was taken and not acknowledged goes to the instance again."""

import logging
import threading
import time

import paho.mqtt.client as mqtt

from keel_cloud import pki

log = logging.getLogger("keel.cloud.adopt")

QUIET_S = 1.0  # nothing came for this long after leaving the groups: the session is drained
SHARED_TOPIC = "devices/+/events/#"  # what the instances share (FleetService.shared_filters)
HOLD_S = 3.0  # how often the claim on the dead instance is renewed (Leases.BEAT_S)
CONNECT_S = 10.0


class SessionAdoption(threading.Thread):
    def __init__(self, service, name: str, started: float, tls):
        super().__init__(name=f"keel-adopt-{name}", daemon=True)
        self.service = service
        self.name = name
        self.started = started
        self.tls = tls
        self.taken = 0
        self.drained = threading.Event()  # set once the session is ended and forgotten

    def run(self) -> None:
        try:
            self._adopt()
        except Exception:  # noqa: BLE001 - another instance claims it again later
            log.exception("taking up the session of instance %s failed", self.name)

    def _client(self, clean: bool) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=pki.instance_cn(self.name),
                             clean_session=clean, manual_ack=True, reconnect_on_failure=False)
        client.tls_set_context(self.tls)
        return client

    def _adopt(self) -> None:
        service, registry = self.service, self.service.registry
        connected, lost, left = threading.Event(), threading.Event(), threading.Event()
        last = [time.monotonic()]
        leave = {}

        def on_connect(client, userdata, flags, reason, properties=None):
            if reason.is_failure:
                log.warning("the broker refused instance %s's session: %s", self.name, reason)
                lost.set()
                return
            log.info("took up the session of instance %s (%s)", self.name,
                     "kept by the broker" if flags.session_present else "none kept")
            _, leave["mid"] = client.unsubscribe(service.shared_filters() + service.own_filters())
            connected.set()

        def on_unsubscribe(client, userdata, mid, reasons, properties=None):
            if mid == leave.get("mid"):
                left.set()

        def on_message(client, userdata, msg):
            last[0] = time.monotonic()
            if mqtt.topic_matches_sub(SHARED_TOPIC, msg.topic):
                self.taken += 1
                service.take(client, msg)
            else:  # what every instance takes whole: the live ones have had it
                client.ack(msg.mid, msg.qos)

        def on_disconnect(client, userdata, flags, reason, properties=None):
            lost.set()

        client = self._client(False)
        client.on_connect, client.on_unsubscribe = on_connect, on_unsubscribe
        client.on_message, client.on_disconnect = on_message, on_disconnect
        client.connect(service.host, service.port, keepalive=30)
        client.loop_start()
        try:
            if not connected.wait(CONNECT_S):
                return
            held = time.monotonic()
            while not (left.is_set() and time.monotonic() - last[0] >= QUIET_S):
                if lost.is_set() or service.stopping:
                    return
                if time.monotonic() - held >= HOLD_S:
                    if not registry.hold_instance(self.name, self.started):
                        log.warning("instance %s started again: its session is its own", self.name)
                        return
                    held = time.monotonic()
                time.sleep(0.1)
            service.ingest.flush(30.0)  # written, and acknowledged on this connection
            if lost.is_set():
                return
        finally:
            client.disconnect()
            client.loop_stop()
        if not registry.hold_instance(self.name, self.started):
            return  # it came back: the session is its own again
        self._end_session()
        registry.forget_instance(self.name, self.started)
        log.warning("instance %s: %d messages the broker kept for it are written; its session "
                    "is ended", self.name, self.taken)
        self.drained.set()

    def _end_session(self) -> None:
        """A clean connection under the instance's name: the broker drops the session."""
        done = threading.Event()
        client = self._client(True)
        client.on_connect = lambda *args, **kwargs: done.set()
        client.connect(self.service.host, self.service.port, keepalive=30)
        client.loop_start()
        try:
            done.wait(CONNECT_S)
        finally:
            client.disconnect()
            client.loop_stop()
