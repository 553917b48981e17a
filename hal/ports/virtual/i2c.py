# Virtual I2C: each bus carries the simulated devices the board lists (the board's
# sim_i2c), e.g. "i2c": [{"bus": 0, "simulated": [{"model": "tmp102", "address": 72}]}].
# An address no device answers raises OSError(ENODEV), as machine.I2C does.
import hal
from hal.ports.virtual.link import sim

_i2c = sim("sim_i2c")


class I2C:
    def __init__(self, bus, freq=400000):
        if freq <= 0:
            raise ValueError("freq must be positive")
        for spec in hal.board().get("i2c", ()):
            if spec["bus"] == bus:
                break
        else:
            raise ValueError("board %s has no I2C bus %r" % (hal.board()["name"], bus))
        self._devices = _i2c.devices(spec)
        self._bus = bus
        self._freq = freq

    def scan(self):
        return sorted(self._devices)

    def readfrom(self, addr, nbytes, stop=True):
        buf = bytearray(nbytes)
        _i2c.read_into(_i2c.target(self._devices, addr), buf)
        return bytes(buf)

    def writeto(self, addr, buf, stop=True):
        _i2c.write(_i2c.target(self._devices, addr), buf)
        return len(buf)  # every byte ACKed

    def readfrom_mem(self, addr, memaddr, nbytes, *, addrsize=8):
        device = _i2c.target(self._devices, addr)
        _i2c.select(device, memaddr, addrsize)
        buf = bytearray(nbytes)
        _i2c.read_into(device, buf)
        return bytes(buf)

    def writeto_mem(self, addr, memaddr, buf, *, addrsize=8):
        device = _i2c.target(self._devices, addr)
        _i2c.select(device, memaddr, addrsize)
        for byte in buf:
            device.receive(byte)

    def __repr__(self):
        return "I2C(%d, freq=%d)" % (self._bus, self._freq)
