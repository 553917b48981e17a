"""The device code's layers, checked. On the device every module is imported by a bare name,
placed where system/parts.json puts it (the bootloader's sources and lib/*.py at the top
level, system part 1's system/core/*.py and app_loader/*.py beside them and the hal
package, part 2's system/services/*.py), so neither an editor nor a reader can follow an
import to its layer. This test resolves every import the way parts.json places the modules
and fails on one against the layering:

    lib          imports nothing of Keel's
    bootloader   bootloader, lib          (and the one handover to the system: handover.py
                                           starts hal and keel_system)
    hal          hal, lib                 (never the system, the app loader or the bootloader)
    app_loader   app_loader, bootloader, lib
    core         core, app_loader, bootloader, hal, lib       (system part 1)
    services     services, core, app_loader, bootloader, hal, lib   (system part 2)

and device code never imports host code (`keel.…` of tools/, `keel_cloud`), except in the
`except ImportError:` branch that lets a file shared with the host tools import there."""

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

ALLOWED = {
    "lib": {"lib"},
    "bootloader": {"bootloader", "lib"},
    "hal": {"hal", "lib"},
    "app_loader": {"app_loader", "bootloader", "lib"},
    "core": {"core", "app_loader", "bootloader", "hal", "lib"},
    "services": {"services", "core", "app_loader", "bootloader", "hal", "lib"},
}
# The bootloader hands over to the system: the one import against the layers.
HANDOVER = {("handover", "hal"), ("handover", "keel_system")}
HOST_PACKAGES = ("keel", "keel_cloud", "bench", "tests")


def device_modules(root: Path = ROOT) -> dict[str, tuple[str, Path]]:
    """{the name a module is imported by on the device: (its layer, its source)}, from
    system/parts.json's sources."""
    parts = json.loads((root / "system" / "parts.json").read_text())
    out = {}

    def add(pattern: str, layer_of) -> None:
        if pattern.startswith("hal:"):
            for path in sorted((root / "hal").rglob("*.py")):
                name = ".".join(path.relative_to(root).with_suffix("").parts)
                out[name.removesuffix(".__init__")] = ("hal", path)
            return
        for path in sorted(root.glob(pattern)):
            out[path.stem] = (layer_of(path), path)

    boot = parts["bootloader"]
    for pattern in boot["sources"] + [s for port in boot["port_sources"].values() for s in port]:
        add(pattern, lambda p: "lib" if p.parts[-2] == "lib" else "bootloader")
    for part in parts["parts"]:
        for pattern in part["sources"]:
            add(pattern, lambda p: {"core": "core", "services": "services"}.get(p.parent.name, p.parent.name))
    return out


def _imports(tree: ast.AST):
    """(name imported, line) for every import, but those in an `except ImportError:` branch
    (a file shared with the host tools imports the host's copy there)."""
    host_fallback = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                if isinstance(handler.type, ast.Name) and handler.type.id == "ImportError":
                    host_fallback.update(id(n) for n in ast.walk(handler))
    for node in ast.walk(tree):
        if id(node) in host_fallback:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno
            for alias in node.names:
                yield f"{node.module}.{alias.name}", node.lineno


def violations(modules: dict[str, tuple[str, Path]], sources: dict[str, str] | None = None) -> list[str]:
    """One line for each import against the layers. sources: {module name: source} to
    check instead of the files (a test's own)."""
    found = []
    for name, (layer, path) in sorted(modules.items()):
        text = (sources or {}).get(name) or path.read_text()
        for target, line in _imports(ast.parse(text, str(path))):
            where = f"{path.relative_to(ROOT) if path.is_absolute() else path}:{line}"
            if target.split(".")[0] in HOST_PACKAGES and target not in modules:
                found.append(f"{where}: device code ({layer}) imports host code '{target}'")
                continue
            if target not in modules:
                continue  # MicroPython's own (machine, vfs, ...), or the board's (vboard)
            to_layer = modules[target][0]
            if to_layer in ALLOWED[layer] or (name, target) in HANDOVER:
                continue
            found.append(f"{where}: {layer} module '{name}' imports {to_layer} module '{target}'")
    return found


def test_every_device_module_is_placed_and_in_a_layer():
    modules = device_modules()
    assert {"keel_boot", "handover", "module_format", "app_loader", "keel_system", "keel", "hal",
            "hal.gpio", "hal.ports.esp32.gpio"} <= set(modules)
    assert {layer for layer, _ in modules.values()} == set(ALLOWED)


def test_the_device_code_keeps_its_layers():
    assert violations(device_modules()) == []


def test_a_hal_module_importing_the_system_is_caught():
    modules = device_modules()
    gpio = modules["hal.gpio"][1].read_text()
    found = violations(modules, {"hal.gpio": gpio + "\nimport keel_system\n"})
    assert len(found) == 1 and "hal module 'hal.gpio' imports core module 'keel_system'" in found[0]
    found = violations(modules, {"module_format": "import hal\n"})
    assert found and "lib module 'module_format' imports hal module 'hal'" in found[0]
    found = violations(modules, {"keel": "from keel import images\n"})
    assert found and "imports host code 'keel.images'" in found[0]
