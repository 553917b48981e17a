# ESP32 I2C controller on the board's pins (machine.I2C: the port's hardware I2C).
# A device that does not answer raises OSError(ENODEV), from machine.I2C itself.
import machine
from hal.ports.esp32 import buses


class I2C:
    def __init__(self, bus, freq=400000):
        spec = buses.find("i2c", bus)
        self._bus = bus
        self._i2c = machine.I2C(
            spec.get("id", bus),
            scl=buses.pin(spec, "scl"),
            sda=buses.pin(spec, "sda"),
            freq=freq,
        )

    def scan(self):
        return self._i2c.scan()

    def readfrom(self, addr, nbytes, stop=True):
        return self._i2c.readfrom(addr, nbytes, stop)

    def writeto(self, addr, buf, stop=True):
        return self._i2c.writeto(addr, buf, stop)

    def readfrom_mem(self, addr, memaddr, nbytes, *, addrsize=8):
        return self._i2c.readfrom_mem(addr, memaddr, nbytes, addrsize=addrsize)

    def writeto_mem(self, addr, memaddr, buf, *, addrsize=8):
        self._i2c.writeto_mem(addr, memaddr, buf, addrsize=addrsize)

    def __repr__(self):
        return "I2C(%d)" % self._bus
