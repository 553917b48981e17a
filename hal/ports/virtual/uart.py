# Virtual UART: the board's buses are loopbacks ("simulated": "loopback"), TX wired to
# RX through a receive buffer of 256 bytes that drops the oldest bytes when full (the
# board's sim_serial). What is written is reported to the host (hex, at most 64 bytes).
import hal
from hal.ports.virtual.link import sim

_serial = sim("sim_serial")


def _bus(bus):
    for spec in hal.board().get("uart", ()):
        if spec["bus"] == bus:
            if spec.get("simulated") != "loopback":
                raise ValueError("UART bus %r has no simulation" % bus)
            return spec
    raise ValueError("board %s has no UART bus %r" % (hal.board()["name"], bus))


class UART:
    def __init__(self, bus, baudrate=115200, bits=8, parity=None, stop=1, timeout=0):
        spec = _bus(bus)
        self._wires = _serial.UARTWires(spec["tx"], spec["rx"], bus)
        self._ring = self._wires.ring
        self._bus = bus
        self.init(baudrate, bits, parity, stop, timeout)

    def init(self, baudrate=115200, bits=8, parity=None, stop=1, timeout=0):
        if baudrate <= 0:
            raise ValueError("baudrate must be positive")
        if bits not in (7, 8, 9) or parity not in (None, 0, 1) or stop not in (1, 2):
            raise ValueError("bits 7..9, parity None/0/1, stop 1 or 2")
        self._baudrate = baudrate
        self._timeout = timeout  # loopback bytes are there at once: nothing to wait for

    def deinit(self):
        pass

    def write(self, buf):
        if isinstance(buf, str):
            buf = buf.encode()
        self._wires.send(buf)
        return len(buf)

    def any(self):
        return self._ring.count

    def read(self, nbytes=None):
        count = self._ring.count
        if not count:
            return None
        return self._ring.take(count if nbytes is None else min(nbytes, count))

    def readline(self):
        if not self._ring.count:
            return None
        return self._ring.take(self._ring.line_length())

    def __repr__(self):
        return "UART(%d, baudrate=%d)" % (self._bus, self._baudrate)
