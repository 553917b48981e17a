# Fault injection for the virtual board's flash (docs/virtual-board.md, "Fault
# injection"). vm_startup.py imports this only when the device directory holds
# faults.json, so a normal boot carries none of it on the heap.
# It counts every flash operation, on any
# partition: each writeblocks call and each block erase (ioctl 6, and the erases of a
# writeblocks without an offset); at operation cut_at_write it cuts the power.
import json
import os
import sys

_POWER_CUT_EXIT = 102  # tells the host runner the board lost power (tools/keel/vdev.py)


def install(device_dir, Partition, _ERASED):
    """Wrap Partition's flash operations as faults.json in device_dir asks."""
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

    def power_gone():
        # Unwinds the stack with the flash frozen: whatever runs on the way out (finally
        # blocks, file closes) reaches nothing, and every later flash access raises
        # again, so the VM exits with status 102 (it always did in the tests).
        sys.modules["vboard"].exiting = True  # not an app crash (keel_boot.resetting)
        raise SystemExit(102)  # the exit status of a power cut (vdev.POWER_CUT_EXIT)

    def before(part, at, data):
        # Before each flash operation: a write of data at byte `at` of part, or an
        # erase of the block there (data None).
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
            f = Partition._flash
            f.seek(part.offset + at)
            if data is None:
                for _ in range(part.BLOCK_SIZE // len(_ERASED) // 2):
                    f.write(_ERASED)
            else:
                f.write(memoryview(data)[: len(data) // 2])
            f.flush()
        power_gone()

    read, write, ioctl = Partition.readblocks, Partition.writeblocks, Partition.ioctl

    def readblocks(self, block, buf, offset=0):
        if state[1]:
            power_gone()
        read(self, block, buf, offset)

    def writeblocks(self, block, buf, offset=None):
        start = block * self.BLOCK_SIZE + (offset or 0)
        if start + len(buf) > self.size:
            raise OSError(22)
        if offset is None:
            for i in range(len(buf) // self.BLOCK_SIZE):
                self.ioctl(6, block + i)  # (counted there)
        before(self, start, buf)
        write(self, block, buf, start - block * self.BLOCK_SIZE)  # in place: erased above

    def erase_counted(self, op, arg):
        if op == 6 and 0 <= arg < self.size // self.BLOCK_SIZE:
            before(self, arg * self.BLOCK_SIZE, None)
        return ioctl(self, op, arg)

    Partition.readblocks = readblocks
    Partition.writeblocks = writeblocks
    Partition.ioctl = erase_counted
    report("-" * 10)
