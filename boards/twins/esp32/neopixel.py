# neopixel, the driver the esp32 port freezes from micropython-lib
# (micropython/drivers/led/neopixel/neopixel.py at lib/micropython-lib 8380c7bb8f): a
# pixel's colour is kept G, R, B(, W) in one buffer and sent with machine.bitstream.
from machine import bitstream

_ORDER = (1, 0, 2, 3)  # where R, G, B, W go in a pixel's bytes
_TIMINGS = {0: (800, 1700, 1600, 900), 1: (400, 850, 800, 450)}  # 400 kHz, 800 kHz


class NeoPixel:
    def __init__(self, pin, n, bpp=3, timing=1):
        self.pin = pin
        self.n = n
        self.bpp = bpp
        self.buf = bytearray(n * bpp)
        self.pin.init(pin.OUT)
        self.timing = _TIMINGS[timing] if isinstance(timing, int) else timing

    def __len__(self):
        return self.n

    def __setitem__(self, i, value):
        at = i * self.bpp
        for k in range(self.bpp):
            self.buf[at + _ORDER[k]] = value[k]

    def __getitem__(self, i):
        at = i * self.bpp
        return tuple(self.buf[at + _ORDER[k]] for k in range(self.bpp))

    def fill(self, value):
        for i in range(self.n):
            self[i] = value

    def write(self):
        bitstream(self.pin, 0, self.timing, self.buf)
