"""keel firmware info: on the VM's own MicroPython (the unix port's ELF, real data), on
small ELFs built here with the symbols a board's firmware has (pyelftools reads them as it
reads micropython.elf), and on ESP32 flash images; and `keel image esp32` refusing a
firmware that lacks what Keel needs."""

import json
import subprocess

import pytest

from keel import firmware
from keel.errors import KeelError

try:
    from test_esp32_image import BOARD, app_image, full_flash
except ImportError:
    from tests.host.test_esp32_image import BOARD, app_image, full_flash


def test_the_vms_own_micropython(keel_cli):
    proc = keel_cli("firmware", "info", firmware._vm_extension())
    assert proc.returncode == 0, proc.stderr
    assert "MicroPython     1.29.0-preview" in proc.stdout
    assert "port            unix" in proc.stdout
    assert "vfs.rom_ioctl   absent" in proc.stdout
    doc = json.loads(keel_cli("firmware", "info", "--json", firmware._vm_extension()).stdout)
    assert (doc["version"], doc["port"], doc["features"]["vfs.rom_ioctl"]) == ("1.29.0-preview", "unix", False)
    assert doc["features"]["tls"] is True
    assert "asyncio/core.py" in doc["frozen"]


def test_the_vms_launcher_is_followed(keel_cli):
    from keel.paths import micropython

    launcher = micropython()  # .venv/bin/micropython: pip's script that starts the VM
    doc = json.loads(keel_cli("firmware", "info", "--json", launcher).stdout)
    assert doc["version"] == "1.29.0-preview" and "launcher" in doc["note"]


BOARD_SOURCE = r"""
const char banner[] = "MicroPython v1.29.0 on 2026-07-01; Generic ESP32 module with ESP32";
const char mp_frozen_names[] = "_boot.py\0inisetup.py\0";
const int mp_module_esp32 = 1, esp32_partition_type = 1, mp_module_network = 1;
%s
int mp_init(void) { return 0; }
"""


def board_elf(tmp_path, extra: str, heap: bool = True):
    """A shared object standing in for an ESP32 build's micropython.elf: the same kinds of
    symbols (the linker's _heap_start/_heap_end too), in an ELF of this machine."""
    src = tmp_path / "fw.c"
    src.write_text(BOARD_SOURCE % extra)
    out = tmp_path / "micropython.elf"
    flags = ["-Wl,--defsym,_heap_start=0x3ffb0000", "-Wl,--defsym,_heap_end=0x3ffe0000"] if heap else []
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src), *flags], check=True)
    return out


def test_a_board_elf_with_what_keel_needs(tmp_path):
    found = firmware.info(board_elf(tmp_path, "const int mp_module_tls = 1, mp_vfs_rom_ioctl_obj = 1;"))
    assert (found.version, found.port, found.board) == ("1.29.0", "esp32", "Generic ESP32 module with ESP32")
    assert found.features == {"vfs.rom_ioctl": True, "esp32.Partition": True, "nrf.Flash": False,
                              "tls": True, "network": True}
    assert found.frozen == ["_boot.py", "inisetup.py"]
    assert found.heap == {"bytes": 0x30000, "from": "_heap_start .. _heap_end"}
    assert found.refusal() is None and found.keel()["without"] == []


def test_a_board_elf_without_tls_is_refused_with_the_reason(tmp_path):
    found = firmware.info(board_elf(tmp_path, "", heap=False))
    assert found.features["tls"] is False and found.heap is None
    assert found.refusal() == "it lacks tls (the cloud session is TLS)"
    assert [w["feature"] for w in found.keel()["without"]] == ["vfs.rom_ioctl"]


def test_not_a_firmware(tmp_path):
    other = tmp_path / "x.txt"
    other.write_text("hello")
    with pytest.raises(KeelError, match="not a MicroPython firmware"):
        firmware.info(other)
    with pytest.raises(KeelError, match="a folder"):
        firmware.info(tmp_path)


def test_an_esp32_bin_and_keel_image_refusing_what_lacks_tls(tmp_path, keel_cli):
    good = tmp_path / "ESP32_GENERIC.bin"
    good.write_bytes(full_flash(app_image()))
    doc = json.loads(keel_cli("firmware", "info", "--json", good).stdout)
    assert (doc["kind"], doc["port"], doc["version"]) == ("esp32-bin", "esp32", "1.25.0")
    assert doc["keel"]["ok"] is True and doc["features"]["vfs.rom_ioctl"] is False
    # what esptool's image reader gives: the app's entry point and segments (app_image's)
    assert doc["image"]["entry"] == "0x40080400"
    loaded = [s["address"] for s in doc["image"]["segments"] if s["address"] != "0x00000000"]  # (0: padding)
    assert loaded == ["0x3f400020", "0x3ffb0000", "0x40080000", "0x400d0020"]
    bad = tmp_path / "ESP32_NO_TLS.bin"
    bad.write_bytes(full_flash(app_image(names=b"\0Partition\0network\0")))
    proc = keel_cli("image", "esp32", "--board", BOARD, "--firmware", bad, "-o", tmp_path / "out")
    assert proc.returncode == 1 and "Keel does not run on this firmware: it lacks tls" in proc.stderr
    assert not (tmp_path / "out").exists()
