# Button: publishes the event "button" (data: how long it was held, in ms) when
# the mode button is pressed. Offline, events wait in the cloud queue.
import keel


def on_button(event, held_ms):
    keel.publish("button", str(held_ms))
    keel.log.info("button pressed for %d ms", held_ms)


def setup():
    keel.on("button", on_button)
