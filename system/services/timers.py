# Software timers: callbacks run from the system loop (between loop() calls, in
# keel.delay() and beside an async app), so they never interrupt app code.
import time
import events
import runtime

_active = []


class Timer:
    def __init__(self, period_ms, callback, one_shot=False):
        if period_ms <= 0:
            raise ValueError("period_ms must be positive")
        self.period_ms = period_ms
        self.callback = callback
        self.one_shot = one_shot
        self._due = 0

    @property
    def running(self):
        return self in _active

    def start(self):
        self._due = time.ticks_add(time.ticks_ms(), self.period_ms)
        if self not in _active:
            _active.append(self)

    def stop(self):
        if self in _active:
            _active.remove(self)

    def change_period(self, period_ms):
        if period_ms <= 0:
            raise ValueError("period_ms must be positive")
        self.period_ms = period_ms
        if self.running:
            self.start()


def _service():
    if not _active:
        return
    now = time.ticks_ms()
    for timer in _active[:]:
        late = time.ticks_diff(now, timer._due)
        if late < 0:
            continue
        if timer.one_shot:
            _active.remove(timer)
        elif late >= timer.period_ms:
            timer._due = time.ticks_add(now, timer.period_ms)  # fell behind: skip, don't burst
        else:
            timer._due = time.ticks_add(timer._due, timer.period_ms)
        events.call_app(timer.callback)


runtime.add_service(_service)
