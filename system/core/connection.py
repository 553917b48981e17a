# The system's network link (docs/connecting.md), as Device OS makes it the system's
# job: on a WiFi board it joins one of the access points stored in /keel/wifi.json (up
# to 5), the strongest in range first, waits with backoff when none works, and joins
# again when the link drops; with none stored it is in listening mode. The cloud session
# opens only while the link is up (cloud_session.py asks up()). The virtual board uses
# the host's network (always up); a board without one (nRF52840) stays offline.
import sys
import time
from micropython import const
import events
import flashfs
import led
from hal import network
from keel_files import WIFI_FILE

MAX_NETWORKS = const(5)
JOIN_TIMEOUT_MS = const(15000)  # one access point's chance (a join takes a few seconds)
BACKOFF_MIN_MS = const(2000)
BACKOFF_MAX_MS = const(60000)
_CHECK_MS = const(200)

# What the link is doing (the status record's network.state)
NONE, LISTENING, JOINING, UP, WAITING, OFF = "none", "listening", "joining", "up", "waiting", "off"
# Who brings the link up (keel.system_mode, as Device OS's SYSTEM_MODE): the system at
# once, or the app with keel.network.connect() (semi-automatic; manual is the same in
# Keel, whose system loop always runs).
AUTOMATIC, SEMI_AUTOMATIC, MANUAL = "automatic", "semi-automatic", "manual"
LISTEN_HOLD_MS = const(3000)  # the MODE/BOOT button held this long: listening mode

_current = [None]


def credentials():
    """The stored networks, [{"ssid", "password"}], newest last."""
    doc = flashfs.read_json(WIFI_FILE)
    nets = doc.get("networks") if isinstance(doc, dict) else None
    if not isinstance(nets, list):
        return []
    return [n for n in nets if isinstance(n, dict) and isinstance(n.get("ssid"), str)][-MAX_NETWORKS:]


def up():
    """Can the cloud session open a socket now."""
    c = _current[0]
    return c is None or c.state == UP


def current():
    return _current[0]


