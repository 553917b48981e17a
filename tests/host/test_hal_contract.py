"""The HAL contract, checked on the host.

1. Every port implements every interface: for each hal/<name>.py that calls
   backend("<name>"), each port under hal/ports/ has <name>.py defining the names
   the interface takes from it, and the classes have the documented methods, their
   own or those of the backend the port shares (hal/ports/machine/) (read with
   Python's ast: the esp32 and nrf backends cannot be imported here).
2. Every board definition is consistent: keys, pins, aliases, buses, and a flash
   layout whose partitions are aligned, inside the flash, apart, and complete.
3. The esp32 and nrf backends run on the real MicroPython VM (the unix port),
   through the interface modules and the real board.json, on the board twins: the
   port's modules as MicroPython v1.28.0 has them (boards/twins/esp32/, boards/twins/
   nrf/), jumpered as the board's hil.json says. This catches the mistakes a compiler
   cannot (a misspelt name, a wrong call, a keyword the port refuses, a pin its
   firmware does not know) until tests/hil runs on hardware.
"""

import ast
import json
from pathlib import Path

import pytest

from keel.boards import PLATFORM_PORTS
from keel.build import SHARED_PORT_FOLDERS

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


def _hal_imports(tree: ast.Module) -> dict:
    """{name: (module file, name in it, or None for the module)} for `from hal... import`."""
    out = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.ImportFrom) and (stmt.module or "").startswith("hal."):
            package = REPO.joinpath(*stmt.module.split("."))
            for alias in stmt.names:
                module = package / f"{alias.name}.py"
                found = (module, None) if module.is_file() else (package.with_suffix(".py"),
                                                                alias.name)
                out[alias.asname or alias.name] = found
    return out


def class_members(path: Path, cls: str) -> tuple[set, set] | None:
    """(methods, constants) of class `cls` as module `path` defines or imports it from
    another hal module (a port's from the backend it shares), its bases' included."""
    tree = ast.parse(path.read_text(), str(path))
    imports = _hal_imports(tree)
    node = _classes(tree).get(cls)
    if node is None:
        module, name = imports.get(cls, (None, None))
        return class_members(module, name) if name else None
    methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
    constants = _bound_names(node.body) - methods
    for base in node.bases:
        if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
            module, name = imports[base.value.id][0], base.attr
        else:
            module, name = imports[base.id]
        inherited = class_members(module, name)
        methods, constants = methods | inherited[0], constants | inherited[1]
    return methods, constants


def port_dirs() -> list[str]:
    """The ports, not the backends they share (keel.build.SHARED_PORT_FOLDERS)."""
    shared = {f for folders in SHARED_PORT_FOLDERS.values() for f in folders}
    present = {p.name for p in PORTS_DIR.iterdir() if p.is_dir() and p.name != "__pycache__"}
    return sorted((present - shared) | set(REQUIRED_PORTS) | set(PENDING_PORTS))


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
    for cls in sorted(req["names"] & set(CLASS_API)):
        members = class_members(module, cls)
        assert members, f"hal/ports/{port}/{name}.py: {cls} must be a class"
        methods, constants = members
        lacking = [m for m in CLASS_API[cls]["methods"] if m not in methods]
        assert not lacking, f"hal/ports/{port}/{name}.py: {cls} lacks methods {lacking}"
        lacking = [c for c in CLASS_API[cls]["constants"] if c not in constants]
        assert not lacking, f"hal/ports/{port}/{name}.py: {cls} lacks constants {lacking}"


def test_class_api_matches_interface_docs():
    """The method lists above are the ones the interface files document."""
    for name, req in REQUIREMENTS.items():
        for cls in req["names"] & set(CLASS_API):
            text = "".join((HAL / f).read_text() for f in req["interfaces"])
            for member in CLASS_API[cls]["methods"] + CLASS_API[cls]["constants"]:
                assert member in text, f"{cls}.{member} is not documented in {req['interfaces']}"


