# /boot.py: the first Keel code a board runs. It starts the bootloader that an
# earlier boot (or the factory image) extracted from the bootloader module.
import sys

sys.path.insert(0, "/keel/m/bl")
try:
    import keel_boot
except ImportError as e:
    print("keel: bootloader missing from /keel/m/bl (%s); reflash the board" % e)
else:
    keel_boot.main()
