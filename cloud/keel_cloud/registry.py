"""The device registry: devices, their last describe, online state, last seen, and
recent events.

SQLite by default (a file in the cloud directory); a postgresql:// (or postgres://) URL
selects PostgreSQL instead, through psycopg 3. Both run the same SQL: the statements are
written once, with `?` placeholders (turned into psycopg's `%s`), in plain portable SQL;
only the events table's autoincrement key is declared per dialect."""

import json
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

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
)
KEEP_EVENTS = 1000  # per device
MAX_ID, MAX_NAME, MAX_PLATFORM = 32, 64, 32  # the column widths above
CONNECT_TIMEOUT = 10  # seconds, unless the URL says otherwise
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_DEVICE_COLUMNS = "id, name, platform, online, last_seen, describe"


class RegistryError(Exception):
    pass


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
            except sqlite3.Error as e:
                raise RegistryError(f"cannot open the registry {self.path}: {_one_line(e)}") from None
        try:
            with self._transaction() as run:
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
    def _transaction(self, atomic: bool = True):
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

    def _query(self, sql: str, args=()) -> list[tuple]:
        with self._transaction(atomic=False) as run:
            return run(sql, args)

    # Devices

    def add_device(self, device_id: str, name: str, platform: str | None = None) -> None:
        if not 0 < len(device_id) <= MAX_ID:
            raise RegistryError(f"a device id has 1 to {MAX_ID} characters, not '{device_id}'")
        if not 0 < len(name) <= MAX_NAME:
            raise RegistryError(f"a device name has 1 to {MAX_NAME} characters, not '{name}'")
        platform = _text(platform, MAX_PLATFORM)
        integrity_error = self._pg.IntegrityError if self._pg else sqlite3.IntegrityError
        try:
            with self._transaction() as run:
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

    def set_online(self, device_id: str, online: bool) -> None:
        self._query(
            "UPDATE devices SET online = ?, last_seen = ? WHERE id = ?",
            (1 if online else 0, time.time(), device_id),
        )

    def set_describe(self, device_id: str, describe: dict) -> None:
        self._query(
            "UPDATE devices SET describe = ?, platform = ?, last_seen = ? WHERE id = ?",
            (json.dumps(describe), _text(describe.get("platform"), MAX_PLATFORM), time.time(),
             device_id),
        )

    def seen(self, device_id: str) -> None:
        self._query("UPDATE devices SET last_seen = ? WHERE id = ?", (time.time(), device_id))

    def known(self, device_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM devices WHERE id = ?", (device_id,)))

    def devices(self) -> list[dict]:
        rows = self._query(f"SELECT {_DEVICE_COLUMNS} FROM devices")
        # Sorted here, by code point: a database's collation may order names otherwise.
        return [_device(row) for row in sorted(rows, key=lambda row: row[1])]

    def device(self, name_or_id: str) -> dict | None:
        rows = self._query(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE name = ? OR id = ? "
            "ORDER BY CASE WHEN name = ? THEN 0 ELSE 1 END",  # a name before an id
            (name_or_id, name_or_id, name_or_id),
        )
        return _device(rows[0]) if rows else None

    # Events

    def add_event(self, device_id: str, name: str, data: str | None) -> int:
        with self._transaction() as run:
            seq = run(
                "INSERT INTO events (device_id, name, data, ts) VALUES (?, ?, ?, ?) RETURNING seq",
                (device_id, _text(name, MAX_NAME), _text(data), time.time()),
            )[0][0]
            # The device's last KEEP_EVENTS stay (counted: other devices' events
            # take sequence numbers in between).
            run(
                "DELETE FROM events WHERE device_id = ? AND seq <= ("
                "SELECT seq FROM events WHERE device_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (device_id, device_id, KEEP_EVENTS),
            )
        return seq

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
            for r in self._query(sql, args)
        ]

    def last_event_seq(self) -> int:
        rows = self._query("SELECT MAX(seq) FROM events")
        return rows[0][0] or 0


def _device(row) -> dict:
    device_id, name, platform, online, last_seen, describe = row
    describe = json.loads(describe) if describe else {}
    modules = describe.get("modules", [])
    system = [m for m in modules if m.get("function") == "system-part" and m.get("index") == 1]
    return {
        "name": name,
        "id": device_id,
        "platform": platform,
        "online": bool(online),
        "mode": describe.get("mode"),
        "system_version": system[0]["version"] if system else None,
        "last_seen": last_seen,
        "describe": describe,
    }


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
