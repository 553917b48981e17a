"""The bootloader's flash ports for real boards, on the MicroPython unix VM.

bootloader/port_esp32.py runs on the ESP32 board twin: the esp32 port's own modules
as MicroPython v1.28.0 has them (boards/twins/esp32/: esp32.Partition found through
the ESP-IDF partition table in the twin's flash, which is the flash `keel image esp32`
writes), with the bootloader the twin's factory step extracted. port_nrf.py runs
against a small stand-in for the modules it uses (`nrf` and `machine`): nrf.Flash(
start=, len=) is a block device over a flash region. Both take readblocks/writeblocks
with an offset (no erase) and ioctl 4/5/6. Then the real bootloader (keel_boot:
load_slots, scan) reads the slots through the port. What this cannot show is a
firmware on hardware behaving as its source says (docs/boards/*.md).
"""

import json
import subprocess
from pathlib import Path

import pytest

from keel import build
from keel.boards import load_board
from keel.paths import micropython

REPO = Path(__file__).resolve().parents[2]

FAKE_MACHINE = r"""
PWRON_RESET, HARD_RESET, WDT_RESET, DEEPSLEEP_RESET, SOFT_RESET = %(causes)s
LOCKUP_RESET = 3
log = []
cause = [PWRON_RESET]
class Reset(Exception):
    pass
def reset_cause():
    return cause[0]
def reset():
    log.append("reset")
    raise Reset()
def deepsleep(ms=0):
    log.append(("deepsleep", ms))
    raise Reset()
"""

FAKE_NRF = r"""
# nrf.Flash(start=, len=) over a flash image file, and the free region the firmware
# reports (between the end of its code and its filesystem).
with open(%(flash)r, "rb") as f:
    FLASH = bytearray(f.read())
FREE = [%(free_start)d, %(free_len)d]
def unused_flash_start():
    return FREE[0]
def unused_flash_length():
    return FREE[1]
class Flash:
    def __init__(self, start=-1, len=-1):
        assert start %% 4096 == 0 and len %% 4096 == 0
        self.start, self.len = start, len
    def readblocks(self, n, buf, off=0):
        at = self.start + n * 4096 + off
        buf[:] = FLASH[at : at + len(buf)]
    def writeblocks(self, n, buf, off=None):
        if off is None:
            self.ioctl(6, n)
        at = self.start + n * 4096 + (off or 0)
        for i in range(len(buf)):
            FLASH[at + i] &= buf[i]
    def ioctl(self, op, arg):
        if op == 4: return self.len // 4096
        if op == 5: return 4096
        if op == 6:
            at = self.start + arg * 4096
            FLASH[at : at + 4096] = b"\xff" * 4096
            return 0
"""

PRELUDE = r"""
import sys, json
sys.path[:0] = [%(fakes)r, %(bootloader)r, %(lib)r]
import fakemachine as machine
sys.modules["machine"] = machine
import %(fake)s as %(portmod)s
sys.modules[%(portmod)r] = %(portmod)s
import keel_boot, module_format as mf
port = keel_boot._port()
assert port.__name__ == %(expect_port)r, port.__name__
assert keel_boot._port() is port and port.exiting is False
with open(%(board_file)r) as f:
    board = json.load(f)
platform = mf.platform_id(board["platform"])
"""

SCAN = r"""
slots = keel_boot.load_slots(board)
for s in slots:
    keel_boot.scan(s, platform)
print(json.dumps({s.label: [s.valid, s.reason, s.size, s.block] for s in slots}))
"""

NRF_CHECKS = r"""
port.DEEP_SLEEP_MARKER = %(marker)r
p = port.Partition.find("system1")
assert p.info() == ("system1", %(s1_offset)d, %(s1_size)d), p.info()
assert port.Partition.find("nope") is None
assert p.ioctl(5, 0) == 4096
st = port.Partition.find("staging")
st.ioctl(6, 0)
st.writeblocks(0, b"keel", 4)
buf = bytearray(8)
st.readblocks(0, buf)
assert buf == b"\xff" * 4 + b"keel", buf
machine.cause[0] = machine.SOFT_RESET
with open(port.DEEP_SLEEP_MARKER, "w") as f:
    f.write("5\n")
assert port.reset_cause() == "deep-sleep"
port._cause.clear()
assert port.reset_cause() == "soft-reset"      # the marker was consumed
for raw, name in ((machine.HARD_RESET, "pin-reset"), (machine.WDT_RESET, "watchdog"),
                  (machine.LOCKUP_RESET, "panic"), (machine.PWRON_RESET, "deep-sleep")):
    machine.cause[0] = raw
    port._cause.clear()
    assert port.reset_cause() == name, (raw, name)
# A slot the firmware does not leave free (here: the firmware's code runs past
# system1's start) is refused, not erased.
nrf.FREE[0] = %(s1_offset)d + 4096
try:
    port.Partition.find("system1")
    raise AssertionError("a slot over the firmware was handed out")
except RuntimeError as e:
    assert "not in the flash this firmware leaves free" in str(e), e
    print("GUARD", e)
nrf.FREE[0] = %(free_start)d
try:
    port.reset()
except machine.Reset:
    pass
assert machine.log == ["reset"]
print("OK")
"""

