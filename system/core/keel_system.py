# System part 1 entry point: starts the system, asks the app loader what to run,
# records the device's state, then runs the app or safe mode beside the system loop.
import sys
import gc
import time
import flashfs
import handover
import app_loader
import hal
import runtime
import led
from keel_files import CLOUD_FILE, RECEIVED_FILE, REFUSED_FILE, ROLLED_BACK_FILE, TRIAL_FILE

_LOOP_PAUSE_MS = 1
_IDLE_PAUSE_MS = 20
SLOTS = []  # the modules the bootloader found, for the app API
RESET_REASON = [None]


class Status:
    """What the device records about its last boot (keel_files.STATUS_FILE)."""

    def __init__(self, board, slots, reset_reason):
        from hal import device

        self.doc = {
            "board": board["name"],
            "device_id": device.unique_id(),  # what it connects to the cloud as
            "mode": "normal",
            "safe_mode_reason": None,
            "missing": [],
            "reset_reason": reset_reason,
            "vm": handover.vm_info(),
            "app": "none",
            "mem": {"heap_total": gc.mem_free() + gc.mem_alloc(), "heap_free_at_app_start": None,
                    "heap_free_connected": None},
            "stage": "system",
        }

    def set(self, **fields):
        self.doc.update(fields)
        handover.write_status(self.doc)  # (with the boot's modules)


def _trust(status):
    """What the board trusts (docs/signing.md), and the last update it refused."""
    import hashlib
    import trust  # the bootloader's: small, and dropped again

    status.doc["trust"] = trust.summary(hashlib.sha256)
    del sys.modules["trust"]
    if status.doc["trust"]["mode"] == "development":
        print("keel: development mode: this board takes unsigned modules")
    refused = flashfs.read_json(REFUSED_FILE)
    if isinstance(refused, dict):
        status.doc["refused"] = refused


def _updates(status):
    """What the bootloader did with the last system update: a part on trial, or
    one it rolled back (kept in the status until the next update goes in)."""
    rolled = flashfs.read_json(ROLLED_BACK_FILE)
    if isinstance(rolled, dict):
        status.doc["rollback"] = rolled
        print("keel: %s %d %s was rolled back to %s (%s)" % (
            rolled.get("function"), rolled.get("index") or 0, rolled.get("version"),
            rolled.get("restored"), rolled.get("reason")))
    if flashfs.exists(TRIAL_FILE):
        import trial

        trial.start(status)


def _describe(dep):
    version = dep["version"]
    return "%s %d >= %s" % (dep["function"], dep["index"], version if version else "any")


def safe_mode(status, decision):
    status.set(
        mode="safe", safe_mode_reason=decision.reason, missing=decision.missing, app=decision.app
    )
    led.set_state("safe-mode")
    print("keel: SAFE MODE (%s)" % decision.reason)
    for dep in decision.missing:
        print("keel:   missing %s" % _describe(dep))
    if decision.reason == app_loader.SAFE_APP_CRASH:
        print("keel: the app crashed %d boots in a row; last traceback:" % app_loader.CRASH_LIMIT)
        print(app_loader.last_traceback() or "(no traceback: the VM itself went down)")
    if decision.reason == app_loader.SAFE_REQUESTED:
        print("keel: safe mode was requested; the next reset runs the app again")
    else:
        print("keel: the app is not run; flash a fixed app or the system parts it needs")
    _start_network(status)
    _start_cloud(status)  # a device in safe mode still reports why, and can be fixed
    runtime.run_forever()


def _start_network(status):
    # The link first (a WiFi board joins its network: connection.py); a board without
    # a network stays offline; the virtual board uses the host's.
    from hal import network

    if network.KIND == "wifi":
        import connection

        connection.start(status)
    elif network.KIND is None:
        status.set(network={"kind": None, "state": "none"})


def _start_cloud(status):
    # Only provisioned devices load the session's code (docs/protocol.md).
    if flashfs.exists(CLOUD_FILE):
        from hal import network

        if network.KIND is None:
            print("keel: cloud: this board has no network; staying offline (updates over USB)")
            status.set(cloud="no-network")
            return
        try:
            import cloud_session

            cloud_session.start(status.doc)
            link = sys.modules.get("connection")
            if link is not None:
                link.current().cloud = True
        except MemoryError as e:
            sys.modules.pop("cloud_session", None)
            sys.modules.pop("mqtt", None)
            gc.collect()
            if handover.INSTALLED[0]:
                # What this boot's install left in the heap: a fresh one (docs/boot-flow.md,
                # "After an install, a fresh heap").
                print("keel: cloud: not enough memory after installing; resetting")
                reset("update")
            # The session does not fit beside the system and the app: the app runs
            # offline and the status says why, rather than Keel stopping.
            print("keel: cloud: not enough memory for the session (%d bytes free: %s); "
                  "staying offline" % (gc.mem_free(), e))
            status.set(cloud="no-memory")


