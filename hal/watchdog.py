# Hardware watchdog: once started it cannot be stopped; if not fed within the
# timeout the board resets with reset reason "watchdog".
#
#   wdt = Watchdog(timeout_ms=8000); wdt.feed()
from hal import backend

Watchdog = backend("watchdog").Watchdog
