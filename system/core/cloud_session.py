# The device's session with Keel Cloud (docs/protocol.md): MQTT 3.1.1 over TLS with
# the device's own certificate, kept up by a state machine that the system loop runs
# a step of on every pass; nothing here blocks the app (except name resolution, which
# MicroPython only has blocking, and only for a host name that is not an address).
#
# The system starts it on provisioned devices, in normal and safe mode. The app API
# (system/services/cloud.py) attaches itself when the app first uses a cloud call; without
# it (safe mode, an app that uses none) the session still reports the device.
import sys
import gc
import json
import time
import errno
import random
import select
import socket
import tls
from micropython import const
import hal
from hal import device
import flashfs
import handover
import runtime
import events
import led
import mqtt
from keel_files import (CHECKED_FILE, CLOUD_CA_FILE, CLOUD_CERT_FILE, CLOUD_DIR, CLOUD_FILE, CLOUD_KEY_FILE,
                        INSTALLED_FILE)
DEFAULT_PORT = const(8883)
DEFAULT_KEEPALIVE_S = const(30)
BACKOFF_MIN_MS = const(1000)
BACKOFF_MAX_MS = const(60000)
CONNECT_TIMEOUT_MS = const(20000)  # TCP + TLS + CONNACK
STABLE_MS = const(30000)  # a connection that lasted this long starts the backoff again
_DESCRIBE_DELAY_MS = const(300)  # registrations come in bursts: describe once after

# states
_WAITING = const(0)  # for the next attempt
_TCP = const(1)
_MQTT = const(2)  # TLS handshake, CONNECT, waiting for CONNACK
_UP = const(3)

_current = [None]


def current():
    """The session, if the system started one."""
    return _current[0]


