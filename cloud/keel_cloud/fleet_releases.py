"""Fleet releases: `keel release app FILE --fleet NAME` makes an app image its fleet's
current app; the fleet service sends it to every member that does not run it (the
healer's rollout) and then heals each member to the system the app needs.

Fleets and their members are in the registry (registry.py). A release is a row of
`app_releases` in the registry's database: the fleet, a number counting up per fleet
(the highest is the fleet's current release), the app's version, size, dependencies, the
SHA-256 of the image file and the digest in the image's suffix, allow_prerelease and the
time. Images are stored once per content, as <cloud>/releases/apps/<sha256>.bin.

The image is parsed and checked (CRC, SHA-256, function) by the caller (the keel CLI,
which has the module format); here the release is checked against its fleet (platform)
and the system catalog: an app whose dependencies no catalogued system release satisfies,
or only a prerelease does while the release does not allow prereleases, is refused, so a
release that cannot be healed is never rolled out.

A fleet may require signed modules (`keel fleet require-signed NAME KEYFILE.pub…`, the
`fleet_signing` table): its releases, and the system parts they need from the catalog,
must then be signed by one of its keys (docs/signing.md), and the fleet service sends its
members nothing else."""

import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from keel_cloud import signatures
from keel_cloud.config import CloudDir, CloudError
from keel_cloud.healer import (HealError, app_matches, image_dependencies, installed_app, plan)
from keel_cloud.registry import Registry, RegistryError
from keel_cloud.releases import RELEASES_DIR

APPS_DIR = "apps"
SCHEMA = """CREATE TABLE IF NOT EXISTS app_releases (
    fleet VARCHAR(64) NOT NULL,
    number INTEGER NOT NULL,
    platform VARCHAR(32) NOT NULL,
    module_index INTEGER NOT NULL,
    version VARCHAR(32) NOT NULL,
    size INTEGER NOT NULL,
    sha256 VARCHAR(64) NOT NULL,
    digest VARCHAR(64) NOT NULL,
    dependencies TEXT NOT NULL,
    allow_prerelease INTEGER NOT NULL,
    file TEXT NOT NULL,
    released DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (fleet, number)
)"""
# The keys (raw Ed25519 public keys, hex, as JSON) a fleet's modules must be signed by;
# a fleet with no row takes unsigned modules.
SIGNING_SCHEMA = """CREATE TABLE IF NOT EXISTS fleet_signing (
    fleet VARCHAR(64) PRIMARY KEY,
    keys TEXT NOT NULL,
    updated DOUBLE PRECISION NOT NULL
)"""
_COLUMNS = ("fleet, number, platform, module_index, version, size, sha256, digest, dependencies, "
            "allow_prerelease, file, released")


@dataclass
class AppImage:
    """A checked user part image: what its header says, and its bytes."""

    version: str
    index: int
    platform: str
    dependencies: list[dict]  # [{function, index, version}]
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def digest(self) -> str:
        """The SHA-256 recorded in the image's suffix (what a device may report)."""
        return signatures.digest(self.data)


