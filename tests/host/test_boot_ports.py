"""The bootloader's flash ports for real boards, on the MicroPython unix VM.

bootloader/port_esp32.py and port_nrf.py cannot meet their firmware here, so each runs
against a small stand-in for the modules it uses (`esp32` or `nrf`, and `machine`),
with the real firmware's shapes: esp32.Partition.find(type, label=) returns a list and
info() a 6-tuple; nrf.Flash(start=, len=) is a block device over a flash region;
both take readblocks/writeblocks with an offset (no erase) and ioctl 4/5/6. Then the
real bootloader (keel_boot: load_slots, scan) reads the slots of a real flash image
through the port: the esp32 one that `keel image esp32` writes, and an nRF52840 flash
with the modules at board.json's offsets. What this cannot show is the firmware
behaving as its source says: the ports are untested on hardware (docs/boards/*.md).
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

FAKE_ESP32 = r"""
# esp32.Partition over a flash image file: find(type, label=) -> list, info() ->
# (type, subtype, addr, size, label, encrypted), 4 KiB blocks, extended read/write.
TABLE = %(table)r
with open(%(flash)r, "rb") as f:
    FLASH = bytearray(f.read())
erased = []
class Partition:
    TYPE_APP = 0
    TYPE_DATA = 1
    def __init__(self, label, ptype, offset, size):
        self.label, self.ptype, self.offset, self.size = label, ptype, offset, size
    @classmethod
    def find(cls, type=TYPE_APP, subtype=255, label=None, block_size=4096):
        return [cls(l, t, o, s) for l, (t, o, s) in TABLE.items()
                if t == type and (label is None or l == label)]
    def info(self):
        return (self.ptype, 0x40, self.offset, self.size, self.label, False)
    def readblocks(self, n, buf, off=0):
        at = self.offset + n * 4096 + off
        assert at + len(buf) <= self.offset + self.size
        buf[:] = FLASH[at : at + len(buf)]
    def writeblocks(self, n, buf, off=None):
        if off is None:
            for b in range(len(buf) // 4096):
                self.ioctl(6, n + b)
        at = self.offset + n * 4096 + (off or 0)
        assert at + len(buf) <= self.offset + self.size
        for i in range(len(buf)):
            FLASH[at + i] &= buf[i]   # NOR flash: programming only clears bits
    def ioctl(self, op, arg):
        if op == 4: return self.size // 4096
        if op == 5: return 4096
        if op == 6:
            erased.append((self.label, arg))
            at = self.offset + arg * 4096
            FLASH[at : at + 4096] = b"\xff" * 4096
            return 0
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

ESP32_CHECKS = r"""
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
st.writeblocks(1, bytes(4096))            # whole block: erased first
assert ("staging", 1) in esp32.erased
for raw, name in ((machine.PWRON_RESET, "power-on"), (machine.HARD_RESET, "pin-reset"),
                  (machine.WDT_RESET, "watchdog"), (machine.DEEPSLEEP_RESET, "deep-sleep"),
                  (machine.SOFT_RESET, "soft-reset"), (99, "unknown")):
    machine.cause[0] = raw
    assert port.reset_cause() == name, (raw, port.reset_cause())
for call in (port.reset, lambda: port.deep_sleep(5000)):
    try:
        call()
        raise AssertionError("no reset")
    except machine.Reset:
        pass
assert machine.log == ["reset", ("deepsleep", 5000)], machine.log
# keel_boot.reset records why, then resets through the port
keel_boot.flashfs.write_atomic = lambda path, data: machine.log.append((path, data))
try:
    keel_boot.reset("update")
except machine.Reset:
    pass
assert machine.log[-2:] == [(keel_boot.RESET_REASON_FILE, "update"), "reset"], machine.log
print("OK")
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

ESP32_CAUSES = "1, 2, 3, 4, 5"  # machine.*_RESET on the esp32 port
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


@pytest.fixture(scope="module")
def esp32_flash(tmp_path_factory) -> Path:
    """The whole flash `keel image esp32` writes (with a synthetic MicroPython)."""
    from keel import esp32image
    from test_esp32_image import full_flash, app_image

    base = tmp_path_factory.mktemp("esp32-flash")
    (base / "fw.bin").write_bytes(full_flash(app_image()))
    esp32image.build_image("esp32_generic", base / "fw.bin", base / "out")
    return base / "out" / "merged.bin"


def test_esp32_port(tmp_path, esp32_flash):
    board = load_board("esp32_generic")
    table = {}
    for p in board.data["flash"]["partitions"]:
        if p.get("idf"):
            label = p["idf"].get("label", p["label"])
            table[label] = (0 if p["idf"]["type"] == "app" else 1, p["offset"], p["size"])
    s1 = board.partition("system1")
    fake = FAKE_ESP32 % {"table": table, "flash": str(esp32_flash)}
    board_file = REPO / "boards" / "esp32_generic" / "board.json"
    script = _prelude(tmp_path, "fakeesp32", "esp32", "port_esp32", board_file) + SCAN + \
        ESP32_CHECKS % {"s1_offset": s1.offset, "s1_size": s1.size}
    out = run_vm(tmp_path, "esp32", fake, ESP32_CAUSES, script).splitlines()
    slots = json.loads(out[0])
    assert out[-1] == "OK"
    # The bootloader reads every slot of the real image through the port.
    assert slots["bootloader"][:2] == [True, None]
    assert slots["system1"][:2] == [True, None] and slots["system2"][:2] == [True, None]
    assert slots["user"][:2] == [False, "empty"]
    assert slots["system1"][2:] == [s1.size, 4096]


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
