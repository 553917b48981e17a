# nRF52840 resets and sleep.
#
# reset_cause(): what the nrf port reports (it reads POWER.RESETREAS at boot):
#   HARD_RESET      the reset pin, and also a plain power-on (RESETREAS empty): "pin-reset"
#   PWRON_RESET     a wake from System OFF, despite its name: "deep-sleep"
#   LOCKUP_RESET    the CPU locked up after a fault: "panic"
# sleep_ms() waits in System ON idle: the port's delay loop sleeps the CPU (WFE)
# between ticks, peripherals and RAM keep their state.
# deep_sleep(ms): System OFF can only be woken by a pin, LPCOMP or NFC, never by a
# timer, so it is emulated: System ON idle for ms (the watchdog, if running, is fed
# meanwhile, as a chip in deep sleep would not reset), then a reset. A marker file
# makes the following reset_cause() report "deep-sleep"; the power saving of System
# OFF is not had.
import os
import sys
import time
import machine
from micropython import const
from hal.ports.nrf import watchdog
from keel_files import DEEP_SLEEP_MARKER as _MARKER

_FEED_MS = const(1000)
_cause = []


def _causes():
    table = {
        machine.HARD_RESET: "pin-reset",
        machine.WDT_RESET: "watchdog",
        machine.SOFT_RESET: "soft-reset",
        machine.PWRON_RESET: "deep-sleep",
    }
    for name, cause in (
        ("LOCKUP_RESET", "panic"),
        ("LPCOMP_RESET", "deep-sleep"),
        ("NFC_RESET", "deep-sleep"),
        ("DEBUG_IF_RESET", "debugger"),
    ):
        if hasattr(machine, name):
            table[getattr(machine, name)] = cause
    return table


def _take_marker():
    try:
        os.remove(_MARKER)
        return True
    except OSError:
        return False


def reset():
    machine.reset()


def reset_cause():
    # Worked out once per boot: the marker file is consumed by the first call. Under
    # Keel the bootloader's port (bootloader/port_nrf.py) has already taken it.
    boot = sys.modules.get("handover")
    if boot is not None:
        return boot.port().reset_cause()
    if not _cause:
        raw = machine.reset_cause()
        marked = _take_marker()
        if marked and raw == machine.SOFT_RESET:
            _cause.append("deep-sleep")
        else:
            _cause.append(_causes().get(raw, "unknown"))
    return _cause[0]


def sleep_ms(ms):
    time.sleep_ms(ms)


def deep_sleep(ms):
    with open(_MARKER, "w") as f:
        f.write("%d\n" % ms)
    end = time.ticks_add(time.ticks_ms(), ms)
    while True:
        watchdog.feed_running()
        left = time.ticks_diff(end, time.ticks_ms())
        if left <= 0:
            break
        time.sleep_ms(left if left < _FEED_MS else _FEED_MS)
    machine.reset()
