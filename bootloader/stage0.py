# /boot.py: stage 0's quick recovery work. A board runs /boot.py after every reset,
# soft reboots included, and /main.py (bootloader/stage0_main.py, which starts Keel)
# only when its REPL is in friendly mode. So a tool that soft-reboots into the raw
# REPL (mpremote, keel flash --usb) finds Keel stopped and the filesystem consistent.
def _recover():
    import os

    bl = "/keel/m/bl"
    try:
        os.stat(bl)
    except OSError:
        # A power cut between two renames: of an install, take the new copy if it is
        # complete (its .sha256 marker is written last); of stage 0 going back from a
        # new bootloader (stage0_main.py), the previous one it kept; else the old one.
        for src in (bl + ".new/.sha256", bl + ".prev/.sha256", bl + ".old/.sha256"):
            try:
                os.stat(src)
                os.rename(src[:-8], bl)
                break
            except OSError:
                pass


_recover()
del _recover
