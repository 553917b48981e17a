# /boot.py: stage 0's recovery work, after every reset (soft reboots included); /main.py
# (stage0_main.py) starts Keel in friendly-REPL mode only, so a raw-REPL tool finds Keel
# stopped. It finishes an interrupted bootloader install and runs a new bootloader's
# trial: at its fourth boot, or when /main.py wrote why it failed, the previous one goes
# back (docs/boot-flow.md, "Bootloader updates"). The nrf port runs it from /flash: the
# filesystem moves to /, where Keel's paths are. (One 4 KiB block: test_boot_ports.)


def _root():
    import os

    if os.getcwd() != "/flash":
        return  # esp32, the virtual board: already at /
    import sys
    import nrf

    try:
        import vfs
    except ImportError:  # MicroPython before 1.23: mount and umount are in os
        vfs = os
    bdev = nrf.Flash()
    vfs.umount("/flash")
    try:
        vfs.mount(bdev, "/")
    except BaseException:  # (a Ctrl-C too)
        vfs.mount(bdev, "/flash")  # as the port had it, for the REPL
        raise
    os.chdir("/")
    sys.path[:] = [p for p in sys.path if not p.startswith("/flash")]


def _recover():
    import os

    bl = "/keel/m/bl"
    try:
        os.stat(bl)
    except OSError:
        # A power cut between two renames: of an install, take the new copy if it is
        # complete (its .sha256 marker is written last); of going back (below), the
        # previous one; else the old one.
        for src in (bl + ".new/.sha256", bl + ".prev/.sha256", bl + ".old/.sha256"):
            try:
                os.stat(src)
                os.rename(src[:-8], bl)
                break
            except OSError:
                pass
    trial = "/keel/bl_trial"
    try:
        with open(trial) as f:
            said = f.read()
    except OSError:
        return  # the usual boot
    try:
        os.stat(bl + ".prev/.sha256")
    except OSError:
        os.remove(trial)  # nothing to go back to: an install cut short, or done
        return
    boots = int(said) if said.isdigit() else -1
    if 0 <= boots < 3:
        _write(trial, str(boots + 1))
        print("keel: new bootloader on trial (boot %d of 3)" % (boots + 1))
        globals()["_bl_trial_failed"] = _trial_failed  # for /main.py
        return
    try:
        with open(bl + "/.sha256") as f:
            digest = f.read()
    except OSError:
        digest = ""
    why = said if boots < 0 else "%d boots did not get to the system" % boots
    print("keel: the new bootloader %s did not prove itself (%s); going back to the "
          "previous one" % (digest[:16], why))
    _write("/keel/bl_rejected", digest)
    for n in range(10):  # aside, for the bootloader to remove; cut here, bl.prev wins
        try:
            os.rename(bl, "%s.rejected%d" % (bl, n))
            break
        except OSError:
            pass
    os.rename(bl + ".prev", bl)
    os.remove(trial)
    _write("/keel/reset_reason", "rollback")


def _write(path, text):
    import os

    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


def _trial_failed(e):
    """/main.py: the bootloader on trial raised; unless it got to the system first
    (which ends the trial), note why and reset: the next boot goes back."""
    import os

    try:
        os.stat("/keel/bl_trial")
    except OSError:
        return
    with open("/keel/bl_trial", "w") as f:
        f.write("%s: %s" % (type(e).__name__, e))
    try:
        import vboard as port
    except ImportError:
        import machine as port
    port.reset()


_root()
_recover()
del _root, _recover, _write, _trial_failed
