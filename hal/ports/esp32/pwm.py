# ESP32 PWM: machine.PWM on the LEDC peripheral, both of its speed groups: 16 channels
# on 8 timers, so at most 8 different frequencies run at once (the port's
# lightsleep=True, not used here, keeps to the 8 low-speed channels and 4 timers). The
# duty resolution falls as the frequency rises (16 bits at 1 kHz, 1 bit at 40 MHz), and
# duty_u16() reads back what the channel's resolution kept.
import machine
import hal


class PWM:
    def __init__(self, name, freq=5000, duty_u16=32768):
        if not hal.pin_has(name, "pwm"):
            raise ValueError("pin %s has no PWM" % name)
        self._name = name
        self._pwm = machine.PWM(machine.Pin(hal.pin_id(name)), freq=freq, duty_u16=duty_u16)

    # freq, duty_u16 and deinit are the other port's too, kept here: in hal/ports/machine/
    # they would cost every app using GPIO 640 B of heap, or a filesystem block the
    # nRF52840 does not have (measured, issue 18).
    def freq(self, hz=None):
        if hz is None:
            return self._pwm.freq()
        self._pwm.freq(hz)

    def duty_u16(self, d=None):
        if d is None:
            return self._pwm.duty_u16()
        self._pwm.duty_u16(d)

    def deinit(self):
        self._pwm.deinit()

    def __repr__(self):
        return "PWM(%s)" % self._name
