# System events: a small publish/subscribe bus inside the device. Handlers run in
# the system loop, one after another; one that raises is logged and skipped.
import sys

# The events the system emits (keel.on(name, handler)).
CLOUD_CONNECTED = "cloud-connected"
CLOUD_DISCONNECTED = "cloud-disconnected"
UPDATE_STARTING = "update-starting"
UPDATE_DONE = "update-done"
RESET_PENDING = "reset-pending"
BUTTON = "button"
NAMES = (CLOUD_CONNECTED, CLOUD_DISCONNECTED, UPDATE_STARTING, UPDATE_DONE, RESET_PENDING, BUTTON)

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
        try:
            handler(name, data)
        except Exception as e:  # one bad subscriber must not stop the others
            print("keel: event handler for %s failed:" % name)
            sys.print_exception(e)
