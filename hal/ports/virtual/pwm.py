# Virtual PWM: the output's frequency and duty live in the VM; every change, and the
# output stopping, is reported to the host.
from micropython import const
import hal
from hal.ports.virtual import link

_FREQ_MIN = const(1)
_FREQ_MAX = const(40_000_000)  # the ESP32 LEDC limit: fast enough for any real board
_DUTY_MAX = const(65535)


def _check_freq(hz):
    if not _FREQ_MIN <= hz <= _FREQ_MAX:
        raise ValueError("freq must be %d..%d Hz" % (_FREQ_MIN, _FREQ_MAX))
    return int(hz)


def _check_duty(d):
    if not 0 <= d <= _DUTY_MAX:
        raise ValueError("duty_u16 must be 0..65535")
    return int(d)


class PWM:
    def __init__(self, name, freq=5000, duty_u16=32768):
        if not hal.pin_has(name, "pwm"):
            raise ValueError("pin %s has no PWM" % name)
        self._pin = hal.pin_name(name)
        self._freq = _check_freq(freq)
        self._duty = _check_duty(duty_u16)
        self._report()

    def _report(self):
        link.emit("pwm", pin=self._pin, freq=self._freq, duty_u16=self._duty)

    def freq(self, hz=None):
        if hz is None:
            return self._freq
        self._freq = _check_freq(hz)
        self._report()

    def duty_u16(self, d=None):
        if d is None:
            return self._duty
        self._duty = _check_duty(d)
        self._report()

    def deinit(self):
        link.emit("pwm", pin=self._pin, off=True)

    def __repr__(self):
        return "PWM(%s, freq=%d, duty_u16=%d)" % (self._pin, self._freq, self._duty)
