# network, as MicroPython v1.28.0's esp32 port has it (ports/esp32/network_wlan.c,
# network_common.c, modnetwork.h, modnetwork_globals.h): the WLAN interfaces and their
# status codes, over the board's radio surroundings (boards/virtual/sim_radio.py),
# which have no access point yet: a station finds none. Sockets are the host's.
import sim_radio

STA_IF = 0
AP_IF = 1
STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
STAT_BEACON_TIMEOUT = 200
STAT_NO_AP_FOUND = 201
STAT_WRONG_PASSWORD = 202
STAT_ASSOC_FAIL = 203  # (deprecated name of STAT_CONNECT_FAIL)
STAT_CONNECT_FAIL = 203
STAT_HANDSHAKE_TIMEOUT = 204
STAT_NO_AP_FOUND_W_COMPATIBLE_SECURITY = 210
STAT_NO_AP_FOUND_IN_AUTHMODE_THRESHOLD = 211
STAT_NO_AP_FOUND_IN_RSSI_THRESHOLD = 212
_AUTH_FAIL = 202  # WIFI_REASON_AUTH_FAIL
_CONNECTION_FAIL = 205
_ASSOC_LEAVE = 8  # after disconnect()
_NO_AP = (201, 210, 211, 212)


class WLAN:
    IF_STA = 0
    IF_AP = 1
    _started = False  # esp_wifi_start() was called (read by machine.ADC: ADC2)
    _ifaces = {}

    def __new__(cls, interface=IF_STA):
        if interface not in (WLAN.IF_STA, WLAN.IF_AP):
            raise ValueError("invalid WLAN interface identifier")
        found = cls._ifaces.get(interface)
        if found is None:  # one object per interface
            found = cls._ifaces[interface] = object.__new__(cls)
            found._if = interface
            found._active = False
            found._requested = False  # wifi_sta_connect_requested
            found._connected = False  # wifi_sta_connected: associated, with an IP
            found._reason = 0  # wifi_sta_disconn_reason
            found._attempt = None  # (ssid, key, bssid) of a connect() the radio has not answered
        return found

    def __init__(self, interface=IF_STA):
        pass

    def active(self, is_active=None):
        if is_active is not None:
            self._active = bool(is_active)
            WLAN._started = any(w._active for w in WLAN._ifaces.values())
        return self._active

    def connect(self, ssid=None, key=None, *, bssid=None):
        if self._if != WLAN.IF_STA:
            raise OSError("STA required")
        if not self._active:
            raise OSError("Wifi Not Started")
        if bssid is not None and len(bssid) != 6:
            raise ValueError
        self._requested = True
        self._attempt = (ssid, key, bssid)

    def disconnect(self):
        self._requested = False
        self._attempt = None
        if self._connected:
            self._reason = _ASSOC_LEAVE
        self._connected = False

    def _events(self):
        # The driver's events, which the port's handler records as they come: here
        # the radio answers a connect() the first time anything asks after it.
        if self._attempt is not None:
            ssid, key, bssid = self._attempt
            self._attempt = None
            reason = sim_radio.join(ssid, key, bssid)
            if reason is None:
                self._connected = True
                self._reason = 0
            else:
                self._reason = reason

    def isconnected(self):
        self._events()
        return self._connected

    def status(self, param=None):
        if param is not None:
            if param == "rssi" and self._if == WLAN.IF_STA:
                if not self._connected:  # esp_wifi_sta_get_ap_info()
                    raise OSError("Wifi Not Connected")
                return sim_radio.rssi()
            if param == "stations" and self._if == WLAN.IF_AP:
                return []
            raise ValueError("unknown status param")
        if self._if != WLAN.IF_STA:
            return None
        self._events()
        reason = self._reason
        if self._connected:
            return STAT_GOT_IP
        if reason in _NO_AP:
            return reason
        if reason in (_AUTH_FAIL, _CONNECTION_FAIL):
            return STAT_WRONG_PASSWORD
        if reason == _ASSOC_LEAVE:
            return STAT_IDLE
        if self._requested:
            return STAT_CONNECTING  # (the driver retries for ever by default)
        return STAT_IDLE if reason == 0 else reason

    def scan(self):
        if not (self._if == WLAN.IF_STA and self._active):
            raise OSError("STA must be active")
        return [(ssid.encode(), bssid, channel, rssi, auth, False)
                for ssid, bssid, channel, rssi, auth in sim_radio.scan()]

    def ifconfig(self, config=None):
        if config is not None:
            return None
        if self._connected:
            return sim_radio.ip_config()  # (ip, netmask, gateway, dns) the AP gave
        return ("0.0.0.0", "0.0.0.0", "0.0.0.0", "0.0.0.0")

    def config(self, *args, **kwargs):
        if args == ("mac",):
            import machine

            mac = bytearray(machine.unique_id())  # the STA's MAC is the base MAC;
            if self._if == WLAN.IF_AP:  # the soft-AP's the base MAC + 1 (ESP-IDF)
                mac[5] = (mac[5] + 1) & 0xFF
            return bytes(mac)
        if args:
            raise ValueError("unknown config param")
        return None
