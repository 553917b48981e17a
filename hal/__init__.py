# Hardware abstraction layer. Each peripheral's API is declared once in hal/<name>.py;
# its implementation lives in hal/ports/<port>/, chosen once here at import time.
# Only the running board's port is built into system part 1.
try:
    import vboard  # noqa: F401

    PORT = "virtual"
except ImportError:
    import sys

    PORT = "esp32" if sys.platform == "esp32" else "nrf"
