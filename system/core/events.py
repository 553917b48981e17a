# System events: a small publish/subscribe bus inside the device, and the one way
# the system calls app code from its loop (call_app): an exception there is an app
# crash, raised again at the end of the system loop's pass, in the app's context.

# The events the system emits (keel.on(name, handler)).
CLOUD_CONNECTED = "cloud-connected"
CLOUD_DISCONNECTED = "cloud-disconnected"
UPDATE_STARTING = "update-starting"
UPDATE_DONE = "update-done"
RESET_PENDING = "reset-pending"
BUTTON = "button"
NETWORK_UP = "network-up"
NETWORK_DOWN = "network-down"
NAMES = (CLOUD_CONNECTED, CLOUD_DISCONNECTED, UPDATE_STARTING, UPDATE_DONE, RESET_PENDING, BUTTON,
         NETWORK_UP, NETWORK_DOWN)

_handlers = {}


def subscribe(name, handler):
    if name not in NAMES:
        raise ValueError("unknown system event '%s'" % name)
    _handlers.setdefault(name, []).append(handler)


def unsubscribe(name, handler):
    handlers = _handlers.get(name)
    if handlers and handler in handlers:
        handlers.remove(handler)


def emit(name, data=None):
    for handler in _handlers.get(name, ()):
        call_app(handler, name, data)


_app_error = [None]


def call_app(fn, *args):
    """Run an app callback; keep its exception (the first) for take_app_error()."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported as an app crash by the system loop
        if _app_error[0] is None:
            _app_error[0] = e


def take_app_error():
    e = _app_error[0]
    _app_error[0] = None
    return e
