# The radio's surroundings: the WiFi access points a station on this board can hear.
# They come from DEVICE_DIR/wifi.json (keel vdev wifi), read at every boot, and go
# down and up while the board runs (keel vdev io --ap-down/--ap-up: io.in commands
# {"op": "ap", "ssid": S, "up": bool}, which the host also writes into wifi.json, as
# an access point stays off across the board's resets).
import json

NO_AP_FOUND = 201  # WIFI_REASON_NO_AP_FOUND (ESP-IDF esp_wifi_types_generic.h)
AUTH_FAIL = 202  # WIFI_REASON_AUTH_FAIL
BEACON_TIMEOUT = 200  # WIFI_REASON_BEACON_TIMEOUT: the associated AP went silent
# How long a join takes (scan, association, WPA2 handshake, DHCP): a few seconds on an
# ESP32; what an app sees is the station connecting meanwhile.
JOIN_MS = 1500
# Authentication modes (WIFI_AUTH_*): open, or WPA2-PSK.
_OPEN, _WPA2_PSK = 0, 3

access_points = []  # dicts: ssid, password, rssi, channel, bssid (bytes), up
_associated = [None]  # the access point joined, while joined


def setup(device_dir, link):
    del access_points[:]
    try:
        with open(device_dir + "/wifi.json") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        doc = {}
    for n, ap in enumerate(doc.get("access_points", ())):
        access_points.append({
            "ssid": ap["ssid"], "password": ap.get("password") or "",
            "rssi": int(ap.get("rssi", -55)), "channel": int(ap.get("channel", 1 + n % 11)),
            "bssid": bytes((0x02, 0x4B, 0x45, 0x45, 0x4C, n & 0xFF)), "up": ap.get("up", True)})
    link.on("ap", _ap_command)


def _ap_command(cmd):
    for ap in access_points:
        if ap["ssid"] == cmd["ssid"]:
            ap["up"] = bool(cmd["up"])


def _find(ssid, bssid=None):
    for ap in access_points:
        if ap["up"] and ap["ssid"] == ssid and (bssid is None or ap["bssid"] == bytes(bssid)):
            return ap
    return None


def scan():
    """(ssid, bssid, channel, rssi, authmode) of every access point on the air."""
    return [(ap["ssid"], ap["bssid"], ap["channel"], ap["rssi"],
             _WPA2_PSK if ap["password"] else _OPEN) for ap in access_points if ap["up"]]


def join(ssid, key, bssid=None):
    """Try to associate: None when it worked, else the disconnect reason."""
    ap = _find(ssid, bssid)
    if ap is None:
        return NO_AP_FOUND
    if ap["password"] and (key or "") != ap["password"]:
        return AUTH_FAIL
    _associated[0] = ap
    return None


def still_there():
    """Is the access point joined still on the air (else the link is lost)."""
    ap = _associated[0]
    return ap is not None and ap["up"]


def leave():
    _associated[0] = None


def rssi():
    """The associated access point's signal (only once join() has worked)."""
    return _associated[0]["rssi"]


def ip_config():
    """(ip, netmask, gateway, dns) the access point's DHCP gave (once joined)."""
    n = access_points.index(_associated[0])
    return ("192.168.%d.20" % (10 + n), "255.255.255.0", "192.168.%d.1" % (10 + n),
            "192.168.%d.1" % (10 + n))
