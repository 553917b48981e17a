# ESP32 SPI controller on the board's pins. "id" in the board's entry picks the
# peripheral: 1 is HSPI, 2 is VSPI (SPI0/SPI1 belong to the flash).
from hal.ports.machine.buses import SPI
