# nRF52840 I2C controller (TWIM0 or TWIM1, "id" in the board's entry) on the board's
# pins. The port runs at 100, 250 or 400 kHz: any other frequency snaps to one of
# them. TWIM0/1 share their instance with SPIM0/1, so a board must not give I2C and SPI
# the same id.
from hal.ports.machine.buses import I2C
