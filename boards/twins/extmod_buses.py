# The bus transfers MicroPython gives every port, at v1.28.0, here on the virtual board's
# simulated buses; a twin's classes subclass these and say what their pins reach:
# - I2C: extmod/machine_i2c.c, mp_machine_i2c_locals_dict (the methods of
#   ports/esp32/machine_i2c.c's I2C and SoftI2C and of ports/nrf/modules/machine/i2c.c's
#   I2C alike), over boards/virtual/sim_i2c.py; the subclass gives _devices();
# - SPI: extmod/machine_spi.c, mp_machine_spi_locals_dict (ports/esp32/machine_hw_spi.c's
#   and ports/nrf/modules/machine/spi.c's SPI), over sim_serial.SPIWires in self._wires.
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


class SPIBus:
    def deinit(self):
        pass

    def write(self, buf):
        self._wires.transfer(buf, bytearray(len(buf)))

    def read(self, nbytes, write=0x00):
        buf = bytearray(nbytes)
        self._wires.transfer(write & 0xFF, buf)
        return bytes(buf)

    def readinto(self, buf, write=0x00):
        self._wires.transfer(write & 0xFF, buf)

    def write_readinto(self, write_buf, read_buf):
        if len(write_buf) != len(read_buf):
            raise ValueError("buffers must be the same length")
        self._wires.transfer(write_buf, read_buf)
