"""The bootloader's flash ports for real boards, on the MicroPython unix VM.

bootloader/port_esp32.py runs on the ESP32 board twin: the esp32 port's own modules
as MicroPython v1.28.0 has them (boards/twins/esp32/: esp32.Partition found through
the ESP-IDF partition table in the twin's flash, which is the flash `keel image esp32`
writes), with the bootloader the twin's factory step extracted. port_nrf.py runs on
the nRF52840 twin (boards/twins/nrf/: nrf.Flash over the twin's flash, laid out as a
MicroPython nrf firmware build leaves it, vfs.rom_ioctl, machine), after stage 0 has
put the filesystem at /. Both take readblocks/writeblocks with an offset (no erase)
and ioctl 4/5/6. Then the real bootloader (boot_check: load_slots, scan) reads the
slots through the port. What this cannot show is a firmware on hardware behaving as
its source says (docs/boards/*.md).
"""

import json
import subprocess
from pathlib import Path

import pytest

from keel import build
from keel.boards import load_board
from keel.paths import micropython

REPO = Path(__file__).resolve().parents[2]

# On the ESP32 twin, with the bootloader the factory step put on its filesystem.
ESP32_TWIN_CHECKS = r"""
import sys, json
sys.path.insert(0, "/keel/m/bl")
import esp32
import machine
import boot_check
import handover
import module_format as mf
port = handover.port()
assert port.__name__ == "port_esp32", port.__name__
assert handover.port() is port and port.exiting is False
with open("/keel/board.json") as f:
    board = json.load(f)
slots = boot_check.load_slots(board)
for s in slots:
    boot_check.scan(s, mf.platform_id(board["platform"]))
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
# A slot is a window on the romfs partition: nothing reaches past its end (the next
# slot), which esp32.Partition would allow (it checks only the partition's bounds).
romfs = esp32.Partition.find(esp32.Partition.TYPE_DATA, label="romfs")[0]
assert romfs.info()[2] < st.info()[1] < romfs.info()[2] + romfs.info()[3]
last = st.ioctl(4, 0) - 1
for call in (lambda: st.readblocks(last, bytearray(8), 4092), lambda: st.ioctl(6, last + 1),
             lambda: st.writeblocks(last + 1, b"x" * 4096), lambda: st.readblocks(-1, buf),
             lambda: st.writeblocks(last, b"x", 4096)):
    try:
        call()
        raise AssertionError("reached past the slot")
    except OSError as e:
        assert e.errno == 22, e
head = bytearray(4)
port.Partition.find("bootloader").readblocks(0, head)
assert head == mf.MAGIC, head
print("view", [port.rom_view(s.label) is not None for s in slots])
v = port.rom_view("system1")
if v is not None:                           # the slot's flash as memory: the same bytes
    p.readblocks(0, buf)
    assert len(v) == %(s1_size)d and bytes(v[:16]) == bytes(buf), (bytes(v[:16]), buf)
print("cause", port.reset_cause())
print("OK")
"""


@pytest.fixture(scope="module")
def esp32_twin(tmp_path_factory):
    from twins import make_twin

    return make_twin(tmp_path_factory.mktemp("esp32-twin"))


def test_esp32_port_says_when_the_table_has_no_romfs_partition(esp32_twin, tmp_path):
    """board.json puts the slots in romfs, the table on the flash has no such partition
    (an old table, or one written by hand): the port says why, for the bootloader to
    halt with, and finds no slot; with the table keel image writes it says nothing."""
    import shutil

    from keel import esp32image, vdev
    from keel.boards import board_from_dict
    from twins import run_on

    code = ("import sys\nsys.path.insert(0, '/keel/m/bl')\nimport port_esp32\n"
            "print('WHY', port_esp32.layout_error())\nprint('S1', port_esp32.Partition.find('system1'))\n")
    assert "WHY None" in run_on(esp32_twin, code).stdout
    path = Path(shutil.copytree(esp32_twin, tmp_path / "no-romfs"))
    data = json.loads((path / "board.json").read_text())
    data["flash"]["partitions"] = [p for p in data["flash"]["partitions"] if p["label"] != "romfs"]
    device = vdev.VirtualDevice(path)
    flash = device.read_flash()
    table = esp32image.partition_table(board_from_dict(data))
    flash[esp32image.TABLE_OFFSET : esp32image.TABLE_OFFSET + len(table)] = table
    device.write_flash(flash)
    out = run_on(path, code).stdout
    assert "WHY keel: no room for Keel on this board: the partition table has no romfs " \
           "partition for its slots" in out and "S1 None" in out, out


