# Hardware abstraction layer. Each peripheral's API is declared once in hal/<name>.py
# and implemented in hal/ports/<port>/<name>.py; the port is chosen once, here.
# Only the running board's port is built into system part 1.
import sys

_PORTS = {"linux": "virtual", "esp32": "esp32"}


def _port_of_this_vm():
    # The nrf port names its platform after the board ("nrf52840-PDK", "nrf52",
    # "PARTICLE-XENON"...); its machine string names the chip ("XENON with NRF52840").
    if sys.platform.startswith("nrf"):
        return "nrf"
    machine = getattr(sys.implementation, "_machine", "")
    if "nrf5" in machine.lower():
        return "nrf"
    return _PORTS.get(sys.platform)


PORT = _port_of_this_vm()
if PORT is None:
    raise ImportError("keel: no HAL port for platform '%s'" % sys.platform)

BOARD_FILE = "/keel/board.json"
_board = None


def use_board(data):
    """Share the board definition the bootloader already read (one copy in RAM)."""
    global _board
    _board = data


def board():
    """The board definition (boards/<name>/board.json, copied to the device)."""
    global _board
    if _board is None:
        import json

        with open(BOARD_FILE) as f:
            _board = json.load(f)
    return _board


def backend(name):
    """The port's implementation module of peripheral `name`."""
    return __import__("hal.ports.%s.%s" % (PORT, name), None, None, (name,))


def pin_id(name):
    """The port's pin identifier for a board pin name ("D7", "A0", "LED")."""
    pins = board()["pins"]
    spec = pins.get(name)
    if spec is None:
        alias = board().get("aliases", {}).get(name)
        spec = pins.get(alias) if alias else None
    if spec is None:
        raise ValueError("board %s has no pin %s" % (board()["name"], name))
    return spec["id"]


def pin_has(name, capability):
    spec = board()["pins"].get(board().get("aliases", {}).get(name, name))
    return bool(spec) and capability in spec.get("caps", ())


_services = []
_scheduler = [None]


def set_scheduler(fn):
    """The system's way to run app callbacks (handlers of pin interrupts)."""
    _scheduler[0] = fn


def schedule(fn, *args):
    if _scheduler[0] is None:
        return fn(*args)
    return _scheduler[0](fn, *args)


def service():
    """Run the port's pending background work (called by the system loop)."""
    for fn in _services:
        fn()


def add_service(fn):
    if fn not in _services:
        _services.append(fn)
