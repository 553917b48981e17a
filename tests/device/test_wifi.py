"""Getting online on the ESP32 twin (issue 13, docs/connecting.md): the system's
connection manager (system/core/connection.py) over the port's network.WLAN stand-in and
the access points keel vdev wifi puts on the air. No credentials: listening mode (dark
blue, blinking); keel device wifi over the console pty stores a network and the board
joins it; the strongest stored network in range first; a wrong password is reported
(network.error, red) while the app runs on; an access point that goes and comes back
is joined again; the button held 3 s gives listening mode; semi-automatic mode, where
the app brings the link up and down and hears network-up/down; keel device provision
--wifi. And the nRF52840, which has no network, stays offline."""

import json
import subprocess
import time

import pytest

from keel import vdev, vio

from test_provisioning import cloud  # noqa: F401 (keel cloud serve: its env)
from test_twin_acceptance import keel, ok
from test_vdev_pty import Board

ESP32 = pytest.mark.parametrize("board_name", ["esp32_generic"], indirect=True)

# The app runs on whatever the network does, and says so.
PLAIN_APP = """\
count = [0]

def setup():
    print("APP started")

def loop():
    count[0] += 1
    if count[0] % 50 == 0:
        print("APP alive", count[0])
"""



def network(dev):
    return vdev.status(dev.path).get("network")


def led(dev):
    """(colour, pattern) the last second of the NeoPixel's frames show (on the ESP32
    the system draws the LED's frames), as keel vdev io reads them, or None."""
    frames = [r["rgb"] for r in vio.read_records(dev.path)
              if r.get("k") == "led" and r.get("rgb") is not None]
    return vio.led_from_frames(frames)


def red_flashes(dev):
    """How many red flashes the LED's last full cycle showed (a code: N flashes, then a
    longer pause), or None: only changes reach the pins, so a flash is a red frame and
    the dark one after it, and the pause is a dark frame that lasts."""
    frames = [(r["t"], tuple(r["rgb"])) for r in vio.read_records(dev.path)
              if r.get("k") == "led" and r.get("rgb") is not None][-40:]
    pauses = [i for i in range(len(frames) - 1)
              if frames[i][1] == (0, 0, 0) and frames[i + 1][0] - frames[i][0] >= 800]
    if len(pauses) < 2:
        return None
    cycle = frames[pauses[-2] + 1:pauses[-1] + 1]
    if {f[1] for f in cycle} != {(255, 0, 0), (0, 0, 0)}:
        return None
    return sum(1 for f in cycle if f[1] == (255, 0, 0))