@pytest.mark.parametrize("firmware", [None, "v1.28-generic"])
def test_esp32_port(esp32_twin, firmware, tmp_path):
    from twins import make_twin, run_on

    twin = esp32_twin if firmware is None else make_twin(
        tmp_path, system_dir=next(esp32_twin.parent.glob("system-esp32-*")), firmware=firmware)
    board = load_board("esp32_generic")
    s1 = board.partition("system1")
    proc = run_on(twin, ESP32_TWIN_CHECKS % {"s1_offset": s1.offset, "s1_size": s1.size})
    out = proc.stdout.splitlines()
    assert out and out[-1] == "OK", proc.stdout + proc.stderr
    slots = json.loads(out[0])
    # The bootloader reads every slot through the port, as the ESP-IDF finds them.
    assert slots["bootloader"][:2] == [True, None]
    assert slots["system1"][:2] == [True, None] and slots["system2"][:2] == [True, None]
    assert slots["user"][:2] == [False, "empty"]
    assert slots["system1"][2:] == [s1.size, 4096]
    assert "cause power-on" in out
    # The default build has ROMFS: every slot is a view of the mapped romfs partition
    # (boot_check still extracts the bootloader's). Stock firmware has none: no slot
    # can run in place.
    views = json.loads(out[1].split(" ", 1)[1].lower())
    assert views == [firmware is None] * 4, views


def test_esp32_port_on_a_table_from_before_the_romfs_partition(esp32_twin, tmp_path):
    """A board set up with a partition per slot (Keel's table before the romfs
    partition, and a /keel/board.json without "in"): the port finds each slot by its
    label, as it did then, and nothing runs in place."""
    import shutil

    from keel import esp32image, vdev
    from keel.boards import board_from_dict
    from twins import run_on

    path = Path(shutil.copytree(esp32_twin, tmp_path / "old"))
    data = json.loads((path / "board.json").read_text())
    for p in data["flash"]["partitions"]:
        if p.pop("in", None):
            p["idf"] = {"type": "data", "subtype": "0x40"}
    data["flash"]["partitions"] = [p for p in data["flash"]["partitions"] if p["label"] != "romfs"]
    (path / "board.json").write_text(json.dumps(data))
    device = vdev.VirtualDevice(path)
    flash = device.read_flash()
    table = esp32image.partition_table(board_from_dict(data))
    flash[esp32image.TABLE_OFFSET : esp32image.TABLE_OFFSET + len(table)] = table
    device.write_flash(flash)
    vdev.write_files(path, {"/keel/board.json": json.dumps(data).encode()})
    s1 = load_board("esp32_generic").partition("system1")
    proc = run_on(path, ESP32_TWIN_CHECKS.replace(
        'romfs = esp32.Partition.find(esp32.Partition.TYPE_DATA, label="romfs")[0]\n'
        'assert romfs.info()[2] < st.info()[1] < romfs.info()[2] + romfs.info()[3]\n', "")
        % {"s1_offset": s1.offset, "s1_size": s1.size})
    out = proc.stdout.splitlines()
    assert out and out[-1] == "OK", proc.stdout + proc.stderr
    assert json.loads(out[0])["system1"][:2] == [True, None]


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
                                        ("handover.reset('update')", 100)])
def test_esp32_port_resets_stop_the_chip(esp32_twin, call, code):
    """A reset or deep sleep stops the twin at once, as the chip stops: nothing after
    it runs, and the runner is told why; handover.reset records its reason first."""
    from keel import vdev
    from twins import io_records, run_on

    proc = run_on(esp32_twin, "import sys\nsys.path.insert(0, '/keel/m/bl')\n"
                              "import port_esp32, handover\n%s\nprint('still running')\n" % call)
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


