# Virtual UART: the board's buses are loopbacks ("simulated": "loopback"), TX wired to
# RX through a receive buffer of _RX_SIZE bytes that drops the oldest bytes when full.
# What is written is reported to the host (hex, at most _TX_SHOWN bytes per write).
from micropython import const
from binascii import hexlify
import hal
from hal.ports.virtual import link

_RX_SIZE = const(256)
_TX_SHOWN = const(64)


class _Ring:
    """The receive buffer of one bus, shared by every UART object on it."""

    def __init__(self):
        self.buf = bytearray(_RX_SIZE)
        self.head = 0  # index of the oldest byte
        self.count = 0

    def put(self, data):
        n = len(data)
        src = memoryview(data)
        if n > _RX_SIZE:
            src = src[n - _RX_SIZE :]
            n = _RX_SIZE
        drop = self.count + n - _RX_SIZE
        if drop > 0:
            self.head = (self.head + drop) % _RX_SIZE
            self.count -= drop
        tail = (self.head + self.count) % _RX_SIZE
        first = min(n, _RX_SIZE - tail)
        self.buf[tail : tail + first] = src[:first]
        if first < n:
            self.buf[: n - first] = src[first:n]
        self.count += n

    def take(self, n):
        out = bytearray(n)
        head = self.head
        first = min(n, _RX_SIZE - head)
        out[:first] = memoryview(self.buf)[head : head + first]
        if first < n:
            out[first:] = memoryview(self.buf)[: n - first]
        self.head = (head + n) % _RX_SIZE
        self.count -= n
        return bytes(out)

    def line_length(self):
        """Bytes up to and including the first newline, or everything held."""
        buf = self.buf
        i = self.head
        for n in range(1, self.count + 1):
            if buf[i] == 0x0A:
                return n
            i = (i + 1) % _RX_SIZE
        return self.count


_rings = {}  # bus -> _Ring


def _ring(bus):
    ring = _rings.get(bus)
    if ring is not None:
        return ring
    for spec in hal.board().get("uart", ()):
        if spec["bus"] == bus:
            if spec.get("simulated") != "loopback":
                raise ValueError("UART bus %r has no simulation" % bus)
            ring = _rings[bus] = _Ring()
            return ring
    raise ValueError("board %s has no UART bus %r" % (hal.board()["name"], bus))


class UART:
    def __init__(self, bus, baudrate=115200, bits=8, parity=None, stop=1, timeout=0):
        self._ring = _ring(bus)
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
        n = len(buf)
        shown = hexlify(memoryview(buf)[:_TX_SHOWN]).decode()
        link.emit("uart", bus=self._bus, tx=shown, n=n)
        self._ring.put(buf)
        return n

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
