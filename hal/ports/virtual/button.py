# Virtual mode button: the host presses it (keel vdev io --press MODE=0.5).
import time
from hal.ports.virtual import link

_release_at = [None]


def pressed():
    at = _release_at[0]
    if at is None:
        return False
    if time.ticks_diff(at, time.ticks_ms()) > 0:
        return True
    _release_at[0] = None
    return False


def _press(cmd):
    ms = int(cmd.get("ms", 100))
    _release_at[0] = time.ticks_add(time.ticks_ms(), max(1, ms))
    link.emit("button", pressed=True, ms=ms)


link.on("press", _press)
