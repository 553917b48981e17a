# SPI controller by bus number (the board's "spi" list gives its pins).
#
#   bus = SPI(0, baudrate=1000000)
#   bus.write(buf); bus.read(n) -> bytes; bus.write_readinto(out_buf, in_buf)
# Chip select is an ordinary output Pin the app drives.
from hal import backend

SPI = backend("spi").SPI
