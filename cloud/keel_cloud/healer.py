"""The safe mode healer: when a device says it is in safe mode because a dependency is
missing, send it the system modules it lacks from the release catalog, one module per
update, and carry on from each describe it sends after its reset, until it runs its app.

plan() is the selection (pure, unit-tested): for each missing (function, index, minimum
version) the LOWEST released version for the device's platform that satisfies it, never a
prerelease unless the minimum is one, never a downgrade of an installed module; the chosen
modules' own dependencies are added the same way, and the updates are ordered so that a
module comes after those it depends on (system part 1 before system part 2).

Healer keeps one state per device in memory (keyed by device id) and does all its work in
its own worker threads: on_describe() runs on paho's thread and only records the describe
and schedules an evaluation. States (status()): idle, healing (with `sending`), blocked
(with `reason`; not retried until the catalog or the describe changes), healed (the
device came back in normal mode), failed (with `reason`; retried on the next describe, at
most MAX_FAILURES times in a row)."""

import hashlib
import json
import logging
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from keel_cloud.ota import OtaError
from keel_cloud.releases import SCHEMA as RELEASES_SCHEMA, RELEASES_DIR, Catalog, version_key

log = logging.getLogger("keel.cloud.healer")

MAX_FAILURES = 3  # transfer errors in a row before the healer gives up (until something changes)
INSTALL_GRACE = 20.0  # s after `pending` during which a describe without the new module is ignored
RECHECK = 15.0  # s between looks at the catalog for blocked and failed devices
WORKERS = 8  # transfers to different devices at the same time


class HealError(Exception):
    """Nothing in the catalog satisfies a missing dependency."""


# Module headers (docs/module-format.md): only what the healer needs, the dependencies.
_HEADER = "<4sBBBBIHBxI"
_HEADER_SIZE = 20
_DEP = "<BBxxI"
_DEP_SIZE = 8
_FUNCTIONS = {2: "bootloader", 4: "system-part", 5: "user-part", 10: "vm"}
_PRERELEASE = {0x00: "alpha", 0x40: "beta", 0x80: "rc"}


def _decode_version(value: int) -> str:
    text = "%d.%d.%d" % ((value >> 24) & 0xFF, (value >> 16) & 0xFF, (value >> 8) & 0xFF)
    tag = value & 0xFF
    if tag == 0xFF:
        return text
    return f"{text}-{_PRERELEASE[tag & 0xC0]}.{tag & 0x3F}"


def image_dependencies(image: bytes) -> list[dict]:
    """The dependencies a module image's header lists: [{function, index, version}]."""
    if len(image) < _HEADER_SIZE:
        raise ValueError("truncated module image")
    magic, _fmt, _function, _index, _flags, _version, _platform, ndeps, _size = \
        struct.unpack_from(_HEADER, image, 0)
    if magic != b"KEEL" or len(image) < _HEADER_SIZE + ndeps * _DEP_SIZE:
        raise ValueError("not a Keel module image")
    deps = []
    for i in range(ndeps):
        function, index, version = struct.unpack_from(_DEP, image, _HEADER_SIZE + i * _DEP_SIZE)
        deps.append({"function": _FUNCTIONS.get(function, str(function)), "index": index,
                     "version": _decode_version(version)})
    return deps


def is_prerelease(version: str | None) -> bool:
    return bool(version) and "-" in version


def label(function: str, index: int, version: str | None) -> str:
    return f"{function} {index} {version}"


# Selection

