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
#   nrf        (not here yet: hal/ports/nrf/device.py reads the FICR DEVICEID; the
#              reader moves into READERS below)
from binascii import hexlify


def _virtual():
    import vboard

    return vboard.uid


def _machine_unique_id():
    import machine

    return hexlify(machine.unique_id()).decode()


# hal.PORT -> the function that reads the id, as lowercase hex. Add a port here.
READERS = {"virtual": _virtual, "esp32": _machine_unique_id}


def device_id(port):
    """The board's id, lowercase hex, the same for the life of the board."""
    return READERS[port]()
