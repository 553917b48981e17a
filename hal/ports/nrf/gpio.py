# nRF GPIO: machine.Pin by board pin name (ids are 0..47: P0.n is n, P1.n is 32 + n).
#
# Port facts (MicroPython nrf port, ports/nrf/modules/machine/pin.c; what toggle()
# relies on is in hal/ports/machine/gpio.py):
# - Pin.irq(handler, trigger) takes no `hard` argument and returns None. Its handler
#   runs inside the GPIOTE interrupt, so the handler given here only queues the app's
#   handler with micropython.schedule (once per pending edge, no allocation); it is
#   then called through hal.schedule, as every port's pin handlers are. On firmware
#   built without micropython.schedule, the system loop collects pending edges
#   (hal.add_service).
# - From 1.24 irq() leaves the pin's direction and pull as they were (1.20-1.23 made it
#   an input with the pull-up on), irq(None) frees the pin's GPIOTE channel, and arming
#   a pin that holds one keeps its old trigger: the channel is freed before re-arming.
#   Before 1.24 irq(None) would leave None as the handler the interrupt calls, so the
#   backend's own handler stays armed there and simply stops passing edges on.
# - 8 GPIOTE channels: 8 pins with handlers at most.
import sys
import hal
from hal.ports.machine import gpio

try:
    from micropython import schedule
except ImportError:  # firmware built without the scheduler: the system loop polls
    schedule = None

_FREES = sys.implementation.version >= (1, 24)  # irq(None) frees the channel
_polled = []  # pins with handlers, when there is no scheduler


def _poll():
    for pin in _polled:
        if pin._pending:
            pin._deliver(None)


class Pin(gpio.Pin):
    def __init__(self, name, mode=-1, pull=None, value=None):
        self._armed = False  # the port's irq() has our _isr on this pin
        self._pending = False
        self._deliver_ref = self._deliver  # bound once: the ISR must not allocate
        super().__init__(name, mode, pull, value)

    def init(self, mode, pull=None, value=None):
        # An output always gets a level, 0 unless given (the shared init() sets one only
        # when given).
        if mode == Pin.OUT:
            self._pin.init(mode, pull, value=1 if value else 0)
        else:
            self._pin.init(mode, pull)

    def irq(self, handler=None, trigger=gpio.BOTH_EDGES):
        self._handler = handler
        if self._armed and _FREES:
            self._pin.irq(None)
            self._armed = False
        if handler is not None:
            if schedule is None and self not in _polled:
                _polled.append(self)
                hal.add_service(_poll)
            self._pin.irq(self._isr, trigger)
            self._armed = True

    def _isr(self, _pin):
        if self._handler is not None and not self._pending:
            self._pending = True
            if schedule is None:
                return  # _poll() delivers it
            try:
                schedule(self._deliver_ref, None)
            except Exception:  # queue full; nothing may escape an ISR on this port
                self._pending = False  # this edge is dropped

    def _deliver(self, arg):
        self._pending = False
        super()._deliver(arg)
