# I2C controller by bus number (the board's "i2c" list gives its pins).
#
#   bus = I2C(0, freq=400000)
#   bus.scan() -> [addresses]
#   bus.readfrom(addr, n) -> bytes;   bus.writeto(addr, buf)
#   bus.readfrom_mem(addr, reg, n);   bus.writeto_mem(addr, reg, buf)
# A device that does not answer raises OSError(ENODEV), as MicroPython's machine.I2C does.
from hal import backend

I2C = backend("i2c").I2C