def wait(predicate, timeout=20.0, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def esp32(device, make_app):
    dev = device("1.1.0")
    dev.flash(make_app("plain-app", {"main.py": PLAIN_APP}))
    return dev


@ESP32
def test_no_credentials_listening_then_joined_over_the_console(esp32, tmp_path):
    ok(keel("vdev", "wifi", esp32.path, "--ap", "home", "--password", "pw-secret-1"))
    board = Board(esp32, tmp_path / "tty")
    try:
        board.wait_for("APP started")
        board.wait_for("listening mode")
        assert wait(lambda: (network(esp32) or {}).get("state") == "listening", what="listening")
        assert wait(lambda: led(esp32) == ("blue", "blinking"), what="the LED")
        assert "status LED      blue blinking (its pixel now" in ok(keel("vdev", "io", esp32.path))
        out = ok(keel("device", "wifi", "--port", board.tty, "--ssid", "home",
                      "--password", "pw-secret-1"))
        assert "stored home" in out and "pw-secret-1" not in out
        board.wait_for("keel: network: joined home", timeout=20)
        net = wait(lambda: (network(esp32) or {}).get("state") == "up" and network(esp32),
                   what="up")
        assert (net["ssid"], net["connects"], net["error"]) == ("home", 1, None)
        assert net["ip"].startswith("192.168.") and net["rssi"] == -55
        assert wait(lambda: led(esp32) == ("green", "breathing"), what="the LED")  # no cloud
        listed = ok(keel("device", "wifi", "--port", board.tty, "--list"))
        assert listed.split() == ["home"]
        board.wait_for("keel: network: joined home", count=2)  # Keel started again after
        assert "pw-secret-1" not in board.console()
    finally:
        board.stop()


@ESP32
def test_strongest_first_a_wrong_password_and_an_access_point_that_comes_back(esp32):
    ok(keel("vdev", "wifi", esp32.path, "--ap", "office", "--password", "office-pass", "--rssi", "-40"))
    ok(keel("vdev", "wifi", esp32.path, "--ap", "home", "--password", "home-pass-1", "--rssi", "-70"))
    nets = {"networks": [{"ssid": "home", "password": "home-pass-1"},
                         {"ssid": "office", "password": "not-the-password"}]}
    vdev.write_files(esp32.path, {"/keel/wifi.json": json.dumps(nets).encode()})
    with esp32.start(seconds=90) as running:
        # office is the stronger: tried first, refused; then home
        running.wait_for("keel: network: cannot join office (wrong-password)", timeout=20)
        running.wait_for("keel: network: joined home", timeout=20)
        assert running.console().index("cannot join office") < running.console().index("joined home")

        ok(keel("vdev", "io", esp32.path, "--ap-down", "home"))
        running.wait_for("keel: network: lost home", timeout=10)
        assert wait(lambda: (network(esp32) or {}).get("state") in ("joining", "waiting"),
                    what="offline")
        alive = running.console().count("APP alive")
        time.sleep(2)
        assert running.console().count("APP alive") > alive  # the app runs on, offline
        ok(keel("vdev", "io", esp32.path, "--ap-up", "home"))
        running.wait_for("keel: network: joined home", count=2, timeout=60)
        net = wait(lambda: (network(esp32) or {}).get("state") == "up" and network(esp32),
                   what="up again")
        assert net["ssid"] == "home" and net["connects"] == 2
    assert "home-pass-1" not in running.console()


@ESP32
def test_a_wrong_password_is_reported_and_the_app_runs_on(esp32):
    ok(keel("vdev", "wifi", esp32.path, "--ap", "home", "--password", "right-pass"))
    nets = {"networks": [{"ssid": "home", "password": "wrong-pass"}]}
    vdev.write_files(esp32.path, {"/keel/wifi.json": json.dumps(nets).encode()})
    with esp32.start(seconds=60) as running:
        running.wait_for("keel: network: cannot join home (wrong-password)", timeout=20)
        running.wait_for("trying again in", timeout=10)
        net = wait(lambda: (network(esp32) or {}).get("error") == "wrong-password" and network(esp32),
                   what="the error")
        assert net["state"] in ("waiting", "joining") and net["connects"] == 0
        assert wait(lambda: red_flashes(esp32) == 2, what="the LED's 2 red flashes")
        running.wait_for("APP alive")
    out = ok(keel("vdev", "status", esp32.path, "--json"))
    assert json.loads(out)["network"]["error"] == "wrong-password"


@pytest.mark.parametrize("board_name", ["nrf52840_dk"], indirect=True)
def test_a_board_without_a_network_stays_offline(device, hello_app):
    dev = device("1.1.0")
    dev.flash(hello_app())
    vdev.write_files(dev.path, {"/keel/cloud/cloud.json": b'{"host": "127.0.0.1", "port": 9}'})
    console = dev.run(until="hello from keel")
    assert "keel: cloud: this board has no network; staying offline (updates over USB)" in console
    status = dev.status()
    assert status["network"] == {"kind": None, "state": "none"}
    assert status["cloud"] == "no-network" and status["app"] == "running"


SEMI_APP = """\
import keel

keel.system_mode(keel.SEMI_AUTOMATIC)
n = [0]
keel.on("network-up", lambda name, data: print("APP event", name))
keel.on("network-down", lambda name, data: print("APP event", name))

def setup():
    print("APP mode", keel.system_mode(), keel.network.kind(), keel.network.connected())

def loop():
    n[0] += 1
    if n[0] == 60:
        print("APP state before connect", keel.network.info()["state"])
        keel.network.connect()
    if n[0] > 60 and keel.network.connected() and n[0] < 10000:
        print("APP joined", keel.network.info()["ssid"])
        keel.network.disconnect()
        print("APP after disconnect", keel.network.info()["state"], keel.network.connected())
        n[0] = 10000
"""


@ESP32
def test_semi_automatic_the_app_brings_the_network_up_and_down(device, make_app):
    """keel.system_mode(SEMI_AUTOMATIC): the system does not join until the app calls
    keel.network.connect(); disconnect() leaves; the app hears network-up and -down."""
    dev = device("1.1.0")
    dev.flash(make_app("semi-app", {"main.py": SEMI_APP}))
    ok(keel("vdev", "wifi", dev.path, "--ap", "home", "--password", "home-pass-1"))
    nets = {"networks": [{"ssid": "home", "password": "home-pass-1"}]}
    vdev.write_files(dev.path, {"/keel/wifi.json": json.dumps(nets).encode()})
    console = dev.run(until="APP event network-down", seconds=40)
    assert "APP mode semi-automatic wifi False" in console
    assert "APP state before connect off" in console  # the system did not join by itself
    assert "APP joined home" in console
    assert "APP after disconnect off False" in console
    assert console.index("APP event network-up") < console.index("APP event network-down")
    assert console.index("APP state before connect") < console.index("keel: network: joined")


@ESP32
def test_holding_the_button_3_s_enters_listening_mode_and_again_leaves_it(esp32):
    ok(keel("vdev", "wifi", esp32.path, "--ap", "home", "--password", "home-pass-1"))
    nets = {"networks": [{"ssid": "home", "password": "home-pass-1"}]}
    vdev.write_files(esp32.path, {"/keel/wifi.json": json.dumps(nets).encode()})
    with esp32.start(seconds=60) as running:
        running.wait_for("keel: network: joined home", timeout=20)
        ok(keel("vdev", "io", esp32.path, "--press", "BOOT=1"))  # too short: nothing
        time.sleep(2)
        assert "listening mode" not in running.console()
        ok(keel("vdev", "io", esp32.path, "--press", "BOOT=3.5"))
        running.wait_for("keel: network: listening mode (the button was held)", timeout=15)
        assert wait(lambda: (network(esp32) or {}).get("state") == "listening", what="listening")
        assert wait(lambda: led(esp32) == ("blue", "blinking"), what="the LED")
        time.sleep(2)
        assert (network(esp32) or {}).get("state") == "listening"  # it stays (credentials or not)
        ok(keel("vdev", "io", esp32.path, "--press", "BOOT=3.5"))
        running.wait_for("keel: network: leaving listening mode", timeout=15)
        running.wait_for("keel: network: joined home", count=2, timeout=20)


@ESP32
def test_provisioning_can_bring_the_network_too(device, make_app, cloud, tmp_path):  # noqa: F811
    """keel device provision --wifi: on a virtual device's directory, and over a board's
    console (--port); the password never in the output."""
    def kc(*args):
        return subprocess.run(["keel", *map(str, args)], env=cloud, capture_output=True,
                              text=True, timeout=120)

    first, second = device("1.1.0"), device("1.1.0")
    for dev in (first, second):
        dev.flash(make_app("plain-app", {"main.py": PLAIN_APP}))
        ok(keel("vdev", "wifi", dev.path, "--ap", "home", "--password", "home-pass-1"))
    refused = kc("device", "provision", first.path, "--password", "home-pass-1")
    assert refused.returncode != 0 and "--password goes with --wifi" in refused.stderr
    short = kc("device", "provision", first.path, "--wifi", "home", "--password", "short")
    assert short.returncode != 0 and "8 to 64 characters" in short.stderr

    out = ok(kc("device", "provision", first.path, "--name", "w1", "--wifi", "home",
                "--password", "home-pass-1"))
    assert "joining home" in out and "home-pass-1" not in out
    assert "keel: network: joined home" in first.run(until="keel: network: joined home")

    board = Board(second, tmp_path / "tty")
    try:
        board.wait_for("listening mode")
        out = ok(kc("device", "provision", "--port", board.tty, "--name", "w2", "--wifi", "home",
                    "--password", "home-pass-1"))
        assert "Keel restarts and joins home" in out and "home-pass-1" not in out
        board.wait_for("keel: network: joined home")  # Keel runs again, with the network
    finally:
        board.stop()
    stored = json.loads(vdev.read_file(second.path, "/keel/wifi.json"))
    assert stored == {"networks": [{"ssid": "home", "password": "home-pass-1"}]}
    show = json.loads(ok(kc("device", "show", "w2", "--json")))
    assert (show["id"], show["platform"]) == ((second.path / "uid").read_text().strip(), "esp32")


@ESP32
def test_on_the_network_with_the_cloud_unreachable_the_led_breathes_green(esp32):
    """Joined, but the cloud does not answer (nothing listens at its port): the session
    retries with backoff and the LED says network up, cloud unreachable (Device OS's
    breathing green) between its tries. Heap raised: the session (issue 14)."""
    ca = pytest.importorskip("keel_cloud.pki").CertificateAuthority.create()
    ident = ca.issue((esp32.path / "uid").read_text().strip())
    ok(keel("vdev", "wifi", esp32.path, "--ap", "home", "--password", "home-pass-1"))
    vdev.write_files(esp32.path, {
        "/keel/wifi.json": json.dumps({"networks": [{"ssid": "home", "password": "home-pass-1"}]}).encode(),
        "/keel/cloud/key.der": ident.key_der, "/keel/cloud/cert.der": ident.cert_der,
        "/keel/cloud/ca.der": ca.cert_der,
        "/keel/cloud/cloud.json": json.dumps({"host": "127.0.0.1", "port": 9}).encode()})
    with esp32.start(seconds=60) as running:
        running.wait_for("keel: network: joined home", timeout=20)
        running.wait_for("keel: cloud not connected", timeout=20)
        assert wait(lambda: led(esp32) == ("green", "breathing"), what="the LED")
        assert (network(esp32) or {}).get("state") == "up"
        running.wait_for("APP alive")
