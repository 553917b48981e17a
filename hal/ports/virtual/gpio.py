# Virtual GPIO: pin levels live in the VM; outputs are reported to the host,
# inputs are driven by it (keel vdev io --set D2=1).
from micropython import const
import hal
from hal.ports.virtual import link

_MODE_NAMES = ("in", "out")
_PULL_NAMES = {None: None, 1: "up", 2: "down"}


class _Line:
    """The state of one physical pin, shared by every Pin object on it."""

    def __init__(self, name):
        self.name = name
        self.mode = 0
        self.pull = None
        self.out = 0
        self.ext = None  # level the host drives, None when floating
        self.handler = None
        self.trigger = 0
        self.pin = None

    def level(self):
        if self.mode == 1:
            return self.out
        if self.ext is not None:
            return self.ext
        return 1 if self.pull == 1 else 0


_lines = {}


def _line(name):
    canonical = hal.board().get("aliases", {}).get(name, name)
    line = _lines.get(canonical)
    if line is None:
        hal.pin_id(canonical)  # raises ValueError for a pin the board lacks
        line = _Line(canonical)
        _lines[canonical] = line
    return line


class Pin:
    IN = const(0)
    OUT = const(1)
    PULL_UP = const(1)
    PULL_DOWN = const(2)
    IRQ_RISING = const(1)
    IRQ_FALLING = const(2)

    def __init__(self, name, mode=-1, pull=None, value=None):
        self._line = _line(name)
        if mode != -1:
            self.init(mode, pull, value)

    def init(self, mode, pull=None, value=None):
        line = self._line
        if mode not in (0, 1):
            raise ValueError("invalid pin mode")
        line.mode = mode
        line.pull = pull
        if value is not None:
            line.out = 1 if value else 0
        link.emit(
            "pin",
            pin=line.name,
            mode=_MODE_NAMES[mode],
            pull=_PULL_NAMES.get(pull),
            value=line.level(),
        )

    def value(self, v=None):
        line = self._line
        if v is None:
            return line.level()
        v = 1 if v else 0
        if line.mode == 1 and v != line.out:
            line.out = v
            link.emit("pin", pin=line.name, value=v)
        else:
            line.out = v

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    def toggle(self):
        self.value(1 - self._line.out)

    def irq(self, handler=None, trigger=3):
        line = self._line
        line.handler = handler
        line.trigger = trigger if handler else 0
        line.pin = self if handler else None

    def __repr__(self):
        return "Pin(%s)" % self._line.name


def _drive(cmd):
    """Host command {"op": "set", "pin": NAME, "value": 0|1}: drive an input."""
    line = _line(cmd["pin"])
    before = line.level()
    line.ext = None if cmd.get("value") is None else (1 if cmd["value"] else 0)
    after = line.level()
    link.emit("pin", pin=line.name, value=after, driven=line.ext)
    if line.handler and before != after and line.mode == 0:
        edge = Pin.IRQ_RISING if after else Pin.IRQ_FALLING
        if line.trigger & edge:
            hal.schedule(line.handler, line.pin)


link.on("set", _drive)
