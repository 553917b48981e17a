# The status LED belongs to the system: it shows the device state in Particle's
# colours. An app may take it over (keel.led) and give it back.
import time
from micropython import const
from hal import status_led

# state -> (colour, pattern)
STATES = {
    "offline": ("white", "breathing"),  # running, no cloud configured
    "joining": ("green", "blinking"),  # joining the network (WiFi)
    "network-up": ("green", "breathing"),  # on the network, no cloud session
    "connecting": ("cyan", "blinking"),  # connecting to the cloud
    "connected": ("cyan", "breathing"),
    "safe-mode": ("magenta", "breathing"),
    "updating": ("magenta", "blinking"),
    "listening": ("blue", "blinking"),  # no network credentials: waiting for them
    "network-error": ("red", "flashes-2"),  # the WiFi password was refused: fix it
    "error": ("red", "blinking"),
}
COLORS = {
    "white": (255, 255, 255),
    "green": (0, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "yellow": (255, 255, 0),
    "red": (255, 0, 0),
    "blue": (0, 0, 255),
}
_FRAME_MS = const(20)
_BREATH_MS = const(3000)
_BLINK_MS = const(250)
# An error the user must fix is red flashes, as many as its code (docs/api.md, "Status
# LED"), then a pause: 2, the WiFi password was refused.
FLASHES = {"flashes-2": 2}
_FLASH_MS = const(200)
_FLASH_PAUSE_MS = const(1200)

_state = ["offline"]
_owner = ["system"]
_last_frame = [0]


def set_state(name):
    if name not in STATES:
        raise ValueError("unknown LED state '%s'" % name)
    _state[0] = name
    if _owner[0] == "system":
        status_led.show(*STATES[name])


def state():
    return _state[0]


def owner():
    return _owner[0]


def take():
    """The app takes the LED: the system stops drawing on it until release()."""
    _owner[0] = "app"
    status_led.show("app", "solid")


def rgb(r, g, b):
    if _owner[0] != "app":
        raise RuntimeError("the status LED belongs to the system: call keel.led.take() first")
    status_led.set_rgb(r, g, b)


def release():
    _owner[0] = "system"
    status_led.show(*STATES[_state[0]])


def _level(pattern, now):
    if pattern == "solid":
        return 255
    if pattern == "blinking":
        return 255 if (now // _BLINK_MS) % 2 == 0 else 0
    count = FLASHES.get(pattern)
    if count:
        at = now % (2 * _FLASH_MS * count + _FLASH_PAUSE_MS)
        return 255 if at < 2 * _FLASH_MS * count and (at // _FLASH_MS) % 2 == 0 else 0
    if pattern == "breathing":
        phase = now % _BREATH_MS
        half = _BREATH_MS // 2
        return 20 + 235 * (phase if phase < half else _BREATH_MS - phase) // half
    return 0


def service():
    """Draw the next frame, on boards whose LED the system animates."""
    if not status_led.ANIMATE or _owner[0] != "system":
        return
    now = time.ticks_ms()
    if time.ticks_diff(now, _last_frame[0]) < _FRAME_MS:
        return
    _last_frame[0] = now
    color, pattern = STATES[_state[0]]
    level = _level(pattern, now)
    r, g, b = COLORS[color]
    status_led.set_rgb(r * level // 255, g * level // 255, b * level // 255)
