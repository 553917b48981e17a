# The wire between a board on the VM and the host: state changes go out as JSON lines
# in DEVICE_DIR/io.log, commands come in as JSON lines appended to DEVICE_DIR/io.in.
# The host side is tools/keel/vio.py (keel vdev io). Part of the simulated hardware
# every board on the VM shares (sim_*.py); the board's start-up calls setup().
import json
import time

_out = None
_in = None
_pos = 0  # where the board started: commands sent since then are read
_partial = b""
_handlers = {}
_waiting = []  # commands that came before their handler (handlers come lazily)
_MAX_WAITING = 16


def setup(out, cmds):
    """out: io.log open for writing; cmds: io.in open for reading at its end."""
    global _out, _in, _pos
    _out, _in = out, cmds
    _pos = cmds.tell()


def emit(kind, **fields):
    """Report a state change to the host."""
    fields["k"] = kind
    fields["t"] = time.ticks_ms()
    _out.write(json.dumps(fields))
    _out.write("\n")


def on(op, handler):
    """handler(command_dict) runs, from poll(), for each host command op. Commands of
    that op that arrived before the handler existed run now."""
    _handlers[op] = handler
    for cmd in [c for c in _waiting if c.get("op") == op]:
        _waiting.remove(cmd)
        _dispatch(cmd)


def pending():
    """True when the host appended something since the last poll."""
    return _in.seek(0, 2) != _pos


def poll():
    """Dispatch the commands the host appended since the last poll."""
    global _pos, _partial
    end = _in.seek(0, 2)
    if end == _pos:
        return
    _in.seek(_pos)
    data = _partial + _in.read(end - _pos)
    _pos = end
    lines = data.split(b"\n")
    _partial = lines.pop()
    for line in lines:
        try:
            cmd = json.loads(line)
        except ValueError:
            emit("error", message="bad command")
            continue
        if cmd.get("op") in _handlers:
            _dispatch(cmd)
        elif len(_waiting) < _MAX_WAITING:
            _waiting.append(cmd)
        else:
            emit("error", message="no handler for %s" % cmd.get("op"))


def _dispatch(cmd):
    try:
        _handlers[cmd["op"]](cmd)
    except Exception as e:  # a bad command must not stop the board
        emit("error", message="%s: %r" % (cmd.get("op"), e))
