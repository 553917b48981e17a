# The radio's surroundings: the WiFi access points a station on this board can hear.
# None yet: a station scans and finds nothing, and a connection fails with "no AP
# found". (A simulated radio, with access points the host sets up, fills this in.)
access_points = []  # (ssid, bssid, channel, rssi, authmode, key)

NO_AP_FOUND = 201  # WIFI_REASON_NO_AP_FOUND (ESP-IDF esp_wifi_types.h)


def scan():
    return [ap[:5] for ap in access_points]


def join(ssid, key, bssid=None):
    """Try to associate: None when it worked, else the disconnect reason."""
    return NO_AP_FOUND


def rssi():
    """The associated access point's signal (only once join() has worked)."""
    raise NotImplementedError


def ip_config():
    """(ip, netmask, gateway, dns) the access point's DHCP gave (once joined)."""
    raise NotImplementedError
