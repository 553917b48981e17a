"""The safe mode healer: when a device says it is in safe mode because a dependency is
missing, send it the system modules it lacks from the release catalog, one module per
update, and carry on from each describe it sends after its reset, until it runs its app.
For a device in a fleet it first sends the fleet's app, when the device does not run it.

plan() is the selection (pure, unit-tested): for each missing (function, index, minimum
version) the LOWEST released version for the device's platform that satisfies it, never a
prerelease unless the minimum is one (for a device in a fleet: never a prerelease unless
the fleet's release allows them), never a module the device rolled back, never a
downgrade of an installed module; the chosen modules' own dependencies are added the same
way, and the updates are ordered so that a module comes after those it depends on (system
part 1 before system part 2).

Healer keeps one state per device in memory (keyed by device id) and does all its work in
its own worker threads: on_describe() runs on paho's thread and only records the describe
and schedules an evaluation. States (status()): idle, updating (sending the fleet's app,
with `sending`), healing (with `sending`), blocked (with `reason`; not retried until the
catalog, the describe, the fleet's release or the rollbacks change), healed (the device
came back in normal mode), failed (with `reason`; retried on the next describe, at most
MAX_FAILURES times in a row)."""

import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from keel_cloud import module_format as mf
from keel_cloud import signatures
from keel_cloud.ota_sender import LeaseElsewhere, OtaError
from keel_cloud.releases import SCHEMA as RELEASES_SCHEMA, RELEASES_DIR, Catalog, version_key

log = logging.getLogger("keel.cloud.healer")

MAX_FAILURES = 3  # transfer errors in a row before the healer gives up (until something changes)
INSTALL_GRACE = 20.0  # s after `pending` during which a describe without the new module is ignored
RECHECK = 15.0  # s between looks at the catalog for blocked and failed devices
WORKERS = 8  # transfers to different devices at the same time


class HealError(Exception):
    """Nothing in the catalog satisfies a missing dependency."""


def image_dependencies(image: bytes) -> list[dict]:
    """The dependencies a module image's header lists: [{function, index, version}]
    (lib/module_format.py reads it, as everywhere else; ValueError when it cannot)."""
    return [mf.dependency_dict(d) for d in mf.parse_header(image).dependencies]


def is_prerelease(version: str | None) -> bool:
    return bool(version) and "-" in version


def label(function: str, index: int, version: str | None) -> str:
    return f"{function} {index} {version}"


# Selection

def plan(describe: dict, releases: list[dict], dependencies, prerelease: bool | None = None,
         rolled_back=()) -> list[dict]:
    """The updates that heal the device, in the order to send them: [{function, index,
    version, platform}]. releases: Catalog.releases(platform); dependencies(module) ->
    that released module's own dependencies. Raises HealError when a requirement has no
    satisfying release. Empty when nothing is missing (or all of it is installed).

    prerelease: None (a device in no fleet) allows a prerelease only when the minimum is
    one; False (its fleet's release was made without --allow-prerelease) never chooses
    one; True prefers what None would choose, else the lowest prerelease that satisfies.
    rolled_back: modules the device rolled back ({function, index, version, sha256 or
    None}), never chosen again."""
    platform = describe.get("platform")
    installed = {}
    for m in describe.get("modules") or []:
        if isinstance(m, dict) and m.get("valid", True) and m.get("version"):
            installed[(m.get("function"), m.get("index"))] = m["version"]
    offered: dict[tuple, dict] = {}  # (function, index) -> {version: sha256}
    for release in releases:
        if release.get("platform") not in (None, platform):
            continue
        for m in release.get("modules", []):
            offered.setdefault((m["function"], m["index"]), {})[m["version"]] = m.get("sha256")

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
            best = _choose(key, minimum, have, offered.get(key, {}), platform, prerelease, rolled_back)
            if chosen.get(key, {}).get("version") == best:
                continue
            module = {"function": key[0], "index": key[1], "version": best, "platform": platform}
            chosen[key] = module
            changed = True
            for dep in dependencies(module):
                if require(dep["function"], dep["index"], dep["version"]):
                    changed = True
    return _order(list(chosen.values()), dependencies)


