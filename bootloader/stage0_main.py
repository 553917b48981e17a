# /main.py: starts the bootloader that an earlier boot (or the factory image)
# extracted from the bootloader module; it runs the Keel system from then on. A
# board runs it after /boot.py (stage0.py) only in friendly-REPL mode: Ctrl-C stops
# Keel and gives the REPL, and a soft reboot into the raw REPL does not start it.
import sys

if "/keel/m/bl" not in sys.path:
    sys.path.insert(0, "/keel/m/bl")
try:
    import keel_boot
except ImportError as e:
    print("keel: bootloader missing from /keel/m/bl (%s); reflash the board" % e)
else:
    keel_boot.main()
