# The virtual board has no radio: it uses the host's network, which is always up.
KIND = "host"


def connect(ssid, password):
    pass


def disconnect():
    pass


def state():
    return "up", None


def scan():
    return []


def info():
    return {}