def test_system_part_1_carries_the_port_and_the_backend_it_shares(tmp_path):
    """The build keeps, of hal/ports/, the board's port and the backend it shares
    (keel.build.port_folders): hal/ports/machine/ on the ESP32 and the nRF52840, not
    on the virtual board."""
    from keel import build, romfs
    from keel import module_format as mf
    from keel.images import load_valid_image

    expected = {"esp32": {"esp32", "machine"}, "nrf52840": {"nrf", "machine"},
                "virtual": {"virtual"}}
    for platform, folders in expected.items():
        paths = build.build_system(platform, None, tmp_path / platform)
        image = load_valid_image(next(p for p in paths if "system-part1" in p.name))
        info = image.info
        names = [n for n, _, _ in romfs.walk(mf.bytes_reader(image.data), info.header_size,
                                              info.payload_size)]
        kept = {n.split("/")[2] for n in names if n.startswith("hal/ports/") and n.count("/") == 3}
        assert kept == folders, (platform, sorted(names))


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


def test_the_hals_pin_table_knows_every_capability():
    """hal.use_board keeps a pin as its id and a bit per capability, in the order of
    hal._CAPS: a capability the table did not know would read as absent."""
    tree = ast.parse((REPO / "hal" / "__init__.py").read_text())
    caps = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and getattr(node.targets[0], "id", None) == "_CAPS")
    assert set(caps) == KNOWN_CAPS


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
    labels = [p["label"] for p in flash["partitions"]]
    assert len(labels) == len(set(labels)), "partition labels repeat"
    # Offsets count from the flash's start, or (nRF52840) from the start of a region
    # the firmware places: "keel" (the Keel region, keel_region bytes long) or "fs" (the
    # firmware's filesystem, of which the partition's size is the least Keel needs).
    # A partition "in" another (ESP32: the slots inside the romfs partition, which the
    # firmware maps as one) lies wholly inside it; the rest are apart.
    regions = {}
    for p in flash["partitions"]:
        if p.get("in"):
            outer = next(q for q in flash["partitions"] if q["label"] == p["in"])
            assert not outer.get("in") and outer.get("region") == p.get("region")
            assert outer["offset"] <= p["offset"] and \
                p["offset"] + p["size"] <= outer["offset"] + outer["size"], \
                f"{p['label']} is not inside {outer['label']}"
            regions.setdefault((p["in"], p.get("region")), []).append(p)
        else:
            regions.setdefault(p.get("region"), []).append(p)
    assert {r[1] if isinstance(r, tuple) else r for r in regions} <= {None, "keel", "fs"}
    for region, parts in regions.items():
        inside = region[1] if isinstance(region, tuple) else region
        limit = {None: flash["size"], "keel": flash.get("keel_region"), "fs": None}[inside]
        parts.sort(key=lambda p: p["offset"])
        end = 0
        for p in parts:
            assert p["offset"] % BLOCK == 0, f"{p['label']} offset {p['offset']:#x} not 4K-aligned"
            assert p["size"] > 0 and p["size"] % BLOCK == 0, f"{p['label']} size {p['size']:#x}"
            assert p["offset"] >= end, f"{p['label']} overlaps the partition before it"
            end = p["offset"] + p["size"]
            assert end <= (limit or flash["size"]), f"{p['label']} ends past its region ({end:#x})"
    if "fs" in regions:
        assert [p["label"] for p in regions["fs"]] == ["fs"] and regions["fs"][0]["offset"] == 0
        assert flash["keel_region"] + regions["fs"][0]["size"] < flash["size"]
    parts = flash["partitions"]
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

