# PWM outputs by board name (pins with the "pwm" capability).
#
#   p = PWM("D3", freq=1000, duty_u16=32768)
#   p.freq(2000); p.freq() -> Hz
#   p.duty_u16(16384); p.duty_u16() -> 0..65535
#   p.deinit()
from hal import backend

PWM = backend("pwm").PWM
