# What the bootloader hands the system, and all the system needs of the bootloader
# while it runs: the slots and what they hold, the port's reset, whether this boot
# installed code (the /keel paths they share: keel_files). A leaf module (it imports
# only flashfs and keel_files):
# the bootloader's own code (boot_check, module_check, ota_apply) and the module
# format's leave the heap once the app runs (release()); see docs/boot-flow.md.
import sys
import gc
import json
import flashfs

from keel_files import MODULE_ROOT, RESET_REASON_FILE, ROLLBACK_FILE, ROM_ROOT, STATUS_FILE, TRIAL_FILE
# (a system built before bootloader 1.1.0 reads this one here: its ota_check.py)
from keel_files import BOOTLOADER_REJECTED_FILE  # noqa: F401

# Boots since the last one that recorded its status: the bootloader adds one to the
# count in the recorded status at every start, the system's next record has none.
BOOT_ATTEMPTS = "boot_attempts"

# Module functions, as module_format numbers them (a host test checks they agree): the
# system tells its slots apart without loading the format.
BOOTLOADER = 2
SYSTEM_PART = 4
USER_PART = 5

INSTALLED = [False]  # this boot installed code (its work may leave the heap short)
SLOTS = []  # the slots the bootloader scanned (Slot), for the system and the app API
# The modules the boot found as the status reports them ("modules"), as JSON (bytes): as
# objects they would cost the heap about three times as much for as long as Keel runs.
MODULES = [None]

_ports = []


def port():
    """The flash and reset primitives of the board's port: `vboard` on the virtual
    board, else the port module the bootloader was built with for its platform
    (bootloader/port_esp32.py or port_nrf.py, "port_sources" in system/parts.json)."""
    if not _ports:
        for name in ("vboard", "port_esp32", "port_nrf"):
            try:
                _ports.append(__import__(name))
                break
            except ImportError:
                pass
        else:
            raise RuntimeError("keel: no flash port for this board")
    return _ports[0]


def status_pieces(doc):
    """A status (or describe) record as JSON, with the boot's "modules": bytes pieces
    to send one after the other (mqtt takes them so), none as big as the whole."""
    text = json.dumps(doc).encode()
    if MODULES[0] is None:
        return (text,)
    if len(text) <= 2:
        return (b'{"modules": ', MODULES[0], b"}")
    return (b'{"modules": ', MODULES[0], b", ", memoryview(text)[1:])


def write_status(doc):
    """Record the status, with the boot's "modules": written in pieces, so it needs no
    copy of the whole record in the heap."""

    def write(f):
        f.write('{"modules": ')
        f.write(MODULES[0] or "[]")
        text = json.dumps(doc)
        if len(text) > 2:
            f.write(", ")
        f.write(text[1:])

    flashfs.write_atomic(STATUS_FILE, write)


def reset(reason):
    flashfs.write_atomic(RESET_REASON_FILE, reason)
    port().reset()


def resetting():
    """True while the port resets or sleeps by unwinding the stack (the virtual
    board exits the VM): that SystemExit is not an app crash."""
    return getattr(port(), "exiting", False)


def vm_info():
    version = ".".join(str(v) for v in sys.implementation.version[:3])
    return {"name": sys.implementation.name, "version": version}


