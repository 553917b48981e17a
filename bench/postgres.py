"""A throwaway PostgreSQL server (Debian's binaries) in its own directory under /tmp, on a
free 127.0.0.1 port with trust authentication: for the tests (tests/cloud/conftest.py)
and figure 6's instances on PostgreSQL. initdb refuses root, so as root the server runs
as the 'postgres' account."""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

WAIT = 30  # seconds: bound for initdb, and for the server to start and stop


class PostgresError(Exception):
    pass


def bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not found:
        raise PostgresError("PostgreSQL's server binaries are missing (no /usr/lib/postgresql/*/bin/"
                            "initdb): install Debian's postgresql package (make setup, as root)")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self):
        self.bindir = bindir()
        self.prefix = []
        account = None
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresError("no 'postgres' account to run PostgreSQL as (install Debian's "
                                    "postgresql)") from None
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.base = Path(tempfile.mkdtemp(prefix="keel-pg-"))
        if account:
            os.chown(self.base, account.pw_uid, account.pw_gid)
        self.data, self.log = self.base / "data", self.base / "postgres.log"
        self.port = _free_port()
        self.admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args, timeout=WAIT):
        return subprocess.run(self.prefix + [str(self.bindir / args[0]), *args[1:]], cwd=self.base,
                              timeout=timeout, capture_output=True, text=True)

    def start(self) -> "PostgresServer":
        if not self.data.is_dir():
            done = self._run("initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
                             "--locale=C", "--auth-local=trust", "--auth-host=trust")
            if done.returncode:
                raise PostgresError(f"initdb failed:\n{done.stdout}{done.stderr}")
        done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(WAIT),
                         "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base} "
                         "-c max_connections=200", "start", timeout=WAIT + 10)
        if done.returncode:
            server_log = self.log.read_text() if self.log.exists() else ""
            raise PostgresError(f"PostgreSQL did not start:\n{done.stdout}{done.stderr}{server_log}")
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            stopped = self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(WAIT),
                                "stop", timeout=WAIT + 10)
            if stopped.returncode and (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", str(WAIT),
                          "stop", timeout=WAIT + 10)

    def database(self, name: str) -> str:
        """A new, empty database; its URL."""
        import psycopg

        with psycopg.connect(self.admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name}")
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
