# The board's pins as wires: each pin is a Line with a level. An output drives its
# line; an input reads what drives it: a jumpered output (keel vdev run --wires), else
# the level the host drives (keel vdev io --set), else its pull. Every change of a
# line's level is reported to the host and given to the line's on_edge(line, level),
# where the HAL (virtual board) or the port's machine.Pin (a twin) decides whether it
# is an interrupt. Without wires nothing here costs more than an attribute test.
import sim_board
import sim_link

IN = 0
OUT = 1


class Line:
    """The state of one physical pin, shared by every pin object on it."""

    peers = ()  # the lines jumpered to this one

    def __init__(self, name):
        self.name = name
        self.mode = IN
        self.pull = None  # "up", "down" or None
        self.out = 0
        self.ext = None  # the level the host drives; None when it floats
        self.on_edge = None

    def level(self):
        if self.mode == OUT:
            return self.out
        for p in self.peers:  # a jumpered output drives this pin
            if p.mode == OUT:
                return p.out
        if self.ext is not None:
            return self.ext
        return 1 if self.pull == "up" else 0

    def configure(self, mode, pull, value=None):
        """Set the direction and pull (and the output latch, if value is given)."""
        was, before = self.level(), _peer_levels(self)
        self.mode = mode
        self.pull = pull
        if value is not None:
            self.out = 1 if value else 0
        now = self.level()
        sim_link.emit("pin", pin=self.name, mode=("in", "out")[mode], pull=pull, value=now)
        _changed(self, was, now, before)

    def write(self, value):
        """Set the output latch; the line follows while the pin is an output."""
        value = 1 if value else 0
        if value == self.out:
            return
        was, before = self.level(), _peer_levels(self)
        self.out = value
        now = self.level()
        if now != was:
            sim_link.emit("pin", pin=self.name, value=now)
        _changed(self, was, now, before)


def _peer_levels(line):
    return [p.level() for p in line.peers] if line.peers else None


def _changed(line, was, now, before):
    if now != was and line.on_edge is not None:
        line.on_edge(line, now)
    if before is None:
        return
    for p, old in zip(line.peers, before):  # a jumpered input follows
        new = p.level()
        if new != old:
            sim_link.emit("pin", pin=p.name, value=new)
            if p.on_edge is not None:
                p.on_edge(p, new)


_lines = {}
_nets = None  # with wires: pin name -> the other pins of its net


def _wire_nets(wires):
    nets = {}
    for pair in wires:
        net = set()
        for name in pair:
            net.add(sim_board.canonical(name))
        for name in list(net):
            net.update(nets.get(name, ()))
        for name in net:
            nets[name] = net
    return {name: tuple(n for n in net if n != name) for name, net in nets.items()}


def line(name):
    """The Line of a board pin (a name or an alias); ValueError for a pin the board
    lacks. Names the board does not list (a twin's other GPIOs) are made with
    make=True."""
    return _line(name, False)


def _line(name, make):
    global _nets
    canonical = sim_board.canonical(name)
    found = _lines.get(canonical)
    if found is not None:
        return found
    if not make and canonical not in sim_board.board()["pins"]:
        raise ValueError("board %s has no pin %s" % (sim_board.board()["name"], name))
    found = _lines[canonical] = Line(canonical)
    wires = sim_board.wires
    if wires:
        if _nets is None:
            _nets = _wire_nets(wires)
        # (each line is in _lines before its peers are made: no endless recursion)
        found.peers = tuple(_line(n, False) for n in _nets.get(canonical, ()))
    return found


def any_line(name):
    """A Line for any name, listed by the board or not (a chip's other pads)."""
    return _line(name, True)


def wired(a, b):
    """True when line b is on line a's net (a jumper between them)."""
    return b in a.peers


def drive(line_, value):
    """The host drives an input: 0, 1 or None (floating)."""
    was = line_.level()
    line_.ext = value
    now = line_.level()
    sim_link.emit("pin", pin=line_.name, value=now, driven=value)
    if now != was and line_.on_edge is not None:
        line_.on_edge(line_, now)


def _drive(cmd):
    """Host command {"op": "set", "pin": NAME, "value": 0|1|null}."""
    value = cmd.get("value")
    drive(line(cmd["pin"]), None if value is None else (1 if value else 0))


sim_link.on("set", _drive)
