# The board's watchdog as the host runner plays it: the VM reports the timeout and the
# feeds in io.log, and the runner resets the board (reset cause "watchdog") when the
# feeds stop (tools/keel/vdev.py). One per board: starting it again sets a new timeout.
import time
import sim_link

# [timeout_ms, when the last feed was reported]
_state = [0, 0]


def start(timeout_ms):
    """Start (or restart) it; the start counts as a feed."""
    _state[0] = int(timeout_ms)
    _state[1] = time.ticks_ms()
    sim_link.emit("wdt", timeout=_state[0])


def feed():
    # Report at most four feeds per timeout: enough for the host to see a running
    # loop, without one log line per pass of a tight loop.
    now = time.ticks_ms()
    if time.ticks_diff(now, _state[1]) >= _state[0] // 4:
        _state[1] = now
        sim_link.emit("wdt-feed")
