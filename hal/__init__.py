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

_board = None
# The pins as one string, a line each: "\nNAME ID CAPS" (CAPS: bits in the order of
# _CAPS), and "\nALIAS =NAME" for an alias. The parsed definition's pin dicts cost
# about 12 KB of heap on an ESP32 board, a dict of small ints still 5 KB (issue 14).
_CAPS = ("digital", "analog", "pwm", "input-only", "uart-tx", "uart-rx")
_pins = [""]
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
        lines = []
        for name, spec in pins.items():
            caps = 0
            for cap in spec.get("caps", ()):
                if cap in _CAPS:
                    caps |= 1 << _CAPS.index(cap)
            lines.append("%s %d %d" % (name, spec["id"], caps))
        for alias, name in data.get("aliases", {}).items():
            lines.append("%s =%s" % (alias, name))
        _pins[0] = "\n" + "\n".join(lines) + "\n"
        lines = None
    for key in _NOT_KEPT:
        data.pop(key, None)
    _board = data


def board():
    """The board definition (boards/<name>/board.json, copied to the device) without
    its pins (pin_id, pin_has, pin_name), flash layout and descriptions."""
    if _board is None:
        import json
        from keel_files import BOARD_FILE  # (the system gives it the board it read: use_board)

        with open(BOARD_FILE) as f:
            use_board(json.load(f))
    return _board


def _entry(name, missing_ok=False):
    # -> (the board's name of the pin, its id, its capability bits)
    board()
    table = _pins[0]
    for _ in range(2):  # a name, or an alias of one
        at = table.find("\n%s " % name)
        if at < 0:
            break
        fields = table[at + 1 : table.index("\n", at + 1)].split()
        if fields[1][0] != "=":
            return fields[0], int(fields[1]), int(fields[2])
        name = fields[1][1:]
    if missing_ok:
        return None
    raise ValueError("board %s has no pin %s" % (_board["name"], name))


def backend(name):
    """The port's implementation module of peripheral `name`."""
    return __import__("hal.ports.%s.%s" % (PORT, name), None, None, (name,))


def pin_id(name):
    """The port's pin identifier for a board pin name ("D7", "A0", "LED")."""
    return _entry(name)[1]


def pin_has(name, capability):
    found = _entry(name, True)
    return found is not None and capability in _CAPS and bool(
        found[2] & 1 << _CAPS.index(capability))


def pin_name(name):
    """The board's own name of a pin given by an alias ("LED" -> "D7")."""
    return _entry(name)[0]


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
