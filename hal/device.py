# Identity of the hardware.
#
#   unique_id() -> lowercase hex string, stable for the life of the board
#
# The rule is hal/device_id.py, one for every board (provisioning runs the same file).
from hal import PORT, backend

try:
    # A port whose id is not in the rule may keep its own reader (none does now).
    unique_id = backend("device").unique_id
except ImportError:
    from hal.device_id import device_id

    _id = []

    def unique_id():
        if not _id:
            _id.append(device_id(PORT))
        return _id[0]