# The nrf backend from this tree, through the interface modules, on the nRF52840 twin
# of each nrf board: the port's machine as v1.28.0 has it (boards/twins/nrf/machine.py),
# the board's jumpers of hil.json in place (and, on the DK, TX-RX as well: its UART
# carries the firmware's REPL). Stage 0 has put the filesystem at / first, as on the
# board. What it prints is checked on the host.
NRF_DRIVER = r"""
exec(open("boot.py").read(), {})
import sys, time
sys.path.insert(0, "/_repo")
sys.path.insert(1, "/_repo/lib")  # keel_files, where the HAL reads the board
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
show("pull_up", Pin("D6", Pin.IN, Pin.PULL_UP).value())

# Interrupts: the port calls the handler in its GPIOTE interrupt (heap locked); the
# backend's queues the app's with micropython.schedule, through hal.schedule.
via, seen = [], []


def runner(fn, *args):
    via.append(fn)
    return fn(*args)


hal.set_scheduler(runner)
inp, out = Pin("D3", Pin.IN), Pin("D2", Pin.OUT, value=0)
inp.irq(lambda p: seen.append((p is inp, p.value())), Pin.IRQ_RISING | Pin.IRQ_FALLING)
for level in (1, 0, 1):
    out.value(level)
    time.sleep_ms(2)
show("irq", (seen, len(via)))
inp.irq(None)
out.value(0)
time.sleep_ms(2)
show("irq_off", len(seen))
# Armed again with another trigger: the port keeps a pin's old trigger unless its
# channel was freed first (1.24+: irq(None) frees it).
inp.irq(lambda p: seen.append("rise"), Pin.IRQ_RISING)
out.value(1); time.sleep_ms(2); out.value(0); time.sleep_ms(2)
inp.irq(lambda p: seen.append("fall"), Pin.IRQ_FALLING)
out.value(1); time.sleep_ms(2); out.value(0); time.sleep_ms(2)
show("retrigger", seen[3:])
inp.irq(None)
# 8 GPIOTE channels: nine pins armed and disarmed one after another all get one.
armed = 0
for name in E["nine"]:
    q = Pin(name, Pin.IN)
    q.irq(lambda p: None, Pin.IRQ_RISING)
    armed += q._pin.pin in machine._channels
    q.irq(None)
show("nine", armed)
# An output with a handler stays an output, driving its level (1.24+).
out.irq(lambda p: None)
out.value(1)
show("irq_output", (out.value(), out._pin.line.mode))
out.irq(None)
try:
    machine.Pin(out._pin.pin).irq(handler=lambda p: None, hard=False)
    show("hard_kw", "no error")
except TypeError:
    show("hard_kw", "TypeError")

from hal.adc import ADC
drive = Pin("D4", Pin.OUT, value=1)
a0 = ADC("A0")
high = (a0.read_u16(), a0.read_uv())
drive.value(0)
show("adc", (high, (a0.read_u16(), a0.read_uv())))
try:
    ADC("LED")
    show("adc_digital", "no error")
except ValueError:
    show("adc_digital", "ValueError")

from hal.pwm import PWM
p = PWM("D5", freq=1000, duty_u16=32768)
first = (p.freq(), p.duty_u16())
p.freq(2000); p.duty_u16(16384)
show("pwm", (first, (p.freq(), p.duty_u16())))
p.deinit()
# The port hands each PWM without device= a module of its own and never frees one:
# the backend hands them out itself, so PWMs come and go without running out.
made = 0
for name in E["pwms"] * 2:
    q = PWM(name, freq=500, duty_u16=100)
    made += q.freq() == 500
    q.deinit()
four = [PWM(n, freq=100 * (i + 1)) for i, n in enumerate(E["pwms"][:4])]
try:
    PWM(E["pwms"][4])
    fifth = "no error"
except ValueError as e:
    fifth = str(e)
show("pwm_modules", (made, [q.freq() for q in four], fifth))

from hal.i2c import I2C
bus = I2C(0)
show("i2c", (bus.scan(), bus.readfrom_mem(0x48, 1, 2), bus._i2c._freq))

from hal.spi import SPI
spi = SPI(0, baudrate=2000000)
into = bytearray(3)
spi.write_readinto(b"abc", into)
show("spi", (bytes(into), spi.read(2, 0xA5), spi._spi._id, spi._spi._baudrate))

from hal.uart import UART
u = UART(1, baudrate=9600)
w = u.write(b"hi\n")
show("uart", (w, u.any(), u.readline(), u.read(), u._uart.attached_to_repl))

from hal import device, button, status_led, power
show("uid", (device.unique_id(), device.unique_id() is device.unique_id()))
show("button", button.pressed())
import sim_pins
sim_pins.drive(sim_pins.line(hal.board()["button"]["pin"]), 0)  # the host holds it down
show("button_held", button.pressed())
show("animate", status_led.ANIMATE)
status_led.set_rgb(255, 0, 255)
from hal.ports.nrf import status_led as port_led
show("led_pins", [q.value() for q in port_led._pins])
from hal.watchdog import Watchdog
Watchdog(timeout_ms=2000).feed()
show("cause", power.reset_cause())
power.sleep_ms(1)
show("done", 1)
"""

