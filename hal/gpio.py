# GPIO: digital pins by board name.
#
#   p = Pin("D7", Pin.OUT)       # modes: Pin.IN, Pin.OUT; pull: Pin.PULL_UP, Pin.PULL_DOWN
#   p.value(1); p.on(); p.off(); p.toggle(); p.value() -> 0 or 1
#   b = Pin("D2", Pin.IN, Pin.PULL_UP)
#   b.irq(handler, Pin.IRQ_FALLING)   # handler(pin); IRQ_RISING, IRQ_FALLING, or both OR-ed
#
# Handlers run from the system loop (as micropython.schedule does), never in a hard IRQ.
from hal import backend

Pin = backend("gpio").Pin
