# Virtual GPIO: a Pin is a view of one of the board's simulated lines (sim_pins):
# outputs drive it and are reported to the host, inputs read it: the host drives them
# (keel vdev io --set D2=1), or the output they are jumpered to (keel vdev run --wires).
from micropython import const
import hal
from hal.ports.virtual.link import sim

_pins = sim("sim_pins")
_PULL_NAMES = {None: None, 1: "up", 2: "down"}


class Pin:
    IN = const(0)
    OUT = const(1)
    PULL_UP = const(1)
    PULL_DOWN = const(2)
    IRQ_RISING = const(1)
    IRQ_FALLING = const(2)

    def __init__(self, name, mode=-1, pull=None, value=None):
        self._line = _pins.line(name)
        if mode != -1:
            self.init(mode, pull, value)

    def init(self, mode, pull=None, value=None):
        if mode not in (0, 1):
            raise ValueError("invalid pin mode")
        self._line.configure(mode, _PULL_NAMES.get(pull), value)

    def value(self, v=None):
        if v is None:
            return self._line.level()
        self._line.write(v)

    def on(self):
        self._line.write(1)

    def off(self):
        self._line.write(0)

    def toggle(self):
        self._line.write(1 - self._line.out)

    def irq(self, handler=None, trigger=3):
        line = self._line
        if handler is None:
            line.on_edge = None
        else:
            # An input's edges, from the host or a jumpered output, run the handler
            # through the system's runner (hal.schedule).
            def edge(_line, level, pin=self, handler=handler, trigger=trigger):
                if _line.mode == Pin.IN and trigger & (Pin.IRQ_RISING if level else Pin.IRQ_FALLING):
                    hal.schedule(handler, pin)

            line.on_edge = edge

    def __repr__(self):
        return "Pin(%s)" % self._line.name

