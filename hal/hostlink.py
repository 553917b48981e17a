# A wire to a development host, where the board has one (the virtual board's I/O
# files). The system uses it to show state and to take commands during development;
# on boards without one AVAILABLE is False and emit/on do nothing.
#
#   emit(kind, **fields)   report something to the host
#   on(op, handler)        handler(command_dict) for host commands of that op
from hal import backend

try:
    _link = backend("link")
    AVAILABLE = True
    emit = _link.emit
    on = _link.on
except ImportError:
    AVAILABLE = False

    def emit(kind, **fields):
        pass

    def on(op, handler):
        pass