NRF_CAUSES = "16, 0, 1, 16, 2"  # nrf: PWRON (a System OFF wake), HARD, WDT, -, SOFT


def run_vm(tmp_path: Path, fake_name: str, fake_src: str, causes: str, script: str) -> str:
    fakes = tmp_path / "fakes"
    fakes.mkdir(exist_ok=True)
    (fakes / "fakemachine.py").write_text(FAKE_MACHINE % {"causes": causes})
    (fakes / f"fake{fake_name}.py").write_text(fake_src)
    (tmp_path / "driver.py").write_text(script)
    # The stand-ins hold the whole flash in RAM: a big heap, not a board's.
    proc = subprocess.run([micropython(), "-X", "heapsize=12M", str(tmp_path / "driver.py")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _prelude(tmp_path, fake, portmod, expect, board_file):
    return PRELUDE % {"fakes": str(tmp_path / "fakes"), "bootloader": str(REPO / "bootloader"),
                      "lib": str(REPO / "lib"), "fake": fake, "portmod": portmod,
                      "expect_port": expect, "board_file": str(board_file)}


# On the ESP32 twin, with the bootloader the factory step put on its filesystem.
ESP32_TWIN_CHECKS = r"""
import sys, json
sys.path.insert(0, "/keel/m/bl")
import esp32
import machine
import keel_boot
import module_format as mf
port = keel_boot._port()
assert port.__name__ == "port_esp32", port.__name__
assert keel_boot._port() is port and port.exiting is False
with open("/keel/board.json") as f:
    board = json.load(f)
slots = keel_boot.load_slots(board)
for s in slots:
    keel_boot.scan(s, mf.platform_id(board["platform"]))
print(json.dumps({s.label: [s.valid, s.reason, s.size, s.block] for s in slots}))
p = port.Partition.find("system1")
assert p.info() == ("system1", %(s1_offset)d, %(s1_size)d), p.info()
assert port.Partition.find("nope") is None
assert p.ioctl(5, 0) == 4096 and p.ioctl(4, 0) == %(s1_size)d // 4096
st = port.Partition.find("staging")
st.ioctl(6, 1)
st.writeblocks(1, b"keel", 10)             # in place, no erase
buf = bytearray(16)
st.readblocks(1, buf)
assert buf == b"\xff" * 10 + b"keel" + b"\xff\xff", buf
st.writeblocks(1, b"\x0f" * 4, 10)         # NOR flash: programming only clears bits
st.readblocks(1, buf)
assert buf[10:14] == bytes(c & 0x0f for c in b"keel"), buf
st.writeblocks(1, b"\xf0" * 4096)          # a whole block, no offset: erased first
st.readblocks(1, buf)
assert buf == b"\xf0" * 16, buf
print("cause", port.reset_cause())
print("OK")
"""


@pytest.fixture(scope="module")
def esp32_twin(tmp_path_factory):
    from twins import make_twin

    return make_twin(tmp_path_factory.mktemp("esp32-twin"))


def test_esp32_port(esp32_twin):
    from twins import run_on

    board = load_board("esp32_generic")
    s1 = board.partition("system1")
    proc = run_on(esp32_twin, ESP32_TWIN_CHECKS % {"s1_offset": s1.offset, "s1_size": s1.size})
    out = proc.stdout.splitlines()
    assert out and out[-1] == "OK", proc.stdout + proc.stderr
    slots = json.loads(out[0])
    # The bootloader reads every slot through the port, as the ESP-IDF finds them.
    assert slots["bootloader"][:2] == [True, None]
    assert slots["system1"][:2] == [True, None] and slots["system2"][:2] == [True, None]
    assert slots["user"][:2] == [False, "empty"]
    assert slots["system1"][2:] == [s1.size, 4096]
    assert "cause power-on" in out


# What started the boot -> what port_esp32 says, through machine.reset_cause() as the
# esp32 port answers it: machine.reset() and a panic both read HARD_RESET, which with
# no reason recorded by Keel is a panic; a soft reboot reads SOFT_RESET.
ESP32_CAUSES = {"power-on": "power-on", "reset": "panic", "panic": "panic",
                "watchdog": "watchdog", "deep-sleep": "deep-sleep", "soft-reboot": "soft-reset"}


@pytest.mark.parametrize("event", sorted(ESP32_CAUSES))
def test_esp32_port_reset_causes(esp32_twin, event):
    from twins import run_on

    code = ("import sys\nsys.path.insert(0, '/keel/m/bl')\nimport port_esp32, machine\n"
            "print(machine.reset_cause(), port_esp32.reset_cause())\n")
    proc = run_on(esp32_twin, code, cause=event)
    raw = {"power-on": 1, "reset": 2, "panic": 2, "watchdog": 3, "deep-sleep": 4,
           "soft-reboot": 5}[event]
    assert proc.stdout.split() == [str(raw), ESP32_CAUSES[event]], proc.stdout + proc.stderr


@pytest.mark.parametrize("call, code", [("port_esp32.reset()", 100),
                                        ("port_esp32.deep_sleep(5000)", 101),
                                        ("keel_boot.reset('update')", 100)])
def test_esp32_port_resets_stop_the_chip(esp32_twin, call, code):
    """A reset or deep sleep stops the twin at once, as the chip stops: nothing after
    it runs, and the runner is told why; keel_boot.reset records its reason first."""
    from keel import vdev
    from twins import io_records, run_on

    proc = run_on(esp32_twin, "import sys\nsys.path.insert(0, '/keel/m/bl')\n"
                              "import port_esp32, keel_boot\n%s\nprint('still running')\n" % call)
    assert "still running" not in proc.stdout and proc.returncode == -9, proc.stdout + proc.stderr
    assert io_records(esp32_twin)[-1] == {"k": "halt", "code": code}
    if "update" in call:
        assert vdev.read_file(esp32_twin, "/keel/reset_reason") == b"update"


def test_twin_flash_is_the_flash_keel_image_writes(esp32_twin, tmp_path):
    """The twin's flash holds what `keel image esp32` writes for the same modules: the
    partition table at 0x8000 and every module in its slot; where the image has the
    ESP-IDF bootloader and MicroPython, the twin's flash is erased (its VM is them)."""
    from keel import esp32image, vdev
    from test_esp32_image import app_image, full_flash

    (tmp_path / "fw.bin").write_bytes(full_flash(app_image()))
    system = next(esp32_twin.parent.glob("system-esp32-*"))
    image = esp32image.build_image("esp32_generic", tmp_path / "fw.bin", tmp_path / "out",
                                   system_dir=system)
    merged = image.merged.read_bytes()
    twin = vdev.VirtualDevice(esp32_twin).read_flash()
    board = load_board("esp32_generic")
    table = slice(esp32image.TABLE_OFFSET, esp32image.TABLE_OFFSET + esp32image.TABLE_MAX)
    assert twin[table] == merged[table]
    for label in ("bootloader", "system1", "system2"):
        part = board.partition(label)
        where = slice(part.offset, part.offset + part.size)
        assert twin[where] == merged[where], label
    for label in ("idf-bootloader", "ota_0"):
        part = board.partition(label)
        assert merged[part.offset] == 0xE9  # an ESP-IDF image in the image,
        assert twin[part.offset : part.offset + part.size] == b"\xff" * part.size  # none here


def test_nrf_port(tmp_path):
    board = load_board("nrf52840_dk")
    flash = bytearray(b"\xff" * board.flash_size)
    for path in build.build_system("nrf52840", None, tmp_path / "system"):
        from keel.images import load_valid_image

        image = load_valid_image(path)
        slot = board.slot_for(image.info.function, image.info.index)
        flash[slot.offset : slot.offset + len(image.data)] = image.data
    (tmp_path / "flash.bin").write_bytes(flash)
    # The firmware ends below the first slot; its filesystem starts at "fs".
    free_start = board.partition("bootloader").offset - 0x8000
    free_len = board.partition("fs").offset - free_start
    s1 = board.partition("system1")
    board_file = tmp_path / "board.json"
    board_file.write_text(json.dumps(board.data))
    fake = FAKE_NRF % {"flash": str(tmp_path / "flash.bin"), "free_start": free_start,
                       "free_len": free_len}
    values = {"s1_offset": s1.offset, "s1_size": s1.size, "free_start": free_start,
              "marker": str(tmp_path / "deep-sleep")}
    script = _prelude(tmp_path, "fakenrf", "nrf", "port_nrf", board_file) + \
        f"port.BOARD_FILE = {str(board_file)!r}\n" + SCAN + NRF_CHECKS % values
    out = run_vm(tmp_path, "nrf", fake, NRF_CAUSES, script).splitlines()
    slots = json.loads(out[0])
    assert out[-1] == "OK"
    assert slots["bootloader"][:2] == [True, None]
    assert slots["system1"][:2] == [True, None] and slots["system2"][:2] == [True, None]
    assert slots["user"][:2] == [False, "empty"]
    guard = next(line for line in out if line.startswith("GUARD"))
    assert f"slot system1 (0x{s1.offset:x}-0x{s1.offset + s1.size:x})" in guard


def test_each_platform_builds_only_its_port(tmp_path):
    """The esp32 bootloader carries port_esp32 and no nrf code, and so on; the virtual
    board's carries neither (its port is vboard, from the VM's start-up)."""
    from keel import romfs
    from keel import module_format as mf
    from keel.images import load_valid_image

    expected = {"esp32": {"port_esp32.mpy"}, "nrf52840": {"port_nrf.mpy"}, "virtual": set()}
    for platform, ports in expected.items():
        paths = build.build_system(platform, None, tmp_path / platform)
        boot = next(load_valid_image(p) for p in paths if "bootloader" in p.name)
        read = mf.bytes_reader(boot.data)
        names = {p for p, _, _ in romfs.walk(read, boot.info.header_size, boot.info.payload_size)}
        assert {n for n in names if n.startswith("port_")} == ports, (platform, names)


@pytest.mark.parametrize("board_name, platform", [("esp32_generic", "esp32"),
                                                  ("nrf52840_dk", "nrf52840")])
def test_filesystem_holds_the_extracted_system(tmp_path, board_name, platform):
    """The board's LittleFS (4 KiB blocks: almost every .mpy takes a block of its own)
    holds what the bootloader extracts, the bootloader and both system parts, plus a
    second copy of part 1 (an update extracts beside the old code before the swap)
    and room for the app and the device's state."""
    from keel import factory, romfs
    from keel import module_format as mf
    from keel.images import load_valid_image

    board = load_board(board_name)
    files = {}
    for path in build.build_system(platform, None, tmp_path / "system"):
        image = load_valid_image(path)
        info = image.info
        base = "/keel/m/bl" if info.function == mf.FUNCTION_BOOTLOADER else f"/keel/m/s{info.index}"
        dirs = [base] + ([base + ".new"] if info.index == 1 and base.endswith("s1") else [])
        for path_, offset, length in romfs.walk(mf.bytes_reader(image.data), info.header_size,
                                                info.payload_size):
            if offset >= 0:
                start = info.header_size + offset
                for d in dirs:
                    files[f"{d}/{path_}"] = image.data[start : start + length]
    fs_part = board.partition("fs")
    fs = factory.new_filesystem(board.block_size, fs_part.size // board.block_size)
    factory.write_files(fs, files)
    spare = fs.block_count - fs.used_block_count
    assert spare >= 16, f"{board_name}: only {spare} blocks left for the app and state"


def test_image_nrf52840_files(keel_cli, tmp_path):
    """keel image nrf52840: the factory files to copy with mpremote, and the modules."""
    proc = keel_cli("image", "nrf52840", "--board", "nrf52840_dk", "-o", tmp_path / "nrf")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fs = tmp_path / "nrf" / "fs"
    assert (fs / "boot.py").read_text() == (REPO / "bootloader" / "stage0.py").read_text()
    assert (fs / "main.py").read_text() == (REPO / "bootloader" / "stage0_main.py").read_text()
    assert json.loads((fs / "keel" / "board.json").read_text())["name"] == "nrf52840_dk"
    assert {"keel_boot.mpy", "port_nrf.mpy", ".sha256"} <= {p.name for p in (fs / "keel/m/bl").iterdir()}
    modules = sorted(p.name for p in (tmp_path / "nrf" / "modules").iterdir())
    assert [m.rsplit("-", 1)[0] for m in modules] == ["bootloader", "system-part-1", "system-part-2"]
    assert "mpremote connect PORT cp -r boot.py main.py keel :" in proc.stdout


def test_image_nrf52840_refuses_an_esp32_board(keel_cli, expect_cli_error, tmp_path):
    expect_cli_error(keel_cli("image", "nrf52840", "--board", "esp32_generic", "-o", tmp_path),
                     "esp32_generic is a esp32 board, not an nrf52840 one")
