# Virtual watchdog: the host runner sees the timeout and the feeds in the I/O log and
# restarts the VM, with reset cause "watchdog", when the feeds stop.
import time
from hal.ports.virtual import link

# One watchdog per board: every Watchdog object shares it. [timeout_ms, last reported feed]
_state = [0, 0]


class Watchdog:
    def __init__(self, timeout_ms=8000):
        if timeout_ms < 1:
            raise ValueError("watchdog timeout must be at least 1 ms")
        # As machine.WDT: starting it again sets the new timeout, and counts as a feed.
        _state[0] = int(timeout_ms)
        _state[1] = time.ticks_ms()
        link.emit("wdt", timeout=_state[0])

    def feed(self):
        # Report at most four feeds per timeout: enough for the host to see a
        # running loop, without one log line per pass of a tight loop.
        now = time.ticks_ms()
        if time.ticks_diff(now, _state[1]) >= _state[0] // 4:
            _state[1] = now
            link.emit("wdt-feed")
