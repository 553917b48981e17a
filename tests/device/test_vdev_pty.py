"""keel vdev run --pty: the virtual board's console as a pty that speaks MicroPython's
REPL, driven by the real mpremote (its CLI and its SerialTransport) on the real VM."""

import hashlib
import io
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from keel import vdev

MPREMOTE = str(Path(sys.executable).parent / "mpremote")
TICKER = """\
import time

def setup():
    print("ticker up")

def loop():
    print("tick")
    time.sleep_ms(200)
"""


def mpremote(tty, *args, timeout=60):
    """The mpremote CLI on the pty; stdout and stderr as sent (\r\n kept)."""
    proc = subprocess.run([MPREMOTE, "connect", str(tty), *args], capture_output=True,
                          timeout=timeout)
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    return proc


class Board:
    """A device running with its console on a pty at self.tty."""

    def __init__(self, dev, tty):
        self.dev = dev
        self.tty = tty
        self.stop_event = threading.Event()
        self.out = io.BytesIO()
        self.console_ = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.console_ = vdev.run(self.dev.path, seconds=300, out=self.out, pty=self.tty,
                                 stop_when=lambda c: self.stop_event.is_set())

    def console(self):
        path = self.dev.path / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, text, count=1, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.console().count(text) >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not printed {count} times:\n{self.console()[-3000:]}")

    def mpremote(self, *args, timeout=60):
        proc = mpremote(self.tty, *args, timeout=timeout)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def stop(self):
        self.stop_event.set()
        self.thread.join(15)


@pytest.fixture
def board(device, make_app, tmp_path):
    dev = device("1.1.0")
    dev.flash(make_app("ticker", {"main.py": TICKER}))
    b = Board(dev, tmp_path / "ttyKEEL")
    try:
        b.wait_for("ticker up")
        yield b
    finally:
        b.stop()


class Terminal:
    """The pty opened as a terminal program would (raw), to type at the REPL."""

    def __init__(self, path):
        import tty

        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)
        self.seen = b""

    def type(self, data):
        os.write(self.fd, data)

    def read_until(self, marker, timeout=15.0):
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"{marker!r} not seen: {self.seen[-2000:]!r}")
            self.seen += os.read(self.fd, 4096)
        head, _, self.seen = self.seen.partition(marker)
        return head + marker

    def close(self):
        os.close(self.fd)


def test_exec_eval_and_fs_ls(board):
    assert board.tty.is_symlink() and os.readlink(board.tty).startswith("/dev/pts/")
    assert board.mpremote("exec", "print(1+1)") == "2\r\n"
    assert board.mpremote("eval", "6*7") == "42\r\n"
    listing = board.mpremote("fs", "ls", "/keel")
    assert "board.json" in listing and "status.json" in listing
    # Each command soft-rebooted into the raw REPL: boot.py only, Keel stays stopped.
    assert "vdev: soft reboot (raw REPL)" in board.console()
    assert board.console().count("ticker up") == 1


def test_errors_come_back_as_on_a_board(board):
    proc = mpremote(board.tty, "exec", "1/0")
    assert proc.returncode == 1
    assert proc.stdout == ('Traceback (most recent call last):\r\n  File "<stdin>", line 1, '
                           'in <module>\r\nZeroDivisionError: divide by zero\r\n')


