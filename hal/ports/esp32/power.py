# ESP32 resets and sleep.
#
# reset_cause() from machine.reset_cause(). What the port can tell apart is limited:
# the EN button resets the whole chip and reads as "power-on"; machine.reset() and a
# panic both read as HARD_RESET. The system records its own reason before it resets,
# so a HARD_RESET with no reason recorded is a panic ("panic": the app loader counts
# it as a crash). Light sleep stops the CPU and keeps RAM, but WiFi connections do not
# survive it.
import machine

_CAUSES = {
    machine.PWRON_RESET: "power-on",
    machine.HARD_RESET: "panic",
    machine.WDT_RESET: "watchdog",
    machine.DEEPSLEEP_RESET: "deep-sleep",
    machine.SOFT_RESET: "soft-reset",
}


def reset():
    machine.reset()


def reset_cause():
    return _CAUSES.get(machine.reset_cause(), "unknown")


def sleep_ms(ms):
    machine.lightsleep(ms)


def deep_sleep(ms):
    machine.deepsleep(ms)