class Fleets:
    """App releases on a registry connection: the service's (Fleets(registry, path)), or
    one of its own for the CLI (Fleets.open(cloud_dir)). cloud_path: where the images
    are; None (a PostgreSQL registry without a cloud directory) still answers target()."""

    def __init__(self, registry: Registry, cloud_path: Path | None, owns_registry: bool = False):
        self.registry = registry
        self.root = Path(cloud_path) if cloud_path else None
        self._owns_registry = owns_registry
        with registry.transaction() as run:
            run(SCHEMA)
            run(SIGNING_SCHEMA)

    @classmethod
    def open(cls, cloud_dir: CloudDir) -> "Fleets":
        cloud_dir.require()
        config = cloud_dir.config()
        return cls(Registry(config.database or cloud_dir.registry_path), cloud_dir.path, owns_registry=True)

    def close(self) -> None:
        if self._owns_registry:
            self.registry.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Releasing

    def release(self, fleet_name: str, app: AppImage, allow_prerelease: bool, catalog) -> dict:
        """Make app the fleet's current release. Returns the release (release_dict keys)
        plus "already": True when it is the current release already (nothing changes).
        Raises CloudError, storing nothing, for a wrong platform or dependencies the
        catalog cannot satisfy under the prerelease rule."""
        fleet = self._fleet(fleet_name)
        if app.platform != fleet["platform"]:
            raise CloudError(f"the app is built for {app.platform}, fleet '{fleet_name}' is "
                             f"{fleet['platform']}")
        keys = self.signing_keys(fleet_name)
        reason = signatures.refusal(app.data, keys)
        if reason:
            raise CloudError(f"fleet '{fleet_name}' requires signed modules and the app is not "
                             f"one it takes: {signatures.refusal_text(reason, signatures.signed_by(app.data), keys)}")
        current = self.current(fleet_name)
        if current and current["sha256"] == app.sha256 and current["allow_prerelease"] == allow_prerelease:
            return current | {"already": True}
        check_dependencies(app, allow_prerelease, catalog, keys)

        relative = f"{RELEASES_DIR}/{APPS_DIR}/{app.sha256}.bin"
        path = self.root / relative
        written = not path.is_file()
        if written:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            tmp.write_bytes(app.data)
            tmp.replace(path)
        integrity_error = self.registry.integrity_error
        try:
            with self.registry.transaction() as run:
                number = (run("SELECT MAX(number) FROM app_releases WHERE fleet = ?",
                              (fleet_name,))[0][0] or 0) + 1
                run(f"INSERT INTO app_releases ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (fleet_name, number, app.platform, app.index, app.version, len(app.data), app.sha256,
                     app.digest, json.dumps(app.dependencies), 1 if allow_prerelease else 0, relative,
                     time.time()))
        except integrity_error:
            raise CloudError(f"another release to fleet '{fleet_name}' was made at the same time: "
                             "try again") from None
        except BaseException:
            if written and not self._file_used(relative):
                path.unlink(missing_ok=True)
            raise
        return self.current(fleet_name) | {"already": False}

    # Signatures

    def require_signed(self, fleet_name: str, keys: list[bytes]) -> None:
        """From now on the fleet takes only modules signed by one of keys (raw Ed25519
        public keys); [] lifts the requirement."""
        self._fleet(fleet_name)
        with self.registry.transaction() as run:
            run("DELETE FROM fleet_signing WHERE fleet = ?", (fleet_name,))
            if keys:
                run("INSERT INTO fleet_signing (fleet, keys, updated) VALUES (?, ?, ?)",
                    (fleet_name, json.dumps([k.hex() for k in keys]), time.time()))

    def signing_keys(self, fleet_name: str) -> list[bytes]:
        """The keys the fleet's modules must be signed by; [] when it takes unsigned ones."""
        rows = self.registry.query("SELECT keys FROM fleet_signing WHERE fleet = ?", (fleet_name,))
        return [bytes.fromhex(k) for k in json.loads(rows[0][0])] if rows else []

    def signing(self) -> dict[str, str]:
        """{fleet: its signing keys (as stored)} for every fleet that requires signatures."""
        return dict(self.registry.query("SELECT fleet, keys FROM fleet_signing"))

    def device_signing_keys(self, device_id: str) -> list[bytes]:
        """The keys modules sent to this device must be signed by (its fleet's)."""
        rows = self.registry.query(
            "SELECT s.keys FROM fleet_members m JOIN fleet_signing s ON s.fleet = m.fleet "
            "WHERE m.device_id = ?", (device_id,))
        return [bytes.fromhex(k) for k in json.loads(rows[0][0])] if rows else []

    def _fleet(self, name: str) -> dict:
        try:
            return self.registry.require_fleet(name)
        except RegistryError as e:
            raise CloudError(str(e)) from None

    def _file_used(self, relative: str) -> bool:
        return bool(self.registry.query("SELECT 1 FROM app_releases WHERE file = ?", (relative,)))

    # Reading

    def history(self, fleet_name: str) -> list[dict]:
        """The fleet's releases, newest first."""
        rows = self.registry.query(
            f"SELECT {_COLUMNS} FROM app_releases WHERE fleet = ? ORDER BY number DESC", (fleet_name,))
        return [release_dict(row) for row in rows]

    def current(self, fleet_name: str) -> dict | None:
        rows = self.registry.query(
            f"SELECT {_COLUMNS} FROM app_releases WHERE fleet = ? ORDER BY number DESC LIMIT 1",
            (fleet_name,))
        return release_dict(rows[0]) if rows else None

    def currents(self) -> dict[str, int]:
        """{fleet: its current release number}, for every fleet with a release."""
        return dict(self.registry.query("SELECT fleet, MAX(number) FROM app_releases GROUP BY fleet"))

    # What the healer asks

    def target(self, device_id: str) -> dict | None:
        """The current release of the device's fleet; None outside a fleet or before the
        fleet's first release."""
        columns = ", ".join(f"a.{c.strip()}" for c in _COLUMNS.split(","))
        rows = self.registry.query(
            f"SELECT {columns} FROM fleet_members m JOIN app_releases a ON a.fleet = m.fleet "
            "WHERE m.device_id = ? ORDER BY a.number DESC LIMIT 1", (device_id,))
        return release_dict(rows[0]) if rows else None

    def app_image(self, release: dict) -> bytes | None:
        if self.root is None:
            return None
        try:
            return (self.root / release["file"]).read_bytes()
        except OSError:
            return None

    def rollbacks(self, device_id: str) -> list[dict]:
        return self.registry.rollbacks(device_id)


