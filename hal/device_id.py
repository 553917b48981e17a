# The device id: one rule for every board. The cloud session connects as this id and
# provisioning issues the device's certificate for it, so both take it from here: on
# the device through hal.device.unique_id(), and keel device provision runs this very
# file on the board (over USB, at its raw REPL) or on its twin (a device directory)
# before it writes anything. Nothing here imports Keel: it runs on a bare board too.
#
#   port       the id                                                     hex digits
#   virtual    the 12 random bytes keel vdev create wrote (DIR/uid)       24
#   esp32      machine.unique_id(): the base MAC the factory burnt into   12
#              eFuse (6 bytes), as the port reads it
#   nrf        the 64-bit DEVICEID Nordic writes into FICR at the factory     16
#              (DEVICEID[1], then [0], at 0x10000064 and 0x10000060: nRF52840
#              Product Specification), read with machine.mem32: the port's
#              machine.unique_id() is b'' (1.28), so every board would share one id
from binascii import hexlify


def _virtual():
    import vboard

    return vboard.uid


def _machine_unique_id():
    import machine

    return hexlify(machine.unique_id()).decode()


def _ficr_deviceid():
    from machine import mem32

    # mem32 reads signed words: a word with bit 31 set is negative, hence the masks
    return "%08x%08x" % (mem32[0x10000064] & 0xFFFFFFFF, mem32[0x10000060] & 0xFFFFFFFF)


# hal.PORT -> the function that reads the id, as lowercase hex. Add a port here.
READERS = {"virtual": _virtual, "esp32": _machine_unique_id, "nrf": _ficr_deviceid}


def device_id(port):
    """The board's id, lowercase hex, the same for the life of the board."""
    return READERS[port]()
