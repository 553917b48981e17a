"""The release catalog: system releases (`keel release system DIR`) kept in the cloud
directory, whether or not the service runs.

Images are stored as <cloud>/releases/<platform>/<function>-<index>-<version>.bin; what
they are goes in the `release_modules` table of the registry's database (SQLite in the
cloud directory, or the PostgreSQL one `cloud.json` names), in the registry's portable
SQL. The images are parsed and checked (CRC, SHA-256) by the caller (the keel CLI, which
has the module format); the catalog checks the set (one platform, one release version),
refuses a module that was released before with other content, and stores nothing unless
all of it can be stored."""

import hashlib
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from keel_cloud import module_format as mf
from keel_cloud.config import CloudDir, CloudError
from keel_cloud.registry import Registry

RELEASES_DIR = "releases"
SCHEMA = """CREATE TABLE IF NOT EXISTS release_modules (
    platform VARCHAR(32) NOT NULL,
    release_version VARCHAR(32) NOT NULL,
    prerelease INTEGER NOT NULL,
    function VARCHAR(32) NOT NULL,
    module_index INTEGER NOT NULL,
    version VARCHAR(32) NOT NULL,
    size INTEGER NOT NULL,
    sha256 VARCHAR(64) NOT NULL,
    file TEXT NOT NULL,
    released DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (platform, release_version, function, module_index)
)"""
_COLUMNS = ("platform, release_version, prerelease, function, module_index, version, size, "
            "sha256, file, released")
_SAFE = re.compile(r"^[A-Za-z0-9._+-]+$")


@dataclass
class ReleaseModule:
    """One checked module image: what its header says, and its bytes."""

    function: str  # "bootloader", "system-part", …
    index: int
    version: str
    platform: str
    prerelease: bool
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def key(self) -> tuple:
        return (self.platform, self.function, self.index, self.version)

    @property
    def label(self) -> str:
        return f"{self.function} {self.index} {self.version}"

    @property
    def filename(self) -> str:
        return f"{self.function}-{self.index}-{self.version}.bin"


def version_key(version: str) -> int:
    """1.2.0-rc.1 < 1.2.0 < 1.10.0: the module format's own encoding, whose integers order
    as the versions do (lib/module_format.py); a malformed version sorts below all."""
    try:
        return mf.encode_version(version)
    except mf.FormatError:
        return -1


def release_version(modules: list[ReleaseModule]) -> tuple[str, bool]:
    """A system release is named by its system parts' version (the bootloader keeps its
    own); without system parts, by the highest version in it."""
    parts = [m for m in modules if m.function == "system-part"] or modules
    versions = {m.version for m in parts}
    if len(versions) > 1 and parts is not modules:
        raise CloudError(f"the system parts have different versions ({', '.join(sorted(versions))})")
    top = max(parts, key=lambda m: version_key(m.version))
    return top.version, top.prerelease


