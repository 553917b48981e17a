"""What the figure modules share: rows and goals, statistics, the context the harness
hands each figure (smoke mode, a scratch folder, cached system builds), and the pieces
most figures need (a VM timed to a marker line, a virtual device running in the
background, `keel cloud serve` in a child process). See bench/README.md."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
KB = 1024


# Rows and goals

@dataclass(frozen=True)
class Goal:
    """A goal: the text the table shows and the test that decides `met` from the row
    (a dict with keel, baseline, ratio, ...)."""

    text: str
    test: Callable[[dict], bool]

    @staticmethod
    def at_most(limit: float, text: str, of: str = "keel") -> "Goal":
        return Goal(text, lambda row: row[of] is not None and row[of] <= limit)


ROW_KEYS = ("figure", "what", "keel", "baseline", "unit", "ratio", "goal", "met", "runs", "spread",
            "limits", "notes")


def row(figure: int, what: str, keel, baseline, unit: str, goal: Goal | None = None, *,
        runs: dict | None = None, ratio: float | None = None, limits: str | None = None,
        notes: str | None = None, met: bool | None = None) -> dict:
    """One line of the results table. `keel` and `baseline` are the medians (None when
    not measured); `runs` the raw values, {"keel": [...], "baseline": [...]}; `ratio`
    is keel / baseline unless given; `met` comes from the goal's test unless given
    (None: no goal, or nothing measured). `limits` says what limits a figure (required
    in spirit when the goal is missed); `notes` anything else worth knowing."""
    runs = runs or {}
    if ratio is None and isinstance(keel, (int, float)) and isinstance(baseline, (int, float)) and baseline:
        ratio = keel / baseline
    out = {
        "figure": figure, "what": what, "keel": keel, "baseline": baseline, "unit": unit,
        "ratio": None if ratio is None else round(ratio, 3),
        "goal": goal.text if goal else None, "met": met,
        "runs": {k: list(v) for k, v in runs.items()},
        "spread": {k: spread(v) for k, v in runs.items() if v},
        "limits": limits, "notes": notes,
    }
    if out["met"] is None and goal is not None and keel is not None:
        out["met"] = bool(goal.test(out))
    return out


def check_row(r: dict) -> list[str]:
    """What is wrong with a row (empty: well-formed). The smoke test asserts on this."""
    problems = []
    if not isinstance(r, dict):
        return [f"not a dict: {r!r}"]
    missing = [k for k in ROW_KEYS if k not in r]
    if missing:
        problems.append(f"missing keys {missing}")
    if not isinstance(r.get("figure"), int):
        problems.append("figure is not a number")
    if not isinstance(r.get("what"), str) or not r.get("what"):
        problems.append("no 'what'")
    if r.get("met") not in (True, False, None):
        problems.append("met is not true/false/null")
    if r.get("met") is not None and not r.get("goal"):
        problems.append("met without a goal")
    if r.get("met") is False and not r.get("limits"):
        problems.append("missed without limits")
    for key in ("keel", "baseline", "ratio"):
        if r.get(key) is not None and not isinstance(r[key], (int, float)):
            problems.append(f"{key} is not a number")
    if not isinstance(r.get("runs"), dict) or not isinstance(r.get("spread"), dict):
        problems.append("runs/spread are not dicts")
    try:
        json.dumps(r)
    except (TypeError, ValueError) as e:
        problems.append(f"not JSON: {e}")
    return problems


# Statistics

def median(values):
    return statistics.median(values) if values else None


def spread(values) -> dict:
    """min, max and the interquartile range of a list of runs."""
    values = sorted(values)
    if len(values) >= 4:
        q = statistics.quantiles(values, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = None
    return {"n": len(values), "min": values[0], "max": values[-1], "iqr": iqr}


def rounded(x, digits=3):
    return None if x is None else round(x, digits)


# The context a figure runs in

@dataclass
class Context:
    """What the harness hands a figure's run(): `smoke` (one run, tiny sizes: the
    figure must still go through every step and return its rows), `work` (a scratch
    folder of its own, removed afterwards), `log(text)` for progress on stderr,
    `runs(full, smoke=1)` for the number of runs, `system(version)` a cached
    `keel build system` for the virtual board."""

    smoke: bool = False
    work: Path = field(default_factory=lambda: Path("/tmp"))
    quiet: bool = False
    _systems: dict = field(default_factory=dict)
    _name: str = ""

    def log(self, text: str) -> None:
        if not self.quiet:
            print(f"  [{self._name}] {text}", file=sys.stderr, flush=True)

    def runs(self, full: int, smoke: int = 1) -> int:
        return smoke if self.smoke else full

    def system(self, version: str = "1.1.0") -> Path:
        """A system build (bootloader and both parts) for the virtual board, built once
        per harness run."""
        if version not in self._systems:
            from keel import build

            out = self.work.parent / f"system-{version}"
            if not out.exists():
                build.build_system("virtual", version, out)
            self._systems[version] = out
        return self._systems[version]

    def app(self, name: str, sources: dict[str, str], target: str | None = "1.1.0",
            app_version: str = "1.0.0") -> tuple[Path, Path]:
        """An app from sources: (its source folder, its built user part)."""
        from keel import build

        src = self.work / f"src-{name}"
        src.mkdir(parents=True, exist_ok=True)
        for filename, text in sources.items():
            (src / filename).write_text(text)
        image = build.build_app(src, "virtual", target, self.work / f"{name}.bin", app_version=app_version)
        return src, image

    def device(self, name: str, version: str = "1.1.0", apps: list[Path] = ()) -> Path:
        from keel import vdev

        path = self.work / name
        vdev.create(path, self.system(version))
        if apps:
            vdev.flash(path, list(apps))
        return path


# Processes

def micropython() -> str:
    from keel.paths import micropython as mp

    return mp()


def board_heap(board: str = "virtual") -> int:
    doc = json.loads((ROOT / "boards" / board / "board.json").read_text())
    return int(doc.get("heap") or doc["ram"])


def keel_vm_command(device: Path, heap: int, cause: str = "power-on") -> list[str]:
    """The command `keel vdev run` starts for one boot of a virtual device (vdev._start_vm)."""
    return [micropython(), "-X", f"heapsize={heap}", str(ROOT / "boards" / "virtual" / "vm_startup.py"),
            str(device), cause]


def time_to_marker(command: list[str], marker: str, timeout: float = 30.0, cwd=None,
                   until: str | None = None, stamps: list | None = None) -> tuple[float, str]:
    """Start a process, return (seconds from just before the start to the line holding
    `marker` on its stdout, what it printed), then kill its process group (a power cut).
    With `until`, keeps reading to the line holding that before killing (the time is
    still the marker's). With `stamps` (a list), appends (seconds, line) for every line."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)
    lines = []
    at = None
    timer = threading.Timer(timeout, lambda: kill_group(proc))
    timer.start()
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            lines.append(line)
            if stamps is not None:
                stamps.append((time.perf_counter() - started, line.rstrip()))
            if at is None and marker in line:
                at = time.perf_counter() - started
                if until is None:
                    break
            if until is not None and at is not None and until in line:
                break
    finally:
        timer.cancel()
        kill_group(proc)
        proc.stdout.close()
    text = "".join(lines)
    if at is None:
        raise RuntimeError(f"{marker!r} not printed within {timeout:g} s by {command}:\n{text[-3000:]}")
    return at, text


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


class RunningDevice:
    """A virtual device run by `keel vdev run` (vdev.run) in a background thread; its
    console is followed in console.log. `lines` timestamps each console line as it is
    seen (time.monotonic(), to ~20 ms) when `watch()` is running."""

    def __init__(self, path: Path, seconds: float = 3600):
        from keel import vdev

        self.path = path
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(
            target=vdev.run, args=(path,),
            kwargs={"seconds": seconds, "out": io.BytesIO(), "stop_when": lambda c: self.stop_flag.is_set()},
            daemon=True)
        self.thread.start()

    def console(self) -> str:
        try:
            return (self.path / "console.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self):
        self.stop_flag.set()
        self.thread.join(15)


class Cloud:
    """`keel cloud serve` (embedded broker) in a child process, and the keel CLI against it."""

    def __init__(self, data: Path):
        self.data = data
        self.mqtt_port = free_port()
        self.env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", KEEL_CLOUD=str(data))
        cmd = [str(BIN / "keel"), "cloud", "serve", "--data", str(data), "--mqtt", f"127.0.0.1:{self.mqtt_port}",
               "--http", f"127.0.0.1:{free_port()}"]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        if "Keel Cloud:" not in line:
            self.stop()
            raise RuntimeError(line + self.proc.stdout.read())
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def keel(self, *args, timeout: float = 120) -> str:
        proc = subprocess.run([str(BIN / "keel"), *map(str, args)], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"keel {' '.join(map(str, args))}: {proc.stderr or proc.stdout}")
        return proc.stdout

    def show(self, name: str) -> dict:
        return json.loads(self.keel("device", "show", name, "--json"))

    def online(self, name: str) -> bool:
        return any(d["name"] == name and d["online"] for d in json.loads(self.keel("list", "--json")))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def point_device_at(device: Path, port: int) -> None:
    """Make a provisioned device connect to 127.0.0.1:port (a link shaper, say)."""
    from keel import vdev

    conn = json.loads(vdev.read_file(device, "/keel/cloud/cloud.json"))
    conn.update(host="127.0.0.1", port=port)
    vdev.write_files(device, {"/keel/cloud/cloud.json": json.dumps(conn).encode()})


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
