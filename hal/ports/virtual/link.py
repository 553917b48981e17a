# The virtual board's wire to the host (io.log out, io.in in; the host side is
# tools/keel/vio.py), and the way to the board's simulated hardware: the models of
# boards/virtual/sim_*.py belong to the board, not to Keel, and its firmware
# (vm_startup.py) loads each when a backend first asks (sim()). The backends are the
# thin layer over them that the esp32 backends are over machine. Host commands are
# read by the system loop.
import hal
import vboard


def sim(name):
    return vboard.sim(name, hal.board)  # (the board definition, read when needed)


_link = sim("sim_link")
emit = _link.emit
on = _link.on
_handlers = _link._handlers  # (for tests: the handlers registered per op)

hal.add_service(_link.poll)
