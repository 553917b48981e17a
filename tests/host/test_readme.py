"""The README's quick tour, run as written: every shell block after the first (`make demo`,
`make test`, `make bench` are what CI runs), line by line, in a fresh HOME with /tmp/ moved
into the test's own directory. A command must succeed, unless its comment says it is
refused; one started with `&` runs on in the background (waited for until it is up, as a
reader would before typing the next line) and is stopped at the end; `keel subscribe`
waits for events until it is stopped. Fails when any line breaks."""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def shell_blocks(text: str) -> list[list[str]]:
    blocks = re.findall(r"^```(?:sh|bash|shell)?\n(.*?)^```", text, re.S | re.M)
    return [[ln for ln in b.splitlines() if ln.strip() and not ln.lstrip().startswith("#")] for b in blocks]


def _settle(command: str, env: dict, work: Path) -> None:
    """Until what a background command started is up."""
    deadline = time.monotonic() + 30
    words = shlex.split(command.split("#")[0].rstrip(" &"))
    while time.monotonic() < deadline:
        if words[1:3] == ["cloud", "serve"]:
            if subprocess.run(["keel", "cloud", "status"], env=env, capture_output=True).returncode == 0:
                return
        elif words[1:3] == ["vdev", "run"]:
            log = Path(words[3]) / "console.log"
            if log.exists() and "vdev: boot" in log.read_text(errors="replace"):
                time.sleep(2)  # (its app's setup)
                return
        else:
            return
        time.sleep(0.2)
    raise AssertionError(f"{command}: not up after 30 s")


def test_the_readme_quick_tour_runs_as_written(tmp_path):
    blocks = shell_blocks((ROOT / "README.md").read_text())
    assert blocks[0][0].startswith("make demo")
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), PATH=f"{BIN}{os.pathsep}/usr/sbin{os.pathsep}{os.environ['PATH']}")
    env.pop("KEEL_CLOUD", None)
    background, jobs = [], []  # every background command; this block's (kill %N)
    ran = 0
    try:
        for block in blocks[1:]:
            jobs = []
            for line in block:
                command = line.replace("/tmp/", f"{tmp_path}/").replace("$PWD", str(ROOT))
                if command.startswith("export "):
                    continue  # (PATH: already so)
                comment = command.split("#", 1)[1] if "#" in command else ""
                code = command.split("#", 1)[0].strip()
                if code.startswith("kill %"):  # the block's Nth background job, as bash's job control
                    _stop(jobs[int(code[len("kill %"):]) - 1])
                    ran += 1
                    continue
                if code.endswith("&"):
                    background.append(subprocess.Popen(["bash", "-c", "exec " + code[:-1]], cwd=ROOT, env=env,
                                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                    jobs.append(background[-1])
                    _settle(code, env, tmp_path)
                    ran += 1
                    continue
                if code.startswith("keel subscribe"):  # listens until stopped
                    proc = subprocess.run(["timeout", "5", "bash", "-c", code], cwd=ROOT, env=env,
                                          capture_output=True, text=True)
                    assert proc.returncode == 124 and "listening for events" in proc.stderr, (line, proc.stderr)
                    ran += 1
                    continue
                deadline = time.monotonic() + (20 if code == "keel list" else 0)
                while True:
                    proc = subprocess.run(["bash", "-c", code], cwd=ROOT, env=env, capture_output=True,
                                          text=True, timeout=300)
                    if code != "keel list" or "online" in proc.stdout or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)  # (the device is still connecting: a reader types it again)
                output = proc.stdout + proc.stderr
                assert "Traceback" not in output, (line, output)
                if "refused" in comment:
                    assert proc.returncode == 1 and "keel: error:" in proc.stderr, (line, output)
                else:
                    assert proc.returncode == 0, (line, output)
                if "prints" in comment:  # e.g. prints "hello from keel"
                    said = re.search(r'prints "([^"]+)"', comment)
                    assert said and said[1] in output, (line, output)
                if code == "keel list":
                    assert "sensor1" in proc.stdout and "online" in proc.stdout, output
                ran += 1
    finally:
        for proc in reversed(background):
            _stop(proc)
    assert ran >= 20


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
