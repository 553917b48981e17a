# nRF52840 PWM: machine.PWM (the common API, MicroPython 1.20 and later; older nrf
# firmware had a different, undocumented one). The chip has 4 PWM modules (PWM0-3)
# of 4 channels, and the channels of one module share its frequency.
#
# machine.PWM(pin) without device= takes a module no PWM has started yet and uses its
# channel 0, and deinit() stops the module without freeing it
# (ports/nrf/modules/machine/pwm.c): a fifth PWM in one boot, even after deinit()
# of the others, raises "all PWM devices in use". So the backend hands out the
# modules itself (device=, channel 0): one per output, each with its own frequency,
# given back by deinit() and taken again by the next PWM; a pin opened again gets
# its module back. At most 4 outputs at a time.
import machine
import hal

_MODULES = 4
_pins = [None] * _MODULES  # the pin id each module drives, or None when free


class PWM:
    def __init__(self, name, freq=5000, duty_u16=32768):
        if not hal.pin_has(name, "pwm"):
            raise ValueError("pin %s has no PWM" % name)
        pid = hal.pin_id(name)
        if pid in _pins:
            device = _pins.index(pid)
        elif None in _pins:
            device = _pins.index(None)
        else:
            raise ValueError("nrf: all %d PWM modules are in use (deinit() one)" % _MODULES)
        self._name = name
        self._pwm = machine.PWM(
            machine.Pin(pid), freq=freq, duty_u16=duty_u16, device=device, channel=0
        )
        _pins[device] = pid
        self._device = device

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
        if _pins[self._device] == hal.pin_id(self._name):
            _pins[self._device] = None

    def __repr__(self):
        return "PWM(%s)" % self._name
