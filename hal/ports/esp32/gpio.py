# ESP32 GPIO: machine.Pin by board pin name. The constants are machine.Pin's own, so
# modes pass straight through. The esp32 port's pin interrupts are always soft: its ISR
# queues the handler with micropython.schedule, so it never runs in the ISR (and its
# Pin.irq() takes no `hard` argument: TypeError); the handler is then called through
# hal.schedule, as every port's pin handlers are.
import machine
import hal

_MP = machine.Pin
_BOTH_EDGES = _MP.IRQ_RISING | _MP.IRQ_FALLING


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
        # GPIO34..39 have no output driver and no pulls; the board marks them.
        if mode == _MP.OUT and hal.pin_has(self._name, "input-only"):
            raise ValueError("pin %s is input-only" % self._name)
        if value is None:
            self._pin.init(mode, pull)
        else:
            self._pin.init(mode, pull, value=value)

    def value(self, v=None):
        if v is None:
            return self._pin.value()
        self._pin.value(v)

    def on(self):
        self._pin.on()

    def off(self):
        self._pin.off()

    def toggle(self):
        # Pin.OUT is GPIO_MODE_INPUT_OUTPUT on this port: value() reads the pad back.
        p = self._pin
        p.value(not p.value())

    def irq(self, handler=None, trigger=_BOTH_EDGES):
        self._handler = handler
        if handler is None:
            self._pin.irq(handler=None)
        else:
            self._pin.irq(handler=self._fire, trigger=trigger)

    def _fire(self, _pin):
        handler = self._handler
        if handler is not None:
            hal.schedule(handler, self)  # the system's runner: it keeps the app's errors

    def __repr__(self):
        return "Pin(%s)" % self._name
