# Sensor: reads a TMP102 temperature sensor on I2C every second, exposes it as the
# cloud variable "temperature", and registers the cloud function "led" ("on"/"off").
import keel
from hal.gpio import Pin
from hal.i2c import I2C

TMP102 = 0x48

bus: I2C  # made in setup() (annotations: MicroPython ignores them, type checkers read them)
led: Pin
celsius: float | None = None


def read_celsius():
    raw = bus.readfrom_mem(TMP102, 0, 2)
    value = (raw[0] << 4) | (raw[1] >> 4)
    if value & 0x800:  # 12-bit two's complement
        value -= 0x1000
    return value * 0.0625


def sample():
    global celsius
    celsius = read_celsius()
    keel.log.info("temperature %.2f C", celsius)


def set_led(arg):
    if arg == "on":
        led.on()
        return 1
    if arg == "off":
        led.off()
        return 0
    return -1  # unknown argument


def setup():
    global bus, led
    bus = I2C(0)
    led = Pin("LED", Pin.OUT)
    sample()
    keel.variable("temperature", lambda: celsius)
    keel.function("led", set_led)
    keel.Timer(1000, sample).start()
