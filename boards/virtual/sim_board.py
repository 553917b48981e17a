# The simulated board's description, shared by the sim_*.py models: its board.json
# (pins, aliases, buses and what is simulated on them) and the run's jumpers.
board = None  # board() -> the board definition
wires = None  # pairs of pin names (keel vdev run --wires), or None


def setup(board_fn, wires_=None):
    """board_fn() returns the board definition when a model needs it: the virtual
    board's HAL reads it once the system shares it (hal.board), so no copy is made."""
    global board, wires
    board, wires = board_fn, wires_


def canonical(name):
    """The board pin behind a name or alias."""
    return board().get("aliases", {}).get(name, name)


def pin_spec(name):
    """board.json's entry for a pin name or alias, or None."""
    return board()["pins"].get(canonical(name))


def has(name, capability):
    spec = pin_spec(name)
    return bool(spec) and capability in spec.get("caps", ())


def bus(kind, number):
    """board.json's entry for bus `number` of kind "i2c", "spi" or "uart", or None."""
    for spec in board().get(kind, ()):
        if spec["bus"] == number:
            return spec
    return None
