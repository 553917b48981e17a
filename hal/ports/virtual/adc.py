# Virtual ADC: each analog pin reads the level the host set
# ({"op": "analog", "pin": "A0", "value": 0..65535}); 0 until it does. With simulated
# wires (keel vdev run --wires), a pin jumpered to a digital output reads that
# output: 0 or full scale. The levels live in the board's sim_analog.
import hal
from hal.ports.virtual.link import sim

_analog = sim("sim_analog")
_quantise = _analog.quantise


class ADC:
    def __init__(self, name):
        self._pin = _analog.analog_pin(name)
        self._vref_uv = hal.board().get("adc", {}).get("vref_uv", 3300000)

    def read_u16(self):
        return _analog.level(self._pin)

    def read_uv(self):
        return self.read_u16() * self._vref_uv // 65535

    def __repr__(self):
        return "ADC(%s)" % self._pin
