# The analog levels of the board's pins, 0..65535 of the converter's full scale: what
# the host set ({"op": "analog", "pin": "A0", "value": 0..65535}), 0 until it does,
# kept to the converter's bits (board.json "adc": {"bits"}). A pin jumpered to a
# digital output reads that output: 0 or full scale.
import sim_board
import sim_link
import sim_pins

_levels = {}  # canonical pin name -> 0..65535


def analog_pin(name):
    if not sim_board.has(name, "analog"):
        raise ValueError("pin %s has no ADC" % name)
    return sim_board.canonical(name)


def level(name):
    """The pin's level now, 0..65535 (name: a canonical analog pin)."""
    if sim_board.wires:
        for p in sim_pins.any_line(name).peers:
            if p.mode == sim_pins.OUT:
                return 65535 if p.out else 0
    return _levels.get(name, 0)


def quantise(value, bits):
    # As a converter of `bits` does: its bits kept, scaled back up to 16 as ports do.
    if bits >= 16:
        return value
    shift = 16 - bits
    raw = value >> shift
    if bits < shift:
        return raw << shift
    return (raw << shift) | (raw >> (bits - shift))


def _set_level(cmd):
    pin = analog_pin(cmd["pin"])
    value = int(cmd["value"])
    if not 0 <= value <= 65535:
        raise ValueError("analog value out of range")
    value = quantise(value, sim_board.board().get("adc", {}).get("bits", 16))
    _levels[pin] = value
    sim_link.emit("analog", pin=pin, value=value)


sim_link.on("analog", _set_level)
