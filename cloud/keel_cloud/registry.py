"""The device registry: devices, their last describe, online state, last seen, and
recent events. SQLite by default; the SQL is kept portable (plain types, no
upserts beyond standard forms) so a PostgreSQL URL can take its place."""

import json
import sqlite3
import threading
import time
from pathlib import Path

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
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id VARCHAR(32) NOT NULL,
        name VARCHAR(64) NOT NULL,
        data TEXT,
        ts DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS events_by_device ON events (device_id, seq)",
)
KEEP_EVENTS = 1000  # per device


class RegistryError(Exception):
    pass


class Registry:
    def __init__(self, path: Path | str):
        if str(path).startswith(("postgres://", "postgresql://")):
            raise RegistryError(
                "PostgreSQL registries need a PostgreSQL driver, which this install does "
                "not include yet; use the default SQLite registry"
            )
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        with self._lock, self._db:
            for statement in SCHEMA:
                self._db.execute(statement)

    def close(self) -> None:
        self._db.close()

    def _query(self, sql: str, args=()) -> list[tuple]:
        with self._lock, self._db:
            return self._db.execute(sql, args).fetchall()

    # Devices

    def add_device(self, device_id: str, name: str, platform: str | None = None) -> None:
        for row in self._query("SELECT id FROM devices WHERE name = ?", (name,)):
            if row[0] != device_id:
                raise RegistryError(f"the name '{name}' is taken by device {row[0]}")
        if self._query("SELECT id FROM devices WHERE id = ?", (device_id,)):
            self._query(
                "UPDATE devices SET name = ?, platform = COALESCE(?, platform) WHERE id = ?",
                (name, platform, device_id),
            )
        else:
            self._query(
                "INSERT INTO devices (id, name, platform, online, created) VALUES (?, ?, ?, 0, ?)",
                (device_id, name, platform, time.time()),
            )

    def set_online(self, device_id: str, online: bool) -> None:
        self._query(
            "UPDATE devices SET online = ?, last_seen = ? WHERE id = ?",
            (1 if online else 0, time.time(), device_id),
        )

    def set_describe(self, device_id: str, describe: dict) -> None:
        self._query(
            "UPDATE devices SET describe = ?, platform = ?, last_seen = ? WHERE id = ?",
            (json.dumps(describe), describe.get("platform"), time.time(), device_id),
        )

    def seen(self, device_id: str) -> None:
        self._query("UPDATE devices SET last_seen = ? WHERE id = ?", (time.time(), device_id))

    def known(self, device_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM devices WHERE id = ?", (device_id,)))

    def devices(self) -> list[dict]:
        rows = self._query(
            "SELECT id, name, platform, online, last_seen, describe FROM devices ORDER BY name"
        )
        return [_device(row) for row in rows]

    def device(self, name_or_id: str) -> dict | None:
        rows = self._query(
            "SELECT id, name, platform, online, last_seen, describe FROM devices "
            "WHERE name = ? OR id = ?",
            (name_or_id, name_or_id),
        )
        return _device(rows[0]) if rows else None

    # Events

    def add_event(self, device_id: str, name: str, data: str | None) -> int:
        with self._lock, self._db:
            cur = self._db.execute(
                "INSERT INTO events (device_id, name, data, ts) VALUES (?, ?, ?, ?)",
                (device_id, name, data, time.time()),
            )
            seq = cur.lastrowid
            self._db.execute(
                "DELETE FROM events WHERE device_id = ? AND seq <= ?",
                (device_id, seq - KEEP_EVENTS),
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