def _choose(key, minimum, have, offered: dict, platform, prerelease, rolled_back) -> str:
    """The lowest offered version for one slot under the prerelease rule; HealError
    saying why there is none."""
    need = f"{key[0]} {key[1]}" + (f" >= {minimum}" if minimum else "")
    satisfying = sorted((v for v in offered
                         if (minimum is None or version_key(v) >= version_key(minimum))
                         and (have is None or version_key(v) > version_key(have))), key=version_key)
    undone = [r for v in satisfying if (r := _rolled_back(key, v, offered[v], rolled_back))]
    usable = [v for v in satisfying if not _rolled_back(key, v, offered[v], rolled_back)]
    if prerelease is False:  # a fleet whose release was made without --allow-prerelease
        usual = [v for v in usable if not is_prerelease(v)]
    else:
        usual = [v for v in usable if not is_prerelease(v) or is_prerelease(minimum)]
    if usual:
        return usual[0]
    if usable and prerelease:
        return usable[0]
    if usable and prerelease is False:
        raise HealError(f"{need} needs the prerelease {usable[0]}, which the fleet's release "
                        "does not allow (--allow-prerelease)")
    if undone:
        r = undone[0]
        raise HealError(f"{key[0]} {key[1]} {r['version']} was rolled back on this device "
                        f"({r.get('reason') or 'no reason given'}) and nothing else satisfies {need}")
    raise HealError(f"no release of {need} for {platform}")


def _rolled_back(key, version, sha256, rolled_back) -> dict | None:
    """The rollback record that rules this catalog module out for the device, if any."""
    for r in rolled_back:
        if (r.get("function"), r.get("index"), r.get("version")) == (key[0], key[1], version) \
                and (not r.get("sha256") or not sha256 or r["sha256"] == sha256):
            return r
    return None


def rollback_of(describe: dict) -> dict | None:
    """The describe's `rollback` ({function, index, version, restored, reason, and perhaps
    sha256}), checked; None when it has none or it is malformed."""
    r = describe.get("rollback") if isinstance(describe, dict) else None
    if not isinstance(r, dict) or not isinstance(r.get("function"), str) \
            or not isinstance(r.get("index"), int) or not isinstance(r.get("version"), str):
        return None
    out = {k: r.get(k) for k in ("function", "index", "version", "restored", "reason")}
    sha = r.get("sha256")
    out["sha256"] = sha.lower() if isinstance(sha, str) and len(sha) == 64 else None
    return out


# The fleet's app on the device

def installed_app(describe: dict) -> dict | None:
    """The user part as the describe lists it (valid or not), or None."""
    for m in describe.get("modules") or []:
        if isinstance(m, dict) and m.get("function") == "user-part":
            return m
    return None


def app_matches(module: dict | None, release: dict) -> bool:
    """Whether the installed user part is the release's app. By SHA-256 when the describe
    carries one (of the image file, or the digest in the image's suffix); else by what it
    does carry: version, size and dependencies must all be the release's."""
    if not module or not module.get("valid", True):
        return False
    sha = module.get("sha256")
    if isinstance(sha, str) and len(sha) == 64:
        return sha.lower() in (release.get("sha256"), release.get("digest"))
    deps = [(d.get("function"), d.get("index"), d.get("version"))
            for d in module.get("dependencies") or [] if isinstance(d, dict)]
    return (module.get("version") == release.get("version")
            and module.get("size") == release.get("size")
            and deps == [(d["function"], d["index"], d["version"]) for d in release.get("dependencies", [])])


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
        with registry.transaction() as run:
            run(RELEASES_SCHEMA)

    def close(self) -> None:  # the registry belongs to the service
        pass


# Per-device state

class _Device:
    def __init__(self):
        self.describe: dict | None = None
        self.seq = 0  # describes received, and pokes: reasons to look again
        self.online = True  # False after its last will: nothing is sent until it describes again
        self.described = False  # a describe came since the last look (it is online, then)
        self.busy = False  # an evaluation or a transfer is scheduled or running
        self.state = "idle"
        self.reason: str | None = None
        self.sending: dict | None = None
        self.plan: list[str] = []
        self.failures = 0
        self.healing = False  # the healer changed something since the device was last normal
        # {"key", "version", "at", "release"}: sent, waiting for its install ("release": the
        # fleet's app release, when the app was sent)
        self.awaiting: dict | None = None
        # (describe, catalog, fleet release and rollbacks) fingerprints a block/failure is for
        self.parked: tuple | None = None
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


