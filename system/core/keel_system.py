# System part 1 entry point: starts the system, asks the app loader what to run,
# records the device's state and runs the app or safe mode.
import sys
import gc
import time
import module_format as mf
import flashfs
import keel_boot
import app_loader

_LOOP_PAUSE_MS = 1
_IDLE_PAUSE_MS = 200
SLOTS = []  # the modules the bootloader found, for the app API


class Status:
    """What the device records about its last boot in /keel/status.json."""

    def __init__(self, slots, reset_reason):
        self.doc = {
            "mode": "normal",
            "safe_mode_reason": None,
            "missing": [],
            "reset_reason": reset_reason,
            "vm": keel_boot.vm_info(),
            "modules": [s.to_dict() for s in slots if s.reason != "empty"],
            "app": "none",
            "mem": {"heap_total": gc.mem_free() + gc.mem_alloc(), "heap_free_at_app_start": None},
            "stage": "system",
        }

    def set(self, **fields):
        self.doc.update(fields)
        flashfs.write_json(keel_boot.STATUS_FILE, self.doc)


def _describe(dep):
    version = dep["version"]
    return "%s %d >= %s" % (dep["function"], dep["index"], version if version else "any")


def safe_mode(status, decision):
    status.set(
        mode="safe", safe_mode_reason=decision.reason, missing=decision.missing, app=decision.app
    )
    print("keel: SAFE MODE (%s)" % decision.reason)
    for dep in decision.missing:
        print("keel:   missing %s" % _describe(dep))
    if decision.reason == app_loader.SAFE_APP_CRASH:
        print("keel: the app crashed %d boots in a row; last traceback:" % app_loader.CRASH_LIMIT)
        print(app_loader.last_traceback() or "(no traceback: the VM itself went down)")
    print("keel: the app is not run; flash a fixed app or the system parts it needs")
    while True:
        time.sleep_ms(_IDLE_PAUSE_MS)


def _app_crashed(status, app_slot, exc):
    text = app_loader.record_crash(app_slot, exc)
    print("keel: app crashed:")
    print(text, end="")
    status.set(app="crashed")
    keel_boot.reset("app-crash")


def _run_app(status, app_slot):
    def started(heap_free):
        mem = status.doc["mem"]
        mem["heap_free_at_app_start"] = heap_free
        status.set(app="running", mem=mem)

    try:
        app = app_loader.start_app(app_slot, started)
        loop = getattr(app, "loop", None)
        began = time.ticks_ms()
        stable = False
        while True:
            if loop:
                loop()
            if not stable and time.ticks_diff(time.ticks_ms(), began) >= app_loader.STABLE_MS:
                app_loader.mark_stable(app_slot)
                stable = True
            time.sleep_ms(_LOOP_PAUSE_MS if loop else _IDLE_PAUSE_MS)
    except KeyboardInterrupt:
        raise  # Ctrl-C on the console: back to the REPL, as MicroPython does
    except BaseException as e:  # noqa: BLE001 - an app's failure, even sys.exit(), must not end the system
        _app_crashed(status, app_slot, e)


def start(board, slots, reset_reason):
    SLOTS[:] = slots
    status = Status(slots, reset_reason)
    decision = app_loader.evaluate(slots, reset_reason)
    version = [s for s in slots if s.function == mf.FUNCTION_SYSTEM_PART and s.index == 1]
    print(
        "keel: system %s on %s, reset reason %s"
        % (mf.decode_version(version[0].info.version), board["name"], reset_reason)
    )
    if decision.mode == "safe":
        safe_mode(status, decision)
    for s in slots:
        if s.function == mf.FUNCTION_SYSTEM_PART and s.index > 1:
            sys.path.insert(0, s.code_dir)
    status.set(app=decision.app)
    app = [s for s in slots if s.function == mf.FUNCTION_USER_PART]
    if decision.app == "none":
        print("keel: no app installed")
        while True:
            time.sleep_ms(_IDLE_PAUSE_MS)
    _run_app(status, app[0])