class Slot:
    """A flash partition that holds one module, and what the last scan found in it:
    `info` is the module's header (module_format.ModuleInfo, or a Header once the
    boot's code is released). boot_check.slot_doc() reports it."""

    def __init__(self, part, label, function, index, name=None, view=None):
        self.part = part
        self.label = label
        self.function = function
        self.index = index
        # Its code: in place (view: the slot as memory-mapped flash) or extracted; and
        # where the digest of the code checked there is kept.
        self.view = view
        root = ROM_ROOT if view is not None else MODULE_ROOT
        self.code_dir = root + "/" + name if name else None
        self.marker = MODULE_ROOT + "/rom/" + name if view is not None else "%s/.sha256" % self.code_dir
        self.size = part.info()[2] if part else 0
        self.block = part.ioctl(5, 0) if part else 4096
        self.info = None
        self.crc_ok = False
        self.sha256_ok = None
        self.valid = False
        self.reason = "empty"
        self.digest = None

    def read(self, offset, buf):
        count = min(len(buf), self.size - offset)
        if count <= 0:
            return 0
        view = memoryview(buf)[:count] if count < len(buf) else buf
        self.part.readblocks(offset // self.block, view, offset % self.block)
        return count

    def installed_digest(self):
        return flashfs.read_text(self.marker)


class Header:
    """What the system keeps of a module's header once the module format's code is
    gone: the fields its dependency checks read, and versions as text."""

    def __init__(self, info, decode_version):
        self.function = info.function
        self.index = info.index
        self.version = info.version
        self.platform = info.platform
        self.dependencies = info.dependencies
        self.version_text = decode_version(info.version)
        # The highest version it depends on (an app's: the system it was built for).
        deps = info.dependencies
        self.target_text = decode_version(max(d[2] for d in deps)) if deps else None


def release():
    """The app is about to start: nothing of the boot's code is needed any more.
    The slots keep their headers as Header records and the module format leaves the
    heap (the OTA receiver loads it again for an update)."""
    mf = sys.modules.get("module_format")
    if mf is not None:
        for slot in SLOTS:
            if slot.info is not None and not isinstance(slot.info, Header):
                slot.info = Header(slot.info, mf.decode_version)
    for name in _BOOT_MODULES:
        sys.modules.pop(name, None)
    gc.collect()


# What only the boot and the system's start use (the app loader stays: it records the
# app's crashes and when it has proved stable).
_BOOT_MODULES = ("module_format", "boot_check", "trust", "module_check", "romfs", "ota_apply")


def note_boot(count=0, why=None):
    """Count this boot in the last status recorded (BOOT_ATTEMPTS: the boots since it,
    none of which recorded its own; the system's next record has no count); or, with
    why, keep this one counted because the system failed to start. Returns the count."""
    doc = flashfs.read_json(STATUS_FILE)
    if not isinstance(doc, dict):
        doc = {}
    if why is None:
        count = doc.get(BOOT_ATTEMPTS)
        count = count + 1 if isinstance(count, int) else 1
    else:
        doc["boot_error"] = why
    doc[BOOT_ATTEMPTS] = count
    try:
        flashfs.write_json(STATUS_FILE, doc)
    except OSError as e:  # a full filesystem must not stop the boot
        print("keel: cannot record this boot in %s (%s)" % (STATUS_FILE, e))
    return count


def give_up_trial(reason):
    """The system part on trial cannot run: reset, and let ota_apply put the
    previous one back. Returns only when there is no trial."""
    if flashfs.exists(TRIAL_FILE):
        print("keel: the system part on trial failed: %s" % reason)
        flashfs.write_atomic(ROLLBACK_FILE, reason)
        reset("rollback")


def _start_system(board, reset_reason):
    # (its own frame: once it has failed, nothing of the system stays referenced here)
    import hal

    hal.use_board(board)  # before the system's modules import: one copy of the board
    import keel_system

    gc.collect()
    keel_system.start(board, SLOTS, reset_reason)


def run(attempts, board, reset_reason):
    """Start the system on the slots the boot left in SLOTS; never returns unless
    the system fails, when this boot is recorded as failed and the error raised."""
    gc.collect()
    loaded = list(sys.modules)
    try:
        _start_system(board, reset_reason)
    except MemoryError:
        if not INSTALLED[0]:
            raise
        # What installing left in the heap (interned names, fragments) leaves the system
        # too little on a small board (an ESP32's 110 KB): start it on a fresh heap; the
        # next boot has nothing to install.
        for name in [n for n in sys.modules if n not in loaded]:
            del sys.modules[name]
        gc.collect()
        print("keel: not enough memory to start the system after installing; resetting")
        reset("update")
    except Exception as e:  # noqa: BLE001 - the system itself failed (apps' errors end in it)
        why = "%s: %s" % (type(e).__name__, e)
        for name in [n for n in sys.modules if n not in loaded]:
            del sys.modules[name]  # the system's heap back, for recording why
        gc.collect()
        note_boot(attempts, why)
        give_up_trial(why)
        raise
