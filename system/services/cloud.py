# The app's side of the cloud: events, subscriptions, functions and variables.
# On a provisioned device the system runs the cloud session (system/core/
# cloud_session.py) and this module attaches to it; while it is not connected (or
# its window is full) publish() queues events in RAM (bounded; the oldest are
# dropped and counted), sent oldest first once it is.
# On the virtual board the host can call functions, read variables and send events
# through the host link (keel vdev io --call/--get/--event), as the cloud will.
import sys
import events
from hal import hostlink

MAX_NAME = 64
MAX_DATA = 1024
MAX_QUEUE = 32
MAX_HANDLERS = 20

_queue = []
_stats = {"published": 0, "dropped": 0}
_subscriptions = []  # (prefix, handler)
_functions = {}
_variables = {}
_session = [None]  # the cloud session, once there is one


def _check_name(kind, name):
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise ValueError("%s names are strings of 1 to %d characters" % (kind, MAX_NAME))


def publish(name, data=None):
    """Send an event; returns True when sent or queued, False when the queue was full
    and the oldest event was dropped to make room."""
    _check_name("event", name)
    if data is not None and not isinstance(data, str):
        data = str(data)
    if data is not None and len(data.encode()) > MAX_DATA:
        raise ValueError("event data is at most %d bytes" % MAX_DATA)
    _stats["published"] += 1
    session = _session[0]
    if session is not None and not _queue and session.publish(name, data):
        hostlink.emit("publish", name=name, data=data, sent=True)
        return True
    dropped = len(_queue) >= MAX_QUEUE
    if dropped:
        _queue.pop(0)
        _stats["dropped"] += 1
    _queue.append((name, data))
    hostlink.emit("publish", name=name, data=data, sent=False, queued=len(_queue))
    return not dropped


def queued():
    return list(_queue)


def subscribe(prefix, handler):
    """handler(name, data) for every cloud event whose name starts with prefix."""
    _check_name("subscription", prefix)
    if len(_subscriptions) >= MAX_HANDLERS:
        raise ValueError("at most %d subscriptions" % MAX_HANDLERS)
    _subscriptions.append((prefix, handler))


def function(name, handler):
    """Register a cloud function: handler(arg: str) -> int or str."""
    _register(_functions, "function", name, handler)


def variable(name, getter):
    """Register a cloud variable: getter() -> int, float, bool or str."""
    _register(_variables, "variable", name, getter)


def _register(table, kind, name, fn):
    _check_name(kind, name)
    if name not in table and len(table) >= MAX_HANDLERS:
        raise ValueError("at most %d %ss" % (MAX_HANDLERS, kind))
    table[name] = fn
    hostlink.emit("registry", functions=sorted(_functions), variables=sorted(_variables))
    if _session[0] is not None:
        _session[0].changed()  # the cloud gets a new describe


def names():
    """(functions, variables), for the session's describe."""
    return sorted(_functions), sorted(_variables)


def send_queued(session):
    """The session, connected: send the queued events, oldest first, while it takes them."""
    while _queue and session.publish(*_queue[0]):
        name, data = _queue.pop(0)
        hostlink.emit("publish", name=name, data=data, sent=True, queued=len(_queue))


def connected():
    session = _session[0]
    return session is not None and session.connected()


def status():
    return {
        "connected": connected(),
        "queued": len(_queue),
        "published": _stats["published"],
        "dropped": _stats["dropped"],
        "functions": sorted(_functions),
        "variables": sorted(_variables),
        "subscriptions": [p for p, _ in _subscriptions],
    }


# What the cloud (or the host link) asks of the device.


def deliver_event(name, data):
    for prefix, handler in _subscriptions:
        if name.startswith(prefix):
            events.call_app(handler, name, data)


class NotFound(KeyError):
    pass


def call_function(name, arg):
    fn = _functions.get(name)
    if fn is None:
        raise NotFound("no function '%s'" % name)
    result = fn(arg if arg is not None else "")
    if not isinstance(result, (int, str)) or isinstance(result, bool):
        raise TypeError("function '%s' returned %s, not int or str" % (name, type(result)))
    return result


def read_variable(name):
    getter = _variables.get(name)
    if getter is None:
        raise NotFound("no variable '%s'" % name)
    value = getter()
    if not isinstance(value, (int, float, bool, str)):
        raise TypeError("variable '%s' is %s, not int, float, bool or str" % (name, type(value)))
    return value


def _reply(cmd, action):
    try:
        hostlink.emit("reply", id=cmd.get("id"), ok=True, result=action())
    except Exception as e:  # the caller gets the error; the app keeps running
        hostlink.emit("reply", id=cmd.get("id"), ok=False, error="%s: %s" % (type(e).__name__, e))
        if not isinstance(e, NotFound):  # the app's own code failed: show where
            sys.print_exception(e)


hostlink.on("call", lambda cmd: _reply(cmd, lambda: call_function(cmd["name"], cmd.get("arg"))))
hostlink.on("get", lambda cmd: _reply(cmd, lambda: read_variable(cmd["name"])))
hostlink.on("event", lambda cmd: deliver_event(cmd["name"], cmd.get("data")))


def _attach_session():
    # The system started the session (part 1) if the device is provisioned.
    module = sys.modules.get("cloud_session")
    session = module.current() if module is not None else None
    if session is not None:
        _session[0] = session
        session.attach(sys.modules[__name__])


_attach_session()
