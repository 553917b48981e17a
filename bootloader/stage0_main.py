# /main.py: starts the bootloader that an earlier boot (or the factory image)
# extracted from the bootloader module; it runs the Keel system from then on. A
# board runs it after /boot.py (stage0.py) only in friendly-REPL mode: Ctrl-C stops
# Keel and gives the REPL, and a soft reboot into the raw REPL does not start it.
import sys

if "/keel/m/bl" not in sys.path:
    sys.path.insert(0, "/keel/m/bl")
try:
    import keel_boot

    keel_boot.main()
except Exception as e:  # noqa: BLE001 - ImportError, or whatever a new bootloader raises
    # While a new bootloader is on trial, /boot.py leaves _bl_trial_failed here: it notes
    # why for /boot.py, which puts the previous one back, and resets.
    if "_bl_trial_failed" in globals():
        _bl_trial_failed(e)  # noqa: F821
    if "keel_boot" in sys.modules:
        raise
    print("keel: bootloader missing from /keel/m/bl (%s); reflash the board" % e)
