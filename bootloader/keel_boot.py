# Keel's bootloader, its entry: /main.py (stage 0) calls main(). The boot's work is
# boot_check.py; the system then runs from handover.py, inside this call. So that
# running the system keeps none of the boot's code alive, this module is only the
# entry, and boot_check leaves the heap before the system starts (docs/boot-flow.md).
import sys


def main():
    import boot_check

    attempts, board, reset_reason = boot_check.boot()
    del sys.modules["boot_check"]
    del boot_check
    import handover

    handover.run(attempts, board, reset_reason)
