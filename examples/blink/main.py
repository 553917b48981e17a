# Blink: toggles the user LED every 500 ms.
import keel
from hal.gpio import Pin

led: Pin  # made in setup() (an annotation: MicroPython ignores it, type checkers read it)


def setup():
    global led
    led = Pin("LED", Pin.OUT)


def loop():
    led.toggle()
    keel.delay(500)  # the system keeps running while the app waits
