# The board's button (board.json "button"): on the nRF52840 DK, BUTTON1 on P0.11,
# active low (the DK has no external pull-ups: the internal one holds it idle).
# Polled by the system loop.
#
# machine.Pin knows only the pins of the firmware's board (its pins.csv): the Particle
# Xenon's firmware does not list P0.11, its MODE button (Pin(11) raises ValueError).
# Such a pin is read through the GPIO registers instead (nRF52840 Product
# Specification, GPIO: PIN_CNF[n] at 0x700 + 4n, IN at 0x510 of port P0 at
# 0x50000000 or P1 at 0x50000300), as an input with the internal pull.
import machine
from machine import mem32
from micropython import const
import hal

_GPIO = const(0x50000000)
_PORT = const(0x300)  # P1's registers are this far after P0's
_IN = const(0x510)
_PIN_CNF = const(0x700)
_CNF_PULL_UP = const(0xC)  # DIR input, INPUT connected, PULL up (3 << 2)
_CNF_PULL_DOWN = const(0x4)  # ... PULL down (1 << 2)

_spec = hal.board()["button"]
_active_low = _spec.get("active", "low") == "low"
_id = hal.pin_id(_spec["pin"])
_pressed_level = 0 if _active_low else 1
_pin = None
try:
    _pin = machine.Pin(
        _id, machine.Pin.IN, machine.Pin.PULL_UP if _active_low else machine.Pin.PULL_DOWN
    )
except ValueError:  # not one of the firmware's pins
    _base = _GPIO + (_id >> 5) * _PORT
    _bit = _id & 31
    mem32[_base + _PIN_CNF + 4 * _bit] = _CNF_PULL_UP if _active_low else _CNF_PULL_DOWN


def pressed():
    if _pin is not None:
        return _pin.value() == _pressed_level
    return (mem32[_base + _IN] >> _bit) & 1 == _pressed_level
