# Identity of the hardware.
#
#   unique_id() -> lowercase hex string, stable for the life of the board
from hal import backend

unique_id = backend("device").unique_id
