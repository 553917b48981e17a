# nRF52840 SPI controller (SPIM0..2, "id" in the board's entry) on the board's pins.
# The port clocks at 125 kHz..8 MHz in powers of two; other rates snap to one of them.
from hal.ports.machine.buses import SPI
