# ADC: analog inputs by board name (pins with the "analog" capability).
#
#   a = ADC("A0")
#   a.read_u16() -> 0..65535
#   a.read_uv()  -> microvolts (over the board's reference, 3.3 V unless it says otherwise)
from hal import backend

ADC = backend("adc").ADC