# On the nRF52840 twin, after stage 0 (/flash/boot.py, as the port runs it) put the
# filesystem at /.
NRF_TWIN_CHECKS = r"""
import os
exec(open("boot.py").read(), {})
import sys, json
assert os.getcwd() == "/" and not [p for p in sys.path if p.startswith("/flash")], sys.path
sys.path.insert(0, "/keel/m/bl")
import vfs
import boot_check
import handover
import module_format as mf
port = handover.port()
assert port.__name__ == "port_nrf", port.__name__
assert handover.port() is port and port.exiting is False
with open("/keel/board.json") as f:
    board = json.load(f)
assert port.layout_error(board) is None, port.layout_error(board)
slots = boot_check.load_slots(board)
for s in slots:
    boot_check.scan(s, mf.platform_id(board["platform"]))
print(json.dumps({s.label: [s.valid, s.reason, s.size, s.block] for s in slots}))
print(json.dumps({s.label: s.part.info()[1] for s in slots}))
print("segment", repr(vfs.rom_ioctl(2, 0)) if hasattr(vfs, "rom_ioctl") else None)
p = port.Partition.find("system1")
assert port.Partition.find("nope") is None
assert p.ioctl(5, 0) == 4096 and p.ioctl(4, 0) == p.info()[2] // 4096
st = port.Partition.find("staging")
st.ioctl(6, 1)
st.writeblocks(1, b"keel", 10)             # in place, no erase
buf = bytearray(16)
st.readblocks(1, buf)
assert buf == b"\xff" * 10 + b"keel" + b"\xff\xff", buf
st.writeblocks(1, b"\x0f" * 4, 10)         # NOR flash: programming only clears bits
st.readblocks(1, buf)
assert buf[10:14] == bytes(c & 0x0f for c in b"keel"), buf
st.writeblocks(0, b"\xf0" * 4096)          # no offset: one page erased, then written
st.readblocks(1, buf)
assert buf[10:14] == bytes(c & 0x0f for c in b"keel"), buf  # the next page untouched
print("cause", port.reset_cause())
print("OK")
"""


@pytest.fixture(scope="module")
def nrf_base(tmp_path_factory):
    return tmp_path_factory.mktemp("nrf-twins")  # (one system build for every twin)


@pytest.fixture(scope="module")
def nrf_twin(nrf_base):
    from twins import make_twin

    return make_twin(nrf_base, board="nrf52840_dk", platform="nrf52840")


@pytest.mark.parametrize("firmware", ["v1.28-fs448k", "v1.27-fs448k"])
def test_nrf_port(nrf_base, firmware):
    """The slots are in the Keel region, the 256 KiB below the filesystem: on 1.28 the
    ROMFS segment, before 1.28 the top of the flash the firmware's code leaves; at the
    same addresses for the same filesystem size."""
    from keel import vdev
    from twins import make_twin, run_on

    twin = make_twin(nrf_base, board="nrf52840_dk", platform="nrf52840", firmware=firmware)
    proc = run_on(twin, NRF_TWIN_CHECKS)
    out = proc.stdout.splitlines()
    assert out and out[-1] == "OK", proc.stdout + proc.stderr
    slots, addresses = json.loads(out[0]), json.loads(out[1])
    assert slots["bootloader"][:2] == [True, None]
    assert slots["system1"][:2] == [True, None] and slots["system2"][:2] == [True, None]
    assert slots["user"][:2] == [False, "empty"]
    board = vdev.VirtualDevice(twin).board()  # where the host placed them
    assert addresses == {label: board.partition(label).offset for label in addresses}
    assert addresses["bootloader"] == 0x50000 and addresses["user"] == 0x69000
    if firmware.startswith("v1.28"):
        assert out[2] == "segment Flash(start=0x00050000, len=262144)"
    else:
        assert out[2] == "segment None"  # no vfs.rom_ioctl before 1.28
    assert "cause pin-reset" in out  # a power-on sets no RESETREAS bit: HARD_RESET


