# ESP32 status LED, as the board describes it (board.json "status_led"):
#   "neopixel" {"pin"}                       one WS2812/SK6812 (GRB) on a data pin
#   "rgb" {"pins": [r, g, b], "active"}      three LEDs on PWM pins
#   "none"                                   nothing to drive
# The system computes the frames (ANIMATE) and calls set_rgb() about every 20 ms;
# only changes reach the pins. No allocation per frame.
import machine
import hal

_spec = hal.board().get("status_led", {"type": "none"})
_TYPE = _spec["type"]
ANIMATE = _TYPE in ("neopixel", "rgb")

# WS2812 at 800 kHz in ns: high/low time of a 0 bit, then of a 1 bit (what
# neopixel.NeoPixel.write() sends, without a tuple per frame).
_TIMING = (400, 850, 800, 450)
_frame = bytearray(3)  # the colour shown: G, R, B for a NeoPixel; R, G, B for "rgb"
_out = []

if _TYPE == "neopixel":
    _out.append(machine.Pin(hal.pin_id(_spec["pin"]), machine.Pin.OUT, value=0))
elif _TYPE == "rgb":
    _invert = _spec.get("active", "high") == "low"
    for _name in _spec["pins"]:
        _pin = machine.Pin(hal.pin_id(_name))
        _out.append(machine.PWM(_pin, freq=1000, duty_u16=65535 if _invert else 0))
elif _TYPE != "none":
    raise ValueError("esp32: status LED type %r not supported" % _TYPE)


def show(color, pattern):
    pass  # the system animates this LED frame by frame through set_rgb()


def set_rgb(r, g, b):
    f = _frame
    if _TYPE == "neopixel":
        if f[0] != g or f[1] != r or f[2] != b:
            f[0] = g
            f[1] = r
            f[2] = b
            machine.bitstream(_out[0], 0, _TIMING, f)
    elif _TYPE == "rgb":
        _channel(0, r)
        _channel(1, g)
        _channel(2, b)


def _channel(i, level):
    if _frame[i] != level:
        _frame[i] = level
        duty = level * 257  # 0..255 -> 0..65535
        _out[i].duty_u16(65535 - duty if _invert else duty)
