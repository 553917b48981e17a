# UART and SPI as the board's wires carry them. A UART's TX bytes reach the receive
# buffer of every open UART whose RX pin is jumpered to that TX pin, or its own when
# board.json says the bus is a loopback ("simulated": "loopback"). SPI reads what is
# on MISO: the bytes clocked out on MOSI when MISO is jumpered to it (or the bus is a
# loopback), else MISO's idle level in every bit.
from micropython import const
from binascii import hexlify
import sim_board
import sim_link
import sim_pins

RX_SIZE = const(256)
_TX_SHOWN = const(64)


class Ring:
    """A receive buffer of RX_SIZE bytes that drops the oldest bytes when full."""

    def __init__(self, size=RX_SIZE):
        self.buf = bytearray(size)
        self.size = size
        self.head = 0  # index of the oldest byte
        self.count = 0

    def put(self, data):
        size = self.size
        n = len(data)
        src = memoryview(data)
        if n > size:
            src = src[n - size :]
            n = size
        drop = self.count + n - size
        if drop > 0:
            self.head = (self.head + drop) % size
            self.count -= drop
        tail = (self.head + self.count) % size
        first = min(n, size - tail)
        self.buf[tail : tail + first] = src[:first]
        if first < n:
            self.buf[: n - first] = src[first:n]
        self.count += n

    def take(self, n):
        size = self.size
        out = bytearray(n)
        head = self.head
        first = min(n, size - head)
        out[:first] = memoryview(self.buf)[head : head + first]
        if first < n:
            out[first:] = memoryview(self.buf)[: n - first]
        self.head = (head + n) % size
        self.count -= n
        return bytes(out)

    def line_length(self):
        """Bytes up to and including the first newline, or everything held."""
        buf = self.buf
        i = self.head
        for n in range(1, self.count + 1):
            if buf[i] == 0x0A:
                return n
            i = (i + 1) % self.size
        return self.count


def _loopback(kind, a, b):
    """True when board.json has a bus of kind on pins a and b marked "loopback"."""
    roles = ("tx", "rx") if kind == "uart" else ("mosi", "miso")
    for spec in sim_board.board().get(kind, ()):
        if spec.get("simulated") == "loopback" and \
                sim_board.canonical(spec[roles[0]]) == a and sim_board.canonical(spec[roles[1]]) == b:
            return True
    return False


_rings = {}  # RX pin name -> Ring of the UART open on it


class UARTWires:
    """One UART's pins: bus is the label the host sees in its "uart" records."""

    def __init__(self, tx, rx, bus, rx_size=RX_SIZE):
        self.tx = sim_pins.any_line(tx)
        self.rx = sim_pins.any_line(rx)
        self.bus = bus
        ring = _rings.get(self.rx.name)
        if ring is None or ring.size != rx_size:
            ring = _rings[self.rx.name] = Ring(rx_size)
        self.ring = ring
        self.loopback = _loopback("uart", self.tx.name, self.rx.name)

    def send(self, buf):
        n = len(buf)
        shown = hexlify(memoryview(buf)[:_TX_SHOWN]).decode()
        sim_link.emit("uart", bus=self.bus, tx=shown, n=n)
        if self.loopback:
            self.ring.put(buf)
        for p in self.tx.peers:
            ring = _rings.get(p.name)
            if ring is not None and not (self.loopback and ring is self.ring):
                ring.put(buf)


class SPIWires:
    """One SPI controller's data pins."""

    def __init__(self, mosi, miso):
        self.mosi = sim_pins.any_line(mosi)
        self.miso = sim_pins.any_line(miso)
        self.loopback = _loopback("spi", self.mosi.name, self.miso.name) or \
            sim_pins.wired(self.mosi, self.miso)

    def transfer(self, out, into):
        """Clock out `out` (bytes, or an int repeated) and fill `into` with MISO."""
        if self.loopback:
            if isinstance(out, int):
                for i in range(len(into)):
                    into[i] = out
            else:
                into[:] = out
            return
        idle = 0xFF if self.miso.level() else 0x00
        for i in range(len(into)):
            into[i] = idle
