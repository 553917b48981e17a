# The ESP32's WiFi station, through the port's network.WLAN (ports/esp32/network_wlan.c):
# connect() only starts the join and the driver retries on its own for as long as the
# connection is wanted; status() says how it goes (STAT_GOT_IP, STAT_CONNECTING, or why
# not: STAT_WRONG_PASSWORD, STAT_NO_AP_FOUND and its variants, a raw IDF reason).
import network

KIND = "wifi"
_sta = [None]
_NO_AP = (network.STAT_NO_AP_FOUND, 210, 211, 212)


def _wlan():
    if _sta[0] is None:
        _sta[0] = network.WLAN(network.STA_IF)
        _sta[0].active(True)
    return _sta[0]


def connect(ssid, password):
    _wlan().connect(ssid, password)


def disconnect():
    if _sta[0] is not None:
        _sta[0].disconnect()


def state():
    if _sta[0] is None:
        return "down", None
    code = _sta[0].status()
    if code == network.STAT_GOT_IP:
        return "up", None
    if code == network.STAT_WRONG_PASSWORD:
        return "down", "wrong-password"
    if code in _NO_AP:
        return "down", "no-ap-found"
    if code == network.STAT_CONNECTING:
        return "joining", None
    if code == network.STAT_IDLE:
        return "down", None
    return "down", code


def scan():
    found = _wlan().scan()
    return sorted(((ap[0].decode(), ap[3]) for ap in found), key=lambda ap: -ap[1])


def info():
    sta = _sta[0]
    if sta is None or not sta.isconnected():
        return {}
    try:
        rssi = sta.status("rssi")
    except OSError:
        rssi = None
    return {"ssid": sta.config("ssid"), "rssi": rssi, "ip": sta.ifconfig()[0]}
