# nRF52840 ADC (SAADC) on the board's analog pins. machine.ADC takes the AIN channel,
# not the pin: the table below is the chip's fixed wiring. The port samples 8 bits,
# gain 1/4 against VDD/4, so full scale is VDD: read_uv() scales by the board's
# "adc": {"vref_uv"}, which must be the board's VDD. Older firmware has only
# value() (0..255, may dip below 0): it is scaled to 16 bits here as read_u16() is.
import machine
import hal

_AIN = {2: 0, 3: 1, 4: 2, 5: 3, 28: 4, 29: 5, 30: 6, 31: 7}  # P0.n -> AINk


class ADC:
    def __init__(self, name):
        if not hal.pin_has(name, "analog"):
            raise ValueError("pin %s has no ADC" % name)
        channel = _AIN.get(hal.pin_id(name))
        if channel is None:
            raise ValueError("pin %s is not an nRF52840 analog input" % name)
        self._name = name
        self._adc = machine.ADC(channel)
        self._native = hasattr(self._adc, "read_u16")
        self._vref_uv = hal.board()["adc"]["vref_uv"]

    def _raw8(self):
        v = self._adc.value()
        return 0 if v < 0 else 255 if v > 255 else v

    def read_u16(self):
        if self._native:
            return self._adc.read_u16()
        v = self._raw8()
        return v << 8 | v

    def read_uv(self):
        # From the 8-bit sample: 255 * vref stays a small int (no long-int allocation).
        return (self.read_u16() >> 8) * self._vref_uv // 255

    def __repr__(self):
        return "ADC(%s)" % self._name
