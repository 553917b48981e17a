# ESP32 UART on the board's pins. UART0 is the REPL on GPIO1/3, so boards give Keel
# UART2 ("id": 2); the GPIO matrix routes it to any output-capable pins.
from hal.ports.machine.buses import UART
