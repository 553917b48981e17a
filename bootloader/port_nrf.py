# The bootloader's flash and reset primitives on the MicroPython nrf port (nRF52840):
# the same small interface the virtual board's `vboard` module offers (see
# keel_boot._port). The nrf port has no partition table, so a Keel slot is a raw
# flash region, an `nrf.Flash(start=, len=)` block device at the offset and size
# board.json gives (why not files: docs/boards/nrf52840.md). A slot must lie in flash
# the firmware leaves free (nrf.unused_flash_start/length: between the end of the
# firmware and its filesystem): writing one must never erase code or the filesystem.
#
# Untested on hardware: checked on the MicroPython unix VM against stand-in `nrf` and
# `machine` modules (tests/host/test_boot_ports.py).
import os
import json
import machine
import nrf

BOARD_FILE = "/keel/board.json"
DEEP_SLEEP_MARKER = "/keel/deep-sleep"  # as hal/ports/nrf/power.py writes it
exiting = False  # a reset here restarts the chip; nothing unwinds the stack
_table = {}  # label -> (offset, size), read once from board.json
_cause = []


def _free_region():
    try:
        start = nrf.unused_flash_start()
        return start, start + nrf.unused_flash_length()
    except AttributeError:  # a firmware without them: trust board.json
        return None


class Partition:
    """A Keel slot on nrf.Flash: info() is (label, offset, size); blocks are the 4 KiB
    flash pages; readblocks/writeblocks take an offset (and then do not erase), ioctl 6
    erases one page, as nrf.Flash does."""

    def __init__(self, label, offset, size):
        self._info = (label, offset, size)
        flash = nrf.Flash(start=offset, len=size)
        self.readblocks = flash.readblocks
        self.writeblocks = flash.writeblocks
        self.ioctl = flash.ioctl

    @classmethod
    def find(cls, label):
        if not _table:
            with open(BOARD_FILE) as f:
                for p in json.load(f)["flash"]["partitions"]:
                    _table[p["label"]] = (p["offset"], p["size"])
        if label not in _table:
            return None
        offset, size = _table[label]
        free = _free_region()
        if free and not (free[0] <= offset and offset + size <= free[1]):
            raise RuntimeError(
                "keel: slot %s (0x%x-0x%x) is not in the flash this firmware leaves free "
                "(0x%x-0x%x); see docs/boards/nrf52840.md"
                % (label, offset, offset + size, free[0], free[1])
            )
        return cls(label, offset, size)

    def info(self):
        return self._info


def _causes():
    table = {
        machine.HARD_RESET: "pin-reset",  # the reset pin, and a plain power-on
        machine.WDT_RESET: "watchdog",
        machine.SOFT_RESET: "soft-reset",
        machine.PWRON_RESET: "deep-sleep",  # despite its name: a wake from System OFF
    }
    for name, cause in (("LOCKUP_RESET", "panic"), ("LPCOMP_RESET", "deep-sleep"),
                        ("NFC_RESET", "deep-sleep"), ("DEBUG_IF_RESET", "debugger")):
        if hasattr(machine, name):
            table[getattr(machine, name)] = cause
    return table


def reset():
    machine.reset()


def reset_cause():
    # Once per boot: an emulated deep sleep (a marker file, then a soft reset) reads
    # as "deep-sleep", and the marker is consumed here.
    if not _cause:
        raw = machine.reset_cause()
        try:
            os.remove(DEEP_SLEEP_MARKER)
            marked = True
        except OSError:
            marked = False
        if marked and raw == machine.SOFT_RESET:
            _cause.append("deep-sleep")
        else:
            _cause.append(_causes().get(raw, "unknown"))
    return _cause[0]


def deep_sleep(ms=0):
    # System OFF wakes only on a pin: emulated as hal/ports/nrf/power.py does.
    import time

    with open(DEEP_SLEEP_MARKER, "w") as f:
        f.write("%d\n" % ms)
    time.sleep_ms(ms)
    machine.reset()
