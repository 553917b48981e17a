"""Mosquitto run and watched by `keel cloud serve` (the default where it is installed,
or --broker mosquitto): the configuration
keel_cloud.mosquitto writes (in CLOUD_DIR/mosquitto/), on the address devices connect to,
started with the service, started again when it dies (after 1 s, doubling to 30 s while
it keeps dying at once), and stopped with the service. Its log is CLOUD_DIR/mosquitto/
mosquitto.log."""

import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from keel_cloud.config import CloudDir, CloudError
from keel_cloud.mosquitto import DB_FILE, PID_FILE, write_config

log = logging.getLogger("keel.cloud.mosquitto")

FOLDER = "mosquitto"
LOG_FILE = "mosquitto.log"
START_WAIT_S = 10.0  # for it to listen
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0
STEADY_S = 10.0  # up this long: the next death restarts it after RESTART_FIRST_S again


ENV = "KEEL_MOSQUITTO"  # the binary to run, when set; set and empty: none


def _die_with_parent() -> None:
    # In the child, before exec: Linux sends it SIGTERM when the service that started it
    # dies, however it dies (a SIGKILL, the OOM killer), so no Mosquitto is left holding
    # the port for the next start (prctl PR_SET_PDEATHSIG, tied to the starting thread;
    # elsewhere nothing is done).
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def find_mosquitto() -> str | None:
    """The mosquitto binary: $KEEL_MOSQUITTO, else `mosquitto` on PATH; None without
    one (Debian's package puts it in /usr/sbin, on root's PATH, not on a user's)."""
    if ENV in os.environ:
        return os.environ[ENV] or None
    return shutil.which("mosquitto")


class MosquittoSupervisor:
    def __init__(self, cloud_dir: CloudDir, host: str, port: int, binary: str | None = None):
        self.dir = cloud_dir
        self.host, self.port = host, port
        self.binary = binary or find_mosquitto()
        if not self.binary:
            raise CloudError("--broker mosquitto: no mosquitto on PATH (install Debian's: "
                             "apt-get install mosquitto, which puts it in /usr/sbin; or name it "
                             "in $KEEL_MOSQUITTO)")
        self.folder = cloud_dir.path / FOLDER
        self.restarts = 0
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: CloudError | None = None
        self._thread: threading.Thread | None = None

    @property
    def log_path(self) -> Path:
        return self.folder / LOG_FILE

    def start(self) -> None:
        # Started as root, Mosquitto would switch to the 'mosquitto' account, which cannot
        # read a key in a root-owned cloud directory (0700): it stays root, as we are.
        user = "root" if os.geteuid() == 0 else None
        # Its state persists across its own restarts (the fleet service's session and
        # subscriptions: what devices publish while the service reconnects waits for it),
        # not across a start of the service: a new broker starts empty.
        (self.folder / DB_FILE).unlink(missing_ok=True)
        self.conf = write_config(self.dir, self.folder, port=self.port, listen=self.host, user=user,
                                 persistence=True)
        # Started, and started again, from one thread that lives as long as the service:
        # Linux ties the parent-death signal to the thread that started the child.
        self._thread = threading.Thread(target=self._run, name="keel-mosquitto", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error:
            raise self._error

    def _run(self) -> None:
        try:
            self._launch()
        except CloudError as e:
            self._error = e
            return
        finally:
            self._ready.set()
        self._watch()

    def _launch(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
        # keel cloud add-instance tells it to read its ACL again (mosquitto.update_acl)
        (self.folder / PID_FILE).write_text(f"{self.proc.pid}\n")
        deadline = time.monotonic() + START_WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CloudError(f"mosquitto exited at start ({self.proc.returncode}): "
                                 f"{self._log_tail()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.proc.kill()
        raise CloudError(f"mosquitto did not listen on {self.host}:{self.port} within "
                         f"{START_WAIT_S:.0f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(an empty log)"

    def _watch(self) -> None:
        delay = RESTART_FIRST_S
        started = time.monotonic()
        while not self._stop.is_set():
            if self.proc.poll() is None:
                if time.monotonic() - started > STEADY_S:
                    delay = RESTART_FIRST_S
                self._stop.wait(0.2)
                continue
            log.warning("mosquitto exited (%s); starting it again in %.0f s: %s",
                        self.proc.returncode, delay, self._log_tail())
            if self._stop.wait(delay):
                return
            try:
                self._launch()
                self.restarts += 1
                started = time.monotonic()
                log.warning("mosquitto started again (restart %d)", self.restarts)
            except CloudError as e:
                log.warning("%s", e)
            delay = min(delay * 2, RESTART_MAX_S)

    def save(self) -> None:
        """Have Mosquitto write its state now (SIGUSR1): the fleet service's session and
        subscriptions, just made, survive it being killed."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGUSR1)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        if self.proc:
            end_process(self.proc)
        (self.folder / PID_FILE).unlink(missing_ok=True)


def end_process(proc: subprocess.Popen, wait_s: float = 5) -> None:
    """SIGTERM, then SIGKILL if it has not gone within wait_s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(wait_s)
