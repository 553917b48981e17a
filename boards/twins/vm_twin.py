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
#     VM when the CPU looks at the hardware or sleeps (poll(), TimeProxy);
#   - the heap: the board's heap for Keel, what the firmware itself holds left out.
import sys
import os
import gc
import vfs
import vm_exit  # (loaded by vm_startup.py: boards/virtual/vm_exit.py)

hw = None  # the device: board, flash, host link files, uid, wires, what started the boot
event = None  # what started this boot: power-on, reset, panic, watchdog, deep-sleep, soft-reboot
_port = None


def halt(code):
    """Stop the board at once, as the chip stops: nothing unwinds, no finally block
    runs, nothing more reaches the flash. The runner reads why in io.log (a "halt"
    record: code: a vm_exit status) and starts it again."""
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


def firmware_build():
    """The MicroPython build the twin plays (DEVICE_DIR/firmware.json, written by keel
    vdev create), or None for a device made before there was a choice."""
    import json

    try:
        with open(hw.device_dir + "/firmware.json") as f:
            return json.load(f)
    except OSError:
        return None


class MappedFlash(bytearray):
    """Flash that the chip maps into the CPU's address space (nRF52840: all of it; ESP32:
    a partition the IDF maps with esp_partition_mmap): code runs from it in place. On
    the twin the memory is this bytearray, a copy of the region kept in step with every
    write and erase of the flash; it is the firmware's, made before the board's heap is
    counted (the host gives the VM its size beyond the board's heap). The chip's memory
    is read-only; this one is not, and Keel never writes through it."""

    def map(self, start):
        self.address = start
        hw.flash.read(start, self)
        flash = hw.flash
        write, erase = flash.write, flash.erase
        end = start + len(self)

        def mirrored_write(addr, buf):
            write(addr, buf)
            if addr < end and addr + len(buf) > start:
                lo, hi = max(addr, start), min(addr + len(buf), end)
                flash.read(lo, memoryview(self)[lo - start : hi - start])  # old AND new

        def mirrored_erase(addr):
            erase(addr)
            if start <= addr < end:
                n = min(flash.erase_size, end - addr)
                flash.read(addr, memoryview(self)[addr - start : addr - start + n])

        flash.write = mirrored_write
        flash.erase = mirrored_erase

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
    sims[7].setup(hw.device_dir, sims[1])  # the access points on the air
    hw.flash.write = _NorFlash(hw.flash).write
    _port = _load_port(hw.board["port"])
    _port.install()
    if hw.faults:
        load(("vm_faults",))[0].install(hw.device_dir, hw.flash,
                                        lambda: halt(vm_exit.POWER_CUT))
    _start_hardware()
    _account_heap(int(os.getenv("KEEL_BOARD_HEAP") or hw.board["heap"]))  # (keel vdev run --heap)
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


class ModuleView:
    """One of the VM's own modules with only the names the board's port has (the
    unix port builds in more: an app on the twin finds what it would find on the
    board)."""

    def __init__(self, module, names):
        self.__name__ = module.__name__
        for name in names:
            setattr(self, name, getattr(module, name))


# ---------------------------------------------------------------- hardware events
# What the host does to the board (io.in: a pin driven, a level, a button pressed) and
# timed changes (a button let go) reach the VM when the CPU looks at the hardware: when
# a stand-in reads it (machine.Pin.value(), ADC, I2C, UART) and while the CPU sleeps
# (time.sleep*, machine.idle(), lightsleep), which is when a port's interrupts would
# run its scheduled handlers. Interrupt handlers are then scheduled as the port's ISRs
# schedule them (micropython.schedule). No thread: one file position compared, per look.

_due = [None]  # ticks_ms when a timed hardware change is due
_timers = []  # [(at, fn)]: what is due then
_servicing = [False]


def after(ms, fn):
    """Run fn() from the hardware service about ms milliseconds from now."""
    at = _time.ticks_add(_time.ticks_ms(), ms)
    _timers.append((at, fn))
    if _due[0] is None or _time.ticks_diff(at, _due[0]) < 0:
        _due[0] = at


def poll():
    """Bring the host's commands and what is due to the board, if there are any."""
    due = _due[0]
    if _link.pending() or (due is not None and _time.ticks_diff(_time.ticks_ms(), due) >= 0):
        if not _servicing[0]:
            _servicing[0] = True
            try:
                _service()
            finally:
                _servicing[0] = False


def _service():
    _link.poll()
    if _timers:
        now = _time.ticks_ms()
        for entry in [t for t in _timers if _time.ticks_diff(now, t[0]) >= 0]:
            _timers.remove(entry)
            entry[1]()
        _due[0] = None
        for at, _fn in _timers:
            if _due[0] is None or _time.ticks_diff(at, _due[0]) < 0:
                _due[0] = at


