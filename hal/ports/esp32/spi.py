# ESP32 SPI controller on the board's pins. "id" in the board's entry picks the
# peripheral: 1 is HSPI, 2 is VSPI (SPI0/SPI1 belong to the flash).
import machine
from hal.ports.esp32 import buses


class SPI:
    MSB = machine.SPI.MSB
    LSB = machine.SPI.LSB

    def __init__(self, bus, baudrate=1000000, polarity=0, phase=0, bits=8, firstbit=MSB):
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
