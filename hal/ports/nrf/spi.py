# nRF52840 SPI controller (SPIM0..2, "id" in the board's entry) on the board's pins.
# The port clocks at 125 kHz..8 MHz in powers of two; other rates snap to one of them.
import machine
from hal.ports.nrf import buses

_MSB = 0


class SPI:
    MSB = _MSB
    LSB = 1

    def __init__(self, bus, baudrate=1000000, polarity=0, phase=0, bits=8, firstbit=_MSB):
        spec = buses.find("spi", bus)
        self._bus = bus
        self._spi = machine.SPI(
            spec.get("id", bus),
            baudrate=baudrate,
            polarity=polarity,
            phase=phase,
            bits=bits,
            firstbit=firstbit,
            sck=buses.pin(spec, "sck"),
            mosi=buses.pin(spec, "mosi"),
            miso=buses.pin(spec, "miso"),
        )

    def deinit(self):
        self._spi.deinit()

    def write(self, buf):
        self._spi.write(buf)

    def read(self, nbytes, write=0x00):
        return self._spi.read(nbytes, write)

    def readinto(self, buf, write=0x00):
        self._spi.readinto(buf, write)

    def write_readinto(self, write_buf, read_buf):
        self._spi.write_readinto(write_buf, read_buf)

    def __repr__(self):
        return "SPI(%d)" % self._bus
