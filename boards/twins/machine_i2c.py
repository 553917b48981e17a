# The I2C transfers MicroPython gives every port's machine.I2C: extmod/machine_i2c.c at
# v1.28.0 (mp_machine_i2c_locals_dict, the methods of ports/esp32/machine_i2c.c's
# I2C and SoftI2C and of ports/nrf/modules/machine/i2c.c's I2C alike), here on the
# virtual board's simulated bus (boards/virtual/sim_i2c.py). A twin's I2C subclasses
# I2CBus and says which devices its pins reach (_devices).
import sim_i2c


class I2CBus:
    def _devices(self):
        raise NotImplementedError  # the port's: the devices on its SDA and SCL pins

    def scan(self):
        return sorted(self._devices())

    def writeto(self, addr, buf, stop=True):
        sim_i2c.write(sim_i2c.target(self._devices(), addr), buf)
        return len(buf)  # the number of bytes ACKed

    def writevto(self, addr, vector, stop=True):
        device = sim_i2c.target(self._devices(), addr)
        device.start()
        count = 0
        for buf in vector:
            for byte in buf:
                device.receive(byte)
            count += len(buf)
        return count

    def readfrom_into(self, addr, buf, stop=True):
        sim_i2c.read_into(sim_i2c.target(self._devices(), addr), buf)

    def readfrom(self, addr, nbytes, stop=True):
        buf = bytearray(nbytes)
        self.readfrom_into(addr, buf, stop)
        return bytes(buf)

    def readfrom_mem_into(self, addr, memaddr, buf, *, addrsize=8):
        device = sim_i2c.target(self._devices(), addr)
        sim_i2c.select(device, memaddr, addrsize)
        sim_i2c.read_into(device, buf)

    def readfrom_mem(self, addr, memaddr, nbytes, *, addrsize=8):
        buf = bytearray(nbytes)
        self.readfrom_mem_into(addr, memaddr, buf, addrsize=addrsize)
        return bytes(buf)

    def writeto_mem(self, addr, memaddr, buf, *, addrsize=8):
        device = sim_i2c.target(self._devices(), addr)
        sim_i2c.select(device, memaddr, addrsize)
        for byte in buf:
            device.receive(byte)