# Firmware that leaves Keel no room: the bootloader halts before it writes anything,
# and says why (the console, and safe mode "layout" in the status).
NRF_LAYOUT_ERRORS = {
    "v1.28-fs388k": "the filesystem is 388K; Keel's code needs 448K",
    "overlap": "the firmware ends at 0x5a000: the top of the free flash (0x50000-0x90000) "
               "overlaps it",
}


@pytest.mark.parametrize("firmware", sorted(NRF_LAYOUT_ERRORS))
def test_nrf_port_refuses_a_firmware_without_room(nrf_base, firmware):
    from keel import vdev
    from twins import make_twin, run_on

    twin = make_twin(nrf_base, board="nrf52840_dk", platform="nrf52840", firmware=firmware)
    before = vdev.VirtualDevice(twin).read_flash()
    proc = run_on(twin, "exec(open('boot.py').read(), {})\nimport sys\n"
                        "sys.path.insert(0, '/keel/m/bl')\nimport port_nrf\n"
                        "print(port_nrf.layout_error())\n"
                        "try:\n    port_nrf.Partition.find('system1')\n"
                        "except RuntimeError as e:\n    print('refused', e)\n")
    why = "keel: no room for Keel on this firmware: " + NRF_LAYOUT_ERRORS[firmware]
    assert proc.stdout.splitlines()[0] == why + " (docs/boards/nrf52840.md)", proc.stdout
    assert "refused " + why in proc.stdout
    # and booting: the bootloader halts with it, having written no slot
    console = vdev.run(twin, seconds=20, out=__import__("io").BytesIO(),
                       stop_when=lambda c: c.contains("waiting for firmware"))
    assert why in console.text.decode()
    status = vdev.status(twin)
    assert (status["mode"], status["safe_mode_reason"], status["stage"]) == (
        "safe", "layout", "bootloader")
    assert status["layout_error"].startswith(why)
    after = vdev.VirtualDevice(twin).read_flash()
    fs = vdev.VirtualDevice(twin).board().partition("fs")
    assert after[: fs.offset] == before[: fs.offset]  # (only the filesystem changed)


# What started the boot -> machine.reset_cause() on the nrf port (RESETREAS) -> what
# port_nrf says. A soft reboot keeps the cause of the boot before (here: watchdog).
NRF_CAUSES = {"power-on": (0, "pin-reset"), "reset": (2, "soft-reset"),
              "watchdog": (1, "watchdog"), "panic": (3, "panic"),
              "deep-sleep": (16, "deep-sleep"), "soft-reboot": (1, "watchdog")}


@pytest.mark.parametrize("event", sorted(NRF_CAUSES))
def test_nrf_port_reset_causes(nrf_twin, event):
    from twins import run_on

    code = ("exec(open('boot.py').read(), {})\nimport sys\nsys.path.insert(0, '/keel/m/bl')\n"
            "import port_nrf, machine\nprint(machine.reset_cause(), port_nrf.reset_cause())\n")
    if event == "soft-reboot":
        run_on(nrf_twin, code, cause="watchdog")
    proc = run_on(nrf_twin, code, cause=event)
    raw, name = NRF_CAUSES[event]
    assert proc.stdout.split() == [str(raw), name], proc.stdout + proc.stderr


def test_nrf_port_emulated_deep_sleep(nrf_twin):
    """System OFF wakes only on a pin, so a deep sleep is a marker and a reset: the next
    boot reads "deep-sleep" once (the reset's SOFT_RESET), then "soft-reset" again."""
    from twins import io_records, run_on

    code = ("exec(open('boot.py').read(), {})\nimport sys\nsys.path.insert(0, '/keel/m/bl')\n"
            "import port_nrf\nprint(port_nrf.reset_cause())\n%s\nprint('still running')\n")
    proc = run_on(nrf_twin, code % "port_nrf.deep_sleep(5)")
    assert "still running" not in proc.stdout and proc.returncode == -9, proc.stdout
    assert io_records(nrf_twin)[-1] == {"k": "halt", "code": 100}  # machine.reset()
    assert run_on(nrf_twin, code % "", cause="reset").stdout.split()[0] == "deep-sleep"
    assert run_on(nrf_twin, code % "", cause="reset").stdout.split()[0] == "soft-reset"


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


@pytest.mark.parametrize("board_name, platform", [("esp32_generic", "esp32")])
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


