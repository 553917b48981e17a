"""The app API's type stubs (stubs/, the keel-stubs package) against the device sources:
a public function, class, method, parameter (its name, and whether it has a default) or
constant that differs fails here. Then mypy on every example app with the stubs, and on
an app that calls the API wrongly."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUBS = ROOT / "stubs"
SERVICES = ROOT / "system" / "services"
CORE = ROOT / "system" / "core"
PORT = ROOT / "hal" / "ports" / "virtual"  # (the ports agree: tests/host/test_hal_contract.py)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _params(fn: ast.FunctionDef) -> list[tuple[str, bool]]:
    """(name, has a default) for each parameter but self; *args and **kwargs as such."""
    args = fn.args
    positional = args.posonlyargs + args.args
    first_default = len(positional) - len(args.defaults)
    out = [(a.arg, i >= first_default) for i, a in enumerate(positional) if a.arg != "self"]
    if args.vararg:
        out.append(("*" + args.vararg.arg, False))
    out += [(a.arg, d is not None) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        out.append(("**" + args.kwarg.arg, False))
    return out


def _api(tree: ast.Module, names=None) -> dict:
    """{name: params (a function), {method: params} (a class), or None (a constant)}."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = _params(node)
        elif isinstance(node, ast.ClassDef):
            out[node.name] = {m.name: _params(m) for m in node.body
                              if isinstance(m, ast.FunctionDef) and (not m.name.startswith("_") or m.name == "__init__")}
            out[node.name].update({t.id: None for m in node.body
                                   for t in (m.targets if isinstance(m, ast.Assign) else
                                             [m.target] if isinstance(m, ast.AnnAssign) else [])
                                   if isinstance(t, ast.Name) and not t.id.startswith("_")})
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    out[t.id] = None
    public = {k: v for k, v in out.items() if not k.startswith("_")}
    return public if names is None else {k: public[k] for k in names if k in public}


def _stub(path: str) -> dict:
    return _api(_tree(STUBS / path))


def _stub_classes(path: str) -> dict:
    tree = _tree(STUBS / path)
    return {n.name: _api(ast.Module(body=[n], type_ignores=[]))[n.name] if not n.name.startswith("_")
            else {m.name: _params(m) for m in n.body if isinstance(m, ast.FunctionDef)}
            | {t.id: None for m in n.body if isinstance(m, ast.AnnAssign) for t in [m.target]}
            for n in tree.body if isinstance(n, ast.ClassDef)}


def _source_keel() -> dict:
    """What `import keel` gives an app: keel.py's own, and what it loads on first use."""
    own = _api(_tree(SERVICES / "keel.py"))
    own.pop("led")  # an instance of _Led: below
    own["EVENTS"] = None
    cloud = _api(_tree(SERVICES / "cloud.py"))
    for name in ("publish", "subscribe", "function", "variable", "connected"):
        own[name] = cloud[name]
    own["cloud_status"] = cloud["status"]
    own["Timer"] = _api(_tree(SERVICES / "timers.py"))["Timer"]
    netapi = _api(_tree(SERVICES / "netapi.py"))
    for name in ("system_mode", "AUTOMATIC", "SEMI_AUTOMATIC", "MANUAL"):
        own[name] = netapi[name]
    return own


def test_keel_stub_matches_the_device_sources():
    stub = _stub("keel/__init__.pyi")
    classes = _stub_classes("keel/__init__.pyi")
    source = _source_keel()
    for instance in ("network", "log", "store", "led"):
        assert stub.pop(instance) is None  # an instance of a class of the stub's, checked below
    stub_public = {k: v for k, v in stub.items() if not k.startswith("_")}
    assert stub_public == source
    # keel.network, keel.log, keel.store, keel.led: a class or module on the device
    netapi = _api(_tree(SERVICES / "netapi.py"))
    assert classes["_Network"] == netapi["network"]
    log = _api(_tree(SERVICES / "log.py"))
    assert classes["_Log"] == {k: v for k, v in log.items() if k not in ("PATH",)}
    store = _api(_tree(SERVICES / "store.py"))
    assert classes["_Store"] == {k: v for k, v in store.items() if k not in ("PATH", "MAX_BYTES", "MAX_KEY")}
    led = _api(_tree(CORE / "led.py"))  # _Led forwards these of core/led.py
    forwarded = [n.targets[0].id for c in _tree(SERVICES / "keel.py").body
                 if isinstance(c, ast.ClassDef) and c.name == "_Led" for n in c.body if isinstance(n, ast.Assign)]
    assert classes["_Led"] == {name: led[name] for name in forwarded}


