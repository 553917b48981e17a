# nRF status LED, as the board describes it (board.json "status_led"):
#   "rgb" {"pins": [r, g, b], "active": "low"|"high"}   three on/off LEDs
#   "none"                                              nothing to drive
# On the nRF52840 DK "rgb" is LED1..LED3, three separate green LEDs standing in for
# red, green and blue: a channel is lit when its level is 128 or more, so colours
# show as which LEDs are on and "breathing" as a slow blink. The system computes
# the frames (ANIMATE) and calls set_rgb() about every 20 ms; only changes reach
# the pins.
import machine
import hal

_spec = hal.board().get("status_led", {"type": "none"})
_TYPE = _spec["type"]
ANIMATE = _TYPE == "rgb"
_THRESHOLD = 128

_pins = []
_lit = bytearray(3)  # 1 where the channel's LED is on
_off_level = 0

if _TYPE == "rgb":
    _off_level = 1 if _spec.get("active", "high") == "low" else 0
    for _name in _spec["pins"]:
        _pins.append(machine.Pin(hal.pin_id(_name), machine.Pin.OUT, value=_off_level))
elif _TYPE != "none":
    raise ValueError("nrf: status LED type %r not supported" % _TYPE)


def show(color, pattern):
    pass  # the system animates this LED frame by frame through set_rgb()


def set_rgb(r, g, b):
    if _pins:
        _channel(0, r)
        _channel(1, g)
        _channel(2, b)


def _channel(i, level):
    lit = 1 if level >= _THRESHOLD else 0
    if _lit[i] != lit:
        _lit[i] = lit
        _pins[i].value(lit ^ _off_level)