class Connection:
    def __init__(self, status):
        self.status = status  # keel_system.Status
        self.normal = status.doc.get("mode") == "normal"  # safe mode keeps its LED
        self.cloud = False  # a cloud session waits for the link (the LED says which)
        self.connects = 0
        self.error = None
        self.ssid = None
        self._queue = []  # the networks to try in this round, strongest first
        self._at = 0
        self._next_check = 0
        self._backoff = BACKOFF_MIN_MS
        self.mode = AUTOMATIC
        self.wanted = True  # the link is to be up (off: disconnect(), or not yet connect())
        self.listen = False  # listening mode asked for with the button
        if network.KIND is None:
            self.state = NONE
        elif network.KIND == "host":
            self.state = UP
        elif credentials():
            self.state = WAITING  # the first round at once
        else:
            # (decided now, recorded with the rest: no flash write of the link's races
            # the app's start)
            self.state = LISTENING
            self._at = time.ticks_add(time.ticks_ms(), 1000)
            print("keel: network: no WiFi credentials stored: listening mode "
                  "(keel device wifi --port PORT --ssid ...)")
        self._record()
        self.show()

    # What the app asks (keel.network, keel.system_mode)

    def set_mode(self, mode):
        if mode not in (AUTOMATIC, SEMI_AUTOMATIC, MANUAL):
            raise ValueError("unknown system mode '%s'" % mode)
        self.mode = mode
        if mode != AUTOMATIC and self.state not in (UP, NONE):
            self.wanted = False  # (the app starts before the network)
            self._enter(OFF, time.ticks_ms())

    def connect(self):
        if self.state == NONE:
            raise OSError("this board has no network")
        self.wanted = True
        if self.state == OFF:
            self._at = time.ticks_ms()
            self._enter(WAITING, self._at)

    def disconnect(self):
        self.wanted = False
        if self.state in (NONE, OFF):
            return
        was_up = self.state == UP
        if network.KIND == "wifi":
            network.disconnect()
        self._enter(OFF, time.ticks_ms())
        if was_up:
            events.emit(events.NETWORK_DOWN)

    def button(self, name, held_ms):
        # (a system event handler) held 3 s: into listening mode, or out of it again
        if held_ms < LISTEN_HOLD_MS or network.KIND != "wifi":
            return
        self.listen = not self.listen
        now = time.ticks_ms()
        if self.listen:
            was_up = self.state == UP
            network.disconnect()
            print("keel: network: listening mode (the button was held); "
                  "hold it again to leave")
            self._at = now
            self._enter(LISTENING, now)
            if was_up:
                events.emit(events.NETWORK_DOWN)
        else:
            print("keel: network: leaving listening mode")
            self._at = now
            self._enter(WAITING if self.wanted else OFF, now)

    # The system loop's step

    def service(self):
        state = self.state
        # (two comparisons, not `in (NONE, OFF)`: that tuple is built on every pass)
        if state == NONE or state == OFF or network.KIND == "host":
            return
        now = time.ticks_ms()
        if time.ticks_diff(now, self._next_check) < 0:
            return
        self._next_check = time.ticks_add(now, _CHECK_MS)
        if state == UP:
            link, _ = network.state()
            if link != "up":
                print("keel: network: lost %s; joining again" % self.ssid)
                self._enter(JOINING, now)
                events.emit(events.NETWORK_DOWN)
            return
        if state == JOINING:
            link, error = network.state()
            if link == "up":
                self._joined(now)
            elif error == "wrong-password" or time.ticks_diff(now, self._at) >= JOIN_TIMEOUT_MS:
                self._failed(now, error or "timeout")
            elif error is not None and time.ticks_diff(now, self._at) >= JOIN_TIMEOUT_MS // 3:
                self._failed(now, error)  # (no AP: it has had a few scans)
            return
        # LISTENING or WAITING: a new round when one is due (listening: credentials came)
        if time.ticks_diff(now, self._at) >= 0:
            self._round(now)

    def _round(self, now):
        nets = [] if self.listen else credentials()
        if not nets:
            if self.state != LISTENING:
                print("keel: network: no WiFi credentials stored: listening mode "
                      "(keel device wifi --port PORT --ssid ...)")
                self._enter(LISTENING, now)
            self._at = time.ticks_add(now, 1000)  # (looks again for credentials)
            return
        heard = {}
        try:
            for ssid, rssi in network.scan():  # (an SSID heard from several APs: the best)
                if rssi > heard.get(ssid, -200):
                    heard[ssid] = rssi
        except OSError:
            pass
        nets.sort(key=lambda n: -heard.get(n["ssid"], -200))  # in range and strongest first
        self._queue = nets
        self._next(now)

    def _next(self, now):
        net = self._queue.pop(0)
        self.ssid = net["ssid"]
        network.connect(net["ssid"], net.get("password") or "")
        self._enter(JOINING, now)

    def _joined(self, now):
        self.connects += 1
        self.error = None
        self._backoff = BACKOFF_MIN_MS
        self._queue = []
        info = network.info()
        self._enter(UP, now, info)  # (recorded first: a console line means it is in the status)
        print("keel: network: joined %s (%s, %s dBm)" % (self.ssid, info.get("ip"), info.get("rssi")))
        events.emit(events.NETWORK_UP)

    def _failed(self, now, error):
        # (each console line after the status records it: a line means it is there)
        self.error = error
        ssid = self.ssid
        network.disconnect()
        if self._queue:
            self._next(now)
            print("keel: network: cannot join %s (%s)" % (ssid, error))
            return
        delay = self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_MS)
        self._at = time.ticks_add(now, delay)
        self._enter(WAITING, now)
        print("keel: network: cannot join %s (%s)" % (ssid, error))
        print("keel: network: trying again in %d ms" % delay)

    def _enter(self, state, now, info=None):
        self.state = state
        if state == JOINING:
            self._at = now
        self._record(info)
        self.show()

    def show(self):
        """The status LED for the link (Device OS's colours); the session's once up."""
        if not self.normal or network.KIND != "wifi":
            return
        state = self.state
        if state == LISTENING:
            led.set_state("listening")
        elif state == JOINING:
            led.set_state("joining")
        elif state == WAITING:
            led.set_state("network-error" if self.error == "wrong-password" else "joining")
        elif state == UP:
            led.set_state("connecting" if self.cloud else "network-up")
        elif state == OFF:
            led.set_state("offline")

    def _record(self, info=None):
        doc = {"kind": network.KIND, "state": self.state, "connects": self.connects,
               "error": self.error}
        if self.ssid is not None:
            doc["ssid"] = self.ssid
        if info:
            doc["rssi"] = info.get("rssi")
            doc["ip"] = info.get("ip")
        self.status.set(network=doc)


def start(status):
    """Bring the link up (in the background: the system loop's service)."""
    import runtime

    c = Connection(status)
    _current[0] = c
    api = sys.modules.get("netapi")  # the app, imported first, may have set the mode
    if api is not None and api.system_mode() != AUTOMATIC:
        c.set_mode(api.system_mode())
    runtime.add_service(c.service)
    events.subscribe(events.BUTTON, c.button)
    return c