NRF_CASES = {
    # pins for nine interrupts one after another, and five PWM outputs
    "nrf52840_dk": {"nine": ["D7", "D8", "D9", "D10", "P1.09", "P1.04", "P1.05", "P0.12",
                             "P0.24"],
                    "pwms": ["D5", "D7", "D8", "D9", "D10"]},
    "particle_xenon": {"nine": ["D5", "D6", "D8", "A1", "A2", "A3", "A4", "A5", "D7"],
                       "pwms": ["D5", "D6", "D7", "D8", "D1"]},
}


@pytest.fixture(scope="module")
def nrf_twins(tmp_path_factory):
    return tmp_path_factory.mktemp("nrf-twins")  # (one system build for both boards)


@pytest.mark.parametrize("board_name", sorted(NRF_CASES))
def test_nrf_backend_runs_on_the_twin(board_name, nrf_twins):
    from twins import MOUNT_REPO, io_records, make_twin, run_on

    twin = make_twin(nrf_twins, board=board_name, platform="nrf52840")
    wires = _load(BOARDS_DIR / board_name / "hil.json")["wires"]
    if ["TX", "RX"] not in wires:
        wires = wires + [["TX", "RX"]]
    code = MOUNT_REPO + "E = %r\n" % NRF_CASES[board_name] + NRF_DRIVER
    proc = run_on(twin, code, wires=wires)
    r = _shown(proc.stdout)
    assert "done" in r, proc.stdout + proc.stderr
    assert "uncaught exception in interrupt handler" not in proc.stdout
    assert r["led"] == "(1, 0, 1)"  # an output reads the level it drives
    assert r["pull_up"] == "1"
    assert r["irq"] == "([(True, 1), (True, 0), (True, 1)], 3)"
    assert r["irq_off"] == "3"
    assert r["retrigger"] == "['rise', 'fall']"
    assert r["nine"] == "9"
    assert r["irq_output"] == "(1, 1)"
    assert r["hard_kw"] == "'TypeError'"
    assert r["adc"] == "((65535, 3000000), (0, 0))"  # 8 bits; full scale is vref_uv
    assert r["adc_digital"] == "'ValueError'"
    assert r["pwm"] == "((1000, 32768), (2000, 16384))"  # stored and read back exactly
    assert r["pwm_modules"] == "(10, [100, 200, 300, 400], " \
        "'nrf: all 4 PWM modules are in use (deinit() one)')"
    assert r["i2c"] == "([72], b'`\\xa0', 400000)"  # the TMP102 board.json puts on the bus
    assert r["spi"] == "(b'abc', b'\\xa5\\xa5', 2, 2000000)"  # MOSI-MISO, SPIM2
    # TX jumpered to RX: what is sent comes back, with the UART no longer the REPL's
    assert r["uart"] == "(3, 3, b'hi\\n', None, False)"
    uid = (twin / "uid").read_text().strip()
    assert r["uid"] == f"({uid!r}, True)" and len(uid) == 16  # FICR DEVICEID
    assert r["button"] == "False" and r["button_held"] == "True"
    assert r["animate"] == "True"
    assert r["led_pins"] == "[0, 1, 0]"  # active low: red and blue lit
    assert r["cause"] == "'pin-reset'"  # a power-on leaves RESETREAS empty: HARD_RESET
    records = io_records(twin)
    assert {"k": "wdt", "timeout": 2000} in [{k: v for k, v in rec.items() if k != "t"}
                                             for rec in records if rec["k"] == "wdt"]


def _shown(output: str) -> dict:
    import re

    return dict(re.findall(r"^(\w+)=(.*)$", output, re.MULTILINE))


# ---------------------------------------------------------------- the esp32 backend, on the twin

# The esp32 backend from this tree, through the interface modules, on the ESP32 twin:
# the port's machine as v1.28.0 has it (boards/twins/esp32/machine.py), the board's
# jumpers of hil.json in place (D25-D26, D27-D34, MOSI-MISO, TX-RX). What it prints
# is checked on the host.
ESP32_DRIVER = r"""
import sys, time
sys.path.insert(0, "/_repo")
sys.path.insert(1, "/_repo/lib")  # keel_files, where the HAL reads the board
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
