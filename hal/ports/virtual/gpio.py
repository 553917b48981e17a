# Virtual GPIO: pin levels live in the VM; outputs are reported to the host,
# inputs are driven by it (keel vdev io --set D2=1), or by the output they are
# jumpered to when the run has simulated wires (keel vdev run --wires FILE: the pairs
# are in vboard.wires, None without; then nothing below costs more than a test).
from micropython import const
import hal
import vboard
from hal.ports.virtual import link

_MODE_NAMES = ("in", "out")
_PULL_NAMES = {None: None, 1: "up", 2: "down"}


class _Line:
    """The state of one physical pin, shared by every Pin object on it."""

    peers = ()  # the lines wired to this one (simulated jumpers)

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
        for p in self.peers:  # a wired output drives this pin
            if p.mode == 1:
                return p.out
        if self.ext is not None:
            return self.ext
        return 1 if self.pull == 1 else 0


_lines = {}
_nets = None  # with wires: pin name -> the other pins of its net


def _canonical(name):
    return hal.board().get("aliases", {}).get(name, name)


def _wire_nets(wires):
    nets = {}
    for pair in wires:
        net = set()
        for name in pair:
            net.add(_canonical(name))
        for name in list(net):
            net.update(nets.get(name, ()))
        for name in net:
            nets[name] = net
    return {name: tuple(n for n in net if n != name) for name, net in nets.items()}


def _line(name):
    global _nets
    canonical = _canonical(name)
    line = _lines.get(canonical)
    if line is None:
        hal.pin_id(canonical)  # raises ValueError for a pin the board lacks
        line = _Line(canonical)
        _lines[canonical] = line
        wires = getattr(vboard, "wires", None)
        if wires:
            if _nets is None:
                _nets = _wire_nets(wires)
            # (each line is in _lines before its peers are made: no endless recursion)
            line.peers = tuple(_line(n) for n in _nets.get(canonical, ()))
    return line


def _changing(line):
    """The levels of the pins wired to line, before it changes (see _changed)."""
    return [p.level() for p in line.peers] if line.peers else None


def _changed(line, before):
    # A wired input that follows line: report its new level, run its interrupt.
    if before is None:
        return
    for p, was in zip(line.peers, before):
        now = p.level()
        if now != was:
            link.emit("pin", pin=p.name, value=now)
            _edge(p, now)


def _edge(line, after):
    if line.handler and line.mode == 0:
        edge = Pin.IRQ_RISING if after else Pin.IRQ_FALLING
        if line.trigger & edge:
            hal.schedule(line.handler, line.pin)


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
        before = _changing(line)
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
        _changed(line, before)

    def value(self, v=None):
        line = self._line
        if v is None:
            return line.level()
        v = 1 if v else 0
        if line.mode == 1 and v != line.out:
            before = _changing(line)
            line.out = v
            link.emit("pin", pin=line.name, value=v)
            _changed(line, before)
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
    if before != after:
        _edge(line, after)


link.on("set", _drive)
