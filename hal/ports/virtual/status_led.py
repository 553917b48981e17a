# Virtual status LED: the host sees the colour and pattern the system shows.
from hal.ports.virtual import link

ANIMATE = False
_shown = [None, None]


def show(color, pattern):
    if _shown[0] != color or _shown[1] != pattern:
        _shown[0] = color
        _shown[1] = pattern
        link.emit("led", color=color, pattern=pattern)


def set_rgb(r, g, b):
    _shown[0] = None
    link.emit("led", rgb=[r, g, b], pattern="solid")
