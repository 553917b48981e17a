# /boot.py: the first Keel code a board runs. It starts the bootloader that an
# earlier boot (or the factory image) extracted from the bootloader module.
import os
import sys

_BL = "/keel/m/bl"
try:
    os.stat(_BL)
except OSError:
    # A power cut between removing the old bootloader code and renaming the new
    # copy into place: the new copy is complete once its .sha256 marker exists.
    try:
        os.stat(_BL + ".new/.sha256")
        os.rename(_BL + ".new", _BL)
    except OSError:
        pass
sys.path.insert(0, _BL)
try:
    import keel_boot
except ImportError as e:
    print("keel: bootloader missing from /keel/m/bl (%s); reflash the board" % e)
else:
    keel_boot.main()
