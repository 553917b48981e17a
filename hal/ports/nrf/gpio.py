# nRF GPIO: machine.Pin by board pin name (ids are 0..47: P0.n is n, P1.n is 32 + n).
#
# Port facts this works around:
# - An output's input buffer is disconnected, so machine.Pin.value() reads 0 there:
#   the level last written is kept here and returned instead.
# - machine.Pin has no toggle().
# - Pin.irq() handlers run inside the GPIOTE interrupt. The handler given here only
#   queues the user's handler with micropython.schedule (once per pending edge, no
#   allocation), so user code never runs in the ISR; it is then called through
#   hal.schedule, as every port's pin handlers are. On firmware built without
#   micropython.schedule, the system loop collects pending edges instead
#   (hal.add_service).
# - Pin.irq() reconfigures the pin as an input with the pull-up on, whatever pull
#   was asked for; there are 8 GPIOTE channels, so 8 pins with handlers at most;
#   irq(None) stops the handler being called, the channel stays taken.
import machine
import hal

try:
    from micropython import schedule
except ImportError:  # firmware built without the scheduler: the system loop polls
    schedule = None

_MP = machine.Pin
_BOTH_EDGES = _MP.IRQ_RISING | _MP.IRQ_FALLING
_polled = []  # pins with handlers, when there is no scheduler


def _poll():
    for pin in _polled:
        if pin._pending:
            pin._deliver(None)


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
        self._out = -1  # level driven while an output, -1 while an input
        self._handler = None
        self._pending = False
        self._deliver_ref = self._deliver  # bound once: the ISR must not allocate
        if mode != -1:
            self.init(mode, pull, value)

    def init(self, mode, pull=None, value=None):
        if mode == _MP.OUT:
            level = 1 if value else 0
            self._pin.init(mode, pull, value=level)
            self._out = level
        else:
            self._pin.init(mode, pull)
            self._out = -1

    def value(self, v=None):
        if v is None:
            return self._out if self._out >= 0 else self._pin.value()
        level = 1 if v else 0
        self._pin.value(level)
        if self._out >= 0:
            self._out = level

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    def toggle(self):
        self.value(1 - self.value())

    def irq(self, handler=None, trigger=_BOTH_EDGES):
        self._handler = handler
        if handler is not None:
            self._out = -1  # the port made it an input
            if schedule is None and self not in _polled:
                _polled.append(self)
                hal.add_service(_poll)
            self._pin.irq(handler=self._isr, trigger=trigger)

    def _isr(self, _pin):
        if self._handler is not None and not self._pending:
            self._pending = True
            if schedule is None:
                return  # _poll() delivers it
            try:
                schedule(self._deliver_ref, None)
            except Exception:  # queue full; nothing may escape an ISR on this port
                self._pending = False  # this edge is dropped

    def _deliver(self, _arg):
        self._pending = False
        handler = self._handler
        if handler is not None:
            hal.schedule(handler, self)  # the system's runner: it keeps the app's errors

    def __repr__(self):
        return "Pin(%s)" % self._name
