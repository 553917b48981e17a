# The app loader: decides whether the user app may run (dependencies met, image
# intact, not crash-looping) and runs it. Safe-mode reasons are recorded, never silent.
import sys
import gc
import flashfs
from keel_files import APP_STATE_FILE, CRASH_FILE, SAFE_REQUEST_FILE

CRASH_LIMIT = 3
# An app that has run this long without an exception is no longer crash-looping.
STABLE_MS = 10000

# Safe-mode reasons (the enum the status and the cloud report).
SAFE_DEPENDENCY = "dependency"
SAFE_INTEGRITY = "integrity"
SAFE_PLATFORM = "platform"
SAFE_APP_CRASH = "app-crash"
SAFE_REQUESTED = "requested"


class Decision:
    def __init__(self, mode="normal", reason=None, missing=None, app="none"):
        self.mode = mode
        self.reason = reason
        self.missing = missing or []
        self.app = app


def _missing(slots, mf):
    """Unmet dependencies of every valid module, highest requirement per module."""
    installed = [s.info for s in slots if s.valid]
    needed = {}
    for s in slots:
        if not s.valid:
            continue
        for dep in mf.missing_dependencies(s.info, installed):
            key = (dep[0], dep[1])
            if needed.get(key, 0) < dep[2]:
                needed[key] = dep[2]
    return [mf.dependency_dict((k[0], k[1], v)) for k, v in sorted(needed.items())]


# Resets that end a start-up without a Python exception but still mean the app
# brought the device down. A power cut or a reset button does not count.
_HARD_CRASH_RESETS = ("panic", "watchdog")


def _crash_state(app_slot):
    state = flashfs.read_json(APP_STATE_FILE, {})
    if state.get("sha256") != app_slot.installed_digest():
        # Another app: its predecessor's crashes and traceback are not its own.
        state = {"sha256": app_slot.installed_digest(), "crashes": 0, "starting": False}
        flashfs.remove_tree(CRASH_FILE)
    return state


def _app_crashes(app_slot, reset_reason):
    state = _crash_state(app_slot)
    if state.get("starting") and reset_reason in _HARD_CRASH_RESETS:
        state["crashes"] += 1
        state["starting"] = False
        flashfs.write_json(APP_STATE_FILE, state)
    return state["crashes"]


def _update_state(app_slot, **fields):
    state = _crash_state(app_slot)
    state.update(fields)
    flashfs.write_json(APP_STATE_FILE, state)


def request_safe_mode():
    """Ask for safe mode at the next boot only (keel.enter_safe_mode())."""
    flashfs.write_atomic(SAFE_REQUEST_FILE, "1")


def _take_safe_request():
    if flashfs.exists(SAFE_REQUEST_FILE):
        flashfs.remove_tree(SAFE_REQUEST_FILE)
        return True
    return False


def evaluate(slots, reset_reason):
    import module_format as mf  # (the boot's: released once the app starts)

    requested = _take_safe_request()
    system = [s for s in slots if s.function == mf.FUNCTION_SYSTEM_PART]
    app = [s for s in slots if s.function == mf.FUNCTION_USER_PART]
    app = app[0] if app else None
    for s in system:
        if not s.valid and s.reason != "empty":
            return Decision("safe", s.reason, app="not-run")
    if requested:
        has_app = app is not None and app.reason != "empty"
        return Decision("safe", SAFE_REQUESTED, app="not-run" if has_app else "none")
    missing = _missing(slots, mf)
    listed = [(m["function"], m["index"]) for m in missing]
    for s in system:
        # An empty system slot is an unmet dependency of the system itself.
        if not s.valid and ("system-part", s.index) not in listed:
            missing.append({"function": "system-part", "index": s.index, "version": None})
    if app is None or (app.info is None and app.reason == "empty"):
        if missing:
            return Decision("safe", SAFE_DEPENDENCY, missing, "none")
        return Decision(app="none")
    if not app.valid:
        return Decision("safe", app.reason, missing, "not-run")
    if missing:
        return Decision("safe", SAFE_DEPENDENCY, missing, "not-run")
    if _app_crashes(app, reset_reason) >= CRASH_LIMIT:
        return Decision("safe", SAFE_APP_CRASH, app="crashed")

    return Decision(app="not-run")


def record_crash(app_slot, exc):
    """Count a crash and keep its traceback; returns the traceback text."""
    import io

    buf = io.StringIO()
    sys.print_exception(exc, buf)
    text = buf.getvalue()
    flashfs.write_atomic(CRASH_FILE, text)
    state = _crash_state(app_slot)
    _update_state(app_slot, crashes=state["crashes"] + 1, starting=False)
    return text


def last_traceback():
    return flashfs.read_text(CRASH_FILE)


def import_app(app_slot, on_started):
    """Import the app (its module-level code runs); returns the app module, or raises.
    The system calls its setup() once the network and the cloud session are started.

    Marks the start first, so that if the VM dies before mark_stable() (STABLE_MS
    later) the next boot counts a crash too."""
    _update_state(app_slot, starting=True)
    sys.path.insert(sys.path.index("/lib"), app_slot.code_dir)
    gc.collect()
    on_started(gc.mem_free())
    import main

    return main


def mark_stable(app_slot):
    _update_state(app_slot, crashes=0, starting=False)
