# ESP32 ADC: ADC1 pins only (the board gives "analog" to GPIO32..39 alone: ADC2 is
# taken by the WiFi driver). 11 dB attenuation spans about 0..3.1 V; read_uv() uses
# the port's eFuse calibration, so it is better than scaling read_u16().
import machine
import hal


class ADC:
    def __init__(self, name):
        if not hal.pin_has(name, "analog"):
            raise ValueError("pin %s has no ADC" % name)
        self._name = name
        adc = machine.ADC(machine.Pin(hal.pin_id(name)))
        adc.atten(machine.ADC.ATTN_11DB)
        self._adc = adc

    def read_u16(self):
        return self._adc.read_u16()

    def read_uv(self):
        return self._adc.read_uv()

    def __repr__(self):
        return "ADC(%s)" % self._name
