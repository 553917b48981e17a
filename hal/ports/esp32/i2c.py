# ESP32 I2C controller on the board's pins (machine.I2C: the port's hardware I2C).
from hal.ports.machine.buses import I2C
