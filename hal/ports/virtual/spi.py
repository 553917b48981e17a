# Virtual SPI: the board's buses are loopbacks ("simulated": "loopback"), MOSI wired
# to MISO, so every byte clocked out is the byte clocked in (the board's sim_serial).
import hal
from hal.ports.virtual.link import sim

_serial = sim("sim_serial")


def _bus(bus):
    for spec in hal.board().get("spi", ()):
        if spec["bus"] == bus:
            if spec.get("simulated") != "loopback":
                raise ValueError("SPI bus %r has no simulation" % bus)
            return spec
    raise ValueError("board %s has no SPI bus %r" % (hal.board()["name"], bus))


class SPI:
    MSB = 0
    LSB = 1

    def __init__(self, bus, baudrate=1000000, polarity=0, phase=0, bits=8, firstbit=0):
        spec = _bus(bus)
        self._wires = _serial.SPIWires(spec["mosi"], spec["miso"])
        self._bus = bus
        self.init(baudrate, polarity, phase, bits, firstbit)

    def init(self, baudrate=1000000, polarity=0, phase=0, bits=8, firstbit=0):
        if baudrate <= 0:
            raise ValueError("baudrate must be positive")
        if polarity not in (0, 1) or phase not in (0, 1) or firstbit not in (0, 1):
            raise ValueError("polarity, phase and firstbit are 0 or 1")
        if bits != 8:
            raise ValueError("only 8-bit transfers")
        self._baudrate = baudrate

    def deinit(self):
        pass

    def write(self, buf):
        pass  # what goes out comes back, and nobody reads it

    def read(self, nbytes, write=0x00):
        buf = bytearray(nbytes)
        self._wires.transfer(write & 0xFF, buf)
        return bytes(buf)

    def readinto(self, buf, write=0x00):
        self._wires.transfer(write & 0xFF, buf)

    def write_readinto(self, write_buf, read_buf):
        if len(write_buf) != len(read_buf):
            raise ValueError("buffers must be the same length")
        self._wires.transfer(write_buf, read_buf)

    def __repr__(self):
        return "SPI(%d, baudrate=%d)" % (self._bus, self._baudrate)
