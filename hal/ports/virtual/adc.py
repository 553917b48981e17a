# Virtual ADC: each analog pin reads the level the host set
# ({"op": "analog", "pin": "A0", "value": 0..65535}); 0 until it does. With simulated
# wires (keel vdev run --wires), a pin jumpered to a digital output reads that
# output: 0 or full scale.
import hal
import vboard
from hal.ports.virtual import link

_wired = bool(getattr(vboard, "wires", None))

_levels = {}  # canonical pin name -> 0..65535, shared by every ADC on the pin


def _analog_pin(name):
    if not hal.pin_has(name, "analog"):
        raise ValueError("pin %s has no ADC" % name)
    return hal.board().get("aliases", {}).get(name, name)


class ADC:
    def __init__(self, name):
        self._pin = _analog_pin(name)
        self._vref_uv = hal.board().get("adc", {}).get("vref_uv", 3300000)

    def read_u16(self):
        if _wired:
            from hal.ports.virtual import gpio

            for p in gpio._line(self._pin).peers:
                if p.mode == 1:  # the output it is wired to drives it
                    return 65535 if p.out else 0
        return _levels.get(self._pin, 0)

    def read_uv(self):
        return self.read_u16() * self._vref_uv // 65535

    def __repr__(self):
        return "ADC(%s)" % self._pin


def _quantise(value, bits):
    # As a real port does: keep the converter's bits, scaled back up to 16.
    if bits >= 16:
        return value
    shift = 16 - bits
    raw = value >> shift
    if bits < shift:
        return raw << shift
    return (raw << shift) | (raw >> (bits - shift))


def _set_level(cmd):
    pin = _analog_pin(cmd["pin"])
    value = int(cmd["value"])
    if not 0 <= value <= 65535:
        raise ValueError("analog value out of range")
    value = _quantise(value, hal.board().get("adc", {}).get("bits", 16))
    _levels[pin] = value
    link.emit("analog", pin=pin, value=value)


link.on("analog", _set_level)
