# /main.py: starts the bootloader that an earlier boot (or the factory image)
# extracted from the bootloader module; it runs the Keel system from then on. A
# board runs it after /boot.py (stage0.py) only in friendly-REPL mode: Ctrl-C stops
# Keel and gives the REPL, and a soft reboot into the raw REPL does not start it.
#
# A bootloader that has just installed a new one keeps itself in /keel/m/bl.prev and
# writes /keel/bl_trial: the new one is on trial until it reaches the system (it then
# deletes both). Here each of its boots is counted; if it cannot be imported, raises
# before it gets there, or starts a fourth boot, the previous one goes back in place,
# its digest is recorded as rejected, and the board resets (docs/boot-flow.md).
import sys

_BL = "/keel/m/bl"
_TRIAL = "/keel/bl_trial"
_TRIAL_BOOTS = 3


def _write(path, text):
    import os

    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


def _on_trial(count=True):
    """Whether a bootloader is on trial; count this boot of it, and go back after
    _TRIAL_BOOTS."""
    import os

    try:
        with open(_TRIAL) as f:
            boots = int(f.read())
    except (OSError, ValueError):
        return False  # the usual boot: one failed open
    try:
        os.stat(_BL + ".prev/.sha256")
    except OSError:
        os.remove(_TRIAL)  # nothing to go back to (an install cut short)
        return False
    if not count:
        return True
    if boots >= _TRIAL_BOOTS:
        _go_back("%d boots did not reach the system" % boots)
    _write(_TRIAL, str(boots + 1))
    print("keel: new bootloader on trial (boot %d of %d)" % (boots + 1, _TRIAL_BOOTS))
    return True


def _go_back(why):
    import os

    try:
        with open(_BL + "/.sha256") as f:
            digest = f.read()
    except OSError:
        digest = ""
    print("keel: the new bootloader %s did not prove itself (%s); going back to the "
          "previous one" % (digest[:16], why))
    _write("/keel/bl_rejected", digest)
    # Each rename is atomic; cut between them, /boot.py takes bl.prev back.
    for n in range(10):
        try:
            os.rename(_BL, "%s.rejected%d" % (_BL, n))  # removed by the bootloader
            break
        except OSError:
            pass
    os.rename(_BL + ".prev", _BL)
    os.remove(_TRIAL)
    _write("/keel/reset_reason", "rollback")
    try:
        import vboard as port
    except ImportError:
        import machine as port
    port.reset()


_trial = _on_trial()
if not _trial:
    del _on_trial, _go_back, _write  # a usual boot keeps none of it
if _BL not in sys.path:
    sys.path.insert(0, _BL)
try:
    import keel_boot
except Exception as e:  # noqa: BLE001 - ImportError, or whatever its code raises
    if _trial:
        _go_back("%s: %s" % (type(e).__name__, e))
    print("keel: bootloader missing from /keel/m/bl (%s); reflash the board" % e)
else:
    try:
        keel_boot.main()
    except Exception as e:  # noqa: BLE001
        if not _trial or not _on_trial(count=False):
            raise  # not on trial, or it got to the system: the system's failure
        _go_back("%s: %s" % (type(e).__name__, e))
