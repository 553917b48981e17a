# Blink: toggles the user LED every 500 ms.
import keel
from hal.gpio import Pin

led = None


def setup():
    global led
    led = Pin("LED", Pin.OUT)


def loop():
    led.toggle()
    keel.delay(500)  # the system keeps running while the app waits
