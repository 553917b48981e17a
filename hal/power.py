# Resets and sleep.
#
#   reset()           restart the board now (keel.reset() records why first; this does not)
#   reset_cause()     "power-on", "soft-reset", "watchdog", "deep-sleep", "panic", ...
#   sleep_ms(ms)      light sleep: the CPU waits, RAM and peripherals keep their state
#   deep_sleep(ms)    power down; the board restarts after ms with cause "deep-sleep"
from hal import backend

_port = backend("power")
reset = _port.reset
reset_cause = _port.reset_cause
sleep_ms = _port.sleep_ms
deep_sleep = _port.deep_sleep
