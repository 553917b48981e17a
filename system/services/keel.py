# The app API (system part 2): `import keel`. Every call is documented, with the
# system version it arrived in, in docs/api.md. Hardware is in hal.* (hal.gpio, ...).
import time
import keel_system
import handover
import runtime
import events
import led as _led

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


class _Led:
    """The status LED, borrowed from the system: take(), rgb(r, g, b), release()."""

    take = staticmethod(_led.take)
    rgb = staticmethod(_led.rgb)
    release = staticmethod(_led.release)
    state = staticmethod(_led.state)
    owner = staticmethod(_led.owner)


led = _Led()


# Loaded when an app first uses them (then kept in this module), so an app pays only
# for what it uses: the cloud calls (queued until a cloud session exists: cloud.py),
# keel.store, keel.log, keel.Timer, keel.network and keel.system_mode.
_CLOUD = ("publish", "subscribe", "function", "variable", "connected", "cloud_status")
_NETWORK = ("network", "system_mode", "AUTOMATIC", "SEMI_AUTOMATIC", "MANUAL")


def _host_link():
    # On a board with a host link (the virtual board) the host can call the app's
    # functions and read its variables at any time (keel vdev io --call/--get/--event):
    # the cloud calls are loaded at once there, to answer.
    from hal import hostlink

    if hostlink.AVAILABLE:
        __getattr__("publish")


def __getattr__(name):
    if name in _CLOUD:
        import cloud

        value = getattr(cloud, "status" if name == "cloud_status" else name)
    elif name == "store" or name == "log":
        value = __import__(name)
    elif name == "Timer":
        from timers import Timer as value
    elif name in _NETWORK:
        import netapi

        value = getattr(netapi, name)
    else:
        raise AttributeError(name)
    globals()[name] = value
    return value


_host_link()
