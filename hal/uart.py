# UART by bus number (the board's "uart" list gives its pins).
#
#   u = UART(1, baudrate=115200)
#   u.write(buf) -> count; u.any() -> bytes waiting; u.read(n=None) -> bytes or None
#   u.readline() -> bytes or None
from hal import backend

UART = backend("uart").UART
