# The virtual board's wire to the host: state changes go out as JSON lines in
# <device>/io.log, commands come in as JSON lines appended to <device>/io.in.
# The host side is tools/keel/vio.py (keel vdev io).
import json
import time
import vboard

_out = vboard.io_out
_in = vboard.io_in
_pos = _in.seek(0, 2)
_partial = b""
_handlers = {}


def emit(kind, **fields):
    """Report a state change to the host."""
    fields["k"] = kind
    fields["t"] = time.ticks_ms()
    _out.write(json.dumps(fields))
    _out.write("\n")


def on(op, handler):
    """handler(command_dict) runs, from the system loop, for each host command op."""
    _handlers[op] = handler


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
            handler = _handlers.get(cmd.get("op"))
        except ValueError:
            emit("error", message="bad command")
            continue
        if handler is None:
            emit("error", message="no handler for %s" % cmd.get("op"))
            continue
        try:
            handler(cmd)
        except Exception as e:  # a bad command must not stop the board
            emit("error", message="%s: %r" % (cmd.get("op"), e))


import hal  # noqa: E402  (hal is initialised before any backend is imported)

hal.add_service(poll)
