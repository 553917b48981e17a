# The nRF52840 ports of MicroPython have no network (no socket or network module): a
# Keel device on one runs offline, and takes its updates over USB.
KIND = None


def connect(ssid, password):
    raise OSError("this board has no network")


def disconnect():
    pass


def state():
    return "down", None


def scan():
    return []


def info():
    return {}
