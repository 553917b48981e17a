# The board's network link: what the cloud session needs before it opens a socket.
#
#   KIND                    "wifi" (a WiFi station: ESP32), "host" (the virtual board
#                           uses the host's network: always up), or None (no network in
#                           the port: nRF52840)
#   connect(ssid, password) start joining an access point; returns at once (wifi)
#   disconnect()            leave it (wifi)
#   state()                 (state, error): state "up", "joining" or "down"; error None,
#                           "wrong-password", "no-ap-found", or the port's number
#   scan()                  [(ssid, rssi)] of the access points in range (wifi; else [])
#   info()                  {"ssid", "rssi", "ip"} while up ({} on "host")
from hal import backend

_port = backend("network")
KIND = _port.KIND
connect = _port.connect
disconnect = _port.disconnect
state = _port.state
scan = _port.scan
info = _port.info
