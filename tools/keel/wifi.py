"""WiFi from the host (docs/connecting.md): the access points on the air around a
virtual ESP32 (keel vdev wifi, keel vdev io --ap-down/--ap-up), and the networks a
board stores (keel device wifi --port: over its raw REPL, into /keel/wifi.json).
A password is never printed or logged."""

import json
from pathlib import Path

from keel import keel_files
from keel.errors import KeelError

AIR_FILE = "wifi.json"  # in a device directory: the access points around the board
MAX_NETWORKS = 5
_SSID_MAX, _PASSWORD_MIN, _PASSWORD_MAX = 32, 8, 64  # 802.11 SSID; WPA2 passphrase


def check_ssid(ssid: str) -> None:
    if not ssid or len(ssid.encode()) > _SSID_MAX:
        raise KeelError(f"an SSID is 1 to {_SSID_MAX} bytes: {ssid!r}")


def check_password(password: str) -> None:
    if password and not _PASSWORD_MIN <= len(password) <= _PASSWORD_MAX:
        raise KeelError(f"a WPA2 password is {_PASSWORD_MIN} to {_PASSWORD_MAX} characters "
                        "(or none, for an open network)")


def ask_password(ssid: str, given: str | None) -> str:
    """The password given, or asked for at the terminal (never echoed); checked."""
    if given is None:
        import getpass

        given = getpass.getpass(f"password for {ssid} (empty: an open network): ")
    check_password(given)
    return given


def network_line(net: dict) -> str:
    """A device's `network` record (status or describe), as keel vdev status and keel
    device show print it."""
    if net.get("kind") is None:
        return "none on this board: offline (updates over USB)"
    where = f" {net['ssid']}" if net.get("ssid") else ""
    extra = f", {net['ip']}, {net.get('rssi')} dBm" if net.get("ip") else ""
    error = f" (last error: {net['error']})" if net.get("error") else ""
    return f"{net.get('kind')} {net.get('state')}{where}{extra}, {net.get('connects', 0)} joins{error}"


# ------------------------------------------------------------------ the air (vdev)


def read_air(device_dir: Path) -> list[dict]:
    path = Path(device_dir) / AIR_FILE
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())["access_points"]
    except (ValueError, KeyError, TypeError) as e:
        raise KeelError(f"{path}: not a list of access points ({e})") from None


def write_air(device_dir: Path, aps: list[dict]) -> None:
    path = Path(device_dir) / AIR_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"access_points": aps}, indent=1) + "\n")
    tmp.replace(path)


def put_ap(device_dir: Path, ssid: str, password: str = "", rssi: int = -55) -> dict:
    check_ssid(ssid)
    check_password(password)
    if not -100 <= rssi <= 0:
        raise KeelError(f"--rssi is in dBm, -100 to 0: {rssi}")
    aps = [ap for ap in read_air(device_dir) if ap["ssid"] != ssid]
    ap = {"ssid": ssid, "password": password, "rssi": rssi, "up": True}
    aps.append(ap)
    write_air(device_dir, aps)
    return ap


def remove_ap(device_dir: Path, ssid: str) -> None:
    aps = read_air(device_dir)
    if not any(ap["ssid"] == ssid for ap in aps):
        raise KeelError(f"{device_dir}: no access point {ssid!r} on the air")
    write_air(device_dir, [ap for ap in aps if ap["ssid"] != ssid])


def switch_ap(device_dir: Path, ssid: str, up: bool) -> dict:
    """An access point off or on the air; the io command that tells a running board."""
    aps = read_air(device_dir)
    found = [ap for ap in aps if ap["ssid"] == ssid]
    if not found:
        raise KeelError(f"{device_dir}: no access point {ssid!r} on the air "
                        "(add it with keel vdev wifi DIR --ap SSID)")
    found[0]["up"] = up
    write_air(device_dir, aps)
    return {"op": "ap", "ssid": ssid, "up": up}


def describe_air(aps: list[dict]) -> list[str]:
    return [f"{ap['ssid']:<24} {ap.get('rssi', -55):>4} dBm  "
            f"{'WPA2' if ap.get('password') else 'open':<5} {'up' if ap.get('up', True) else 'DOWN'}"
            for ap in aps]


# ------------------------------------------------------------------ a board's networks

_BOARD_READ = """\
def _wifi_read():
    import json
    try:
        with open(%r) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        doc = {}
    nets = doc.get("networks") if isinstance(doc, dict) else None
    return nets if isinstance(nets, list) else []
""" % keel_files.WIFI_FILE

_BOARD_WRITE = """\
def _wifi_write(nets):
    import json, os
    try:
        os.mkdir(%r)
    except OSError:
        pass
    with open(%r, "w") as f:
        json.dump({"networks": nets}, f)
    os.rename(%r, %r)
""" % (keel_files.KEEL_DIR, keel_files.WIFI_FILE + ".tmp", keel_files.WIFI_FILE + ".tmp", keel_files.WIFI_FILE)


def board_networks(link) -> list[str]:
    """The SSIDs a board stores (never its passwords)."""
    link._exec(_BOARD_READ)
    return json.loads(link._exec("import json; print(json.dumps([n.get('ssid') for n in _wifi_read()]))"))


def store_network(link, ssid: str, password: str) -> list[str]:
    """Add (or replace) a network on the board, newest last, at most MAX_NETWORKS;
    returns the SSIDs it then stores."""
    check_ssid(ssid)
    check_password(password)
    link._exec(_BOARD_READ + _BOARD_WRITE)
    # The password goes in the code, never on the host's output: json.dumps quotes it.
    link._exec("_n = [n for n in _wifi_read() if n.get('ssid') != %s]\n"
               "_n.append({'ssid': %s, 'password': %s})\n"
               "_wifi_write(_n[-%d:])\n" % (json.dumps(ssid), json.dumps(ssid),
                                            json.dumps(password), MAX_NETWORKS))
    return board_networks(link)


def clear_networks(link) -> None:
    link._exec(_BOARD_WRITE)
    link._exec("_wifi_write([])")
