# The system loop: the system's own work runs between the app's loop() calls, in
# keel.delay(), and beside an async app as a task. Nothing here blocks.
import time
import hal
from hal import button
import events
import led

hal.set_scheduler(events.call_app)  # pin interrupt handlers are app callbacks too

_services = [led.service]
_pressed_at = [None]
SESSION_RX_SIZE = 1536  # the largest message the cloud session takes: a 1 KB event and its topic
SESSION_RX = [None]  # its buffer, taken early (keel_system.start): one block, before the app


def add_service(fn):
    """fn() runs on every pass of the system loop; it must return quickly."""
    if fn not in _services:
        _services.append(fn)


def _button_service():
    down = button.pressed()
    started = _pressed_at[0]
    if down and started is None:
        _pressed_at[0] = time.ticks_ms()
    elif not down and started is not None:
        _pressed_at[0] = None
        events.emit(events.BUTTON, time.ticks_diff(time.ticks_ms(), started))


_services.append(_button_service)


_short_at = [None]


def process():
    """One pass of the system's work. Raises the exception of an app callback
    (timer, handler, interrupt) that failed during the pass (app callbacks run through
    events.call_app, which keeps their exceptions for this)."""
    hal.service()
    for fn in _services:
        try:
            fn()
        except MemoryError:
            # A system task found the heap full: the app's doing or not, it is not the
            # app's crash. The task tries again at the next pass; said every 10 s.
            now = time.ticks_ms()
            if _short_at[0] is None or time.ticks_diff(now, _short_at[0]) >= 10000:
                _short_at[0] = now
                print("keel: not enough memory for a system task (%d bytes free); "
                      "trying again" % _free())
    error = events.take_app_error()
    if error is not None:
        raise error


def _free():
    import gc

    gc.collect()
    return gc.mem_free()


def delay(ms):
    """Wait ms milliseconds while the system keeps working."""
    end = time.ticks_add(time.ticks_ms(), ms)
    while True:
        process()
        left = time.ticks_diff(end, time.ticks_ms())
        if left <= 0:
            return
        time.sleep_ms(left if left < 5 else 5)


def run_forever(pause_ms=20):
    while True:
        process()
        time.sleep_ms(pause_ms)
