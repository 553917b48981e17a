# GPIO: machine.Pin by board pin name. The constants are machine.Pin's own, so modes
# pass straight through. irq() here suits a port whose Pin.irq() handlers are soft
# (run later, not in the ISR); the handler is then called through hal.schedule, as
# every port's pin handlers are.
import machine
import hal

_MP = machine.Pin
BOTH_EDGES = _MP.IRQ_RISING | _MP.IRQ_FALLING


class Pin:
    IN = _MP.IN
    OUT = _MP.OUT
    PULL_UP = _MP.PULL_UP
    PULL_DOWN = _MP.PULL_DOWN
    IRQ_RISING = _MP.IRQ_RISING
    IRQ_FALLING = _MP.IRQ_FALLING

    def __init__(self, name, mode=-1, pull=None, value=None):
        self._name = name
        self._pin = _MP(hal.pin_id(name))
        self._handler = None
        if mode != -1:
            self.init(mode, pull, value)

    def init(self, mode, pull=None, value=None):
        # GPIO34..39 of the ESP32 have no output driver and no pulls; the board marks them.
        if mode == _MP.OUT and hal.pin_has(self._name, "input-only"):
            raise ValueError("pin %s is input-only" % self._name)
        if value is None:
            self._pin.init(mode, pull)
        else:
            self._pin.init(mode, pull, value=value)

    def value(self, v=None):
        if v is None:
            return self._pin.value()
        self._pin.value(1 if v else 0)

    def on(self):
        self._pin.value(1)

    def off(self):
        self._pin.value(0)

    def toggle(self):
        # The nrf port's machine.Pin has no toggle(). Both ports read an output back:
        # the esp32's Pin.OUT is GPIO_MODE_INPUT_OUTPUT (value() reads the pad), the
        # nrf's value() of an output reads the level it drives, the OUT register
        # (ports/nrf/modules/machine/pin.c, mphalport.h).
        self._pin.value(1 - self._pin.value())

    def irq(self, handler=None, trigger=BOTH_EDGES):
        self._handler = handler
        if handler is None:
            self._pin.irq(handler=None)
        else:
            self._pin.irq(handler=self._deliver, trigger=trigger)

    def _deliver(self, _arg):
        handler = self._handler
        if handler is not None:
            hal.schedule(handler, self)  # the system's runner: it keeps the app's errors

    def __repr__(self):
        return "Pin(%s)" % self._name
