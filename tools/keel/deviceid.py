"""A board's device id, by the rule the board itself uses (hal/device_id.py).

The cloud session connects as hal.device.unique_id(), and provisioning must issue the
certificate for that same id. So the host never works it out itself: it runs Keel's
own rule on the board, the port found as hal/__init__.py finds it and the id read as
hal/device_id.py reads it, either on a board at its raw REPL (keel device provision
--port) or on a device directory's board in the VM (keel device provision DIR)."""

from pathlib import Path

from keel.errors import KeelError
from keel.paths import source_root

_PRINT = "\nprint('device-id', device_id(PORT))\n"


def rule_source() -> str:
    """Code that prints `device-id ID` on the board it runs on."""
    hal = source_root() / "hal"
    return ((hal / "__init__.py").read_text() + "\n" + (hal / "device_id.py").read_text()
            + _PRINT)


def parse(output: str, where: str) -> str:
    for line in output.splitlines():
        if line.startswith("device-id "):
            return line.split(" ", 1)[1].strip()
    last = output.strip().splitlines()[-1] if output.strip() else "no output"
    raise KeelError(f"{where}: the board did not say its device id ({last})")


def on_board(transport, where: str) -> str:
    """On a board at its raw REPL (an mpremote transport)."""
    code = "_keel_id = {}\nexec(%r, _keel_id)\ndel _keel_id\n" % rule_source()
    return parse(transport.exec(code).decode(errors="replace"), where)


def on_device(path: Path | str) -> str:
    """On a device directory's board: its VM started once, to answer only this."""
    from keel import vdev

    proc = vdev.ask(path, rule_source())
    return parse(proc.stdout + proc.stderr, str(path))