HAL_MODULES = ("gpio", "adc", "pwm", "i2c", "spi", "uart", "watchdog", "power", "button",
               "network", "status_led")


@pytest.mark.parametrize("name", HAL_MODULES)
def test_hal_stubs_match_the_port(name):
    exported = [t.id for node in _tree(ROOT / "hal" / f"{name}.py").body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name) and not t.id.startswith("_")]
    port = _api(_tree(PORT / f"{name}.py"))
    stub = _stub(f"hal/{name}.pyi")
    assert sorted(stub) == sorted(exported)
    for item in exported:
        expected = port[item]
        if isinstance(expected, dict):  # a class: its public methods and constants
            expected = {k: v for k, v in expected.items()}
        assert stub[item] == expected, item


def test_hal_package_stub_matches():
    source = _api(_tree(ROOT / "hal" / "__init__.py"),
                  ["PORT", "board", "pin_id", "pin_has", "pin_name", "schedule"])
    assert _stub("hal/__init__.pyi") == source
    assert _stub("hal/device.pyi") == {"unique_id": []}
    # hal.hostlink: what both of its branches define (the virtual board's link, or none)
    fallback = next(n for n in _tree(ROOT / "hal" / "hostlink.py").body if isinstance(n, ast.Try))
    no_link = _api(ast.Module(body=fallback.handlers[0].body, type_ignores=[]))
    assert _stub("hal/hostlink.pyi") == no_link


def _mypy(*paths):
    return subprocess.run([sys.executable, "-m", "mypy", "--check-untyped-defs", "--no-error-summary",
                           "--cache-dir", "/dev/null", *map(str, paths)],
                          capture_output=True, text=True, env={"MYPYPATH": str(STUBS), "PATH": ""},
                          cwd=ROOT)


def test_mypy_passes_every_example_app_with_the_stubs():
    apps = sorted(ROOT.glob("examples/*/main.py"))
    assert len(apps) >= 4
    for app in apps:  # one at a time: each is its own `main` module
        proc = _mypy(app)
        assert proc.returncode == 0, (app, proc.stdout + proc.stderr)


def test_mypy_fails_an_app_that_calls_the_api_wrongly(tmp_path):
    app = tmp_path / "main.py"
    app.write_text("import keel\nfrom hal.gpio import Pin\n\n\ndef setup():\n"
                   "    keel.publish(1, 2, 3)\n    Pin('D7', Pin.OUT).value('x')\n")
    proc = _mypy(app)
    assert proc.returncode == 1
    assert 'Too many arguments for "publish"' in proc.stdout
    assert 'Argument 1 to "publish" has incompatible type "int"' in proc.stdout


def test_the_stubs_install_as_keel_stubs(tmp_path):
    """pip installs them as a stub-only package (PEP 561): keel-stubs/ and hal-stubs/,
    which Pyright and mypy find in the environment's site-packages."""
    source = shutil.copytree(STUBS, tmp_path / "src")  # (the build writes beside its sources)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                           "--no-build-isolation", "--disable-pip-version-check", "--target",
                           str(tmp_path / "site"), str(source)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "site" / "keel-stubs" / "__init__.pyi").is_file()
    assert sorted(p.name for p in (tmp_path / "site" / "hal-stubs").glob("*.pyi")) == \
        sorted(p.name for p in (STUBS / "hal").glob("*.pyi"))