def plan(describe: dict, releases: list[dict], dependencies) -> list[dict]:
    """The updates that heal the device, in the order to send them: [{function, index,
    version, platform}]. releases: Catalog.releases(platform); dependencies(module) ->
    that released module's own dependencies. Raises HealError when a requirement has no
    satisfying release. Empty when nothing is missing (or all of it is installed)."""
    platform = describe.get("platform")
    installed = {}
    for m in describe.get("modules") or []:
        if isinstance(m, dict) and m.get("valid", True) and m.get("version"):
            installed[(m.get("function"), m.get("index"))] = m["version"]
    offered: dict[tuple, set] = {}
    for release in releases:
        if release.get("platform") not in (None, platform):
            continue
        for m in release.get("modules", []):
            offered.setdefault((m["function"], m["index"]), set()).add(m["version"])

    required: dict[tuple, str | None] = {}  # (function, index) -> the highest minimum

    def require(function, index, version) -> bool:
        key = (function, index)
        if key in required:
            old = required[key]
            if version is None or (old is not None and version_key(old) >= version_key(version)):
                return False
        required[key] = version
        return True

    for dep in describe.get("missing") or []:
        if isinstance(dep, dict):
            require(dep.get("function"), dep.get("index"), dep.get("version"))

    chosen: dict[tuple, dict] = {}
    changed = True
    while changed:
        changed = False
        for key, minimum in sorted(required.items(), key=lambda kv: _slot_order(kv[0])):
            have = installed.get(key)
            if have is not None and (minimum is None or version_key(have) >= version_key(minimum)):
                chosen.pop(key, None)  # already satisfied: never downgrade
                continue
            candidates = [
                v for v in offered.get(key, ())
                if (minimum is None or version_key(v) >= version_key(minimum))
                and (not is_prerelease(v) or is_prerelease(minimum))
                and (have is None or version_key(v) > version_key(have))
            ]
            if not candidates:
                at_least = f" >= {minimum}" if minimum else ""
                raise HealError(f"no release of {key[0]} {key[1]}{at_least} for {platform}")
            best = min(candidates, key=version_key)
            if chosen.get(key, {}).get("version") == best:
                continue
            module = {"function": key[0], "index": key[1], "version": best, "platform": platform}
            chosen[key] = module
            changed = True
            for dep in dependencies(module):
                if require(dep["function"], dep["index"], dep["version"]):
                    changed = True
    return _order(list(chosen.values()), dependencies)


def _slot_order(key: tuple) -> tuple:
    rank = {"bootloader": 0, "system-part": 1, "vm": 2, "user-part": 3}
    return rank.get(key[0], 4), str(key[0]), key[1] or 0


def _order(modules: list[dict], dependencies) -> list[dict]:
    """Dependencies first (a topological order), then bootloader, system parts by index."""
    keys = {(m["function"], m["index"]): m for m in modules}
    after = {k: {(d["function"], d["index"]) for d in dependencies(m)} & keys.keys() - {k}
             for k, m in keys.items()}
    out: list[dict] = []
    done: set = set()
    while len(out) < len(keys):
        ready = [k for k in keys if k not in done and after[k] <= done]
        if not ready:  # a cycle: break it in the plain order
            ready = [k for k in keys if k not in done]
        k = min(ready, key=_slot_order)
        done.add(k)
        out.append(keys[k])
    return out


# The catalog, read through the service's registry connection

class SharedCatalog(Catalog):
    """The release catalog on the registry connection the service already has (the
    release_modules table lives in the registry's database)."""

    def __init__(self, registry, cloud_path: Path):
        self.registry = registry
        self.dir = SimpleNamespace(path=Path(cloud_path))
        self.root = Path(cloud_path) / RELEASES_DIR
        with registry._transaction() as run:
            run(RELEASES_SCHEMA)

    def close(self) -> None:  # the registry belongs to the service
        pass


# Per-device state

class _Device:
    def __init__(self):
        self.describe: dict | None = None
        self.seq = 0  # describes received
        self.busy = False  # an evaluation or a transfer is scheduled or running
        self.state = "idle"
        self.reason: str | None = None
        self.sending: dict | None = None
        self.plan: list[str] = []
        self.failures = 0
        self.healing = False  # the healer changed something since the device was last normal
        self.awaiting: dict | None = None  # {"key", "version", "at"}: sent, waiting for its install
        self.parked: tuple | None = None  # (describe, catalog) fingerprints a block/failure is for
        self.updated = time.time()

    def status(self) -> dict:
        out = {"state": self.state, "updated": self.updated}
        if self.reason:
            out["reason"] = self.reason
        if self.sending:
            out["sending"] = dict(self.sending)
        if self.plan:
            out["plan"] = list(self.plan)
        if self.failures:
            out["failures"] = self.failures
        return out