def app_label(release: dict) -> str:
    return f"app {release['version']} (fleet {release['fleet']} release {release['number']})"


class Healer:
    """ota: the service's OtaSender; catalog: has releases(platform) and image(platform,
    function, index, version) (a Catalog), or None (the healer then only reports);
    fleets: has target(device_id) (the current app release of the device's fleet, or
    None), app_image(release) and rollbacks(device_id) (a fleets.Fleets), or None (no
    device is in a fleet)."""

    def __init__(self, ota, catalog, fleets=None, workers: int = WORKERS,
                 install_grace: float = INSTALL_GRACE, recheck: float = RECHECK,
                 send_timeout: float = 600.0, state_of=None):
        self.ota = ota
        # With several service instances, a device's describes and status reach any of
        # them: each look starts from the registry's (state_of(device_id) -> (describe or
        # None, online)), the latest committed by any instance.
        self.state_of = state_of
        self.catalog = catalog
        self.fleets = fleets
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

    # From paho's thread (and the service's): record and schedule, nothing more

    def on_describe(self, device_id: str, describe: dict, fresh: bool = True) -> None:
        """fresh: the device just sent it (so it is online); else read from the registry."""
        if not isinstance(describe, dict):
            return
        with self._lock:
            dev = self._devices.setdefault(device_id, _Device())
            dev.describe = describe
            dev.online = True
            dev.described = fresh
            dev.seq += 1
            if dev.busy:
                return  # the running worker looks at the new describe when it is done
            dev.busy = True
        self._submit(device_id)

    def on_offline(self, device_id: str) -> None:
        with self._lock:
            dev = self._devices.get(device_id)
            if dev is not None:
                dev.online = False

    def poke(self, device_id: str) -> None:
        """Decide again from the device's last describe: its fleet, or its fleet's
        release, changed, or (several instances) the instance that was sending it an update
        died. A device not heard from since the start waits for its describe, unless the
        registry has it (state_of)."""
        with self._lock:
            dev = self._devices.get(device_id)
        if dev is None and self.state_of is not None and not self._stop.is_set():
            describe, _ = self.state_of(device_id)
            if describe:
                self.on_describe(device_id, describe, fresh=False)  # (online: as the registry says)
            return
        with self._lock:
            if dev is None or self._stop.is_set():
                return
            dev.seq += 1
            if dev.busy:
                return  # the running worker goes round once more
            dev.busy = True
        self._submit(device_id)

    def status(self, device_id: str) -> dict:
        with self._lock:
            dev = self._devices.get(device_id)
            return dev.status() if dev else {"state": "idle"}

    def _timer_poke(self, device_id: str) -> None:
        """Evaluate the last describe again (a timer's), unless a worker is at it."""
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
                    seq = dev.seq
                try:
                    if self.state_of is not None:
                        latest, online = self.state_of(device_id)
                        with self._lock:
                            if latest:
                                # A describe that just came says it is online, whatever
                                # the registry says: its online status may have gone to
                                # another instance, not committed yet.
                                dev.describe = latest
                                dev.online = online or dev.described
                            dev.described = False
                    with self._lock:
                        describe = dev.describe
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

    def _signing_keys(self, device_id: str) -> list[bytes]:
        """The keys the device's fleet requires its modules to be signed by ([]: none)."""
        keys = getattr(self.fleets, "device_signing_keys", None)
        return keys(device_id) if keys else []

    def _target(self, device_id: str) -> dict | None:
        return self.fleets.target(device_id) if self.fleets is not None else None

    def _rolled_back(self, device_id: str, describe: dict) -> list[dict]:
        """What the device rolled back: as recorded, and as this describe says."""
        known = list(self.fleets.rollbacks(device_id)) if self.fleets is not None else []
        latest = rollback_of(describe)
        same = ("function", "index", "version")
        if latest and not any(all(r.get(k) == latest[k] for k in same) for r in known):
            known.append(latest)
        return known

    def _prints(self, device_id: str, describe: dict, release=None, rolled_back=None) -> tuple:
        """What a decision depends on: the describe, the catalog, the fleet's release and
        the rollbacks (a block or failure waits for one of them to change)."""
        if rolled_back is None:
            release, rolled_back = self._target(device_id), self._rolled_back(device_id, describe)
        keys = [k.hex() for k in self._signing_keys(device_id)]
        return (_fingerprint({k: describe.get(k) for k in ("modules", "missing", "mode", "trust")}),
                _fingerprint(self._releases(describe.get("platform"))),
                _fingerprint([release, rolled_back, keys]))

    def _evaluate(self, device_id: str, dev: _Device, describe: dict) -> None:
        if dev.awaiting and not self._install_settled(device_id, dev, describe):
            return
        release = self._target(device_id)
        mode, reason = describe.get("mode"), describe.get("safe_mode_reason")
        needs_app = release is not None and not app_matches(installed_app(describe), release)
        if not needs_app and (mode != "safe" or reason != "dependency"):
            return self._settled(device_id, dev, mode)
        if not dev.online:
            return  # its describe, when it is back, says where it stands

        rolled_back = self._rolled_back(device_id, describe)
        prints = self._prints(device_id, describe, release, rolled_back)
        if dev.state in ("blocked", "failed") and dev.parked == prints and (
                dev.state == "blocked" or dev.failures >= MAX_FAILURES):
            return  # nothing changed since it was given up
        if dev.parked and dev.parked != prints:
            dev.failures = 0  # something changed: a fresh run of attempts
        dev.parked = None

        if needs_app:  # the fleet's app first: what it needs is healed after
            return self._roll_out(device_id, dev, describe, release, prints)
        if self.catalog is None:
            return self._park(device_id, dev, describe, "blocked", "the healer has no release catalog", prints)
        try:
            steps = plan(describe, self._releases(describe.get("platform")), self._dependencies,
                         prerelease=release["allow_prerelease"] if release else None,
                         rolled_back=rolled_back)
        except HealError as e:
            log.warning("healer: %s is blocked: %s", device_id, e)
            return self._park(device_id, dev, describe, "blocked", str(e), prints)
        if not steps:
            missing = ", ".join(label(m.get("function"), m.get("index"), m.get("version"))
                                for m in describe.get("missing") or [])
            return self._park(device_id, dev, describe, "blocked",
                              f"nothing to send: the device misses {missing or 'nothing'} "
                              "but has every version the catalog offers", prints)
        labels = [label(m["function"], m["index"], m["version"]) for m in steps]
        if self.ota.busy(device_id):
            self._set(dev, "healing", reason="another update to the device is in progress", plan=labels)
            return  # its reset brings a new describe
        module = steps[0]
        image = self.catalog.image(module["platform"], module["function"], module["index"], module["version"])
        if image is None:
            return self._park(device_id, dev, describe, "blocked",
                              f"the catalog lost the image of {labels[0]}", prints)
        self._send(device_id, dev, describe, module, image, labels, prints, "healing")

    def _leases(self):
        return getattr(self.ota, "leases", None)

    def _release(self, device_id: str) -> None:
        """Done with the device for now: another instance may send it the next update."""
        leases = self._leases()
        if leases:
            leases.release(device_id)

    def _settled(self, device_id: str, dev: _Device, mode) -> None:
        """Nothing to send: the device runs (its fleet's app, if it has a fleet), or is in
        safe mode for a reason the healer cannot help with."""
        self._release(device_id)
        with self._lock:
            dev.parked = None
            dev.failures = 0
            healed = dev.healing and mode == "normal"
            if mode == "normal":
                dev.healing = False
        self._set(dev, "healed" if healed or (dev.state == "healed" and mode == "normal") else "idle",
                  plan=[])

    def _install_settled(self, device_id: str, dev: _Device, describe: dict) -> bool:
        """A module was sent: did this boot install it? False: wait (or given up)."""
        awaiting = dev.awaiting
        name = label(*awaiting["key"], awaiting["version"])
        if self._arrived(describe, awaiting):
            log.info("healer: %s installed %s", device_id, name)
            self._release(device_id)
            dev.awaiting = None
            dev.failures = 0
            return True
        rollback = rollback_of(describe)
        if rollback and (rollback["function"], rollback["index"], rollback["version"]) == \
                (*awaiting["key"], awaiting["version"]):
            # Installed, and undone by the bootloader: plan() will not choose it again.
            log.warning("healer: %s rolled back %s (%s)", device_id, name, rollback.get("reason"))
            self._release(device_id)
            dev.awaiting = None
            return True
        if time.monotonic() - awaiting["at"] < self.install_grace:
            # The describe from before the reset, or a slow install: look again later
            # (a device that rolled back says nothing more).
            left = self.install_grace - (time.monotonic() - awaiting["at"])
            timer = threading.Timer(left + 0.1, self._timer_poke, (device_id,))
            timer.daemon = True
            timer.start()
            return False
        self._release(device_id)
        dev.awaiting = None
        dev.failures += 1
        log.warning("healer: %s did not install %s", device_id, name)
        if dev.failures >= MAX_FAILURES:
            self._park(device_id, dev, describe, "failed",
                       f"the device did not install {name} ({dev.failures} attempts)")
            return False
        return True

    @staticmethod
    def _arrived(describe: dict, awaiting: dict) -> bool:
        if awaiting.get("release"):
            return app_matches(installed_app(describe), awaiting["release"])
        have = {(m.get("function"), m.get("index")): m.get("version")
                for m in describe.get("modules") or []
                if isinstance(m, dict) and m.get("valid", True)}.get(awaiting["key"])
        return have is not None and version_key(have) >= version_key(awaiting["version"])

    def _roll_out(self, device_id: str, dev: _Device, describe: dict, release: dict, prints) -> None:
        """Send the fleet's app to a member that does not run it (older, newer, or flashed
        by hand: the fleet's release is what its members run)."""
        name = app_label(release)
        platform = describe.get("platform")
        if platform and platform != release["platform"]:
            return self._park(device_id, dev, describe, "blocked", f"fleet '{release['fleet']}' is "
                              f"{release['platform']}, the device is {platform}", prints)
        if self.ota.busy(device_id):
            self._set(dev, "updating", reason="another update to the device is in progress", plan=[name])
            return  # its reset brings a new describe
        image = self.fleets.app_image(release)
        if image is None:
            return self._park(device_id, dev, describe, "blocked", f"the image of {name} is missing", prints)
        module = {"function": "user-part", "index": release["index"], "version": release["version"],
                  "platform": release["platform"]}
        self._send(device_id, dev, describe, module, image, [name], prints, "updating", release)

    def _park(self, device_id, dev, describe, state, reason, prints=None) -> None:
        self._release(device_id)
        dev.parked = prints or self._prints(device_id, describe)
        self._set(dev, state, reason=reason, plan=[])

    def _send(self, device_id, dev, describe, module, image, labels, prints, state, release=None) -> None:
        """One transfer, in this worker thread; then wait for the describe after the reset."""
        name = labels[0]
        refused = signatures.send_refusal(image, self._signing_keys(device_id), describe)
        if refused:  # it would be refused (docs/signing.md): say so, and wait for a change
            log.warning("healer: %s: not sending %s: %s", device_id, name, refused)
            return self._park(device_id, dev, describe, "blocked", f"not sending {name}: {refused}",
                              prints)
        sending = {"module": name, "size": len(image), "acknowledged": 0}
        with self._lock:
            if state == "healing":
                dev.healing = True
        self._set(dev, state, sending=sending, plan=labels)
        log.info("healer: sending %s to %s (%d bytes; then %s)", name, device_id, len(image),
                 ", ".join(labels[1:]) or "nothing")

        def progress(done: int):
            with self._lock:
                if dev.sending is not None:
                    dev.sending["acknowledged"] = done

        try:
            # (with several instances the lease stays held until the module is installed)
            self.ota.send(device_id, image, module, progress, timeout=self.send_timeout, keep_lease=True)
        except LeaseElsewhere as e:  # another instance got there first: its work
            log.info("healer: %s: %s", device_id, e)
            self._set(dev, state, reason=str(e), plan=labels)
            return
        except OtaError as e:
            with self._lock:
                dev.failures += 1
                failures = dev.failures
            reason = f"sending {name}: {e}"
            if failures >= MAX_FAILURES:
                reason += f" ({failures} attempts in a row; waiting for a change)"
            log.warning("healer: %s: %s", device_id, reason)
            self._park(device_id, dev, describe, "failed", reason, prints)
            return
        with self._lock:
            dev.awaiting = {"key": (module["function"], module["index"]), "version": module["version"],
                            "at": time.monotonic(), "release": release}
            if dev.sending is not None:
                dev.sending["acknowledged"] = len(image)
                dev.sending["installing"] = True
        self._set(dev, state, sending=dev.sending)