class Catalog:
    def __init__(self, cloud_dir: CloudDir):
        # Created on first use: a catalog serves `keel update` over USB with no cloud
        # running (the directory is the one `keel cloud serve` would create).
        if not cloud_dir.exists():
            cloud_dir.init()
        self.dir = cloud_dir
        config = cloud_dir.config()
        self.root = cloud_dir.path / RELEASES_DIR
        self.registry = Registry(config.database or cloud_dir.registry_path)
        with self.registry.transaction() as run:
            run(SCHEMA)

    def close(self) -> None:
        self.registry.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Adding

    def add(self, modules: list[ReleaseModule]) -> dict:
        """Register one release. Returns {"version", "platform", "prerelease", "added":
        [labels], "already": [labels]}; raises CloudError (nothing stored) when the set is
        not one release or conflicts with the catalog."""
        if not modules:
            raise CloudError("no module images to release")
        platforms = {m.platform for m in modules}
        if len(platforms) > 1:
            raise CloudError(f"the images are for different platforms ({', '.join(sorted(platforms))})")
        platform = platforms.pop()
        seen: dict[tuple, ReleaseModule] = {}
        for m in modules:
            for text in (m.platform, m.function, m.version):
                if not _SAFE.match(text or ""):
                    raise CloudError(f"{m.label}: '{text}' cannot name a release file")
            slot = (m.function, m.index)
            if slot in seen:
                raise CloudError(f"two images for {m.function} {m.index} "
                                 f"({seen[slot].version} and {m.version})")
            seen[slot] = m
        version, prerelease = release_version(modules)

        with self.registry.transaction() as run:
            new, already = self._check(run, platform, version, modules)
        written: list[Path] = []
        try:
            for m in new:
                path = self.root / platform / m.filename
                if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == m.sha256:
                    continue  # the same module, stored for an earlier release
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + f".tmp{os.getpid()}")
                tmp.write_bytes(m.data)
                tmp.replace(path)
                written.append(path)
            now = time.time()
            with self.registry.transaction() as run:
                new, already = self._check(run, platform, version, modules)  # again, under the lock
                for m in new:
                    run(
                        f"INSERT INTO release_modules ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (platform, version, 1 if prerelease else 0, m.function, m.index, m.version,
                         m.size, m.sha256, f"{RELEASES_DIR}/{platform}/{m.filename}", now),
                    )
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return {"version": version, "platform": platform, "prerelease": prerelease,
                "added": [m.label for m in new], "already": [m.label for m in already]}

    def _check(self, run, platform: str, version: str, modules: list[ReleaseModule]):
        """(modules to add, modules already in this release); CloudError on a conflict."""
        new, already = [], []
        for m in modules:
            rows = run(
                "SELECT release_version, sha256 FROM release_modules "
                "WHERE platform = ? AND function = ? AND module_index = ? AND version = ?",
                (platform, m.function, m.index, m.version),
            )
            for other_release, sha in rows:
                if sha != m.sha256:
                    raise CloudError(
                        f"{m.label} for {platform} was released before (in {other_release}) "
                        "with different content: give the module a new version"
                    )
            slot = run(
                "SELECT version, sha256 FROM release_modules WHERE platform = ? AND "
                "release_version = ? AND function = ? AND module_index = ?",
                (platform, version, m.function, m.index),
            )
            if slot and slot[0][1] == m.sha256:
                already.append(m)
            elif slot:
                raise CloudError(f"release {version} for {platform} already has "
                                 f"{m.function} {m.index} {slot[0][0]}")
            else:
                new.append(m)
        return new, already

    # Reading

    def releases(self, platform: str | None = None) -> list[dict]:
        """Newest version first: {version, platform, prerelease, modules: [{function,
        index, version, size, sha256}], released (ISO 8601, UTC)}."""
        sql = f"SELECT {_COLUMNS} FROM release_modules"
        args = []
        if platform:
            sql += " WHERE platform = ?"
            args.append(platform)
        groups: dict[tuple, dict] = {}
        for (plat, release, pre, function, index, version, size, sha, _file, released) in \
                self.registry.query(sql, args):
            entry = groups.setdefault((plat, release), {
                "version": release, "platform": plat, "prerelease": bool(pre),
                "modules": [], "released": released,
            })
            entry["released"] = min(entry["released"], released)
            entry["modules"].append({"function": function, "index": index, "version": version,
                                     "size": size, "sha256": sha})
        out = sorted(groups.values(), key=lambda r: (r["platform"], version_key(r["version"])))
        out.sort(key=lambda r: version_key(r["version"]), reverse=True)
        for entry in out:
            entry["modules"].sort(key=lambda m: (m["function"] != "bootloader", m["function"], m["index"]))
            entry["released"] = datetime.fromtimestamp(entry["released"], timezone.utc).isoformat(
                timespec="seconds")
        return out

    def image(self, platform: str, function: str, index: int, version: str) -> bytes | None:
        rows = self.registry.query(
            "SELECT file FROM release_modules WHERE platform = ? AND function = ? AND "
            "module_index = ? AND version = ?", (platform, function, index, version))
        return (self.dir.path / rows[0][0]).read_bytes() if rows else None
