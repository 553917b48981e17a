# The mode/setup button (board "button"). The system polls it and turns presses
# into "button" events (with the press length); apps use keel.on("button", ...).
#
#   pressed() -> True while held
from hal import backend

pressed = backend("button").pressed
