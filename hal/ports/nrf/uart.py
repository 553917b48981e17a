# nRF52840 UART. The nrf port has one UART, UART(0), on pins fixed when the firmware
# is built (PCA10056: TX P0.06, RX P0.08, with RTS/CTS flow control on P0.05/P0.07);
# the board's entry records them, they cannot be moved from here. 8N1 only, and a
# 64-byte receive buffer (ports/nrf/modules/machine/uart.c).
#
# On the nRF52840 DK the firmware attaches UART(0) to its REPL at every boot
# (os.dupterm, MICROPY_HW_ENABLE_UART_REPL): while attached, every byte it receives
# goes to the REPL, none to read(). Opening the bus detaches it, so the app gets what
# arrives; the REPL on the USB port stays, the UART one is back at the next reset.
import os
import machine
from hal.ports.machine import buses


class UART(buses.UART):
    def _open(self, spec, baudrate, bits, parity, stop, timeout):
        if bits != 8 or parity is not None or stop != 1:
            raise ValueError("nrf: UART is 8N1 only")
        # timeout: ms to wait for the first byte; the port needs at least 1.
        port_uart = machine.UART(
            spec.get("id", 0), baudrate=baudrate, timeout=max(1, timeout), timeout_char=1
        )
        repl = os.dupterm(None)
        if repl is not None and repl is not port_uart:
            os.dupterm(repl)  # another stream, not this UART: leave it attached
        return port_uart
