# Logging with levels, to the console (and to the cloud once it is connected).
import time

LEVELS = ("trace", "info", "warn", "error")
_NAMES = ("TRACE", "INFO", "WARN", "ERROR")
_min = [1]


def set_level(name):
    """Messages below this level are dropped ("trace", "info", "warn", "error")."""
    _min[0] = LEVELS.index(name)


def level():
    return LEVELS[_min[0]]


def _log(lvl, msg, args):
    if lvl < _min[0]:
        return
    if args:
        msg = msg % args
    print("%d %s %s" % (time.ticks_ms(), _NAMES[lvl], msg))


def trace(msg, *args):
    _log(0, msg, args)


def info(msg, *args):
    _log(1, msg, args)


def warn(msg, *args):
    _log(2, msg, args)


def error(msg, *args):
    _log(3, msg, args)
