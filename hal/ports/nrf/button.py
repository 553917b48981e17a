# The board's button (board.json "button"): on the nRF52840 DK, BUTTON1 on P0.11,
# active low (the DK has no external pull-ups: the internal one holds it idle).
# Polled by the system loop.
import machine
import hal

_spec = hal.board()["button"]
_active_low = _spec.get("active", "low") == "low"
_pin = machine.Pin(
    hal.pin_id(_spec["pin"]),
    machine.Pin.IN,
    machine.Pin.PULL_UP if _active_low else machine.Pin.PULL_DOWN,
)
_pressed_level = 0 if _active_low else 1


def pressed():
    return _pin.value() == _pressed_level
