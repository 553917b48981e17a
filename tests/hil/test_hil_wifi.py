"""Joining a real access point (issue 13, docs/connecting.md): with --wifi-ssid (and
--wifi-password), `keel device wifi --port` stores the network on the board, Keel
restarts, and its connection manager joins it: the console says so and the status the
board records has the network up, with an address. The board's own stored networks are
put back at the end. Skipped without --wifi-ssid, and on a board with no network (the
nRF52840). In make test, tests/hil/on_virtual_board.py runs it on the ESP32 twin with an
access point it puts on the air (keel vdev wifi)."""

import json

import pytest

STATUS_FILE = "/keel/status.json"
CREDENTIALS_FILE = "/keel/wifi.json"
JOIN_S = 60  # a boot, a scan and a join (DHCP included) on a real board


@pytest.fixture
def access_point(request):
    ssid = request.config.getoption("--wifi-ssid", default=None)
    if not ssid:
        pytest.skip("no access point given: run with --wifi-ssid SSID [--wifi-password P]")
    return ssid, request.config.getoption("--wifi-password", default=None) or ""


def test_the_board_joins_the_access_point(hil_board, access_point):
    if hil_board.data["platform"] != "esp32":
        pytest.skip(f"{hil_board.name} has no WiFi station (of Keel's boards only the ESP32 "
                    "joins an access point)")
    ssid, password = access_point
    hil_board.connect()
    before = hil_board.read_file(CREDENTIALS_FILE)
    hil_board.remove(STATUS_FILE)
    try:
        proc = hil_board.keel("device", "wifi", "--port", hil_board.port, "--ssid", ssid,
                              "--password", password)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert not password or password not in proc.stdout + proc.stderr
        seen = hil_board.wait_output([f"keel: network: joined {ssid}",
                                      f"keel: network: cannot join {ssid}"], JOIN_S)
        assert seen == f"keel: network: joined {ssid}", f"the board said {seen!r}"
        hil_board.connect()
        status = json.loads(hil_board.read_file(STATUS_FILE))
        net = status["network"]
        assert (net["kind"], net["state"], net["ssid"], net["error"]) == ("wifi", "up", ssid, None)
        assert net["ip"] and net["ip"] != "0.0.0.0" and net["connects"] >= 1
    finally:
        hil_board.connect()
        if before is None:
            hil_board.remove(CREDENTIALS_FILE)
        else:
            hil_board.run("with open(%r, 'wb') as f:\n    f.write(%r)\n" % (CREDENTIALS_FILE, before))
