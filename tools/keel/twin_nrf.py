"""The host side of the nRF52840 twin: which MicroPython nrf firmware build it plays,
and the flash that build leaves (boards/twins/nrf/firmware.json). The ESP32 twin's
choice of build (boards/twins/esp32/firmware.json: with ROMFS or without) is read
here too; there the partition table, not the build, places Keel's flash.

On an nRF52840 the firmware decides where Keel's flash is: its code at the bottom, its
filesystem at the top, and (1.28 and later) a ROMFS segment directly below the
filesystem. board.json gives Keel's slots as offsets in the Keel region (the 256 KiB
below the filesystem) and the filesystem as a region of its own; the bootloader finds
both on the board (bootloader/port_nrf.py). A twin's device directory records the build
it plays (DIR/firmware.json), from which the host places the slots and reads the
filesystem, and the twin's nrf module reports the same layout."""

import json

from keel.errors import KeelError
from keel.paths import source_root

FIRMWARE_FILE = "firmware.json"  # in the device directory: the build the twin plays
# What the firmware's code area holds up to the end of its image. Not MicroPython (the
# VM is that): bytes that are not erased, so that a slot written over them shows.
IMAGE_FILL = b"MicroPython nrf firmware image (nRF52840 twin)\n"


CHIPS = {"nrf": "nRF52840", "esp32": "ESP32"}


def builds(port: str = "nrf") -> dict:
    """The firmware builds a port's twin can play (boards/twins/<port>/firmware.json)."""
    return json.loads((source_root() / "boards" / "twins" / port / FIRMWARE_FILE).read_text())


def choose(name: str | None, port: str = "nrf") -> dict:
    """The build `name` (None: the default, the one Keel documents), with its name."""
    table = builds(port)
    name = name or table["default"]
    if name not in table["builds"]:
        raise KeelError(f"no {CHIPS[port]} firmware build {name!r} for the twin "
                        f"(known: {', '.join(table['builds'])})")
    return dict(table["builds"][name], build=name)


def regions(board_data: dict, build: dict) -> dict:
    """Where the build puts the board's regions: {"keel": (address, size), "fs": ...}.
    The Keel region as port_nrf finds it: the ROMFS segment, else the top of the flash
    the code leaves free, which ends at the filesystem."""
    layout = build["layout"]
    fs_start, fs_size = layout["fs"]
    romfs_start, romfs_size = layout["romfs"]
    if romfs_size:
        keel = (romfs_start, romfs_size)
    else:
        size = board_data["flash"]["keel_region"]
        keel = (fs_start - size, size)
    return {"keel": keel, "fs": (fs_start, fs_size)}


def write_firmware(build: dict, flash: bytearray) -> None:
    """The firmware's image at the bottom of the flash."""
    end = build["layout"]["image_end"]
    fill = IMAGE_FILL * (end // len(IMAGE_FILL) + 1)
    flash[:end] = fill[:end]
