# The board twin framework: the VM playing a real board. vm_startup.py calls start()
# for a board whose port is not "virtual"; the port's part is boards/twins/<port>/:
# its stand-in modules (machine, esp32, ...) and port.py, the port's start-up. What
# every twin shares is here (docs/virtual-board.md, "Board twins"):
#   - the simulated hardware of the virtual board (boards/virtual/sim_*.py), all of it
#     loaded now, driven and watched by the host as on the virtual board;
#   - the flash as NOR flash (programming only clears bits), as the chips are;
#   - stops without unwinding: a reset, a deep sleep, a power cut end the VM at once,
#     as the chip stops, and the runner starts it again (halt());
#   - the board's hardware events (host commands, a button's release) brought to the
#     VM as a port's interrupts are: a thread sees them and schedules the service;
#   - the heap: the board's heap for Keel, what the firmware itself holds left out.
import sys
import os
import gc
import vfs
import micropython

RESET_EXIT = 100  # the runner's exit statuses (tools/keel/vdev.py)
DEEP_SLEEP_EXIT = 101
POWER_CUT_EXIT = 102

hw = None  # the device: board, flash, host link files, uid, wires, what started the boot
event = None  # what started this boot: power-on, reset, panic, watchdog, deep-sleep, soft-reboot
_port = None


def halt(code):
    """Stop the board at once, as the chip stops: nothing unwinds, no finally block
    runs, nothing more reaches the flash. The runner reads why in io.log (a "halt"
    record: code RESET_EXIT, DEEP_SLEEP_EXIT or POWER_CUT_EXIT) and starts it again."""
    if hw.ctl is not None:
        hw.ctl.write(b"R")  # resetting: a Ctrl-C from now on is for the next boot
    hw.io_out.write('{"k": "halt", "code": %d}\n' % code)
    os.system("kill -9 $PPID")  # the VM's own process: no Python code runs after this
    while True:  # (never reached: the signal is not catchable)
        pass


class _NorFlash:
    """Programming NOR flash: a byte becomes old AND new, so a write over bytes that
    were not erased stores what the chip would."""

    def __init__(self, flash):
        self._write = flash.write
        self._read = flash.read
        self._old = bytearray(256)

    def write(self, addr, buf):
        data = memoryview(buf)
        old = self._old
        step = len(old)
        for at in range(0, len(data), step):
            part = data[at : at + step]
            n = len(part)
            view = old if n == step else memoryview(old)[:n]
            self._read(addr + at, view)
            erased = old == _ERASED if n == step else view == _ERASED[:n]
            if not erased:  # the chip ANDs the new bits into the old
                for i in range(n):
                    old[i] &= part[i]
                part = view
            self._write(addr + at, part)


_ERASED = b"\xff" * 256

_SIMS = ("sim_board", "sim_link", "sim_pins", "sim_analog", "sim_i2c", "sim_serial",
         "sim_watchdog", "sim_radio")


def start(hw_, load):
    """Build the board (vm_startup.py's hw), its port's modules and its filesystem;
    returns the banner's board name."""
    global hw, event, _port
    hw = hw_
    event = hw.cause
    sims = load(_SIMS)
    sims[0].setup(lambda: hw.board, hw.wires)
    sims[1].setup(hw.io_out, hw.io_in)
    hw.flash.write = _NorFlash(hw.flash).write
    _port = _load_port(hw.board["port"])
    _port.install()
    if hw.faults:
        load(("vm_faults",))[0].install(hw.device_dir, hw.flash,
                                        lambda: halt(POWER_CUT_EXIT))
    _start_hardware()
    _account_heap(hw.board["heap"])
    _port.boot()
    return _port.BANNER


def _load_port(port):
    # The port's stand-ins are modules named as the port's own (machine, esp32, ...),
    # some of which the unix port has built in: they are imported from their folder as
    # a package (esp32.machine), through a mount of boards/twins, and registered under
    # their own names in sys.modules, where imports look first.
    global _package
    root = os.getenv("KEEL_VM_FIRMWARE") or sys.argv[0].rsplit("/", 2)[0]
    vfs.mount(vfs.VfsPosix(root + "/twins"), "/.vm")
    sys.path.insert(0, "/.vm")
    _package = port
    return __import__(port + ".port", None, None, ("port",))


_package = None
_registered = {}


