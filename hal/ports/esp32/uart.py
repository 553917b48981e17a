# ESP32 UART on the board's pins. UART0 is the REPL on GPIO1/3, so boards give Keel
# UART2 ("id": 2); the GPIO matrix routes it to any output-capable pins.
import machine
from hal.ports.esp32 import buses


class UART:
    def __init__(self, bus, baudrate=115200, bits=8, parity=None, stop=1, timeout=0):
        spec = buses.find("uart", bus)
        self._bus = bus
        self._uart = machine.UART(
            spec.get("id", bus),
            baudrate=baudrate,
            bits=bits,
            parity=parity,
            stop=stop,
            tx=buses.pin(spec, "tx"),
            rx=buses.pin(spec, "rx"),
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
