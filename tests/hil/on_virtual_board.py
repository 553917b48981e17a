"""The hardware-in-the-loop suite on the virtual board and the board twins, as
`make test` runs it.

    .venv/bin/python tests/hil/on_virtual_board.py [--board BOARD]... [PYTEST ARGS...]

For each board (by default every one in BOARDS: the virtual board, the ESP32 twin and
the nRF52840 DK's)
it makes a device from this tree (system and the hello app, built for the board's
platform), runs it with its console on a pty and the jumpers of
boards/<board>/hil.json simulated

    keel vdev run DIR --pty DIR/tty --wires boards/<board>/hil.json

then runs the suite on that pty exactly as on a board

    python -m pytest tests/hil --port DIR/tty --board <board>

and checks that it passed with nothing skipped but what cannot run on the VM (the
ESP32 flashing test, which writes a chip with esptool: it skips with its reason) or
what the board's hil.json says is skipped, and that the device was left as found: the
same modules, the app running. Exit status 0 if so, for every board.
On a failure (or with KEEL_HIL_KEEP=1) the work directory is kept and named: the
device, its console.log, the runner's output and the suite's report (hil.xml).
See docs/hil.md.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The boards the suite runs on in make test: the virtual board and the twins.
BOARDS = ("virtual", "esp32_generic", "nrf52840_dk")
# Tests that cannot run on the VM at all (not a peripheral: nothing to wire): writing
# a chip with esptool needs the chip.
NOT_ON_THE_VM = {"test_hil_esp32_flash"}  # (by module name)
HIL_AP = ("keel-hil-ap", "hil-pass-123")  # the ESP32 twin's access point (keel vdev wifi)


def keel(*args, **kw):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["keel", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"on_virtual_board: keel {' '.join(map(str, args))} failed:\n"
                         f"{proc.stdout}{proc.stderr}")
    return proc


def modules(device):
    from keel import vdev

    status = vdev.status(device)
    return status, {(m["function"], m["index"]): m.get("sha256") for m in status["modules"]}


def stop_vm(device: Path) -> None:
    """The VM of a runner that had to be killed (it runs in a session of its own)."""
    try:
        pid = int((device / "vm.pid").read_text())
        os.killpg(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


def wait_for(path: Path, text: str, timeout: float, runner) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        if runner.poll() is not None:
            break
        time.sleep(0.1)
    log = path.read_text(errors="replace") if path.is_file() else "(no console.log)"
    raise SystemExit(f"on_virtual_board: {text!r} never printed:\n{log[-3000:]}")


def check_report(xml_path: Path, hil_json: Path, not_here=NOT_ON_THE_VM) -> list[str]:
    """Problems in the suite's JUnit report: failures, and skips not allowed (but in
    the modules not_here, which cannot run on this board)."""
    allowed = set((json.loads(hil_json.read_text()).get("skip") or {}).values())
    problems, ran = [], 0
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        ran += 1
        name = f"{case.get('classname')}::{case.get('name')}"
        for tag in ("failure", "error"):
            if case.find(tag) is not None:
                problems.append(f"{name}: {tag}")
        skipped = case.find("skipped")
        module = (case.get("classname") or "").rsplit(".", 1)[-1]
        if skipped is not None and module not in not_here:
            reason = skipped.get("message", "")
            if not any(a in reason for a in allowed):
                problems.append(f"{name}: skipped ({reason})")
    if not ran:
        problems.append("no test ran")
    return problems


def run_board(board: str, pytest_args: list[str]) -> int:
    hil_json = REPO / "boards" / board / "hil.json"
    platform = json.loads((REPO / "boards" / board / "board.json").read_text())["platform"]
    work = Path(tempfile.mkdtemp(prefix=f"keel-hil-{board}-"))
    device, tty = work / "dev", work / "dev" / "tty"
    keel("build", "system", "--platform", platform, "-o", work / "system")
    keel("build", "app", REPO / "examples" / "hello", "--platform", platform, "-o", work / "hello.bin")
    keel("vdev", "create", device, "--board", board, "--system", work / "system")
    keel("vdev", "flash", device, work / "hello.bin")
    wifi_args = []
    if platform == "esp32":  # an access point on the air, for test_hil_wifi.py
        keel("vdev", "wifi", device, "--ap", HIL_AP[0], "--password", HIL_AP[1])
        wifi_args = ["--wifi-ssid", HIL_AP[0], "--wifi-password", HIL_AP[1]]

    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    runner_out = open(work / "runner.out", "wb")
    # (SIGINT as Ctrl-C even when this script was started with it ignored, as a
    # background job of a shell is)
    runner = subprocess.Popen(["keel", "vdev", "run", device, "--pty", tty, "--wires", hil_json],
                              stdout=runner_out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(device / "console.log", "hello from keel", 60, runner)
        _, before = modules(device)
        print(f"on_virtual_board: {device} runs on {tty}; pytest tests/hil --port {tty} --board {board}",
              flush=True)
        report = work / "hil.xml"
        suite = subprocess.run(
            [sys.executable, "-m", "pytest", "tests/hil", "--port", str(tty), "--board", board,
             "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={report}", *wifi_args,
             *pytest_args],
            cwd=REPO, env=env)
    finally:
        if runner.poll() is None:
            runner.send_signal(signal.SIGINT)  # Ctrl-C: the runner powers the VM off
            try:
                runner.wait(20)
            except subprocess.TimeoutExpired:
                runner.kill()
                runner.wait()
                stop_vm(device)
        runner_out.close()

    problems = [] if suite.returncode == 0 else [f"pytest exited with status {suite.returncode}"]
    if report.is_file():
        no_wifi = {"test_hil_wifi"} if platform != "esp32" else set()  # (no WiFi station)
        problems += check_report(report, hil_json, NOT_ON_THE_VM | no_wifi)
    else:
        problems.append("pytest wrote no report")
    if not pytest_args:  # (a selection of tests need not leave a whole session's state)
        status, after = modules(device)
        if after != before:
            problems.append(f"the device's modules changed: {before} -> {after}")
        if (status["mode"], status["app"]) != ("normal", "running"):
            problems.append(f"the device was left in mode {status['mode']}, app {status['app']}")
        console = (device / "console.log").read_text(errors="replace")
        last_boot = console.rsplit("vdev: boot ", 1)[-1]
        if "hello from keel" not in last_boot:
            problems.append("the app did not run again at the device's last boot")
    for p in problems:
        print(f"on_virtual_board: {board}: {p}")
    if problems or os.environ.get("KEEL_HIL_KEEP"):
        print(f"on_virtual_board: {board}: {'FAILED' if problems else 'passed'}: the device, its "
              f"console.log and the suite's report hil.xml are in {work}")
        return 1 if problems else 0
    shutil.rmtree(work, ignore_errors=True)
    print(f"on_virtual_board: {board}: passed")
    return 0


def main(argv: list[str]) -> int:
    boards, pytest_args = [], []
    while argv:
        arg = argv.pop(0)
        if arg == "--board" and argv:
            boards.append(argv.pop(0))
        else:
            pytest_args.append(arg)
    failed = [b for b in boards or BOARDS if run_board(b, pytest_args)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
