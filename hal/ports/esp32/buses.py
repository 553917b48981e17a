# The board's bus table ("i2c", "spi", "uart" in board.json). Keel numbers buses per
# board, the same on every board where it can (I2C 0, SPI 0, UART 1, as the virtual
# board); "id" names the ESP32 peripheral behind the bus when it differs.
import machine
import hal


def find(kind, bus):
    """The board's entry for bus number `bus` of `kind` ("i2c", "spi", "uart")."""
    for spec in hal.board().get(kind, ()):
        if spec["bus"] == bus:
            return spec
    raise ValueError("board %s has no %s bus %r" % (hal.board()["name"], kind.upper(), bus))


def pin(spec, role):
    """machine.Pin for the board pin named by spec[role] ("sda", "tx", ...)."""
    return machine.Pin(hal.pin_id(spec[role]))
