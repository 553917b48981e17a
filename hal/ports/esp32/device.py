# ESP32 identity: machine.unique_id() is the factory base MAC address in eFuse
# (6 bytes), fixed for the life of the chip.
import machine
from binascii import hexlify

_id = []


def unique_id():
    if not _id:
        _id.append(hexlify(machine.unique_id()).decode())
    return _id[0]