def test_fs_cp_to_and_from_the_board(board, tmp_path):
    data = os.urandom(20000)
    (tmp_path / "data.bin").write_bytes(data)
    board.mpremote("fs", "cp", str(tmp_path / "data.bin"), ":/data.bin")
    board.mpremote("fs", "cp", ":/data.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data
    assert board.mpremote("eval", "__import__('os').stat('/data.bin')[6]") == "20000\r\n"


def test_soft_reset_and_resume(board):
    board.mpremote("exec", "x = 42")
    assert board.mpremote("resume", "exec", "print(x)") == "42\r\n"  # no soft reset
    board.mpremote("soft-reset")
    assert board.mpremote("resume", "exec", "print('x' in globals())") == "False\r\n"
    assert board.console().count("ticker up") == 1  # the soft reboots did not start Keel


def test_ctrl_c_interrupts_the_app_and_gives_the_friendly_repl(board):
    term = Terminal(board.tty)
    try:
        term.type(b"\x03")
        shown = term.read_until(b">>> ")
        assert b"KeyboardInterrupt" in shown and b"MicroPython" in shown
        term.type(b"print(6*7)\r")
        assert b"42\r\n" in term.read_until(b">>> ")
        term.type(b"for i in range(3):\r")
        term.read_until(b"...     ")  # auto-indented, as MicroPython's readline does
        term.type(b"print('n', i)\r\r\r\r")  # a block ends after two blank lines
        assert b"n 0\r\nn 1\r\nn 2\r\n" in term.read_until(b">>> ")
        ticks = board.console().count("tick\n")
        time.sleep(0.6)
        assert board.console().count("tick\n") == ticks  # the app is stopped
        term.type(b"\x04")  # soft reboot in friendly mode: main.py, so Keel, runs again
        term.read_until(b"MPY: soft reboot\r\n")
        board.wait_for("ticker up", count=2)
        assert "vdev: soft reboot (friendly REPL)" in board.console()
    finally:
        term.close()


def test_reset_from_the_repl_boots_keel_again(board):
    board.mpremote("exec", "--no-follow", "import vboard; vboard.reset()")
    board.wait_for("ticker up", count=2)
    assert "(soft-reset), heap" in board.console()
    assert board.mpremote("exec", "import machine; print(machine.reset_cause())") == "5\r\n"
    board.mpremote("reset")  # mpremote's own: machine.reset()
    board.wait_for("ticker up", count=3)
    uid = bytes.fromhex((board.dev.path / "uid").read_text().strip())
    assert board.mpremote("eval", "__import__('machine').unique_id()") == f"{uid!r}\r\n"


def test_serial_transport_api_on_one_connection(board):
    from mpremote.transport_serial import SerialTransport

    t = SerialTransport(str(board.tty), baudrate=115200)
    try:
        t.enter_raw_repl()
        for i in range(20):
            assert t.exec(f"print({i} * 2)") == f"{i * 2}\r\n".encode()
        assert t.eval("[1, 'a']") == [1, "a"]
        t.exit_raw_repl()
        t.enter_raw_repl(soft_reset=False)
        t.exec("y = 5")
        t.use_raw_paste = False  # the plain raw REPL too (what mpremote falls back to)
        assert t.eval("y + 1") == 6
        t.exit_raw_repl()
    finally:
        t.close()


def test_several_hundred_kb_through_the_raw_repl(board):
    from mpremote.transport_serial import SerialTransport
    import base64

    data = os.urandom(384 * 1024)
    t = SerialTransport(str(board.tty), baudrate=115200)
    started = time.monotonic()
    try:
        t.enter_raw_repl()
        t.exec("import binascii\nf = open('/big.bin', 'wb')\nw = f.write\nd = binascii.a2b_base64")
        for at in range(0, len(data), 3072):
            t.exec("w(d(%r))" % base64.b64encode(data[at : at + 3072]).decode())
        t.exec("f.close()")
        t.exec("import hashlib\nh = hashlib.sha256()\nb = bytearray(1024)\n"
               "with open('/big.bin', 'rb') as f:\n while True:\n  n = f.readinto(b)\n"
               "  if not n: break\n  h.update(b[:n])")
        digest = t.eval("h.digest()")
        t.exit_raw_repl()
    finally:
        t.close()
    assert digest == hashlib.sha256(data).digest()
    assert time.monotonic() - started < 60


def test_keel_vdev_run_pty_from_the_cli(device, hello_app, tmp_path, keel_env):
    dev = device("1.1.0")
    dev.flash(hello_app())
    link = tmp_path / "tty"
    run = subprocess.Popen(["keel", "vdev", "run", str(dev.path), "--seconds", "12",
                            "--pty", str(link)], stdout=subprocess.PIPE, env=keel_env)
    log = dev.path / "console.log"
    deadline = time.monotonic() + 10
    while not log.exists() or "hello from keel" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.05)
    proc = mpremote(link, "exec", "print('via cli')")
    assert proc.stdout == "via cli\r\n"
    run.wait(30)
    assert run.returncode == 0 and not link.is_symlink()


def test_no_running_device_is_a_clear_error(device, tmp_path):
    dev = device("1.1.0")
    link = tmp_path / "tty"
    vdev.run(dev.path, seconds=1.5, out=io.BytesIO(), pty=link)
    assert not link.exists() and not link.is_symlink()  # removed at the end of the run
    proc = mpremote(link, "exec", "print(1)", timeout=30)
    assert proc.returncode != 0 and "failed to access" in proc.stdout + proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
@pytest.mark.parametrize("board_name", ["virtual", "esp32_generic", "nrf52840_dk"], indirect=True)
def test_keel_vdev_run_killed_takes_its_vm_with_it(device, hello_app, keel_env, sig, board_name):
    """`keel vdev run D & kill $!`: the VM stops with it, whichever signal (SIGTERM and
    SIGHUP as Ctrl-C does; SIGKILL through the VM's parent-death signal)."""
    dev = device("1.1.0")
    dev.flash(hello_app())
    run = subprocess.Popen(["keel", "vdev", "run", str(dev.path)], stdout=subprocess.DEVNULL,
                           env=keel_env)
    log = dev.path / "console.log"
    deadline = time.monotonic() + 20
    while not log.exists() or "hello from keel" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.05)
    vm = int((dev.path / "vm.pid").read_text())
    os.kill(vm, 0)  # running
    run.send_signal(sig)
    run.wait(10)
    deadline = time.monotonic() + 5
    while _alive(vm):
        assert time.monotonic() < deadline, f"the VM outlived keel vdev run ({sig.name})"
        time.sleep(0.05)
    if sig != signal.SIGKILL:  # (SIGKILL leaves no time to tidy up)
        assert not (dev.path / "vm.pid").exists()
        assert "interrupted" in log.read_text()
    deadline = time.monotonic() + 5
    while vdev.VirtualDevice(dev.path).running_pid() is not None:  # (once init reaps it)
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # (a zombie has exited)
    except FileNotFoundError:
        return False
