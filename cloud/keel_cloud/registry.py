"""The device registry: devices, their last describe, online state, last seen, recent
events, fleets (a name and a platform; a device is in at most one) and the system parts
each device rolled back.

SQLite by default (a file in the cloud directory); a postgresql:// (or postgres://) URL
selects PostgreSQL instead, through psycopg 3. Both run the same SQL: the statements are
written once, with `?` placeholders (turned into psycopg's `%s`), in plain portable SQL;
only the events table's autoincrement key is declared per dialect."""

import json
import logging
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from keel_cloud import protocol

log = logging.getLogger("keel.cloud.registry")

# The only per-dialect SQL: how the events table's key counts up.
SEQ_KEY = {
    "sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "postgresql": "BIGSERIAL PRIMARY KEY",
}
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS devices (
        id VARCHAR(32) PRIMARY KEY,
        name VARCHAR(64) NOT NULL UNIQUE,
        platform VARCHAR(32),
        online INTEGER NOT NULL DEFAULT 0,
        last_seen DOUBLE PRECISION,
        describe TEXT,
        created DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS events (
        seq {seq_key},
        device_id VARCHAR(32) NOT NULL,
        name VARCHAR(64) NOT NULL,
        data TEXT,
        ts DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS events_by_device ON events (device_id, seq)",
    """CREATE TABLE IF NOT EXISTS fleets (
        name VARCHAR(64) PRIMARY KEY,
        platform VARCHAR(32) NOT NULL,
        created DOUBLE PRECISION NOT NULL
    )""",
    # Keyed by the device: a device is in at most one fleet.
    """CREATE TABLE IF NOT EXISTS fleet_members (
        device_id VARCHAR(32) PRIMARY KEY,
        fleet VARCHAR(64) NOT NULL,
        added DOUBLE PRECISION NOT NULL
    )""",
    # What a device's bootloader installed, saw fail to prove itself and undid: never
    # offered to that device again. sha256 is '' when the device did not say.
    """CREATE TABLE IF NOT EXISTS rollbacks (
        device_id VARCHAR(32) NOT NULL,
        function VARCHAR(32) NOT NULL,
        module_index INTEGER NOT NULL,
        version VARCHAR(32) NOT NULL,
        sha256 VARCHAR(64) NOT NULL,
        restored VARCHAR(32),
        reason VARCHAR(64),
        ts DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (device_id, function, module_index, version, sha256)
    )""",
    # Messages from a device that the protocol does not allow (keel_cloud.protocol): how
    # many were dropped, the last one's reason and when.
    # Fleet service instances sharing this registry (keel cloud serve --instance): each
    # writes its row at start and beats every few seconds.
    """CREATE TABLE IF NOT EXISTS instances (
        name VARCHAR(64) PRIMARY KEY,
        host VARCHAR(255),
        pid INTEGER,
        http VARCHAR(255),
        started DOUBLE PRECISION NOT NULL,
        beat DOUBLE PRECISION NOT NULL
    )""",
    # An update being sent to a device, and which instance sends it: one at a time per
    # device, taken over when the owner stops renewing it (keel_cloud.leases).
    """CREATE TABLE IF NOT EXISTS leases (
        device_id VARCHAR(32) PRIMARY KEY,
        owner VARCHAR(64) NOT NULL,
        work VARCHAR(200),
        expires DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS dropped_messages (
        device_id VARCHAR(32) PRIMARY KEY,
        count BIGINT NOT NULL,
        reason VARCHAR(200) NOT NULL,
        ts DOUBLE PRECISION NOT NULL
    )""",
)
KEEP_EVENTS = 1000  # per device
EVENT_LOCK = 0x4B45454C  # PostgreSQL advisory lock taken to number events ("KEEL")
MAX_ID, MAX_NAME, MAX_PLATFORM, MAX_REASON = 32, 64, 32, 200  # the column widths above
CONNECT_TIMEOUT = 10  # seconds, unless the URL says otherwise
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_DEVICE_COLUMNS = "d.id, d.name, d.platform, d.online, d.last_seen, d.describe, m.fleet"
_DEVICES = "devices d LEFT JOIN fleet_members m ON m.device_id = d.id"
_FLEET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RegistryError(Exception):
    pass


class Write(NamedTuple):
    """One message's change to the registry (Registry.write_batch)."""
    kind: str
    device_id: str
    value: object
    ts: float


class Registry:
    """One connection shared by the service's threads, behind a lock."""

    def __init__(self, path: Path | str):
        self._lock = threading.Lock()
        url = _URL.match(str(path))
        if url and url.group(1).lower() in ("postgres", "postgresql"):
            self.dialect = "postgresql"
            self.path = None
            self.url = str(path)
            self.where = _redact(self.url)
            self._pg = _import_psycopg()
            self._db = self._connect_postgresql()
        elif url:
            raise RegistryError(
                f"unsupported database '{_redact(str(path))}': use a postgresql:// URL, "
                "or no database for the SQLite registry in the cloud directory"
            )
        else:
            self.dialect = "sqlite"
            self.path = Path(path)
            self.url = None
            self.where = str(self.path)
            self._pg = None
            try:
                self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
                self._db.execute("PRAGMA journal_mode=WAL")
                # With WAL, NORMAL syncs at checkpoints rather than at every commit: a
                # commit stays atomic and the database consistent; a power loss (not a
                # crash of the process) may undo the last commits before a checkpoint.
                self._db.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as e:
                raise RegistryError(f"cannot open the registry {self.path}: {_one_line(e)}") from None
        try:
            with self.transaction() as run:
                for statement in SCHEMA:
                    run(statement.format(seq_key=SEQ_KEY[self.dialect]))
        except (sqlite3.Error, *((self._pg.Error,) if self._pg else ())) as e:
            self._db.close()
            raise RegistryError(f"cannot set up the registry at {self.where}: {self._message(e)}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # The connection

    def _connect_postgresql(self):
        pg = self._pg
        try:
            options = pg.conninfo.conninfo_to_dict(self.url)
        except pg.Error as e:
            raise RegistryError(f"invalid database URL '{self.where}': {self._message(e)}") from None
        extra = {} if "connect_timeout" in options else {"connect_timeout": CONNECT_TIMEOUT}
        try:
            return pg.connect(self.url, autocommit=True, **extra)
        except pg.Error as e:
            raise RegistryError(
                f"cannot connect to the PostgreSQL registry at {self.where}: {self._message(e)}"
            ) from None

    def _message(self, error: Exception) -> str:
        """The error on one line, without the URL's password (libpq may quote the URL)."""
        text = _one_line(error)
        return text.replace(self.url, self.where) if self.url else text

    def _run(self, sql: str, args=()) -> list[tuple]:
        """One statement on the connection (the lock held); the rows it returns."""
        if self._pg:
            sql = sql.replace("%", "%%").replace("?", "%s")
        cursor = self._db.execute(sql, tuple(args))
        return cursor.fetchall() if cursor.description is not None else []

    @contextmanager
    def transaction(self, atomic: bool = True):
        """Holds the lock; yields run(sql, args). With atomic, the statements run in one
        transaction, rolled back if the block raises."""
        with self._lock:
            if not self._pg:
                with self._db:  # commits, or rolls back on an exception
                    yield self._run
                return
            if self._db.broken:  # the server went away since: try a new connection
                self._db = self._connect_postgresql()
            try:
                if atomic:
                    with self._db.transaction():
                        yield self._run
                else:
                    yield self._run
            except self._pg.OperationalError as e:
                raise RegistryError(
                    f"the PostgreSQL registry at {self.where} failed: {self._message(e)}"
                ) from None

    def query(self, sql: str, args=()) -> list[tuple]:
        """One statement outside a transaction of its own (? placeholders on both
        databases); its rows. transaction() and query() are for the modules that keep
        their own tables in the registry's database (releases, fleets, the healer)."""
        with self.transaction(atomic=False) as run:
            return run(sql, args)

    def is_transient(self, error: Exception) -> bool:
        """Whether a driver's error is the database's (locked, restarting, unreachable),
        which may pass, rather than the statement's."""
        return isinstance(error, sqlite3.OperationalError) or bool(
            self._pg and isinstance(error, self._pg.OperationalError))

    @property
    def integrity_error(self) -> type:
        """The database driver's error for a broken constraint (a duplicate key)."""
        return self._pg.IntegrityError if self._pg else sqlite3.IntegrityError

    # Devices

    def name_taken(self, name: str, device_id: str) -> str | None:
        """The id of another device that has this name, or None."""
        rows = self.query("SELECT id FROM devices WHERE name = ? AND id <> ?", (name, device_id))
        return rows[0][0] if rows else None

    def add_device(self, device_id: str, name: str, platform: str | None = None) -> None:
        if not 0 < len(device_id) <= MAX_ID:
            raise RegistryError(f"a device id has 1 to {MAX_ID} characters, not '{device_id}'")
        if not 0 < len(name) <= MAX_NAME:
            raise RegistryError(f"a device name has 1 to {MAX_NAME} characters, not '{name}'")
        platform = _text(platform, MAX_PLATFORM)
        integrity_error = self.integrity_error
        try:
            with self.transaction() as run:
                for (other,) in run("SELECT id FROM devices WHERE name = ?", (name,)):
                    if other != device_id:
                        raise RegistryError(f"the name '{name}' is taken by device {other}")
                if run("SELECT id FROM devices WHERE id = ?", (device_id,)):
                    run(
                        "UPDATE devices SET name = ?, platform = COALESCE(?, platform) WHERE id = ?",
                        (name, platform, device_id),
                    )
                else:
                    run(
                        "INSERT INTO devices (id, name, platform, online, created) "
                        "VALUES (?, ?, ?, 0, ?)",
                        (device_id, name, platform, time.time()),
                    )
        except integrity_error:  # another process took the name meanwhile
            raise RegistryError(f"the name '{name}' is taken by another device") from None

    # One message from a device: what write_batch does for each of a batch (the fleet
    # service writes batches; these are for one write at a time, e.g. from a script)

    def _write_one(self, kind: str, device_id: str, value=None):
        return self.write_batch([Write(kind, device_id, value, time.time())])[0]

    def set_online(self, device_id: str, online: bool) -> None:
        self._write_one("status", device_id, online)

    def set_describe(self, device_id: str, describe: dict) -> None:
        """Store a describe; it must be one the protocol allows (protocol.Invalid if not:
        only what validated is stored)."""
        self._write_one("describe", device_id, (describe, None))

    def count_drop(self, device_id: str, reason: str) -> int:
        """One more message from the device dropped, for reason; also sets last_seen (it
        was heard from). Returns the device's count of dropped messages."""
        return self._write_one("drop", device_id, reason)

    @staticmethod
    def _count_drop(run, device_id: str, reason: str, now: float) -> int:
        reason = _text(reason, MAX_REASON)
        rows = run("SELECT count FROM dropped_messages WHERE device_id = ?", (device_id,))
        if rows:
            count = rows[0][0] + 1
            run("UPDATE dropped_messages SET count = ?, reason = ?, ts = ? WHERE device_id = ?",
                (count, reason, now, device_id))
        else:
            count = 1
            run("INSERT INTO dropped_messages (device_id, count, reason, ts) VALUES (?, ?, ?, ?)",
                (device_id, count, reason, now))
        return count

    def drops(self, device_id: str) -> dict:
        """{"count", "reason", "ts"} of the messages dropped from the device (count 0,
        reason and ts None, when there were none)."""
        rows = self.query("SELECT count, reason, ts FROM dropped_messages WHERE device_id = ?",
                           (device_id,))
        if not rows:
            return {"count": 0, "reason": None, "ts": None}
        count, reason, ts = rows[0]
        return {"count": count, "reason": reason, "ts": ts}

    def set_all_offline(self) -> None:
        """Every device offline (a broker that starts anew has no connections)."""
        self.query("UPDATE devices SET online = 0")

    def write_batch(self, writes: list) -> list:
        """What devices sent, in order, in one transaction (the fleet service's ingest):
        writes are Write(kind, device_id, value, ts) with kind one of status (value: bool),
        describe ((a describe, the rollback it reports or None: healer.rollback_of)),
        event ((name, data)), seen and drop (value: the reason). Returns one result per write: None for a device the registry does not
        know (nothing written); last_seen of every device heard from is the commit's time;
        for an event {"seq", "device", "id", "name", "data",
        "ts"}; for a describe, the rollback it reports when that is new, else False; for
        a drop the device's count of dropped messages; else True.

        Events take their sequence numbers under a lock held to the commit (PostgreSQL:
        an advisory lock), so numbers become visible in order even with several service
        instances writing: a reader going by `seq > last` misses none."""
        # In device order (a device's own writes keep theirs): instances writing the same
        # devices' rows (statuses and describes go to each) then lock them in one order,
        # and wait for each other instead of deadlocking.
        order = sorted(range(len(writes)), key=lambda i: writes[i].device_id)
        results = self._write_sorted([writes[i] for i in order])
        out = [None] * len(writes)
        for position, result in zip(order, results):
            out[position] = result
        return out

    def _write_sorted(self, writes: list) -> list:
        with self.transaction() as run:
            ids = sorted({w.device_id for w in writes})
            names = {}
            for start in range(0, len(ids), 500):
                part = ids[start:start + 500]
                marks = ", ".join("?" * len(part))
                names.update(run(f"SELECT id, name FROM devices WHERE id IN ({marks})", part))
            if any(w.kind == "event" for w in writes):
                self._lock_events(run)
            results, last_seen, trim = [], {}, set()
            for w in writes:
                device_id = w.device_id
                if device_id not in names:
                    results.append(None)
                    continue
                last_seen[device_id] = True
                if w.kind == "status":
                    run("UPDATE devices SET online = ? WHERE id = ?", (1 if w.value else 0, device_id))
                    results.append(True)
                elif w.kind == "describe":
                    describe, rollback = w.value
                    protocol.check_describe(describe)
                    run("UPDATE devices SET describe = ?, platform = ? WHERE id = ?",
                        (json.dumps(describe), _text(describe.get("platform"), MAX_PLATFORM),
                         device_id))
                    results.append(self._add_rollback(run, device_id, rollback, w.ts))
                elif w.kind == "event":
                    name, data = w.value
                    name, data = _text(name, MAX_NAME), _text(data)
                    seq = self._insert_event(run, device_id, name, data, w.ts)
                    trim.add(device_id)
                    results.append({"seq": seq, "device": names[device_id], "id": device_id,
                                    "name": name, "data": data, "ts": w.ts})
                elif w.kind == "drop":
                    results.append(self._count_drop(run, device_id, w.value, w.ts))
                else:  # seen
                    results.append(True)
            # last_seen: when the registry learned it (the commit's time, not the
            # message's: what a reader sees is then never dated before it was there).
            now = time.time()
            for device_id in last_seen:
                run("UPDATE devices SET last_seen = ? WHERE id = ?", (now, device_id))
            for device_id in trim:
                self._trim_events(run, device_id)
        return results

    def seen(self, device_id: str) -> None:
        """last_seen = now (every write sets it too)."""
        self._write_one("seen", device_id)

    def known(self, device_id: str) -> bool:
        return bool(self.query("SELECT 1 FROM devices WHERE id = ?", (device_id,)))

    def devices(self) -> list[dict]:
        rows = self.query(f"SELECT {_DEVICE_COLUMNS} FROM {_DEVICES}")
        # Sorted here, by code point: a database's collation may order names otherwise.
        return [_device(row) for row in sorted(rows, key=lambda row: row[1])]

    def device(self, name_or_id: str) -> dict | None:
        rows = self.query(
            f"SELECT {_DEVICE_COLUMNS} FROM {_DEVICES} WHERE d.name = ? OR d.id = ? "
            "ORDER BY CASE WHEN d.name = ? THEN 0 ELSE 1 END",  # a name before an id
            (name_or_id, name_or_id, name_or_id),
        )
        return _device(rows[0]) if rows else None

    # Fleets

    def create_fleet(self, name: str, platform: str) -> None:
        if not _FLEET_NAME.match(name or ""):
            raise RegistryError(f"invalid fleet name '{name}' (letters, digits, '.', '_', '-'; "
                                f"at most {MAX_NAME}; a letter or digit first)")
        if not 0 < len(platform or "") <= MAX_PLATFORM:
            raise RegistryError(f"a platform has 1 to {MAX_PLATFORM} characters, not '{platform}'")
        integrity_error = self.integrity_error
        try:
            with self.transaction() as run:
                for (other,) in run("SELECT platform FROM fleets WHERE name = ?", (name,)):
                    raise RegistryError(f"fleet '{name}' exists already (platform {other})")
                run("INSERT INTO fleets (name, platform, created) VALUES (?, ?, ?)",
                    (name, platform, time.time()))
        except integrity_error:  # another process made it meanwhile
            raise RegistryError(f"fleet '{name}' exists already") from None

    def fleet(self, name: str) -> dict | None:
        rows = self.query(
            "SELECT f.name, f.platform, f.created, COUNT(m.device_id) FROM fleets f "
            "LEFT JOIN fleet_members m ON m.fleet = f.name WHERE f.name = ? "
            "GROUP BY f.name, f.platform, f.created", (name,))
        return _fleet(rows[0]) if rows else None

    def fleets(self) -> list[dict]:
        rows = self.query(
            "SELECT f.name, f.platform, f.created, COUNT(m.device_id) FROM fleets f "
            "LEFT JOIN fleet_members m ON m.fleet = f.name GROUP BY f.name, f.platform, f.created")
        return [_fleet(row) for row in sorted(rows, key=lambda row: row[0])]

    def require_fleet(self, name: str) -> dict:
        fleet = self.fleet(name)
        if fleet is None:
            known = ", ".join(f["name"] for f in self.fleets()) or "none yet: keel fleet create"
            raise RegistryError(f"no fleet '{name}' (fleets: {known})")
        return fleet

    def fleet_devices(self, name: str) -> list[dict]:
        rows = self.query(f"SELECT {_DEVICE_COLUMNS} FROM {_DEVICES} WHERE m.fleet = ?", (name,))
        return [_device(row) for row in sorted(rows, key=lambda row: row[1])]

    def memberships(self) -> dict[str, str]:
        """{device id: fleet name} for every device in a fleet."""
        return dict(self.query("SELECT device_id, fleet FROM fleet_members"))

    def add_to_fleet(self, name: str, devices: list[str]) -> dict:
        """Put devices (names or ids) in the fleet: all of them or, on an error, none.
        Returns {"added": [names], "already": [names]}."""
        with self.transaction() as run:
            fleet = self._fleet_in(run, name)
            found = [self._device_in(run, d) for d in devices]
            added, already = [], []
            for device_id, device_name, platform, current in found:
                if current == name:
                    already.append(device_name)
                    continue
                if current is not None:
                    raise RegistryError(f"device '{device_name}' is in fleet '{current}': "
                                        f"keel fleet remove {current} {device_name} first")
                if platform and platform != fleet["platform"]:
                    raise RegistryError(f"device '{device_name}' is {platform}, fleet '{name}' is "
                                        f"{fleet['platform']}: it cannot run the fleet's app")
                run("INSERT INTO fleet_members (device_id, fleet, added) VALUES (?, ?, ?)",
                    (device_id, name, time.time()))
                added.append(device_name)
        return {"added": added, "already": already}

    def remove_from_fleet(self, name: str, devices: list[str]) -> list[str]:
        """Take devices out of the fleet (all of them or, on an error, none); their names."""
        with self.transaction() as run:
            self._fleet_in(run, name)
            found = [self._device_in(run, d) for d in devices]
            for _, device_name, _, current in found:
                if current != name:
                    where = f"in fleet '{current}'" if current else "in no fleet"
                    raise RegistryError(f"device '{device_name}' is not in fleet '{name}' ({where})")
            for device_id, _, _, _ in found:
                run("DELETE FROM fleet_members WHERE device_id = ?", (device_id,))
        return [device_name for _, device_name, _, _ in found]

    def _fleet_in(self, run, name: str) -> dict:
        rows = run("SELECT name, platform FROM fleets WHERE name = ?", (name,))
        if not rows:
            raise RegistryError(f"no fleet '{name}' (make it with keel fleet create {name} --platform P)")
        return {"name": rows[0][0], "platform": rows[0][1]}

    def _device_in(self, run, name_or_id: str) -> tuple:
        """(id, name, platform, fleet) of a device, by name (first) or id."""
        rows = run(
            "SELECT d.id, d.name, d.platform, m.fleet FROM devices d "
            "LEFT JOIN fleet_members m ON m.device_id = d.id WHERE d.name = ? OR d.id = ? "
            "ORDER BY CASE WHEN d.name = ? THEN 0 ELSE 1 END", (name_or_id, name_or_id, name_or_id))
        if not rows:
            raise RegistryError(f"no device '{name_or_id}' (provision it with keel device provision)")
        return rows[0]

    # Rollbacks

    def add_rollback(self, device_id: str, rollback: dict) -> bool:
        """Record a rollback a device reported (its describe's `rollback`); False when it
        was known already (a device reports it on every describe)."""
        with self.transaction() as run:
            return bool(self._add_rollback(run, device_id, rollback, time.time()))

    @staticmethod
    def _add_rollback(run, device_id: str, rollback, now: float):
        """The rollback, checked (healer.rollback_of's fields), when it is new and now
        recorded; False when there is none or it was known."""
        if not isinstance(rollback, dict) or not isinstance(rollback.get("function"), str) \
                or not isinstance(rollback.get("index"), int) \
                or not isinstance(rollback.get("version"), str):
            return False
        key = (device_id, _text(rollback.get("function"), 32), int(rollback.get("index") or 0),
               _text(rollback.get("version"), 32), _text(rollback.get("sha256") or "", 64))
        if run("SELECT 1 FROM rollbacks WHERE device_id = ? AND function = ? AND "
               "module_index = ? AND version = ? AND sha256 = ?", key):
            return False
        run("INSERT INTO rollbacks (device_id, function, module_index, version, sha256, "
            "restored, reason, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (*key, _text(rollback.get("restored"), 32), _text(rollback.get("reason"), 64), now))
        return rollback

    def rollbacks(self, device_id: str) -> list[dict]:
        """Oldest first: {function, index, version, sha256 (None if unknown), restored,
        reason, ts}."""
        rows = self.query(
            "SELECT function, module_index, version, sha256, restored, reason, ts FROM rollbacks "
            "WHERE device_id = ? ORDER BY ts", (device_id,))
        return [{"function": f, "index": i, "version": v, "sha256": sha or None, "restored": r,
                 "reason": why, "ts": ts} for f, i, v, sha, r, why, ts in rows]

    # Events

    def add_event(self, device_id: str, name: str, data: str | None) -> int:
        """Stores the event and sets the device's last_seen to its time, in one
        transaction (write_batch sets the commit's time instead)."""
        now = time.time()
        with self.transaction() as run:
            self._lock_events(run)
            seq = self._insert_event(run, device_id, _text(name, MAX_NAME), _text(data), now)
            run("UPDATE devices SET last_seen = ? WHERE id = ?", (now, device_id))
            self._trim_events(run, device_id)
        return seq

    def _lock_events(self, run) -> None:
        """Before a transaction numbers events: the lock is held to its commit, so
        numbers become visible in order (PostgreSQL; SQLite has one writer at a time)."""
        if self._pg:
            run("SELECT pg_advisory_xact_lock(?)", (EVENT_LOCK,))

    @staticmethod
    def _insert_event(run, device_id: str, name: str, data: str | None, ts: float) -> int:
        return run("INSERT INTO events (device_id, name, data, ts) VALUES (?, ?, ?, ?) RETURNING seq",
                   (device_id, name, data, ts))[0][0]

    @staticmethod
    def _trim_events(run, device_id: str) -> None:
        # The device's last KEEP_EVENTS stay (counted: other devices' events take
        # sequence numbers in between).
        run(
            "DELETE FROM events WHERE device_id = ? AND seq <= ("
            "SELECT seq FROM events WHERE device_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (device_id, device_id, KEEP_EVENTS),
        )

    def events(self, after: int = 0, device_id: str | None = None, limit: int = 100) -> list[dict]:
        sql = (
            "SELECT e.seq, d.name, e.device_id, e.name, e.data, e.ts FROM events e "
            "JOIN devices d ON d.id = e.device_id WHERE e.seq > ?"
        )
        args: list = [after]
        if device_id:
            sql += " AND e.device_id = ?"
            args.append(device_id)
        sql += " ORDER BY e.seq LIMIT ?"
        args.append(limit)
        return [
            {"seq": r[0], "device": r[1], "id": r[2], "name": r[3], "data": r[4], "ts": r[5]}
            for r in self.query(sql, args)
        ]

    def last_event_seq(self) -> int:
        rows = self.query("SELECT MAX(seq) FROM events")
        return rows[0][0] or 0


    # Instances and leases (several fleet service instances: keel_cloud.leases)

    def beat(self, instance: dict, ttl: float) -> set[str]:
        """The instance is alive: its row written, and its leases renewed for ttl s.
        Returns the devices whose leases it holds."""
        now = time.time()
        with self.transaction() as run:
            if run("SELECT 1 FROM instances WHERE name = ?", (instance["name"],)):
                run("UPDATE instances SET host = ?, pid = ?, http = ?, started = ?, beat = ? "
                    "WHERE name = ?", (instance.get("host"), instance.get("pid"), instance.get("http"),
                                       instance["started"], now, instance["name"]))
            else:
                run("INSERT INTO instances (name, host, pid, http, started, beat) VALUES "
                    "(?, ?, ?, ?, ?, ?)", (instance["name"], instance.get("host"), instance.get("pid"),
                                           instance.get("http"), instance["started"], now))
            # (a lease that expired already is not revived: another instance may be taking it)
            run("UPDATE leases SET expires = ? WHERE owner = ? AND expires >= ?",
                (now + ttl, instance["name"], now))
            return {d for (d,) in run("SELECT device_id FROM leases WHERE owner = ? AND expires >= ?",
                                      (instance["name"], now))}

    def instances(self) -> list[dict]:
        rows = self.query("SELECT name, host, pid, http, started, beat FROM instances ORDER BY name")
        return [{"name": n, "host": h, "pid": p, "http": u, "started": s, "beat": b}
                for n, h, p, u, s, b in rows]

    def forget_instance(self, name: str, started: float | None = None) -> None:
        """A stopped instance: its row goes and its leases expire now (the next sweep of
        another instance takes its work over). With started: only that life of it (not
        the instance if it started again meanwhile)."""
        with self.transaction() as run:
            if started is not None and not run(
                    "SELECT 1 FROM instances WHERE name = ? AND started = ?", (name, started)):
                return
            run("UPDATE leases SET expires = 0 WHERE owner = ?", (name,))
            run("DELETE FROM instances WHERE name = ?", (name,))

    def claim_dead_instances(self, me: str, ttl: float) -> list[tuple[str, float]]:
        """Instances that stopped beating more than ttl s ago, claimed by `me` (to take up
        their MQTT sessions, keel_cloud.adopt): their beat is moved to now, so no other
        instance claims them while `me` holds them (hold_instance). [(name, started)]"""
        now = time.time()
        return [tuple(r) for r in self.query(
            "UPDATE instances SET beat = ? WHERE name <> ? AND beat < ? RETURNING name, started",
            (now, me, now - ttl))]

    def hold_instance(self, name: str, started: float) -> bool:
        """Keep a claimed dead instance claimed; False when it has started again (or is
        forgotten)."""
        return bool(self.query("UPDATE instances SET beat = ? WHERE name = ? AND started = ? "
                                "RETURNING name", (time.time(), name, started)))

    def take_lease(self, device_id: str, owner: str, ttl: float, work: str) -> str:
        """The device's lease for owner, if it is free, expired or owner's already: returns
        the owner after the attempt (owner itself when it got it)."""
        now = time.time()
        with self.transaction() as run:
            run("INSERT INTO leases (device_id, owner, work, expires) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET owner = excluded.owner, work = excluded.work, "
                "expires = excluded.expires WHERE leases.owner = excluded.owner OR leases.expires < ?",
                (device_id, owner, _text(work, 200), now + ttl, now))
            return run("SELECT owner FROM leases WHERE device_id = ?", (device_id,))[0][0]

    def lease(self, device_id: str) -> dict | None:
        rows = self.query("SELECT owner, work, expires FROM leases WHERE device_id = ?", (device_id,))
        return {"owner": rows[0][0], "work": rows[0][1], "expires": rows[0][2]} if rows else None

    def lease_owners(self) -> dict[str, str]:
        """{device id: owner} of the leases not expired."""
        return dict(self.query("SELECT device_id, owner FROM leases WHERE expires >= ?", (time.time(),)))

    def release_lease(self, device_id: str, owner: str) -> None:
        self.query("DELETE FROM leases WHERE device_id = ? AND owner = ?", (device_id, owner))

    def expired_leases(self) -> list[tuple[str, str]]:
        """Leases whose owner stopped renewing them, removed (by one instance only: it
        gets them): [(device id, owner)]."""
        return [tuple(r) for r in self.query(
            "DELETE FROM leases WHERE expires < ? RETURNING device_id, owner", (time.time(),))]

    def state_of(self, device_id: str) -> tuple[dict | None, bool]:
        """(the device's stored describe, or None when there is none or it is unusable;
        whether it is online)."""
        rows = self.query("SELECT describe, online FROM devices WHERE id = ?", (device_id,))
        if not rows:
            return None, False
        describe, _ = stored_describe(rows[0][0])
        return describe or None, bool(rows[0][1])


def _device(row) -> dict:
    device_id, name, platform, online, last_seen, stored, fleet = row
    describe, describe_error = stored_describe(stored)
    if describe_error:
        log.warning("device %s: its stored describe is unusable (%s): treated as unknown",
                    device_id, describe_error)
    system = [m for m in describe.get("modules") or []
              if m.get("function") == "system-part" and m.get("index") == 1]
    return {
        "name": name,
        "id": device_id,
        "platform": platform,
        "online": bool(online),
        "mode": describe.get("mode"),
        "system_version": system[0].get("version") if system else None,
        "last_seen": last_seen,
        "describe": describe,
        # Why the stored describe was not used (None when it was, or there is none).
        "describe_error": describe_error,
        "fleet": fleet,
    }


def stored_describe(stored) -> tuple[dict, str | None]:
    """(describe, None) for a stored describe the protocol allows, else ({}, why): a row
    written by an older version or by hand is treated as unknown, never raised."""
    if not stored:
        return {}, None
    try:
        text = stored if isinstance(stored, bytes) else str(stored).encode("utf-8", "replace")
        return protocol.parse_describe(text), None
    except protocol.Invalid as e:
        return {}, str(e)


def _fleet(row) -> dict:
    name, platform, created, members = row
    return {"name": name, "platform": platform, "created": created, "members": members}


def _text(value, limit: int | None = None) -> str | None:
    """What a device sent, as text both databases store alike: PostgreSQL refuses NUL
    characters and strings wider than their column, SQLite would keep them."""
    if value is None:
        return None
    text = (value if isinstance(value, str) else str(value)).replace("\x00", "\ufffd")
    return text[:limit] if limit else text


def _import_psycopg():
    try:
        import psycopg
        import psycopg.conninfo
    except ImportError:
        raise RegistryError(
            "a PostgreSQL registry needs psycopg, which is not installed "
            "(pip install psycopg psycopg-binary, or make setup)"
        ) from None
    return psycopg


def _redact(url: str) -> str:
    """The URL without its password (for messages)."""
    url = re.sub(r"(?i)(password=)[^&]*", r"\1***", url)
    match = re.match(r"^([^:/]+://)([^@/]*)@", url)
    if match and ":" in match.group(2):
        user = match.group(2).split(":", 1)[0]
        url = f"{match.group(1)}{user}:***@{url[match.end():]}"
    return url


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__
