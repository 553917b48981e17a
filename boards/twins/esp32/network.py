# network, as MicroPython v1.28.0's esp32 port has it (ports/esp32/network_wlan.c,
# network_common.c, modnetwork.h, modnetwork_globals.h): the WLAN interfaces and their
# status codes, over the board's radio surroundings (boards/virtual/sim_radio.py: the
# access points keel vdev wifi puts on the air). A join takes sim_radio.JOIN_MS; on a
# disconnect (the AP gone: beacon timeout; no AP; a wrong password) the driver tries
# again for as long as the connect stands (network_wlan.c, the STA_DISCONNECTED
# handler: conf_wifi_sta_reconnects 0, for ever). Sockets are the host's, gated by the
# station's state (boards/twins/esp32/socket.py).
import time

import sim_radio
import vm_twin

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
# (made once: status() is C on the chip and allocates nothing; a tuple built in the
# call would take 32 bytes of the twin's heap every time the network manager asks)
_REFUSED = (_AUTH_FAIL, _CONNECTION_FAIL)


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
            found._target = None  # (ssid, key, bssid) of the last connect()
            found._attempt = None  # ticks_ms of the join under way, if one is
        return found

    def __init__(self, interface=IF_STA):
        pass

    def active(self, is_active=None):
        if is_active is not None:
            self._active = bool(is_active)
            WLAN._started = any(w._active for w in WLAN._ifaces.values())
            if not self._active and self._if == WLAN.IF_STA:  # esp_wifi_stop()
                self._attempt = None
                if self._connected:
                    self._drop(_ASSOC_LEAVE)
        return self._active

    def connect(self, ssid=None, key=None, *, bssid=None):
        if self._if != WLAN.IF_STA:
            raise OSError("STA required")
        if not self._active:
            raise OSError("Wifi Not Started")
        if bssid is not None and len(bssid) != 6:
            raise ValueError
        if self._connected:
            self._drop(_ASSOC_LEAVE)
        self._requested = True
        self._target = (ssid, key, bssid)
        self._attempt = time.ticks_ms()

    def disconnect(self):
        # esp_wifi_disconnect(): connected or still trying, the driver reports a
        # disconnection with reason ASSOC_LEAVE [IDF], so status() reads STAT_IDLE
        # until a later connect() has an outcome.
        self._requested = False
        if self._connected or self._attempt is not None:
            self._drop(_ASSOC_LEAVE)
        self._attempt = None

    def _drop(self, reason):
        self._connected = False
        self._reason = reason
        sim_radio.leave()

    def _events(self):
        # The driver's events, which the port's handlers record as they come: here
        # they are worked out when anything asks (the CPU looks at the radio).
        vm_twin.poll()  # the host's commands: an access point down or up
        now = time.ticks_ms()
        if self._connected and not sim_radio.still_there():
            self._drop(sim_radio.BEACON_TIMEOUT)
            if self._requested:
                self._attempt = now  # the handler's esp_wifi_connect()
        if self._attempt is not None and time.ticks_diff(now, self._attempt) >= sim_radio.JOIN_MS:
            ssid, key, bssid = self._target
            reason = sim_radio.join(ssid, key, bssid)
            if reason is None:
                self._attempt = None
                self._connected = True
                self._reason = 0
            else:
                self._reason = reason
                self._attempt = now if self._requested else None  # and again

    def isconnected(self):
        self._events()
        return self._connected

    def status(self, param=None):
        if param is not None:
            if param == "rssi" and self._if == WLAN.IF_STA:
                self._events()
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
        if reason in _REFUSED:
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
        self._events()
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
        if args in (("ssid",), ("essid",)) and self._if == WLAN.IF_STA:
            # network_wlan_config: the station's configured SSID (cfg.sta.ssid)
            return self._target[0] if self._target and self._target[0] else ""
        if args:
            raise ValueError("unknown config param")
        return None
