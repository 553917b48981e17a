# nRF52840 watchdog. The nrf port has no machine.WDT, so this drives the WDT
# peripheral's registers with machine.mem32 (nRF52840 Product Specification, WDT).
# The WDT is not one of the SoftDevice's restricted peripherals, so this also works
# on Bluetooth builds. Once started it cannot be stopped, nor its timeout changed,
# until the next reset: a second Watchdog only feeds the running one. It counts
# while the CPU sleeps and pauses while a debugger halts the CPU; after it fires,
# machine.reset_cause() is WDT_RESET.
from machine import mem32
from micropython import const

_WDT = const(0x40010000)
_TASKS_START = const(_WDT + 0x000)
_RUNSTATUS = const(_WDT + 0x400)
_CRV = const(_WDT + 0x504)
_RREN = const(_WDT + 0x508)
_CONFIG = const(_WDT + 0x50C)
_RR0 = const(_WDT + 0x600)
_RELOAD = const(0x6E524635)  # the value RR[n] must be written with to feed
_CONFIG_SLEEP_RUN = const(1)  # keep counting while the CPU sleeps; pause when halted
_LFCLK_HZ = const(32768)


def running():
    return mem32[_RUNSTATUS] & 1 == 1


def feed_running():
    """Feed the watchdog if someone started it (power.deep_sleep waits with it)."""
    if running():
        mem32[_RR0] = _RELOAD


class Watchdog:
    def __init__(self, timeout_ms=8000):
        if timeout_ms < 1:
            raise ValueError("watchdog timeout must be at least 1 ms")
        if not running():
            ticks = timeout_ms * _LFCLK_HZ // 1000 - 1  # timeout = (CRV + 1) / 32768 s
            mem32[_CRV] = ticks if ticks > 0xF else 0xF
            mem32[_RREN] = 1  # only RR[0] reloads it
            mem32[_CONFIG] = _CONFIG_SLEEP_RUN
            mem32[_TASKS_START] = 1
        self.feed()

    def feed(self):
        mem32[_RR0] = _RELOAD
