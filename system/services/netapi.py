# keel.network and keel.system_mode (docs/api.md): the app's hand on the network link,
# as Device OS's WiFi.* and SYSTEM_MODE. Loaded the first time an app uses either, so an
# app that does not pays nothing for it.
import sys

AUTOMATIC = "automatic"  # the system joins the network and the cloud by itself
SEMI_AUTOMATIC = "semi-automatic"  # the app starts first, and calls keel.network.connect()
MANUAL = "manual"  # as semi-automatic (Keel's system loop always runs)
_mode = [AUTOMATIC]


def _link():
    # The connection manager on a WiFi board; None on the virtual board (the host's
    # network, always up) and on a board without a network.
    c = sys.modules.get("connection")
    return c.current() if c is not None else None


def _kind():
    from hal import network

    return network.KIND


def system_mode(mode=None):
    """The system mode (no argument), or set it: call it when the app is imported."""
    if mode is None:
        return _mode[0]
    if mode not in (AUTOMATIC, SEMI_AUTOMATIC, MANUAL):
        raise ValueError("unknown system mode '%s'" % mode)
    link = _link()
    if link is not None:
        link.set_mode(mode)
    _mode[0] = mode
    return mode


class network:
    """The board's network link (keel.network)."""

    @staticmethod
    def kind():
        """"wifi", "host" (the virtual board: the host's network) or None (none)."""
        return _kind()

    @staticmethod
    def connected():
        link = _link()
        if link is None:
            return _kind() == "host"
        return link.state == "up"

    @staticmethod
    def connect():
        """Join the stored networks (in semi-automatic mode, or after disconnect())."""
        link = _link()
        if link is None:
            if _kind() is None:
                raise OSError("this board has no network")
            return
        link.connect()

    @staticmethod
    def disconnect():
        """Leave the network (and so the cloud) until connect()."""
        link = _link()
        if link is not None:
            link.disconnect()

    @staticmethod
    def info():
        """{"state", "ssid", "rssi", "ip", "connects", "error"}: what the status records."""
        link = _link()
        if link is None:
            return {"state": "up" if _kind() == "host" else "none"}
        return dict(link.status.doc.get("network") or {})
