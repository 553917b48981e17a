# Virtual resets and sleep: the host runner restarts the VM.
import time
import vboard
from hal.ports.virtual import link


def reset():
    vboard.reset()


def reset_cause():
    return vboard.reset_cause()


def sleep_ms(ms):
    time.sleep_ms(ms)


def deep_sleep(ms):
    link.emit("deep-sleep", ms=ms)
    vboard.deep_sleep()