def _fingerprint(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class Healer:
    """ota: the service's OtaSender; catalog: has releases(platform) and image(platform,
    function, index, version) (a Catalog), or None (the healer then only reports)."""

    def __init__(self, ota, catalog, workers: int = WORKERS, install_grace: float = INSTALL_GRACE,
                 recheck: float = RECHECK, send_timeout: float = 600.0):
        self.ota = ota
        self.catalog = catalog
        self.install_grace = install_grace
        self.send_timeout = send_timeout
        self._lock = threading.Lock()
        self._devices: dict[str, _Device] = {}
        self._deps: dict[tuple, list[dict]] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="keel-healer")
        self._stop = threading.Event()
        self._recheck = recheck
        self._ticker = None
        if recheck:
            self._ticker = threading.Thread(target=self._tick, name="keel-healer-recheck", daemon=True)
            self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # From paho's thread: record and schedule, nothing more

    def on_describe(self, device_id: str, describe: dict) -> None:
        if not isinstance(describe, dict):
            return
        with self._lock:
            dev = self._devices.setdefault(device_id, _Device())
            dev.describe = describe
            dev.seq += 1
            if dev.busy:
                return  # the running worker looks at the new describe when it is done
            dev.busy = True
        self._submit(device_id)

    def status(self, device_id: str) -> dict:
        with self._lock:
            dev = self._devices.get(device_id)
            return dev.status() if dev else {"state": "idle"}

    def _poke(self, device_id: str) -> None:
        """Evaluate the last describe again (a timer's)."""
        with self._lock:
            dev = self._devices.get(device_id)
            if dev is None or dev.busy or self._stop.is_set():
                return
            dev.busy = True
        self._submit(device_id)

    def _submit(self, device_id: str) -> None:
        try:
            self._pool.submit(self._work, device_id)
        except RuntimeError:  # shut down
            with self._lock:
                self._devices[device_id].busy = False

    def _tick(self) -> None:
        """Blocked and failed devices get another look when the catalog changes."""
        while not self._stop.wait(self._recheck):
            with self._lock:
                parked = [(i, d.describe) for i, d in self._devices.items()
                          if d.state in ("blocked", "failed") and not d.busy and d.describe]
            for device_id, describe in parked:
                try:
                    catalog_print = _fingerprint(self._releases(describe.get("platform")))
                except Exception:  # noqa: BLE001 - a database hiccup: next time
                    log.exception("healer: cannot read the catalog")
                    continue
                with self._lock:
                    dev = self._devices[device_id]
                    if dev.busy or not dev.parked or dev.parked[1] == catalog_print:
                        continue
                    dev.busy = True
                self._submit(device_id)

    # The worker

    def _work(self, device_id: str) -> None:
        try:
            while True:
                with self._lock:
                    dev = self._devices[device_id]
                    describe, seq = dev.describe, dev.seq
                try:
                    self._evaluate(device_id, dev, describe)
                except Exception as e:  # noqa: BLE001 - reported in the status, and logged
                    log.exception("healer: %s", device_id)
                    self._set(dev, "failed", reason=f"internal error: {e}")
                with self._lock:
                    if dev.seq == seq:
                        dev.busy = False
                        return
        except BaseException:
            with self._lock:
                self._devices[device_id].busy = False
            raise

    def _set(self, dev: _Device, state: str, reason: str | None = None, sending=None, plan=None) -> None:
        with self._lock:
            dev.state = state
            dev.reason = reason
            dev.sending = sending
            if plan is not None:
                dev.plan = plan
            dev.updated = time.time()

    def _releases(self, platform):
        return self.catalog.releases(platform) if self.catalog is not None else []

    def _dependencies(self, module: dict) -> list[dict]:
        key = (module["platform"], module["function"], module["index"], module["version"])
        if key not in self._deps:
            image = self.catalog.image(*key)
            self._deps[key] = image_dependencies(image) if image else []
        return self._deps[key]

    def _evaluate(self, device_id: str, dev: _Device, describe: dict) -> None:
        mode, reason = describe.get("mode"), describe.get("safe_mode_reason")
        installed = {(m.get("function"), m.get("index")): m.get("version")
                     for m in describe.get("modules") or [] if isinstance(m, dict) and m.get("valid", True)}

        if dev.awaiting:  # a module was sent: did this boot install it?
            key, version = dev.awaiting["key"], dev.awaiting["version"]
            have = installed.get(key)
            if have is not None and version_key(have) >= version_key(version):
                log.info("healer: %s installed %s", device_id, label(*key, version))
                dev.awaiting = None
                dev.failures = 0
            elif time.monotonic() - dev.awaiting["at"] < self.install_grace:
                # The describe from before the reset, or a slow install: look again later
                # (a device that rolled back says nothing more).
                left = self.install_grace - (time.monotonic() - dev.awaiting["at"])
                timer = threading.Timer(left + 0.1, self._poke, (device_id,))
                timer.daemon = True
                timer.start()
                return
            else:
                dev.awaiting = None
                dev.failures += 1
                log.warning("healer: %s did not install %s", device_id, label(*key, version))
                if dev.failures >= MAX_FAILURES:
                    self._park(dev, describe, "failed",
                               f"the device did not install {label(*key, version)} "
                               f"({dev.failures} attempts)")
                    return

        if mode != "safe" or reason != "dependency":
            with self._lock:
                dev.parked = None
                dev.failures = 0
                healed = dev.healing and mode == "normal"
                if mode == "normal":
                    dev.healing = False
            self._set(dev, "healed" if healed or (dev.state == "healed" and mode == "normal") else "idle",
                      plan=[])
            return

        platform = describe.get("platform")
        releases = self._releases(platform)
        prints = (_fingerprint({k: describe.get(k) for k in ("modules", "missing", "mode")}),
                  _fingerprint(releases))
        if dev.state in ("blocked", "failed") and dev.parked == prints and (
                dev.state == "blocked" or dev.failures >= MAX_FAILURES):
            return  # nothing changed since it was given up
        if dev.parked and dev.parked != prints:
            dev.failures = 0  # something changed: a fresh run of attempts
        dev.parked = None

        if self.catalog is None:
            return self._park(dev, describe, "blocked", "the healer has no release catalog", prints)
        try:
            steps = plan(describe, releases, self._dependencies)
        except HealError as e:
            log.warning("healer: %s is blocked: %s", device_id, e)
            return self._park(dev, describe, "blocked", str(e), prints)
        if not steps:
            missing = ", ".join(label(m.get("function"), m.get("index"), m.get("version"))
                                for m in describe.get("missing") or [])
            return self._park(dev, describe, "blocked",
                              f"nothing to send: the device misses {missing or 'nothing'} "
                              "but has every version the catalog offers", prints)
        if self.ota.busy(device_id):
            self._set(dev, "healing", reason="another update to the device is in progress",
                      plan=[label(m["function"], m["index"], m["version"]) for m in steps])
            return  # its reset brings a new describe
        self._send(device_id, dev, describe, steps, prints)

    def _park(self, dev, describe, state, reason, prints=None) -> None:
        if prints is None:
            prints = (_fingerprint({k: describe.get(k) for k in ("modules", "missing", "mode")}),
                      _fingerprint(self._releases(describe.get("platform"))))
        dev.parked = prints
        self._set(dev, state, reason=reason, plan=[])

    def _send(self, device_id, dev, describe, steps, prints) -> None:
        module = steps[0]
        name = label(module["function"], module["index"], module["version"])
        image = self.catalog.image(module["platform"], module["function"], module["index"], module["version"])
        if image is None:
            return self._park(dev, describe, "blocked", f"the catalog lost the image of {name}", prints)
        sending = {"module": name, "size": len(image), "acknowledged": 0}
        with self._lock:
            dev.healing = True
        self._set(dev, "healing", sending=sending,
                  plan=[label(m["function"], m["index"], m["version"]) for m in steps])
        log.info("healer: sending %s to %s (%d bytes; then %s)", name, device_id, len(image),
                 ", ".join(label(m["function"], m["index"], m["version"]) for m in steps[1:]) or "nothing")

        def progress(done: int):
            with self._lock:
                if dev.sending is not None:
                    dev.sending["acknowledged"] = done

        try:
            self.ota.send(device_id, image, module, progress, timeout=self.send_timeout)
        except OtaError as e:
            with self._lock:
                dev.failures += 1
                failures = dev.failures
            reason = f"sending {name}: {e}"
            if failures >= MAX_FAILURES:
                reason += f" ({failures} attempts in a row; waiting for a change)"
            log.warning("healer: %s: %s", device_id, reason)
            self._park(dev, describe, "failed", reason, prints)
            return
        with self._lock:
            dev.awaiting = {"key": (module["function"], module["index"]), "version": module["version"],
                            "at": time.monotonic()}
            if dev.sending is not None:
                dev.sending["acknowledged"] = len(image)
                dev.sending["installing"] = True
        self._set(dev, "healing", sending=dev.sending)
