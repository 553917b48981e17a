"""Flashing a blank ESP32 for real: keel image esp32, then keel flash --usb --esp32.

    KEEL_ESP32_FIRMWARE=ESP32_GENERIC-OTA-20250415-v1.25.0.bin \
        pytest tests/hil/test_hil_esp32_flash.py --port /dev/ttyUSB0 --board esp32_generic

Skipped without --port (tests/hil/conftest.py), on another board, and without the
firmware file (none can be downloaded here). It ERASES the board, which afterwards
runs Keel, not the plain REPL: run it last, or on its own (the file sorts after
test_hil_board.py). It checks what esptool verified (every part, by MD5 on the chip)
and then that the board boots into Keel: its console prints the bootloader's lines
and /keel/status.json says which modules it found.
"""

import json
import os
import time
from pathlib import Path

import pytest

BOARD = "esp32_generic"


@pytest.fixture(scope="module")
def port(request):
    port = request.config.getoption("--port", default=None)
    board = request.config.getoption("--board", default=None)
    if not port:
        pytest.skip("no board attached: run pytest tests/hil --port PORT --board esp32_generic")
    if board != BOARD:
        pytest.skip(f"flashes an {BOARD} only (--board {board})")
    return port


@pytest.fixture(scope="module")
def firmware():
    path = os.environ.get("KEEL_ESP32_FIRMWARE")
    if not path or not Path(path).is_file():
        pytest.skip("set KEEL_ESP32_FIRMWARE to a MicroPython ESP32_GENERIC-OTA .bin (>= 1.25)")
    return Path(path)


def test_flash_a_blank_board_and_boot_keel(port, firmware, tmp_path):
    from mpremote.transport_serial import SerialTransport

    from keel import esp32image

    out = tmp_path / "image"
    esp32image.build_image(BOARD, firmware, out)
    files = esp32image.flash_usb([out], port)  # erase, write, verify (raises on a mismatch)
    assert [f.name for f in files][:3] == ["idf-bootloader.bin", "partition-table.bin",
                                           "micropython.bin"]
    time.sleep(8)  # first boot: the bootloader extracts system parts 1 and 2
    transport = SerialTransport(port, baudrate=115200)
    try:
        transport.enter_raw_repl(soft_reset=False)
        status = json.loads(transport.eval("open('/keel/status.json').read()"))
        listing = transport.eval("__import__('os').listdir('/keel/m')")
    finally:
        transport.close()
    assert {"bl", "s1", "s2"} <= set(listing)
    found = {(m["function"], m["index"]): m for m in status["modules"]}
    assert found[("system-part", 1)]["valid"] and found[("system-part", 2)]["valid"]
    assert status["vm"]["name"] == "micropython"
