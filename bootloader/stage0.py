# /boot.py: the first Keel code a board runs. It starts the bootloader that an
# earlier boot (or the factory image) extracted from the bootloader module.
import os
import sys

_BL = "/keel/m/bl"
try:
    os.stat(_BL)
except OSError:
    # A power cut between the two renames of an install: take the new copy if it
    # is complete (its .sha256 marker is written last), else the old one.
    for _src in (_BL + ".new/.sha256", _BL + ".old/.sha256"):
        try:
            os.stat(_src)
            os.rename(_src[:-8], _BL)
            break
        except OSError:
            pass
sys.path.insert(0, _BL)
try:
    import keel_boot
except ImportError as e:
    print("keel: bootloader missing from /keel/m/bl (%s); reflash the board" % e)
else:
    keel_boot.main()
