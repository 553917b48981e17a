# Virtual watchdog: the host runner sees the timeout and the feeds in the I/O log and
# restarts the VM, with reset cause "watchdog", when the feeds stop (sim_watchdog).
from hal.ports.virtual.link import sim

_wdt = sim("sim_watchdog")


class Watchdog:
    def __init__(self, timeout_ms=8000):
        if timeout_ms < 1:
            raise ValueError("watchdog timeout must be at least 1 ms")
        _wdt.start(timeout_ms)  # as machine.WDT: a new timeout, and a feed

    def feed(self):
        _wdt.feed()