def release_dict(row) -> dict:
    (fleet, number, platform, index, version, size, sha, digest, deps, allow, file, released) = row
    return {"fleet": fleet, "number": number, "platform": platform, "index": index,
            "version": version, "size": size, "sha256": sha, "digest": digest,
            "dependencies": json.loads(deps), "allow_prerelease": bool(allow), "file": file,
            "released": datetime.fromtimestamp(released, timezone.utc).isoformat(timespec="seconds")}


def check_dependencies(app: AppImage, allow_prerelease: bool, catalog,
                       keys: list[bytes] = ()) -> list[dict]:
    """What a device with no system would be sent for the app (plan()'s answer under the
    release's prerelease rule); CloudError when the catalog cannot satisfy it, or (keys:
    the fleet requires signed modules) when a module it would send is not signed by one
    of the keys."""
    describe = {"platform": app.platform, "modules": [], "missing": app.dependencies}

    def dependencies(module):
        image = catalog.image(module["platform"], module["function"], module["index"], module["version"])
        return image_dependencies(image) if image else []

    try:
        needed = plan(describe, catalog.releases(app.platform), dependencies, prerelease=allow_prerelease)
    except HealError as e:
        hint = " (register one with keel release system DIR first)" if str(e).startswith("no release") else ""
        raise CloudError(f"{e}{hint}") from None
    for module in needed if keys else ():
        image = catalog.image(module["platform"], module["function"], module["index"], module["version"])
        reason = signatures.refusal(image, list(keys)) if image else "missing"
        if reason:
            text = (signatures.refusal_text(reason, signatures.signed_by(image), list(keys))
                    if image else "its image is missing from the catalog")
            raise CloudError(f"the app needs {module['function']} {module['index']} "
                             f"{module['version']} from the catalog, and {text}: the fleet's "
                             "devices could not be healed")
    return needed


def member_state(device: dict, heal: dict, release: dict | None) -> dict:
    """Where a fleet member stands: {"state", and perhaps "reason", "sending", "plan"}.
    States: up to date, updating, healing, blocked, failed, safe mode, no release."""
    if release is None:
        return {"state": "no release"}
    describe = device.get("describe") or {}
    if not describe:
        return {"state": "updating", "reason": "never connected: gets the release when it does"}
    state = heal.get("state")
    if state in ("blocked", "failed", "updating", "healing"):
        return {k: heal[k] for k in ("state", "reason", "sending", "plan") if heal.get(k)}
    if not app_matches(installed_app(describe), release):
        if not device.get("online"):
            return {"state": "updating", "reason": "offline: gets the release when it connects"}
        return {"state": "updating"}
    if describe.get("mode") == "safe":
        if describe.get("safe_mode_reason") == "dependency":
            return {"state": "healing"}
        return {"state": "safe mode", "reason": describe.get("safe_mode_reason")}
    return {"state": "up to date"}
