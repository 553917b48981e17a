# The RGB status LED. It belongs to the system (system/core/led.py drives it with
# Particle's colours); apps borrow it through keel.led.
#
#   show(color, pattern)  what the system means to display (pattern: "solid",
#                         "breathing", "blinking", "flashes-N" (N flashes, then a
#                         pause: an error code), "off"); backends that animate
#                         themselves (the virtual board records it) use this
#   set_rgb(r, g, b)      one frame, 0..255 per channel, for backends with ANIMATE True
#   ANIMATE               True if the system must compute frames and call set_rgb
from hal import backend

_port = backend("status_led")
show = _port.show
set_rgb = _port.set_rgb
ANIMATE = _port.ANIMATE
