# The bootloader's flash and reset primitives on stock MicroPython esp32 firmware:
# the same small interface the virtual board's `vboard` module offers (see
# handover.port). Keel's slots are ESP-IDF data partitions found by their label
# in the partition table `keel image esp32` writes (docs/boards/esp32.md).
#
# Untested on hardware: it runs on the ESP32 board twin (boards/twins/esp32/, the
# port's modules as MicroPython v1.28.0 has them) in the device tests.
import esp32
import machine

exiting = False  # a reset here restarts the chip; nothing unwinds the stack

_CAUSES = {
    machine.PWRON_RESET: "power-on",
    machine.HARD_RESET: "panic",
    machine.WDT_RESET: "watchdog",
    machine.DEEPSLEEP_RESET: "deep-sleep",
    machine.SOFT_RESET: "soft-reset",
}


class Partition:
    """A Keel slot: an esp32.Partition, with info() as (label, offset, size) as the
    bootloader reads it. Blocks are the partition's 4 KiB erase sectors; readblocks
    and writeblocks take the extended form (an offset inside the block, and with it
    no erase), and ioctl 6 erases one block, as esp32.Partition does."""

    def __init__(self, part):
        _, _, offset, size, label, _ = part.info()
        self._info = (label, offset, size)
        self.readblocks = part.readblocks
        self.writeblocks = part.writeblocks
        self.ioctl = part.ioctl

    @classmethod
    def find(cls, label):
        found = esp32.Partition.find(esp32.Partition.TYPE_DATA, label=label)
        return cls(found[0]) if found else None

    def info(self):
        return self._info


def reset():
    machine.reset()


def reset_cause():
    # The EN button resets the whole chip and reads as power-on; machine.reset() and
    # a panic both read as HARD_RESET. Keel records its own reason before it resets
    # (it takes precedence), so HARD_RESET here is a panic: the app loader counts it.
    return _CAUSES.get(machine.reset_cause(), "unknown")


def deep_sleep(ms=0):
    machine.deepsleep(ms)
