# Fault injection for the flash of a board on the VM (docs/virtual-board.md, "Fault
# injection"). vm_startup.py imports this only when the device directory holds
# faults.json, so a normal boot carries none of it on the heap.
# It counts every flash operation, on any partition: each write (a writeblocks call)
# and each erase of a block (ioctl 6, and the erases of a writeblocks without an
# offset); at operation cut_at_write it cuts the power.
import json
import os


def install(device_dir, flash, power_gone):
    """Wrap flash's operations (a vm_flash.Flash) as faults.json in device_dir asks.
    power_gone() ends the boot as the power going does, and does not return: the
    virtual board raises SystemExit(vm_exit.POWER_CUT) with the flash frozen, a twin stops at once."""
    path = device_dir + "/faults.json"
    with open(path) as f:
        doc = json.load(f)
    os.rename(path, device_dir + "/faults.used")  # read once: the next boot is normal
    cut_at = doc.get("cut_at_write")
    cut_at = None if cut_at is None else int(cut_at)
    torn = bool(doc.get("torn"))
    out = open(device_dir + "/faults.out", "w")  # opened before / is unmounted
    state = [0, False]  # flash operations so far; whether the power is gone

    def report(what):
        # COUNT STATE, fixed width: a later report always covers an earlier one
        out.seek(0)
        out.write("%10d %s\n" % (state[0], what))
        out.flush()

    read, write, erase = flash.read, flash.write, flash.erase

    def before(addr, data):
        # Before each flash operation: a write of data at addr, or an erase of the
        # block there (data None). Unwinding code that still reaches the flash after
        # the cut (finally blocks, closes) finds it frozen: every access ends again.
        if state[1]:
            power_gone()
        state[0] += 1
        if state[0] != cut_at:
            if cut_at is None:
                report("-" * 10)
            return
        state[1] = True
        report(("torn-" if torn else "cut-") + ("erase" if data is None else "write"))
        if torn:  # half done: the first half of the buffer, or of the block
            if data is None:
                size, flash.erase_size = flash.erase_size, flash.erase_size // 2
                try:
                    erase(addr)
                finally:
                    flash.erase_size = size
            else:
                write(addr, memoryview(data)[: len(data) // 2])
        power_gone()

    def read_frozen(addr, buf):
        if state[1]:
            power_gone()
        read(addr, buf)

    def write_counted(addr, buf):
        before(addr, buf)
        write(addr, buf)

    def erase_counted(addr):
        before(addr, None)
        erase(addr)

    flash.read = read_frozen
    flash.write = write_counted
    flash.erase = erase_counted
    report("-" * 10)
