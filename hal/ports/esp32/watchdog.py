# ESP32 watchdog: machine.WDT (the ESP-IDF task watchdog on the MicroPython task).
# Once started it cannot be stopped; machine.reset_cause() is WDT_RESET afterwards.
import machine


class Watchdog:
    def __init__(self, timeout_ms=8000):
        if timeout_ms < 1:
            raise ValueError("watchdog timeout must be at least 1 ms")
        self._wdt = machine.WDT(timeout=int(timeout_ms))

    def feed(self):
        self._wdt.feed()
