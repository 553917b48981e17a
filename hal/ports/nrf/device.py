# nRF52840 identity: the 64-bit DEVICEID that Nordic writes into FICR at the factory
# (FICR.DEVICEID[0] at 0x10000060, [1] at 0x10000064), read with machine.mem32. It
# is read even where the firmware has machine.unique_id(), so the id does not change
# when a firmware update adds or changes that function.
from machine import mem32
from micropython import const

_DEVICEID0 = const(0x10000060)
_DEVICEID1 = const(0x10000064)
_id = []


def unique_id():
    if not _id:
        high = mem32[_DEVICEID1] & 0xFFFFFFFF
        low = mem32[_DEVICEID0] & 0xFFFFFFFF
        _id.append("%08x%08x" % (high, low))
    return _id[0]
