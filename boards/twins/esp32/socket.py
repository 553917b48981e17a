# socket, as the esp32 port has it (ports/esp32/modsocket.c over lwIP, v1.28.0), on the
# host's sockets: a name resolves only while the WiFi station has an address. With no
# link lwIP's DNS has no server and getaddrinfo fails, raised as a negative number
# (_getaddrinfo_inner: mp_raise_OSError(-retval), EAI_FAIL = 202); a numeric address
# resolves on the board and its connect() then fails (no route: EHOSTUNREACH), where
# the twin fails at getaddrinfo for every host: one step earlier, the same OSError for
# code that opens a connection. A socket already open keeps working on the host when
# the link goes: Keel's connection manager closes its session then, as on the board
# its traffic would stop.
import socket as _host

import network

for _name in dir(_host):
    if not _name.startswith("__") and _name != "getaddrinfo":
        globals()[_name] = getattr(_host, _name)
del _name

_EAI_FAIL = 202


def getaddrinfo(host, port, af=0, type=0, proto=0, flags=0):
    sta = network.WLAN._ifaces.get(network.STA_IF)
    if sta is None or not sta.isconnected():
        raise OSError(-_EAI_FAIL)
    return _host.getaddrinfo(host, port, af, type, proto, flags)
