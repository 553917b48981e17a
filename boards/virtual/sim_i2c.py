# The devices on the board's I2C buses, modelled as a target sees the bus, one byte at
# a time: start() when it is addressed for a write, receive(byte) per byte written,
# start_read() and send() per byte read. board.json lists them per bus:
#   "i2c": [{"bus": 0, "sda": "D0", "scl": "D1", "simulated": [{"model": "tmp102", "address": 72}]}]
# A bus object is what a controller on those pins reaches; an address no device
# answers is a NACK (OSError(ENODEV) from the controllers that use this).
import time
from micropython import const
import sim_board
import sim_link

ENODEV = const(19)

_TMP102_CONFIG_RESET = const(0x60A0)
_TMP102_TLOW_RESET = const(0x4B00)  # 75 °C
_TMP102_THIGH_RESET = const(0x5000)  # 80 °C
_TMP102_CONFIG_WRITABLE = const(0x1FD0)  # F1 F0 POL TM SD, CR1 CR0, EM
_TMP102_CONFIG_FIXED = const(0x6020)  # R1 R0 (12 bits) and AL read 1; OS reads 0
_TMP102_EM = const(0x0010)  # extended mode: 13-bit temperatures
_TMP102_BASE = const(344)  # 21.5 °C in 1/16 °C


def _sixteenths(celsius):
    """celsius as a whole number of 1/16 °C, rounded half away from zero."""
    x = celsius * 16
    return int(x + 0.5) if x >= 0 else -int(0.5 - x)


class TMP102:
    """TI TMP102 temperature sensor. The pointer register (the first byte of a write)
    selects temperature (0, read only), config (1), TLOW (2) or THIGH (3); the next two
    bytes written, or all bytes read, are that register, MSB first. Shutdown, one-shot,
    the conversion rate and the ALERT comparator are not modelled: reads always see the
    current temperature."""

    held = None  # 1/16 °C the host set ({"op": "sensor", ...}), or None: the default drift

    def __init__(self):
        self.pointer = 0
        self.regs = [0, _TMP102_CONFIG_RESET, _TMP102_TLOW_RESET, _TMP102_THIGH_RESET]
        self.count = 0  # bytes written, or read, since the last start
        self.latched = 0

    @classmethod
    def hold(cls, celsius):
        cls.held = None if celsius is None else _sixteenths(celsius)
        return None if cls.held is None else cls.held / 16

    def temperature(self):
        """The temperature in 1/16 °C: 21.5 °C drifting by at most ±0.5 °C, as a
        triangle wave of 1/16 °C steps over 2**19 ms (about 9 minutes). Whole numbers
        only, so that a read allocates nothing."""
        if TMP102.held is not None:
            return TMP102.held
        step = (time.ticks_ms() >> 14) & 31
        return _TMP102_BASE - 8 + (step if step < 16 else 32 - step)

    def register(self, n):
        if n:
            return self.regs[n]
        t = self.temperature()
        if self.regs[1] & _TMP102_EM:
            return (max(-4096, min(4095, t)) & 0x1FFF) << 3 | 1
        return (max(-2048, min(2047, t)) & 0xFFF) << 4

    def start(self):
        self.count = 0

    def receive(self, byte):
        n = self.count
        self.count = n + 1
        if n == 0:
            self.pointer = byte & 3
        elif n == 1:
            self.latched = byte << 8
        elif n == 2 and self.pointer:
            value = self.latched | byte
            if self.pointer == 1:
                value = (value & _TMP102_CONFIG_WRITABLE) | _TMP102_CONFIG_FIXED
            self.regs[self.pointer] = value

    def start_read(self):
        self.count = 0
        self.latched = self.register(self.pointer)

    def send(self):
        n = self.count
        self.count = n + 1
        return self.latched & 0xFF if n & 1 else self.latched >> 8


MODELS = {"tmp102": TMP102}

_buses = {}  # (sda, scl) -> {address: device}: a device keeps its state across objects


def devices(spec):
    """The devices on the bus board.json describes with spec ({} when it lists none)."""
    key = (sim_board.canonical(spec["sda"]), sim_board.canonical(spec["scl"]))
    found = _buses.get(key)
    if found is not None:
        return found
    found = {}
    for sim in spec.get("simulated", ()):
        model = MODELS.get(sim["model"])
        if model is None:
            raise ValueError("no simulated I2C device %s" % sim["model"])
        found[sim["address"]] = model()
    _buses[key] = found
    return found


def on_pins(sda, scl):
    """The devices a controller on pins sda and scl reaches: those of the board's bus
    on those pins, none on other pins."""
    sda, scl = sim_board.canonical(sda), sim_board.canonical(scl)
    for spec in sim_board.board().get("i2c", ()):
        if sim_board.canonical(spec["sda"]) == sda and sim_board.canonical(spec["scl"]) == scl:
            return devices(spec)
    return {}


def target(found, addr):
    device = found.get(addr)
    if device is None:
        raise OSError(ENODEV)
    return device


def write(device, data):
    device.start()
    for byte in data:
        device.receive(byte)


def read_into(device, buf):
    device.start_read()
    for i in range(len(buf)):
        buf[i] = device.send()


def select(device, memaddr, addrsize):
    """A memory read or write's register address, MSB first."""
    if addrsize not in (8, 16, 24, 32):
        raise ValueError("addrsize must be 8, 16, 24 or 32")
    device.start()
    for shift in range(addrsize - 8, -8, -8):
        device.receive((memaddr >> shift) & 0xFF)


def _hold_reading(cmd):
    """Host command {"op": "sensor", "model": "tmp102", "value": 25.0}; value null
    returns the sensor to its default reading."""
    model = MODELS.get(cmd.get("model"))
    if model is None:
        raise ValueError("no simulated sensor %s" % cmd.get("model"))
    sim_link.emit("sensor", model=cmd["model"], value=model.hold(cmd.get("value")))


sim_link.on("sensor", _hold_reading)
