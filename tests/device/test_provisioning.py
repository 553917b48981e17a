"""keel device provision on every board (issue 12): the registry's id for a device is
the one the board itself reports as device_id (keel vdev status), by the one rule
(hal/device_id.py) run on the board: the virtual board's 12-byte uid, the ESP32's 6-byte
eFuse MAC (machine.unique_id()), the nRF52840's FICR DEVICEID (machine.mem32: the nrf
port's unique_id() is empty at v1.28.0). Two chips never share an id."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

HELLO = "hello from keel"
# board: how many hex digits its id has
ID_DIGITS = {"virtual": 24, "esp32_generic": 12, "nrf52840_dk": 16, "particle_xenon": 16}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    """keel cloud serve on a fresh directory, as the CLI's user starts it: its env."""
    data = tmp_path_factory.mktemp("cloud")
    env = dict(os.environ, KEEL_CLOUD=str(data),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(["keel", "cloud", "serve", "--data", str(data), "--mqtt",
                             f"127.0.0.1:{_free_port()}", "--http", f"127.0.0.1:{_free_port()}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert "Keel Cloud:" in line, line + proc.stdout.read()
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    yield env
    proc.send_signal(signal.SIGTERM)
    proc.wait(15)


@pytest.mark.parametrize("board_name", list(ID_DIGITS), indirect=True)
def test_provisioning_names_the_id_the_board_reports(device, hello_app, cloud, board_name):
    ids = []
    for n in (1, 2):
        dev, name = device("1.1.0"), f"{board_name}-{n}"
        dev.flash(hello_app())
        out = subprocess.run(["keel", "device", "provision", dev.path, "--name", name],
                             env=cloud, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        console = dev.run(until=HELLO)
        assert HELLO in console
        if board_name in ("nrf52840_dk", "particle_xenon"):  # (no network in the port)
            assert dev.status()["cloud"] == "no-network"
        show = subprocess.run(["keel", "device", "show", name, "--json"], env=cloud,
                              capture_output=True, text=True, timeout=60)
        assert show.returncode == 0, show.stdout + show.stderr
        ids.append(json.loads(show.stdout)["id"])
        status = dev.status()
        assert status["board"] == board_name
        assert ids[-1] == status["device_id"] == (dev.path / "uid").read_text().strip()
        assert len(ids[-1]) == ID_DIGITS[board_name]
    assert ids[0] != ids[1]