def reset(reason):
    """Reset the device, telling subscribers first (system event reset-pending)."""
    import events

    events.emit(events.RESET_PENDING, reason)
    handover.reset(reason)


def _app_crashed(status, app_slot, exc):
    text = app_loader.record_crash(app_slot, exc)
    print("keel: app crashed:")
    print(text, end="")
    status.set(app="crashed")
    reset("app-crash")


def _stable_watch(app_slot):
    began = time.ticks_ms()
    done = [False]

    def check():
        if not done[0] and time.ticks_diff(time.ticks_ms(), began) >= app_loader.STABLE_MS:
            app_loader.mark_stable(app_slot)
            done[0] = True

    return check


def _run_async(coro):
    """Run an async main() with the system loop as a task beside it. If app code
    fails inside the system's pass (a timer, a handler), main() is cancelled and
    the error raised here, so it counts as a crash like any other."""
    import asyncio

    failed = []

    async def system_task(app_task):
        while True:
            try:
                runtime.process()
            except Exception as e:  # noqa: BLE001 - handed to the app runner below
                failed.append(e)
                app_task.cancel()
                return
            await asyncio.sleep_ms(10)

    async def both():
        app_task = asyncio.create_task(coro)
        asyncio.create_task(system_task(app_task))
        try:
            await app_task
        except asyncio.CancelledError:
            pass

    asyncio.run(both())
    if failed:
        raise failed[0]


def _app_failed(status, app_slot, e, starting):
    if handover.resetting():
        raise e
    if starting and isinstance(e, MemoryError) and handover.INSTALLED[0]:
        # Installing left this boot's heap short (a small board): not the app's
        # fault, and not counted; it starts on a fresh heap.
        print("keel: not enough memory to start the app after installing; resetting")
        reset("update")
    _app_crashed(status, app_slot, e)


def _run_app(status, app_slot):
    def started(heap_free):
        mem = status.doc["mem"]
        mem["heap_free_at_app_start"] = heap_free
        status.set(app="running", mem=mem)

    # The app is imported before the network and the cloud session start: its code
    # (and the API's, `import keel`) takes the heap while it is still in one piece;
    # the session's buffers and sockets come after (docs/boot-flow.md, "Running the app").
    try:
        app = app_loader.import_app(app_slot, started)
    except KeyboardInterrupt:
        raise  # Ctrl-C on the console: back to the REPL, as MicroPython does
    except BaseException as e:  # noqa: BLE001 - an app's failure, even sys.exit(), must not end the system
        _app_failed(status, app_slot, e, True)
    _start_network(status)
    _start_cloud(status)
    starting = True
    try:
        setup = getattr(app, "setup", None)
        if setup:
            setup()
        starting = False
        runtime.add_service(_stable_watch(app_slot))
        main = getattr(app, "main", None)
        result = main() if main else None
        if hasattr(result, "send"):  # async def main()
            _run_async(result)
        loop = getattr(app, "loop", None)
        pause = _LOOP_PAUSE_MS if loop else _IDLE_PAUSE_MS
        while True:
            if loop:
                loop()
            runtime.process()  # raises an app callback's exception
            time.sleep_ms(pause)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - as above
        _app_failed(status, app_slot, e, starting)


def start(board, slots, reset_reason):
    hal.use_board(board)
    SLOTS[:] = slots
    RESET_REASON[0] = reset_reason
    status = Status(board, slots, reset_reason)
    if flashfs.exists(RECEIVED_FILE):
        # An update whose checks did not fit beside the session and the app at the last
        # boot: checked now, on a fresh heap (ota.py); resets to install it if it passes.
        import ota

        ota.check_received()  # (its checks' modules dropped by the receiver itself)
        del sys.modules["ota"]
    _trust(status)
    _updates(status)
    decision = app_loader.evaluate(slots, reset_reason)
    # The boot's code (the module format's included) leaves the heap now, before the
    # network, the cloud session and the app take theirs.
    handover.release()
    core = [s for s in slots if s.function == handover.SYSTEM_PART and s.index == 1]
    print("keel: system %s on %s, reset reason %s"
          % (core[0].info.version_text, board["name"], reset_reason))
    if decision.mode == "safe":
        safe_mode(status, decision)
    for s in slots:
        if s.function == handover.SYSTEM_PART and s.index > 1:
            sys.path.insert(0, s.code_dir)
    led.set_state("offline")
    status.set(app=decision.app)
    if flashfs.exists(CLOUD_FILE):
        # The session's buffer, while the heap still has room in one piece (the app and
        # the session's code come after, in smaller pieces).
        runtime.SESSION_RX[0] = bytearray(runtime.SESSION_RX_SIZE)
    app = [s for s in slots if s.function == handover.USER_PART]
    if decision.app == "none":
        _start_network(status)
        _start_cloud(status)
        print("keel: no app installed")
        runtime.run_forever()
    _run_app(status, app[0])
