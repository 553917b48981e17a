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
# A pin is one small int in _pins: its port id in the low byte, its capabilities as
# bits above it (the order of _CAPS), aliases under their own names too. The parsed
# definition's pin dicts cost about 12 KB of heap on an ESP32 board (issue 14).
_CAPS = ("digital", "analog", "pwm", "input-only", "uart-tx", "uart-rx")
_pins = {}
_aliases = {}
# What the HAL does not keep: the flash layout is the bootloader's (it has read it by
# now), the rest is for people and host tools. The virtual board's simulated hardware
# reads its pins from this same dict (boards/virtual/sim_board.py: one copy in RAM).
_NOT_KEPT = ("flash", "description") + (() if PORT == "virtual" else ("pins", "aliases"))


def use_board(data):
    """Take the board definition (the bootloader's copy: one in RAM) and keep of it what
    the HAL needs while Keel runs; the dict itself loses the rest."""
    global _board
    pins = data.get("pins")
    if pins is not None:
        _pins.clear()
        for name, spec in pins.items():
            caps = 0
            for cap in spec.get("caps", ()):
                if cap in _CAPS:
                    caps |= 1 << _CAPS.index(cap)
            _pins[name] = spec["id"] | caps << 8
        _aliases.clear()
        for alias, name in data.get("aliases", {}).items():
            if name in _pins:
                _pins[alias] = _pins[name]
                _aliases[alias] = name
    for key in _NOT_KEPT:
        data.pop(key, None)
    _board = data


def board():
    """The board definition (boards/<name>/board.json, copied to the device) without
    its pins (pin_id, pin_has, pin_name), flash layout and descriptions."""
    if _board is None:
        import json

        with open(BOARD_FILE) as f:
            use_board(json.load(f))
    return _board


def backend(name):
    """The port's implementation module of peripheral `name`."""
    return __import__("hal.ports.%s.%s" % (PORT, name), None, None, (name,))


def _pin(name):
    board()
    found = _pins.get(name)
    if found is None:
        raise ValueError("board %s has no pin %s" % (_board["name"], name))
    return found


def pin_id(name):
    """The port's pin identifier for a board pin name ("D7", "A0", "LED")."""
    return _pin(name) & 0xFF


def pin_has(name, capability):
    board()
    found = _pins.get(name)
    return found is not None and capability in _CAPS and bool(
        found >> 8 & 1 << _CAPS.index(capability))


def pin_name(name):
    """The board's own name of a pin given by an alias ("LED" -> "D7")."""
    _pin(name)
    return _aliases.get(name, name)


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
