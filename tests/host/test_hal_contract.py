"""The HAL contract, checked on the host.

1. Every port implements every interface: for each hal/<name>.py that calls
   backend("<name>"), each port under hal/ports/ has <name>.py defining the names
   the interface takes from it, and the classes have the documented methods
   (read with Python's ast: the esp32 and nrf backends cannot be imported here).
2. Every board definition is consistent: keys, pins, aliases, buses, and a flash
   layout whose partitions are aligned, inside the flash, apart, and complete.
3. The esp32 and nrf backends run on the real MicroPython VM (the unix port),
   through the interface modules and the real board.json: the esp32 backend on the
   ESP32 board twin (the port's modules as MicroPython v1.28.0 has them,
   boards/twins/esp32/, jumpered as boards/esp32_generic/hil.json says), the nrf one
   against a small stand-in for its `machine` module. This catches the mistakes a
   compiler cannot (a misspelt name, a wrong call, a keyword the port refuses) until
   tests/hil runs on hardware.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from keel.boards import PLATFORM_PORTS

REPO = Path(__file__).resolve().parents[2]
HAL = REPO / "hal"
PORTS_DIR = HAL / "ports"
BOARDS_DIR = REPO / "boards"

REQUIRED_PORTS = ("esp32", "nrf")  # must be complete
PENDING_PORTS = ()  # ports that may be missing while being written (none now)

# What each class the interfaces hand out must have, as hal/<name>.py documents it.
CLASS_API = {
    "Pin": {
        "methods": ("value", "on", "off", "toggle", "irq"),
        "constants": ("IN", "OUT", "PULL_UP", "PULL_DOWN", "IRQ_RISING", "IRQ_FALLING"),
    },
    "ADC": {"methods": ("read_u16", "read_uv"), "constants": ()},
    "PWM": {"methods": ("freq", "duty_u16", "deinit"), "constants": ()},
    "I2C": {
        "methods": ("scan", "readfrom", "writeto", "readfrom_mem", "writeto_mem"),
        "constants": (),
    },
    "SPI": {"methods": ("write", "read", "write_readinto"), "constants": ()},
    "UART": {"methods": ("write", "read", "any", "readline"), "constants": ()},
    "Watchdog": {"methods": ("feed",), "constants": ()},
}


# ---------------------------------------------------------------- interfaces


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return handler.type is None or any(
        isinstance(k, ast.Name) and k.id in ("ImportError", "Exception") for k in kinds
    )


def _parents(tree: ast.AST) -> dict:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _optional(node: ast.AST, parents: dict) -> bool:
    """True if node sits in the body of a try that catches ImportError."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Try) and child in parent.body:
            if any(_catches_import_error(h) for h in parent.handlers):
                return True
        child, parent = parent, parents.get(parent)
    return False


def interface_requirements() -> dict:
    """{backend: {"names": set, "optional": bool, "interfaces": [file]}} from hal/*.py."""
    found: dict = {}
    for path in sorted(HAL.glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        parents = _parents(tree)
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "backend"
            ):
                continue
            assert len(node.args) == 1 and isinstance(node.args[0], ast.Constant), (
                f"{path.name}:{node.lineno}: backend() takes one literal module name"
            )
            name = node.args[0].value
            parent = parents[node]
            if isinstance(parent, ast.Attribute):
                names = {parent.attr}
            elif isinstance(parent, ast.Assign) and isinstance(parent.targets[0], ast.Name):
                var = parent.targets[0].id
                names = {
                    a.attr
                    for a in ast.walk(tree)
                    if isinstance(a, ast.Attribute)
                    and isinstance(a.value, ast.Name)
                    and a.value.id == var
                }
            else:
                raise AssertionError(f"{path.name}:{node.lineno}: unrecognised use of backend()")
            entry = found.setdefault(name, {"names": set(), "optional": True, "interfaces": []})
            entry["names"] |= names
            entry["optional"] = entry["optional"] and _optional(node, parents)
            entry["interfaces"].append(path.name)
    return found


REQUIREMENTS = interface_requirements()