def register(name):
    """Import the port's stand-in `name` (boards/twins/<port>/<name>.py) and make it
    the module `name`. Called by the port's install(), in the order they import each
    other (the one named as the port itself takes its name last: it is the package's)."""
    module = __import__(_package + "." + name, None, None, (name,))
    module.__name__ = name
    _registered[name] = module
    if name != _package:
        sys.modules[name] = module
    return module


def done_registering():
    """The stand-ins are in place: their folder and package are no longer needed."""
    for name in [n for n in sys.modules if n == _package or n.startswith(_package + ".")]:
        del sys.modules[name]
    sys.modules.update(_registered)
    _registered.clear()
    sys.path.remove("/.vm")
    vfs.umount("/.vm")


class SysProxy:
    """`sys` as the board's port has it: its sys.platform, everything else the VM's
    own sys (put in sys.modules as "sys", so `import sys` in code on the twin gets
    it; the firmware's own code keeps the real module)."""

    def __init__(self, platform):
        self.platform = platform

    def __getattr__(self, name):
        return getattr(_real_sys, name)


_real_sys = sys


# ---------------------------------------------------------------- hardware events

_due = [None]  # ticks_ms when a timed hardware change is due (a button's release)
_timers = []  # [(at, fn)]: what is due then


def after(ms, fn):
    """Run fn() from the hardware service about ms milliseconds from now."""
    import time

    at = time.ticks_add(time.ticks_ms(), ms)
    _timers.append((at, fn))
    _due[0] = at if _due[0] is None or time.ticks_diff(at, _due[0]) < 0 else _due[0]


def _service(_):
    # Runs in the VM's main thread, scheduled as a port's ISR schedules a soft IRQ.
    import time
    import sim_link

    sim_link.poll()
    if _timers:
        now = time.ticks_ms()
        for entry in [t for t in _timers if time.ticks_diff(now, t[0]) >= 0]:
            _timers.remove(entry)
            entry[1]()
        _due[0] = None
        for at, _fn in _timers:
            if _due[0] is None or time.ticks_diff(at, _due[0]) < 0:
                _due[0] = at


def _hardware(cmds, link):
    # The board's hardware, beside the CPU: every 10 ms it looks for what the host
    # sent (io.in grew) or a timed change that is due, and schedules the service. It
    # allocates nothing: one seek on its own file, a comparison, a schedule.
    import time

    pending = [False]

    def done(_):
        pending[0] = False
        _service(None)

    while True:
        time.sleep_ms(10)
        due = _due[0]
        if pending[0]:
            continue
        if cmds.seek(0, 2) != link._pos or (due is not None and time.ticks_diff(time.ticks_ms(), due) >= 0):
            pending[0] = True
            try:
                micropython.schedule(done, None)
            except RuntimeError:  # the queue is full: next tick
                pending[0] = False


def _start_hardware():
    import _thread
    import sim_link

    cmds = open(hw.device_dir + "/io.in", "rb")  # (its own: the VM's is at another place)
    _thread.start_new_thread(_hardware, (cmds, sim_link))


# ---------------------------------------------------------------- the heap


class GcProxy:
    """`gc` with the twin's own heap left out: mem_alloc() counts only what was
    allocated after the firmware (the stand-ins, the simulated hardware, this
    framework) and the reserve that pads the VM's heap to the board's, so that
    mem_free() + mem_alloc() is the board's heap, as on the board."""

    def __init__(self, own):
        self.own = own

    def mem_alloc(self):
        return gc.mem_alloc() - self.own

    def __getattr__(self, name):
        return getattr(gc, name)


_reserve = None


def _account_heap(board_heap):
    """The VM's heap is the board's plus room for the firmware (keel vdev run gives
    both): measure what the firmware holds now, and hold the room it did not need in
    one block, so what is left for Keel is the board's heap."""
    global _reserve
    gc.collect()
    total = gc.mem_free() + gc.mem_alloc()
    spare = total - gc.mem_alloc() - board_heap
    if spare < 0:
        print("twin: the VM's heap is %d bytes short of the board's %d and the firmware's %d"
              % (-spare, board_heap, gc.mem_alloc()))
        sys.exit(0)  # (the runner stops: no reset would make it fit)
    if spare > 64:
        _reserve = bytearray(spare - 32)  # (its own header and rounding: measured below)
    gc.collect()
    own = gc.mem_alloc() + gc.mem_free() - board_heap
    sys.modules["gc"] = GcProxy(own)