def start(status):
    """Start the session if the device is provisioned; status is the record the
    system keeps of this boot (keel_system.Status.doc). Returns it, or None."""
    config = flashfs.read_json(CLOUD_FILE)
    if not isinstance(config, dict):
        print("keel: cloud: %s is not a JSON object; staying offline" % CLOUD_FILE)
        return None
    try:
        session = Session(config, _tls_context(), status)
    except (OSError, ValueError, TypeError) as e:
        print("keel: cloud: cannot use the credentials in %s (%s)" % (CLOUD_DIR, e))
        return None
    _current[0] = session
    runtime.add_service(session.service)
    app = sys.modules.get("cloud")  # the app's cloud calls, if it loaded them at import
    if app is not None:
        app._attach_session()
    return session


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _tls_context():
    ctx = tls.SSLContext(tls.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = tls.CERT_REQUIRED
    ctx.load_verify_locations(_read(CLOUD_CA_FILE))
    ctx.load_cert_chain(_read(CLOUD_CERT_FILE), _read(CLOUD_KEY_FILE))
    return ctx


class Session:
    def __init__(self, config, ctx, status):
        self.host = config.get("host", "127.0.0.1")
        self.port = int(config.get("port", DEFAULT_PORT))
        self.server_name = config.get("server_name", self.host)
        self.keepalive = int(config.get("keepalive", DEFAULT_KEEPALIVE_S))
        self.device_id = device.unique_id()
        self.base = ("devices/%s/" % self.device_id).encode()
        self.status = status
        self.normal = status.get("mode") == "normal"  # safe mode keeps its LED
        self.app = None
        self.last_error = None
        self._ctx = ctx
        self._rx = runtime.SESSION_RX[0] or bytearray(runtime.SESSION_RX_SIZE)
        runtime.SESSION_RX[0] = None
        self._sock = None
        self._poll = None
        self._client = None
        self._ack_entry = None  # the OTA acknowledgement's packet (ota_ack)
        self._ack_size = 0
        self._carried = ()
        self._state = _WAITING
        self._opened = 0
        self._up_at = 0
        self._useful = False
        self._retry_at = time.ticks_ms()  # the first attempt at once
        self._backoff = BACKOFF_MIN_MS
        self._changed_at = None
        self._described_app = None
        self._busy = False
        random.seed(hash(self.device_id) ^ time.ticks_us())  # devices spread their retries
        if self.normal and "connection" not in sys.modules:  # (a WiFi board's link shows its own)
            led.set_state("connecting")

    # What the app API uses

    def connected(self):
        return self._state == _UP

    def attach(self, app):
        """app (the cloud module) provides call_function, read_variable,
        deliver_event, names() and send_queued(session)."""
        self.app = app
        self.changed()

    def changed(self):
        """Functions or variables changed: describe the device again."""
        self._changed_at = time.ticks_ms()

    def publish(self, name, data):
        """Send an app event; False when not connected or the window is full."""
        client = self._client
        if self._state != _UP or client.room() <= 0:
            return False
        return client.publish((self.base, b"events/", name), data or b"", carry=True) != 0

    def ota_status(self, data):
        """Publish devices/<id>/ota/status (ota.py); False when not connected."""
        if self._state != _UP:
            return False
        return self._client.publish((self.base, b"ota/status"), data, force=True) != 0

    def ota_ack(self, data):
        """An OTA acknowledgement (ota.py's `receiving` status, always the same length) at
        QoS 0, from one packet made once: one lost with a connection is made good by the
        one the receiver sends again once connected (ota.reconnected), and the cloud goes
        by the acknowledgements, not MQTT's (docs/protocol.md, "Updates")."""
        if self._state != _UP:
            return False
        entry = self._ack_entry
        if entry is None or len(entry[0]) != self._ack_size + len(data):
            packet = mqtt.encode_publish((self.base, b"ota/status"), data, 0)
            self._ack_size = len(packet) - len(data)
            entry = self._ack_entry = [packet, 0]
        return self._client.send_again(entry, data)

    # The system loop's step

    def service(self):
        if self._busy:
            return  # an app handler called from here is in keel.delay(): not again
        self._busy = True
        now = time.ticks_ms()
        try:
            state = self._state
            link = sys.modules.get("connection")  # a WiFi board's link (connection.py)
            if link is not None and not link.up():
                if state != _WAITING:
                    self._link_lost(now)
                return
            if state == _WAITING:
                if time.ticks_diff(now, self._retry_at) >= 0:
                    self._open(now)
            elif state == _TCP:
                self._tcp(now)
            else:
                self._client.service(now)
                if self._state == _UP:
                    self._up(now)
                elif time.ticks_diff(now, self._opened) >= CONNECT_TIMEOUT_MS:
                    raise mqtt.MQTTError("no CONNACK (TLS or broker not answering)")
        except MemoryError as e:
            if handover.INSTALLED[0]:
                # What this boot's install left in the heap: the session needs a fresh
                # one (docs/boot-flow.md, "After an install, a fresh heap").
                print("keel: cloud: not enough memory after installing; resetting")
                self._close()
                handover.reset("update")
            self._fail(now, e)
        except (OSError, ValueError, mqtt.MQTTError) as e:  # (a TLS failure is a ValueError)
            self._fail(now, e)
        except Exception as e:  # noqa: BLE001 - a session bug must not stop the app
            sys.print_exception(e)
            self._fail(now, e)
        finally:
            self._busy = False

    def _open(self, now):
        self._opened = now
        if self.normal and "connection" in sys.modules:
            led.set_state("connecting")  # (blinking cyan while it tries)
        info = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)
        if not info:
            raise OSError("cannot resolve %s" % self.host)
        sock = socket.socket(info[0][0], socket.SOCK_STREAM)
        self._sock = sock
        sock.setblocking(False)
        try:
            sock.connect(info[0][-1])
        except OSError as e:
            if e.errno != errno.EINPROGRESS:
                raise
        self._poll = select.poll()
        self._poll.register(sock, select.POLLOUT)
        self._state = _TCP

    def _tcp(self, now):
        for ready in self._poll.poll(0):
            if ready[1] & (select.POLLERR | select.POLLHUP):
                raise OSError("cannot reach %s:%d" % (self.host, self.port))
            if ready[1] & select.POLLOUT:
                self._mqtt()
                return
        if time.ticks_diff(now, self._opened) >= CONNECT_TIMEOUT_MS:
            raise OSError("TCP connect timed out")

    def _mqtt(self):
        self._poll = None
        self._sock = self._ctx.wrap_socket(
            self._sock, server_hostname=self.server_name, do_handshake_on_connect=False
        )
        client = mqtt.Client(
            self._sock, self._connected, self._message, self.keepalive, self._rx, self._carried
        )
        self._client = client
        self._carried = ()
        # The first write drives the TLS handshake; the broker keeps the will.
        client.connect(self.device_id, (self.base + b"status"), b"offline", True)
        self._state = _MQTT

    def _connected(self):
        self._state = _UP
        self._up_at = time.ticks_ms()
        self._useful = False
        self.last_error = None
        base = self.base
        client = self._client
        client.publish((base, b"status"), b"online", retain=True, force=True)
        client.subscribe((base + b"call", base + b"get", base + b"inbox/#", base + b"ota/offer", base + b"ota/chunk"))
        trial = sys.modules.get("trial")
        if trial is not None:
            trial.passed()  # a new system part reached the cloud: it stays
        self._describe()
        ota = sys.modules.get("ota")
        if ota is not None:
            ota.reconnected()
        self._report_update()
        if self.normal:
            led.set_state("connected")
        print("keel: cloud connected to %s:%d" % (self.host, self.port))
        mem = self.status.get("mem")
        if isinstance(mem, dict) and mem.get("heap_free_connected") is None:
            gc.collect()  # what the app has with the session up (once a boot)
            mem["heap_free_connected"] = gc.mem_free()
            handover.write_status(self.status)
        events.emit(events.CLOUD_CONNECTED)

    def _report_update(self):
        # What became of an update at the last boots, told once: it went in (the
        # bootloader's installed.json), or the checks it was left to failed (ota.py).
        for path in (INSTALLED_FILE, CHECKED_FILE):
            if not flashfs.exists(path):
                continue  # (the usual case: nothing to tell)
            doc = flashfs.read_json(path)
            flashfs.remove_tree(path)
            if isinstance(doc, dict) and path == INSTALLED_FILE:
                doc = {"state": "installed", "version": doc.get("version")}
            if isinstance(doc, dict):
                self.ota_status(json.dumps(doc))

    def _up(self, now):
        if self.status.get("app") != self._described_app and self._changed_at is None:
            self._changed_at = now
        changed = self._changed_at
        if changed is not None and time.ticks_diff(now, changed) >= _DESCRIBE_DELAY_MS:
            self._describe()
        if self.app is not None and self._client.room() > 0:
            self.app.send_queued(self)

    def _fail(self, now, error):
        was_up = self._state == _UP
        # The state first: should anything below run out of memory, the next pass
        # starts over from a closed session (its retry time set again below).
        self._state = _WAITING
        self._retry_at = time.ticks_add(now, self._backoff)
        self._close()
        # (not at CONNACK: a broker that takes the device and drops it again at once,
        # say for a clone of its identity, must not have it back every second; but a
        # connection that carried an update was real, however short a bad link made it)
        if was_up and (self._useful or time.ticks_diff(now, self._up_at) >= STABLE_MS):
            self._backoff = BACKOFF_MIN_MS
        delay = self._backoff + random.getrandbits(16) % (self._backoff // 2 + 1)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_MS)
        self._retry_at = time.ticks_add(now, delay)
        self._state = _WAITING
        self.last_error = ("%s" % (error,)).strip()
        what = "lost" if was_up else "not connected"
        print("keel: cloud %s (%s); retrying in %d ms" % (what, self.last_error, delay))
        link = "connection" in sys.modules  # a WiFi board: its network is up meanwhile
        if self.normal and (was_up or link):
            # (on a WiFi board: breathing green, on the network with the cloud unreachable)
            led.set_state("network-up" if link else "connecting")
        if was_up:
            events.emit(events.CLOUD_DISCONNECTED)

    def _link_lost(self, now):
        # The network went: the connection is dead whatever its socket says. Again at
        # once when the link is back (the connection manager shows the LED meanwhile).
        was_up = self._state == _UP
        self._close()
        self._state = _WAITING
        self._retry_at = now
        self.last_error = "network down"
        print("keel: cloud %s (network down)" % ("lost" if was_up else "not connected"))
        if was_up:
            events.emit(events.CLOUD_DISCONNECTED)

    def _close(self):
        client, self._client = self._client, None
        sock, self._sock = self._sock, None
        self._poll = None
        if client is not None:
            self._carried = client.unacked()  # app events sent again next time
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    # Messages

    def _describe(self):
        self._changed_at = None
        st = self.status
        board = hal.board()
        names = self.app.names() if self.app is not None else ([], [])
        gc.collect()
        doc = {
            "platform": board["platform"],
            "board": board["name"],
            "mode": st.get("mode"),
            "safe_mode_reason": st.get("safe_mode_reason"),
            "missing": st.get("missing", []),
            "reset_reason": st.get("reset_reason"),
            "vm": st.get("vm"),
            "heap_free": gc.mem_free(),
            "app": st.get("app"),
            "functions": names[0],
            "variables": names[1],
        }
        for key in ("rollback", "trust", "refused", "network"):
            if st.get(key):
                doc[key] = st[key]
        self._described_app = doc["app"]
        self._client.publish((self.base, b"describe"), handover.status_pieces(doc), force=True)

    def _message(self, topic, payload):
        n = len(self.base)
        if len(topic) <= n or topic[:n] != self.base:
            return
        rest = topic[n:]
        if rest == b"call":
            self._request(payload, True)
        elif rest == b"get":
            self._request(payload, False)
        elif rest == b"ota/chunk" or rest == b"ota/offer":
            self._useful = True
            try:
                import ota  # (loaded by the first OTA message only)
            except MemoryError as e:
                # The receiver (and the module format it loads) does not fit beside the
                # system and the app: refuse the update, keep the session.
                for name in ("ota", "module_format"):
                    sys.modules.pop(name, None)
                gc.collect()
                print("keel: ota: not enough memory for the receiver (%d bytes free, in pieces: "
                      "%s); refusing the update" % (gc.mem_free(), e))
                if rest == b"ota/offer":
                    self.ota_status(b'{"state": "refused", "reason": "no-memory"}')
                return
            ota.message(self, rest, payload)
        elif rest[:6] == b"inbox/" and self.app is not None:
            try:
                name = str(rest[6:], "utf-8")
                data = str(payload, "utf-8") if len(payload) else None
            except UnicodeError:
                return
            self.app.deliver_event(name, data)

    def _request(self, payload, call):
        try:
            req = json.loads(payload)
            rid = req["id"]
        except (ValueError, TypeError, KeyError):
            print("keel: cloud: ignored a malformed request")
            return
        app = self.app
        if app is None:
            mode = self.status.get("mode")
            if mode == "normal" and self.status.get("app") == "running":
                # (an app that has not used keel's cloud calls registered nothing)
                error = "NotFound: no %s '%s'" % ("function" if call else "variable", req.get("name"))
            else:
                error = "no app running (%s mode)" % mode
            reply = {"id": rid, "ok": False, "error": error}
        else:
            try:
                name = req["name"]
                if call:
                    result = app.call_function(name, req.get("arg"))
                else:
                    result = app.read_variable(name)
                reply = {"id": rid, "ok": True, "result": result}
            except Exception as e:  # noqa: BLE001 - the caller gets the error; the app goes on
                reply = {"id": rid, "ok": False, "error": "%s: %s" % (type(e).__name__, e)}
                # A name nobody registered is not worth a traceback; the app's own errors are.
                if not isinstance(e, getattr(app, "NotFound", KeyError)):
                    sys.print_exception(e)
        self._client.publish((self.base, b"reply"), json.dumps(reply), force=True)