def _bound_names(body) -> set:
    """Names a module (or class) body binds, including under if/try at that level."""
    names = set()
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(stmt.name)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        names.add(n.id)
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            for alias in stmt.names:
                names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(stmt, ast.If):
            names |= _bound_names(stmt.body) | _bound_names(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            names |= _bound_names(stmt.body)
            for h in stmt.handlers:
                names |= _bound_names(h.body)
            names |= _bound_names(stmt.orelse) | _bound_names(stmt.finalbody)
    return names


def _classes(tree: ast.Module) -> dict:
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def port_dirs() -> list[str]:
    present = {p.name for p in PORTS_DIR.iterdir() if p.is_dir() and p.name != "__pycache__"}
    return sorted(present | set(REQUIRED_PORTS) | set(PENDING_PORTS))


# An optional backend (the host link) is checked where a port has it.
CASES = [
    (port, name)
    for port in port_dirs()
    for name in sorted(REQUIREMENTS)
    if not REQUIREMENTS[name]["optional"] or (PORTS_DIR / port / f"{name}.py").is_file()
]


def test_interfaces_found():
    assert {"gpio", "adc", "pwm", "i2c", "spi", "uart", "watchdog"} <= set(REQUIREMENTS)
    assert {"status_led", "button", "device", "power"} <= set(REQUIREMENTS)
    assert REQUIREMENTS["gpio"]["names"] == {"Pin"}
    assert REQUIREMENTS["status_led"]["names"] == {"show", "set_rgb", "ANIMATE"}
    assert REQUIREMENTS["power"]["names"] == {"reset", "reset_cause", "sleep_ms", "deep_sleep"}


@pytest.mark.parametrize("port,name", CASES, ids=[f"{p}-{n}" for p, n in CASES])
def test_port_implements_interface(port, name):
    port_dir = PORTS_DIR / port
    req = REQUIREMENTS[name]
    if not port_dir.is_dir():
        pytest.fail(f"hal/ports/{port}/ is missing")
    module = port_dir / f"{name}.py"
    if not module.is_file():
        pytest.fail(f"hal/ports/{port}/{name}.py is missing ({', '.join(req['interfaces'])})")
    tree = ast.parse(module.read_text(), str(module))
    missing = req["names"] - _bound_names(tree.body)
    assert not missing, f"hal/ports/{port}/{name}.py does not define {sorted(missing)}"
    classes = _classes(tree)
    for cls in sorted(req["names"] & set(CLASS_API)):
        assert cls in classes, f"hal/ports/{port}/{name}.py: {cls} must be a class"
        body = classes[cls].body
        methods = {n.name for n in body if isinstance(n, ast.FunctionDef)}
        lacking = [m for m in CLASS_API[cls]["methods"] if m not in methods]
        assert not lacking, f"hal/ports/{port}/{name}.py: {cls} lacks methods {lacking}"
        constants = _bound_names(body) - methods
        lacking = [c for c in CLASS_API[cls]["constants"] if c not in constants]
        assert not lacking, f"hal/ports/{port}/{name}.py: {cls} lacks constants {lacking}"


def test_class_api_matches_interface_docs():
    """The method lists above are the ones the interface files document."""
    for name, req in REQUIREMENTS.items():
        for cls in req["names"] & set(CLASS_API):
            text = "".join((HAL / f).read_text() for f in req["interfaces"])
            for member in CLASS_API[cls]["methods"] + CLASS_API[cls]["constants"]:
                assert member in text, f"{cls}.{member} is not documented in {req['interfaces']}"


# ---------------------------------------------------------------- boards

BOARD_FILES = sorted(BOARDS_DIR.glob("*/board.json"))
REFERENCE_BOARD = BOARDS_DIR / "virtual" / "board.json"
KNOWN_CAPS = {"digital", "pwm", "analog", "input-only", "uart-tx", "uart-rx"}
LED_TYPES = {"virtual", "neopixel", "rgb", "none"}
BUS_PINS = {"i2c": ("sda", "scl"), "spi": ("sck", "mosi", "miso"), "uart": ("tx", "rx")}
MODULE_SLOTS = {("bootloader", 0), ("system-part", 1), ("system-part", 2), ("user-part", 1)}
BLOCK = 4096


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _resolve(board: dict, name: str) -> str | None:
    """The pin name behind a board name or alias, or None."""
    if name in board["pins"]:
        return name
    target = board["aliases"].get(name)
    return target if target in board["pins"] else None


def _caps(board: dict, name: str) -> set:
    pin = _resolve(board, name)
    return set(board["pins"][pin]["caps"]) if pin else set()


board_params = pytest.mark.parametrize(
    "board_file", BOARD_FILES, ids=[p.parent.name for p in BOARD_FILES]
)


def test_boards_found():
    names = {p.parent.name for p in BOARD_FILES}
    assert {"virtual", "esp32_generic", "nrf52840_dk", "particle_xenon"} <= names


@board_params
def test_board_keys(board_file):
    board = _load(board_file)
    reference = set(_load(REFERENCE_BOARD))
    assert set(board) == reference, "top-level keys differ from the virtual board's"
    assert board["name"] == board_file.parent.name
    assert PLATFORM_PORTS.get(board["platform"]) == board["port"]
    assert (PORTS_DIR / board["port"]).is_dir() or board["port"] in PENDING_PORTS
    assert 0 < board["heap"] <= board["ram"]
    assert isinstance(board["features"], list)
    assert board["adc"]["bits"] in range(8, 17) and board["adc"]["vref_uv"] > 0


@board_params
def test_board_pins(board_file):
    board = _load(board_file)
    ids = [spec["id"] for spec in board["pins"].values()]
    assert len(ids) == len(set(ids)), "two pins share a port pin id"
    for name, spec in board["pins"].items():
        assert isinstance(spec["id"], int), name
        assert set(spec["caps"]) <= KNOWN_CAPS, (name, set(spec["caps"]) - KNOWN_CAPS)
        assert "digital" in spec["caps"], name
    for alias, target in board["aliases"].items():
        assert alias not in board["pins"], f"alias {alias} hides a pin of that name"
        assert target in board["pins"], f"alias {alias} -> {target}: no such pin"
    assert _resolve(board, board["user_led"]), board["user_led"]
    assert "input-only" not in _caps(board, board["user_led"])
    assert _resolve(board, board["button"]["pin"]), board["button"]
    assert board["button"]["active"] in ("low", "high")


@board_params
def test_board_status_led(board_file):
    board = _load(board_file)
    led = board["status_led"]
    assert led["type"] in LED_TYPES
    if led["type"] == "neopixel":
        assert _resolve(board, led["pin"]) and "input-only" not in _caps(board, led["pin"])
    if led["type"] == "rgb":
        assert len(led["pins"]) == 3 and led["active"] in ("low", "high")
        for name in led["pins"]:
            assert _resolve(board, name) and "input-only" not in _caps(board, name), name


@board_params
def test_board_buses(board_file):
    board = _load(board_file)
    for kind, roles in BUS_PINS.items():
        numbers = [spec["bus"] for spec in board[kind]]
        assert len(numbers) == len(set(numbers)), f"{kind}: bus numbers repeat"
        for spec in board[kind]:
            assert isinstance(spec["bus"], int)
            for role in roles:
                where = f"{kind} bus {spec['bus']}: {role} {spec[role]}"
                assert _resolve(board, spec[role]), where


@board_params
def test_board_flash_layout(board_file):
    flash = _load(board_file)["flash"]
    assert flash["block_size"] == BLOCK and flash["size"] % BLOCK == 0
    parts = sorted(flash["partitions"], key=lambda p: p["offset"])
    labels = [p["label"] for p in parts]
    assert len(labels) == len(set(labels)), "partition labels repeat"
    end = 0
    for p in parts:
        assert p["offset"] % BLOCK == 0, f"{p['label']} offset {p['offset']:#x} not 4K-aligned"
        assert p["size"] > 0 and p["size"] % BLOCK == 0, f"{p['label']} size {p['size']:#x}"
        assert p["offset"] >= end, f"{p['label']} overlaps the partition before it"
        end = p["offset"] + p["size"]
        assert end <= flash["size"], f"{p['label']} ends past the flash ({end:#x})"
    slots = [(p["module"], p.get("index", 0)) for p in parts if p.get("module")]
    assert sorted(slots) == sorted(MODULE_SLOTS), slots
    assert {"staging", "fs"} <= set(labels)
    staging = next(p for p in parts if p["label"] == "staging")
    largest = max(p["size"] for p in parts if p.get("module"))
    assert staging["size"] >= largest, "staging cannot hold the largest module slot"


HIL_FILES = sorted(BOARDS_DIR.glob("*/hil.json"))


@pytest.mark.parametrize("hil_file", HIL_FILES, ids=[p.parent.name for p in HIL_FILES])
def test_hil_wiring_names_real_pins(hil_file):
    board = _load(hil_file.parent / "board.json")
    hil = _load(hil_file)
    for a, b in hil.get("gpio_loopback") or []:
        for name in (a, b):
            assert _resolve(board, name) and "input-only" not in _caps(board, name), name
    if hil.get("adc_loopback"):
        drive, analog = hil["adc_loopback"]
        assert _resolve(board, drive) and "input-only" not in _caps(board, drive), drive
        assert "analog" in _caps(board, analog), analog
    for name in hil.get("pwm") or []:
        assert "pwm" in _caps(board, name), name
    for kind, key in (("i2c", "i2c"), ("spi", "spi_loopback"), ("uart", "uart_loopback")):
        if hil.get(key):
            assert hil[key]["bus"] in {s["bus"] for s in board[kind]}, (key, hil[key])
        elif key in hil:
            assert hil.get("skip", {}).get(key), f"{key} is off: say why under 'skip'"
    # Each jumpered or driven pin serves one check only, and none is taken by the board.
    wired = [n for pair in hil.get("gpio_loopback") or [] for n in pair]
    wired += list(hil.get("adc_loopback") or []) + list(hil.get("pwm") or [])
    wired = [_resolve(board, n) for n in wired]
    assert len(wired) == len(set(wired)), f"a pin is wired for two checks: {wired}"
    taken = {_resolve(board, board["button"]["pin"])}
    led = board["status_led"]
    taken |= {_resolve(board, n) for n in led.get("pins", [led.get("pin")]) if n}
    for kind, roles in BUS_PINS.items():
        taken |= {_resolve(board, spec[role]) for spec in board[kind] for role in roles}
    assert not set(wired) & taken, f"wired pins the board uses: {set(wired) & taken}"


# ---------------------------------------------------------------- on the VM

# A stand-in for the nrf port's machine module: the classes and constants the backends
# use, with the port's own constant values, and the port quirks the backends rely on
# (outputs read 0, Pin.irq has no `hard`, ADC takes an AIN channel and may lack
# read_u16, UART takes no pins). (The esp32 backend runs on the ESP32 twin instead.)
FAKE_MACHINE = r"""
PORT = "%(port)s"
log = []


class Reset(Exception):
    pass


class _Mem:
    def __init__(self):
        self.d = {0x10000060: 0x89ABCDEF, 0x10000064: 0x01234567}

    def __getitem__(self, addr):
        return self.d.get(addr, 0)

    def __setitem__(self, addr, value):
        self.d[addr] = value
        if addr == 0x40010000 and value == 1:
            self.d[0x40010400] = 1  # WDT TASKS_START -> RUNSTATUS


mem32 = _Mem()


class Pin:
    IN, OUT = 0, 1
    PULL_UP, PULL_DOWN = 3, 1
    IRQ_RISING, IRQ_FALLING = 1, 2

    def __init__(self, id, mode=-1, pull=-1, value=None):
        self.id, self.mode, self.level, self.handler = id, -1, 0, None
        if mode != -1:
            self.init(mode, pull, value=value)

    def init(self, mode, pull=-1, value=None):
        self.mode = mode
        if value is not None:
            self.level = 1 if value else 0
        elif mode == self.IN and pull == self.PULL_UP:
            self.level = 1

    def value(self, v=None):
        if v is None:
            return 0 if self.mode == self.OUT else self.level
        self.level = 1 if v else 0

    def on(self):
        self.level = 1

    def off(self):
        self.level = 0

    def irq(self, handler=None, trigger=3, **kw):
        if kw:
            raise TypeError("unexpected keyword argument")
        self.handler, self.trigger = handler, trigger
        self.mode = self.IN


class ADC:
    ATTN_11DB = 3

    def __init__(self, src):
        if isinstance(src, Pin):
            raise TypeError("the backend gives an AIN channel")
        self.src = src

    def atten(self, a):
        self.att = a

    def value(self):
        return 200


class PWM:
    def __init__(self, pin, freq=None, duty_u16=None):
        self.f, self.d = freq, duty_u16

    def freq(self, f=None):
        if f is None:
            return self.f
        self.f = f

    def duty_u16(self, d=None):
        if d is None:
            return self.d
        self.d = d

    def deinit(self):
        self.f = 0


class I2C:
    def __init__(self, id, scl, sda, freq=400000):
        assert isinstance(scl, Pin) and isinstance(sda, Pin)
        self.id = id

    def scan(self):
        return [0x48]

    def readfrom(self, addr, n, stop=True):
        return bytes(n)

    def writeto(self, addr, buf, stop=True):
        return len(buf)

    def readfrom_mem(self, addr, mem, n, addrsize=8):
        return bytes(n)

    def writeto_mem(self, addr, mem, buf, addrsize=8):
        pass


class SPI:
    MSB, LSB = 0, 1

    def __init__(self, id, baudrate, polarity, phase, bits, firstbit, sck, mosi, miso):
        self.id = id

    def deinit(self):
        pass

    def write(self, buf):
        pass

    def read(self, n, write=0):
        return bytes([write]) * n

    def readinto(self, buf, write=0):
        for i in range(len(buf)):
            buf[i] = write

    def write_readinto(self, out, into):
        into[:] = out


class UART:
    def __init__(self, id, **kw):
        allowed = ("baudrate", "timeout", "timeout_char")
        for k in kw:
            if k not in allowed:
                raise TypeError("unexpected keyword argument " + k)
        self.id, self.buf = id, b""

    def deinit(self):
        pass

    def write(self, b):
        self.buf += b
        return len(b)

    def any(self):
        return len(self.buf)

    def read(self, n=None):
        n = len(self.buf) if n is None else n
        out, self.buf = self.buf[:n], self.buf[n:]
        return out or None

    def readline(self):
        i = self.buf.find(b"\n")
        return self.read(len(self.buf) if i < 0 else i + 1)


HARD_RESET, WDT_RESET, SOFT_RESET, LOCKUP_RESET = 0, 1, 2, 3
PWRON_RESET, LPCOMP_RESET, DEBUG_IF_RESET, NFC_RESET = 16, 17, 18, 19

cause = [PWRON_RESET]


def reset_cause():
    return cause[0]


def reset():
    log.append(("reset",))
    raise Reset()
"""

# The walk through every interface on the nrf boards; `expect` holds what differs.
DRIVER = r"""
import sys, time
sys.path.insert(0, %(fake_dir)r)
import fakemachine as machine
sys.modules["machine"] = machine
sys.path.insert(0, %(repo)r)
import hal
hal.PORT = %(port)r
hal.BOARD_FILE = %(board_file)r
E = %(expect)r

from hal.gpio import Pin
led = Pin("LED", Pin.OUT)
led.on(); assert led.value() == 1
led.toggle(); assert led.value() == 0
led.off(); led.toggle(); assert led.value() == 1
a = Pin(E["in_pin"], Pin.IN, Pin.PULL_UP)
assert a.value() == 1
seen, via = [], []


def runner(fn, *args):  # the system's scheduler: every pin handler must go through it
    via.append(fn)
    return fn(*args)


hal.set_scheduler(runner)
seen = []
a.irq(lambda p: seen.append(p), Pin.IRQ_FALLING)
raw = a._pin
assert raw.trigger == Pin.IRQ_FALLING
raw.handler(raw)          # the interrupt: the port's ISR, or its scheduled soft IRQ
raw.handler(raw)
time.sleep_ms(1)          # the scheduler runs
assert seen and all(p is a for p in seen), seen
assert len(via) == len(seen), "a pin handler bypassed hal.schedule"
a.irq(None)

from hal.adc import ADC
adc = ADC(E["analog"])
assert adc.read_u16() == E["u16"], adc.read_u16()
assert adc.read_uv() == E["uv"], adc.read_uv()
try:
    ADC("LED")
    raise AssertionError("ADC on a digital pin")
except ValueError:
    pass

from hal.pwm import PWM
p = PWM(E["pwm"], freq=1000, duty_u16=1000)
assert p.freq() == 1000 and p.duty_u16() == 1000
p.freq(2000); p.duty_u16(2000)
assert p.freq() == 2000 and p.duty_u16() == 2000
p.deinit()

from hal.i2c import I2C
bus = I2C(0)
assert bus.scan() == [0x48]
assert bus.readfrom_mem(0x48, 0, 2) == b"\x00\x00"
assert bus.readfrom(0x48, 1) == b"\x00"
assert bus.writeto(0x48, b"\x01") == 1
bus.writeto_mem(0x48, 1, b"\x60\xa0")
assert bus._i2c.id == E["i2c_id"]

from hal.spi import SPI
spi = SPI(0, baudrate=2000000)
into = bytearray(3)
spi.write_readinto(b"abc", into)
assert into == b"abc"
assert spi.read(2, 0xFF) == b"\xff\xff"
spi.write(b"x")
assert spi._spi.id == E["spi_id"]

from hal.uart import UART
u = UART(1, baudrate=9600)
assert u.write(b"hi\n") == 3 and u.any() == 3
assert u.readline() == b"hi\n" and u.read() is None
assert u._uart.id == E["uart_id"]

from hal import device
uid = device.unique_id()
assert uid == E["uid"] and device.unique_id() is uid, uid

from hal import button
assert button.pressed() is False

from hal import status_led
assert status_led.ANIMATE is True
machine.log.clear()
status_led.show("cyan", "breathing")
status_led.set_rgb(255, 0, 0)
status_led.set_rgb(255, 0, 0)
from hal.ports.nrf import status_led as port_led
assert [q.level for q in port_led._pins] == [0, 1, 1], [q.level for q in port_led._pins]

from hal.watchdog import Watchdog
w = Watchdog(timeout_ms=2000)
w.feed()

from hal import power
assert power.reset_cause() == E["first_cause"], power.reset_cause()
power.sleep_ms(1)
%(port_checks)s
print("OK")
"""

NRF_CHECKS = r"""
from hal.ports.nrf import gpio as port_gpio, power as port_power
port_gpio.schedule = None  # firmware without micropython.schedule: the system loop polls
b3 = Pin(%(irq_pin)r, Pin.IN)
got = []
b3.irq(lambda p: got.append(p), Pin.IRQ_RISING)
b3._pin.handler(b3._pin)
b3._pin.handler(b3._pin)
assert got == []
hal.service()
assert got == [b3], got
hal.service()
assert got == [b3], got
m = machine.mem32.d
assert m[0x40010504] == 2000 * 32768 // 1000 - 1 and m[0x40010400] == 1
Watchdog(timeout_ms=9000)               # already running: only feeds
assert m[0x40010504] == 2000 * 32768 // 1000 - 1
assert m[0x40010600] == 0x6E524635
port_power._MARKER = %(marker)r
try:
    power.deep_sleep(5)
except machine.Reset:
    pass
machine.cause[0] = machine.SOFT_RESET
port_power._cause.clear()
assert power.reset_cause() == "deep-sleep"
port_power._cause.clear()
assert power.reset_cause() == "soft-reset"   # the marker was consumed
for raw_cause, name in ((0, "pin-reset"), (1, "watchdog"), (3, "panic"), (16, "deep-sleep")):
    machine.cause[0] = raw_cause
    port_power._cause.clear()
    assert power.reset_cause() == name
try:
    UART(1, bits=7)
    raise AssertionError("nrf UART is 8N1 only")
except ValueError:
    pass
"""

VM_CASES = {
    "nrf52840_dk": {
        "in_pin": "BUTTON2",
        "analog": "A0",
        "u16": 200 << 8 | 200,
        "uv": 200 * 3000000 // 255,
        "pwm": "D5",
        "i2c_id": 0,
        "spi_id": 2,
        "uart_id": 0,
        "uid": "0123456789abcdef",
        "led": "rgb",
        "first_cause": "deep-sleep",  # the nrf port's PWRON_RESET is a wake from System OFF
        "irq_pin": "BUTTON3",
    },
    "particle_xenon": {
        "in_pin": "D3",
        "analog": "A0",
        "u16": 200 << 8 | 200,
        "uv": 200 * 3000000 // 255,
        "pwm": "D5",
        "i2c_id": 0,
        "spi_id": 2,
        "uart_id": 0,
        "uid": "0123456789abcdef",
        "led": "rgb",
        "first_cause": "deep-sleep",
        "irq_pin": "D6",
    },
}


def _micropython() -> Path:
    return Path(sys.executable).parent / "micropython"


@pytest.mark.parametrize("board_name", sorted(VM_CASES))
def test_backend_runs_on_micropython(board_name, tmp_path):
    board_file = BOARDS_DIR / board_name / "board.json"
    port = _load(board_file)["port"]
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    (fake_dir / "fakemachine.py").write_text(FAKE_MACHINE % {"port": port})
    checks = NRF_CHECKS % {"marker": str(tmp_path / "m"),
                           "irq_pin": VM_CASES[board_name]["irq_pin"]}
    script = DRIVER % {
        "fake_dir": str(fake_dir),
        "repo": str(REPO),
        "port": port,
        "board_file": str(board_file),
        "expect": VM_CASES[board_name],
        "port_checks": checks,
    }
    (tmp_path / "drive.py").write_text(script)
    proc = subprocess.run(
        [str(_micropython()), str(tmp_path / "drive.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


# ---------------------------------------------------------------- the esp32 backend, on the twin

# The esp32 backend from this tree, through the interface modules, on the ESP32 twin:
# the port's machine as v1.28.0 has it (boards/twins/esp32/machine.py), the board's
# jumpers of hil.json in place (D25-D26, D27-D34, MOSI-MISO, TX-RX). What it prints
# is checked on the host.
ESP32_DRIVER = r"""
import sys, time
sys.path.insert(0, "/_repo")
import machine
import hal
from hal.gpio import Pin


def show(name, value):
    print("%s=%r" % (name, value))


led = Pin("LED", Pin.OUT)
led.on(); a = led.value()
led.toggle(); b = led.value()
led.off(); led.toggle()
show("led", (a, b, led.value()))
show("pull_up", Pin("D14", Pin.IN, Pin.PULL_UP).value())
try:
    Pin("D34", Pin.OUT)
    show("input_only", "no error")
except ValueError:
    show("input_only", "ValueError")

# Interrupts: the port's ISR schedules the handler; every call goes through hal.schedule.
via, seen = [], []


def runner(fn, *args):
    via.append(fn)
    return fn(*args)


hal.set_scheduler(runner)
inp, out = Pin("D25", Pin.IN), Pin("D26", Pin.OUT, value=0)
inp.irq(lambda p: seen.append((p is inp, p.value())), Pin.IRQ_RISING | Pin.IRQ_FALLING)
for level in (1, 0, 1):
    out.value(level)
    time.sleep_ms(2)  # scheduled callbacks run
show("irq", (seen, len(via)))
inp.irq(None)
out.value(0)
time.sleep_ms(2)
show("irq_off", len(seen))
try:
    machine.Pin(25).irq(handler=lambda p: None, hard=False)
    show("hard_kw", "no error")
except TypeError:
    show("hard_kw", "TypeError")

from hal.adc import ADC
drive = Pin("D27", Pin.OUT, value=1)
a2 = ADC("A2")
high = (a2.read_u16(), a2.read_uv())
drive.value(0)
show("adc", (high, (a2.read_u16(), a2.read_uv())))
try:
    ADC("LED")
    show("adc_digital", "no error")
except ValueError:
    show("adc_digital", "ValueError")

from hal.pwm import PWM
p = PWM("D13", freq=1000, duty_u16=32768)
first = (p.freq(), p.duty_u16())
p.freq(2000); p.duty_u16(16384)
show("pwm", (first, (p.freq(), p.duty_u16())))
p.deinit()

from hal.i2c import I2C
bus = I2C(0)
show("i2c", (bus.scan(), bus.readfrom_mem(0x48, 1, 2), bus._i2c._freq))

from hal.spi import SPI
spi = SPI(0, baudrate=2000000)
into = bytearray(3)
spi.write_readinto(b"abc", into)
show("spi", (bytes(into), spi.read(2, 0xA5), spi._spi._id))

from hal.uart import UART
u = UART(1, baudrate=9600)
w = u.write(b"hi\n")
show("uart", (w, u.any(), u.readline(), u.read(), u._uart._id))

from hal import device, button, status_led, power
show("uid", (device.unique_id(), device.unique_id() is device.unique_id()))
show("button", button.pressed())
show("animate", status_led.ANIMATE)
status_led.set_rgb(255, 0, 0)
status_led.set_rgb(255, 0, 0)
from hal.watchdog import Watchdog
Watchdog(timeout_ms=2000).feed()
show("cause", power.reset_cause())
power.sleep_ms(1)
show("done", 1)
power.deep_sleep(5000)
show("after_deep_sleep", 1)
"""


@pytest.fixture(scope="module")
def esp32_twin(tmp_path_factory):
    from twins import make_twin

    return make_twin(tmp_path_factory.mktemp("esp32-twin"))


def _shown(output: str) -> dict:
    import re

    return dict(re.findall(r"^(\w+)=(.*)$", output, re.MULTILINE))


def test_esp32_backend_runs_on_the_twin(esp32_twin):
    from twins import MOUNT_REPO, io_records, run_on

    wires = _load(BOARDS_DIR / "esp32_generic" / "hil.json")["wires"]
    proc = run_on(esp32_twin, MOUNT_REPO + ESP32_DRIVER, wires=wires)
    r = _shown(proc.stdout)
    assert "done" in r, proc.stdout + proc.stderr
    assert r["led"] == "(1, 0, 1)"
    assert r["pull_up"] == "1"
    assert r["input_only"] == "'ValueError'"
    # three edges of the jumpered output, each a handler call with the HAL's Pin,
    # each through the system's runner; none once the interrupt is off
    assert r["irq"] == "([(True, 1), (True, 0), (True, 1)], 3)"
    assert r["irq_off"] == "3"
    assert r["hard_kw"] == "'TypeError'"  # what the backend used to pass
    assert r["adc"] == "((65535, 3100000), (0, 0))"  # full scale is the board's vref_uv
    assert r["adc_digital"] == "'ValueError'"
    # freq() is what the LEDC timer's divider gives (ESP-IDF ledc_get_freq): 998.4 Hz
    # for 1 kHz at 16 bits; the duty as the channel's resolution keeps it
    assert r["pwm"] == "((998, 32768), (1997, 16384))"
    assert r["i2c"] == "([72], b'`\\xa0', 400000)"  # the TMP102 board.json puts on the bus
    assert r["spi"] == "(b'abc', b'\\xa5\\xa5', 2)"  # MOSI jumpered to MISO, on VSPI
    assert r["uart"] == "(3, 3, b'hi\\n', None, 2)"  # TX jumpered to RX, on UART2
    uid = (esp32_twin / "uid").read_text().strip()
    assert r["uid"] == f"({uid!r}, True)" and len(uid) == 12
    assert r["button"] == "False"
    assert r["animate"] == "True"
    assert r["cause"] == "'power-on'"
    assert "after_deep_sleep" not in r  # the chip sleeps: nothing after it runs
    records = io_records(esp32_twin)
    leds = [rec["rgb"] for rec in records if rec["k"] == "led"]
    assert leds == [[255, 0, 0]]  # the NeoPixel's first pixel, sent once
    assert {"k": "wdt", "timeout": 2000} in [{k: v for k, v in rec.items() if k != "t"}
                                             for rec in records if rec["k"] == "wdt"]
    assert [rec["ms"] for rec in records if rec["k"] == "deep-sleep"] == [5000]
    assert records[-1] == {"k": "halt", "code": 101}
    assert proc.returncode == -9  # stopped at once, as the chip does