def sleep_ms(ms):
    """The CPU idles for ms: the hardware's events come in meanwhile."""
    end = _time.ticks_add(_time.ticks_ms(), ms)
    while True:
        poll()
        left = _time.ticks_diff(end, _time.ticks_ms())
        if left <= 0:
            return
        _time.sleep_ms(left if left < 10 else 10)


class TimeProxy:
    """`time` as the board's code sees it: the VM's own, but a sleep is also when the
    hardware's events come in (in slices of 10 ms). Its other functions are the
    real module's, copied, so a ticks_ms() costs no more than it did."""

    def __init__(self, real):
        for name in dir(real):
            if not name.startswith("__"):
                setattr(self, name, getattr(real, name))
        self.sleep_ms = sleep_ms

    def sleep(self, seconds):
        sleep_ms(int(seconds * 1000))

    def sleep_us(self, us):
        if us >= 10000:
            sleep_ms(us // 1000)
        else:
            poll()
            _time.sleep_us(us)


import time as _time  # noqa: E402 - the VM's own (the proxy replaces it in sys.modules)

_link = None


def _start_hardware():
    global _link
    import sim_link

    _link = sim_link
    sim_link.on("press", _press)
    sys.modules["time"] = TimeProxy(_time)


def _press(cmd):
    # Host command {"op": "press", "button": PIN, "ms": MS}: a twin's button is a pin
    # (board.json "button"), held at its active level for ms, then let go.
    import sim_board
    import sim_pins

    spec = sim_board.board()["button"]
    line = sim_pins.line(spec["pin"])
    ms = max(1, int(cmd.get("ms", 100)))
    sim_pins.drive(line, 0 if spec.get("active", "low") == "low" else 1)
    _link.emit("button", pressed=True, ms=ms)
    after(ms, lambda: sim_pins.drive(line, None))


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


# The room the firmware did not need (the reserve): one block, and chunks outside()
# lends. A chunk is a tuple, one allocation of about 1 KB (a bytearray would be two), in
# slots fixed at the start (a list that grew would allocate), so lending and holding
# back moves no small blocks about the board's part of the heap.
_block = None
_chunks = []  # a chunk, or None where one is lent out
_CHUNK_ITEMS = 126
_chunk_cost = [0]  # what one chunk takes of the heap
_carry = [0]
_LENDABLE = 64  # chunks: what outside() can lend at most


def _chunk():
    return (None,) * _CHUNK_ITEMS


def _account_heap(board_heap):
    """The VM's heap is the board's plus room for the firmware (keel vdev run gives
    both): measure what the firmware holds now, and hold the room it did not need
    (the reserve), so that what is left for Keel is the board's heap."""
    global _block
    gc.collect()
    total = gc.mem_free() + gc.mem_alloc()
    spare = total - gc.mem_alloc() - board_heap
    if spare < 0:
        print("twin: the VM's heap is %d bytes short of the board's %d and the firmware's %d"
              % (-spare, board_heap, gc.mem_alloc()))
        sys.exit(0)  # (the runner stops: no reset would make it fit)
    _grow_names()
    _chunks.extend([None] * _LENDABLE)
    gc.collect()
    before = gc.mem_alloc()
    _chunks[0] = _chunk()
    _chunk_cost[0] = gc.mem_alloc() - before
    spare = total - gc.mem_alloc() - board_heap
    n = min(_LENDABLE, spare // _chunk_cost[0])
    for i in range(1, n):
        _chunks[i] = _chunk()
    spare -= (n - 1) * _chunk_cost[0]
    if spare > 64:
        _block = bytearray(spare - 64)  # (its header, rounding: measured below)
    gc.collect()
    own = gc.mem_alloc() + gc.mem_free() - board_heap
    sys.modules["gc"] = GcProxy(own)
    import builtins

    _real_import[0] = builtins.__import__
    builtins.__import__ = _import


# ---------------------------------------------------------------- interned names
# Every name code loads from a file is interned: an entry in a pool of the VM's, which
# grows by a new pool twice the size of the last (py/qstr.c, qstr_add, v1.28.0). On a
# board the firmware's own names are in flash and the first pool Keel's names grow is 20
# entries (mpy-tool.py gives the frozen names' pool an alloc of at most 10). On the twin
# the stand-ins are Python, and their ~640 names would fill the pools first: Keel's
# names would then cost nothing up to a point and a 14 KB block past it. So the twin
# grows, as firmware, one pool with room for all the names Keel loads, and charges Keel
# the pools a board grows instead: after each import that loaded a module, the pools
# for the names interned since the firmware (counted by their number), each held as one
# block of the size the chip allocates (32-bit: qstr_pool_t's 24 bytes, then 7 bytes an
# entry: a pointer, a 2-byte hash (MICROPY_QSTR_BYTES_IN_HASH at the extra-features
# level, which ports/esp32/mpconfigport.h and, for the nRF52840, ports/nrf/mpconfigport.h
# choose), a 1-byte length). A pool the heap cannot give is the MemoryError the board
# raises at that import (the board raises it before the module runs; the twin after).
_NAMES_ROOM = 1200  # names Keel may load before the twin's own pool grows again
_VM_ENTRY = 11  # an entry in the VM's own pools: a 64-bit pointer, the hash, the length
_POOL_HEAD = 24  # qstr_pool_t on the chip: prev, total_prev_len, alloc, len, hashes, lengths
_ENTRY = 7
_names = [0, 0, 20, 0]  # the firmware's last name, Keel's names charged for, next pool, pools
_pools = []  # the board's pools, as blocks (slots fixed at the start)
_real_import = [None]


def _name_number(name):
    # A name's number: an interned str is not a heap object; its id() is the tagged
    # value (number << 3 | 2, MicroPython's object representation A).
    getattr(None, name, None)  # (interns it)
    return id(str(bytes(name, "utf-8"), "utf-8")) >> 3


def _grow_names():
    # Names, as firmware, until the VM grows a pool with room for _NAMES_ROOM more: a
    # step in the heap in use of more than a KB after one name is a new pool.
    gc.collect()
    before = gc.mem_alloc()
    i = 0
    while True:
        getattr(None, "_twin_name_%d" % i, None)
        i += 1
        now = gc.mem_alloc()
        if (now - before) // _VM_ENTRY > _NAMES_ROOM:
            break
        before = now
    _names[0] = _name_number("_twin_name_%d" % (i - 1))
    _pools.extend([None] * 12)


# The names the firmware's own modules interned when loaded after the start (the REPL,
# a simulated part first used): on a board they are C, so not Keel's; and probes made.
_firmware_names = [0, 0]
_firmware_loading = [False]


def firmware_import(name):
    """Import one of the twin's own modules (vm_startup.load): the names it interns are
    counted as the firmware's, between two probe names, and not charged to Keel."""
    if _real_import[0] is None or _firmware_loading[0]:  # (before the start: all firmware)
        return __import__(name)
    _firmware_names[1] += 1
    before = _name_number("_twin_probe_%d" % _firmware_names[1])
    _firmware_loading[0] = True
    try:
        return __import__(name)
    finally:
        _firmware_loading[0] = False
        _firmware_names[1] += 1
        after = _name_number("_twin_probe_%d" % _firmware_names[1])
        _firmware_names[0] += after - before + 1


def _charge_names(module):
    newest = _names[0]
    for key in module.__dict__:
        n = id(key)
        if n & 7 == 2 and n >> 3 > newest:
            newest = n >> 3
    keel_names = newest - _names[0] - _firmware_names[0]
    while keel_names > _names[1]:
        size = _names[2]
        _pools[_names[3]] = (None,) * ((_POOL_HEAD + _ENTRY * size - 16 + 7) // 8)
        _names[3] += 1
        _names[1] += size
        _names[2] = size * 2


def _import(name, globals=None, locals=None, fromlist=(), level=0):
    known = name in sys.modules
    module = _real_import[0](name, globals, locals, fromlist, level)
    if not known and level == 0 and name in sys.modules and not _firmware_loading[0]:
        try:
            _charge_names(sys.modules[name])
        except MemoryError:
            del sys.modules[name]
            raise MemoryError("memory allocation failed, allocating %d bytes" % _names[2])
    return module


# ---------------------------------------------------------------- memory outside the heap
# Some of a port's C code allocates outside the GC heap (the ESP32's mbedTLS takes the
# ESP-IDF heap's memory); the VM's own allocates in its one heap. outside() runs such a
# call with the reserve's chunks lent (freed), then holds back all but what the call
# took (or more, by what it freed), so the board's heap is what it was.
_short = [False]


def _lend():
    lent = 0
    for i in range(len(_chunks)):
        if _chunks[i] is not None:
            _chunks[i] = None
            lent += 1
    return lent


def _hold(amount):
    # Takes back into the reserve `amount` bytes (in chunks; the rest is carried to the
    # next call). A heap too fragmented for a chunk leaves the debt for later: the
    # board's heap is a little bigger meanwhile.
    _carry[0] += amount
    cost = _chunk_cost[0]
    try:
        for i in range(len(_chunks)):
            if _carry[0] < cost:
                break
            if _chunks[i] is None:
                _chunks[i] = _chunk()
                _carry[0] -= cost
    except MemoryError:
        pass


def outside(fn, *args, **kw):
    lent = _lend()
    gc.collect()
    before = gc.mem_alloc()
    try:
        return fn(*args, **kw)
    finally:
        gc.collect()
        _hold(lent * _chunk_cost[0] - (gc.mem_alloc() - before))
        if _carry[0] < 0 and not _short[0]:  # it took more than could be lent
            _short[0] = True
            print("twin: the firmware's room is %d bytes short of what its C code takes "
                  "outside the board's heap" % -_carry[0])
