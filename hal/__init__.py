# Hardware abstraction layer. Each peripheral's API is declared once in hal/<name>.py;
# its implementation lives in hal/ports/<port>/, chosen once here at import time.
# Only the running board's port is built into system part 1.
import sys

_PORTS = {"linux": "virtual", "esp32": "esp32", "nrf": "nrf"}
PORT = _PORTS.get(sys.platform)
if PORT is None:
    raise ImportError("keel: no HAL port for platform '%s'" % sys.platform)
