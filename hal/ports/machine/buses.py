# The board's buses ("i2c", "spi", "uart" in board.json) on machine.SPI, machine.I2C
# and machine.UART. Keel numbers buses per board, the same on every board where it can
# (I2C 0, SPI 0, UART 1, as the virtual board); "id" names the port's peripheral behind
# the bus when it differs. One module for the three: every file the board extracts
# takes a 4 KiB block of its filesystem, and the nRF52840's has few to spare.
import machine
import hal


def find(kind, bus):
    """The board's entry for bus number `bus` of `kind` ("i2c", "spi", "uart")."""
    for spec in hal.board().get(kind, ()):
        if spec["bus"] == bus:
            return spec
    raise ValueError("board %s has no %s bus %r" % (hal.board()["name"], kind.upper(), bus))


def pin(spec, role):
    """machine.Pin for the board pin named by spec[role] ("sda", "mosi", "tx", ...)."""
    return machine.Pin(hal.pin_id(spec[role]))


class SPI:
    MSB = 0  # machine.SPI.MSB and LSB on both ports
    LSB = 1

    def __init__(self, bus, baudrate=1000000, polarity=0, phase=0, bits=8, firstbit=MSB):
        spec = find("spi", bus)
        self._bus = bus
        self._spi = machine.SPI(
            spec.get("id", bus),
            baudrate=baudrate,
            polarity=polarity,
            phase=phase,
            bits=bits,
            firstbit=firstbit,
            sck=pin(spec, "sck"),
            mosi=pin(spec, "mosi"),
            miso=pin(spec, "miso"),
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


# A device that does not answer raises OSError(ENODEV), from machine.I2C itself.
class I2C:
    def __init__(self, bus, freq=400000):
        spec = find("i2c", bus)
        self._bus = bus
        self._i2c = machine.I2C(
            spec.get("id", bus),
            scl=pin(spec, "scl"),
            sda=pin(spec, "sda"),
            freq=freq,
        )

    def scan(self):
        return self._i2c.scan()

    def readfrom(self, addr, nbytes, stop=True):
        return self._i2c.readfrom(addr, nbytes, stop)

    def writeto(self, addr, buf, stop=True):
        return self._i2c.writeto(addr, buf, stop)

    def readfrom_mem(self, addr, memaddr, nbytes, *, addrsize=8):
        return self._i2c.readfrom_mem(addr, memaddr, nbytes, addrsize=addrsize)

    def writeto_mem(self, addr, memaddr, buf, *, addrsize=8):
        self._i2c.writeto_mem(addr, memaddr, buf, addrsize=addrsize)

    def __repr__(self):
        return "I2C(%d)" % self._bus


# _open() makes the port's UART; this one passes every setting and the board's pins,
# as machine.UART documents them.
class UART:
    def __init__(self, bus, baudrate=115200, bits=8, parity=None, stop=1, timeout=0):
        spec = find("uart", bus)
        self._bus = bus
        self._uart = self._open(spec, baudrate, bits, parity, stop, timeout)

    def _open(self, spec, baudrate, bits, parity, stop, timeout):
        return machine.UART(
            spec.get("id", self._bus),
            baudrate=baudrate,
            bits=bits,
            parity=parity,
            stop=stop,
            tx=pin(spec, "tx"),
            rx=pin(spec, "rx"),
            timeout=timeout,
        )

    def deinit(self):
        self._uart.deinit()

    def write(self, buf):
        return self._uart.write(buf)

    def any(self):
        return self._uart.any()

    def read(self, nbytes=None):
        if nbytes is None:
            return self._uart.read()
        return self._uart.read(nbytes)

    def readline(self):
        return self._uart.readline()

    def __repr__(self):
        return "UART(%d)" % self._bus