# On the VM's own LittleFS (MicroPython's VfsLfs2 with its defaults, as the nrf port
# formats its filesystem; littlefs-python with its defaults packs small files more
# tightly than the board does): the files, then as many one-block files as still fit.
NRF_FS_FILL = r"""
import json, os, vfs
class Ram:
    def __init__(self, blocks):
        self.blocks, self.data = blocks, bytearray(b"\xff" * (blocks * 4096))
    def readblocks(self, n, buf, off=0):
        at = n * 4096 + off
        buf[:] = self.data[at : at + len(buf)]
    def writeblocks(self, n, buf, off=0):
        at = n * 4096 + off
        self.data[at : at + len(buf)] = buf
    def ioctl(self, op, arg):
        if op == 4: return self.blocks
        if op == 5: return 4096
        if op == 6:
            self.data[arg * 4096 : (arg + 1) * 4096] = b"\xff" * 4096
        return 0
with open(%(files)r) as f:
    files = json.load(f)
dev = Ram(%(blocks)d)
vfs.VfsLfs2.mkfs(dev)
vfs.mount(vfs.VfsLfs2(dev), "/t")
for path in sorted(files):
    at = "/t"
    for part in path.split("/")[1:-1]:
        at += "/" + part
        try:
            os.mkdir(at)
        except OSError:
            pass
    with open("/t" + path, "wb") as f:
        f.write(bytes.fromhex(files[path]))
os.mkdir("/t/spare")
n = 0
try:
    while True:
        with open("/t/spare/%%d" %% n, "wb") as f:
            f.write(b"x" * 600)
        n += 1
except OSError:
    print("spare", n)
"""


@pytest.mark.parametrize("fs_kib, enough", [(448, True), (388, False)])
def test_nrf_filesystem_holds_keel(tmp_path, fs_kib, enough):
    """The nRF52840's filesystem holds stage 0, the board, the bootloader twice (a new
    one is extracted beside the running one), parts 1 and 2 once (with no room for a
    second copy, part 1's old code goes before the new is extracted: module_check),
    with 16 blocks to spare for the app and the device's state: 448K does (the size
    board.json asks for), 388K does not."""
    from keel import factory, romfs
    from keel import module_format as mf
    from keel.images import load_valid_image

    board = load_board("nrf52840_dk")
    assert board.partition("fs").size == 448 * 1024
    files = {}
    for path in build.build_system("nrf52840", None, tmp_path / "system"):
        image = load_valid_image(path)
        info = image.info
        if info.function == mf.FUNCTION_BOOTLOADER:
            files.update(factory.device_files(board.data, image))
            dirs = ["/keel/m/bl.new"]
        else:
            dirs = [f"/keel/m/s{info.index}"]
        for name, offset, length in romfs.walk(mf.bytes_reader(image.data), info.header_size,
                                               info.payload_size):
            if offset >= 0:
                start = info.header_size + offset
                for d in dirs:
                    files[f"{d}/{name}"] = image.data[start : start + length]
    (tmp_path / "files.json").write_text(json.dumps({k: bytes(v).hex() for k, v in files.items()}))
    script = tmp_path / "fill.py"
    script.write_text(NRF_FS_FILL % {"files": str(tmp_path / "files.json"),
                                     "blocks": fs_kib * 1024 // 4096})
    proc = subprocess.run([micropython(), "-X", "heapsize=8M", str(script)],
                          capture_output=True, text=True, timeout=60)
    spare = int(proc.stdout.split()[-1]) if "spare" in proc.stdout else -1
    assert spare >= 0, proc.stdout + proc.stderr
    assert (spare >= 16) == enough, f"{fs_kib}K: {spare} blocks to spare"


def test_stage0_files_take_one_block_each():
    """Stage 0 is source on the filesystem: a file past 4 KiB takes a second block of the
    nRF52840's, which has none to spare (test_nrf_filesystem_holds_keel)."""
    from keel import factory
    from keel.paths import source_root

    for source in factory.STAGE0_FILES.values():
        size = (source_root() / source).stat().st_size
        assert size <= 4096 - 128, f"{source}: {size} bytes; keep it within one 4 KiB block"


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
