"""The board's console pty (tools/keel/vdev.py, ConsolePty) as a USB-serial adapter:
what a client writes reaches the board even when it closes the port at once (keel
flash --usb ends with the Ctrl-D that restarts Keel, then closes)."""

import os
import subprocess
import time

from keel.vdev import ConsolePty


def _read_all(fd, want, timeout=10.0):
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        try:
            got += os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.01)
    return got


def test_input_written_just_before_the_client_closes_reaches_the_board(tmp_path):
    pty = ConsolePty(tmp_path / "tty")
    board_in, pty_out = os.pipe()
    ctl_in, ctl_out = os.pipe()
    board = subprocess.Popen(["sleep", "60"])  # stands for the VM: only signalled
    try:
        pty.attach(board, pty_out, ctl_in)
        os.write(ctl_out, b"0")  # the REPL reads its input
        os.set_blocking(board_in, False)
        sent = b""
        for i in range(200):  # each client: open, write, close at once
            fd = os.open(tmp_path / "tty", os.O_RDWR | os.O_NOCTTY)
            os.write(fd, b"%04d" % i)
            os.close(fd)
            sent += b"%04d" % i
        assert _read_all(board_in, len(sent)) == sent
    finally:
        board.kill()
        board.wait()
        pty.close()
        for fd in (board_in, ctl_out):
            os.close(fd)
