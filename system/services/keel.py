# The app API (system part 2): `import keel`. Every call is documented, with the
# system version it arrived in, in docs/api.md. Hardware is in hal.* (hal.gpio, ...).
import time
import keel_system
import handover
import runtime
import events
import led as _led
import cloud as _cloud
import store  # noqa: F401  (keel.store.get/set/delete/keys)
import log  # noqa: F401  (keel.log.info/warn/error/trace)
from timers import Timer  # noqa: F401

API_VERSION = "1.0.0"  # the system version this API level arrived in


def _slot(function, index):
    for slot in keel_system.SLOTS:
        if slot.function == function and slot.index == index and slot.info:
            return slot
    return None



# Identity and versions


def device_id():
    from hal import device

    return device.unique_id()


def platform():
    import hal

    return hal.board()["platform"]


def board():
    import hal

    return hal.board()["name"]


def system_version():
    slot = _slot(handover.SYSTEM_PART, 1)
    return slot.info.version_text if slot else None


def app_version():
    slot = _slot(handover.USER_PART, 1)
    return slot.info.version_text if slot else None


def target_version():
    """The system version the running app was built against."""
    slot = _slot(handover.USER_PART, 1)
    return slot.info.target_text if slot else None


def reset_reason():
    return keel_system.RESET_REASON[0]


# Time


def millis():
    return time.ticks_ms()


def delay(ms):
    """Wait ms milliseconds while the system (timers, LED, events) keeps running."""
    runtime.delay(ms)


# System events and control


def on(event, handler):
    """handler(event, data) on a system event (see keel.EVENTS)."""
    events.subscribe(event, handler)


def off(event, handler):
    events.unsubscribe(event, handler)


EVENTS = events.NAMES


def reset():
    keel_system.reset("user")


def enter_safe_mode():
    """Reset into safe mode (for this one boot): the app is not run."""
    import app_loader

    app_loader.request_safe_mode()
    keel_system.reset("safe-mode")


# Cloud (queued until a cloud session exists)

publish = _cloud.publish
subscribe = _cloud.subscribe
function = _cloud.function
variable = _cloud.variable
connected = _cloud.connected
cloud_status = _cloud.status


class _Led:
    """The status LED, borrowed from the system: take(), rgb(r, g, b), release()."""

    take = staticmethod(_led.take)
    rgb = staticmethod(_led.rgb)
    release = staticmethod(_led.release)
    state = staticmethod(_led.state)
    owner = staticmethod(_led.owner)


led = _Led()


def __getattr__(name):
    # keel.network, keel.system_mode and its modes: loaded when an app first uses them
    if name in ("network", "system_mode", "AUTOMATIC", "SEMI_AUTOMATIC", "MANUAL"):
        import netapi

        return getattr(netapi, name)
    raise AttributeError(name)
