"""bootloader/module_check.py (keel.module_check): a module's payload must be what its
header claims. Valid images changed as an attacker would, with the SHA-256 and CRC32
sealed again (so only these checks can catch them), through the host's paths: the
image reader (keel.images), `keel inspect` and `keel vdev flash`, which must refuse
them and write nothing. The device's side of the same rule: tests/device/
test_hostile_images.py."""

import contextlib
import hashlib
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hostile_images as hostile
from keel import build, cli, images, module_check, romfs, vdev
from keel import module_format as mf
from keel.boards import PLATFORM_PORTS
from keel.errors import KeelError

REPO = Path(__file__).resolve().parents[2]
VM_MPY = 0xB06  # sys.implementation._mpy of the virtual board's VM: v6.3, x64


@pytest.fixture(scope="module")
def originals(tmp_path_factory, hello_image):
    base = tmp_path_factory.mktemp("originals")
    build.build_system("virtual", "1.1.0", base / "sys")
    return hostile.load_images(base / "sys", hello_image), base / "sys"


@pytest.fixture(scope="module")
def board(tmp_path_factory, originals):
    """A virtual device (never booted here) to flash into."""
    path = tmp_path_factory.mktemp("board") / "dev"
    vdev.create(path, originals[1])
    return path


def check(data, mpy=None):
    info = mf.parse_header(data)
    return module_check.check(mf.bytes_reader(data), info, info.function, info.index, mpy)


# --- the rules ------------------------------------------------------------------------


def test_what_each_module_must_hold():
    boot, part, app = mf.FUNCTION_BOOTLOADER, mf.FUNCTION_SYSTEM_PART, mf.FUNCTION_USER_PART
    assert "keel_boot" in module_check.required(boot, 0, 1)
    assert module_check.required(boot, 0, mf.platform_id("esp32"))[-1] == "port_esp32"
    assert module_check.required(boot, 0, mf.platform_id("nrf52840"))[-1] == "port_nrf"
    assert module_check.required(part, 1, 1) == ("keel_system",)
    assert module_check.required(part, 2, 1) == ("keel",)
    assert module_check.required(part, 3, 1) == ()
    assert module_check.required(app, 1, 1) == ("main",)


def test_the_bootloaders_entry_modules_are_among_its_sources():
    """The rule's list is written once on the device; the build's list must hold it."""
    spec = json.loads((REPO / "system" / "parts.json").read_text())["bootloader"]
    sources = {Path(p).stem for p in spec["sources"]}
    assert set(module_check.BOOTLOADER_MODULES) <= sources
    for platform, number in mf.PLATFORMS.items():
        port = spec.get("port_sources", {}).get(PLATFORM_PORTS[platform], [])
        assert [Path(p).stem for p in port] == ([module_check.BOOTLOADER_PORTS[number]]
                                                if number in module_check.BOOTLOADER_PORTS else [])


def test_the_hand_over_numbers_modules_as_the_format_does():
    """handover.py tells the slots apart without loading the module format: its
    function numbers are the format's."""
    text = (REPO / "bootloader" / "handover.py").read_text()
    numbers = dict(line.split(" = ") for line in text.splitlines()
                   if line.split(" = ")[0] in ("BOOTLOADER", "SYSTEM_PART", "USER_PART"))
    assert {k: int(v) for k, v in numbers.items()} == {
        "BOOTLOADER": mf.FUNCTION_BOOTLOADER, "SYSTEM_PART": mf.FUNCTION_SYSTEM_PART,
        "USER_PART": mf.FUNCTION_USER_PART}
    # ...and the OTA receiver names them as the format does (system/core/ota.py)
    import re

    ota = (REPO / "system" / "core" / "ota.py").read_text()
    pairs = re.findall(r"\(handover\.(\w+), \"([\w-]+)\"\)", ota)
    assert len(pairs) == 3
    assert {name: mf.function_name(getattr(mf, "FUNCTION_" + const)) for const, name in pairs} == \
        {name: name for _, name in pairs}


def test_real_builds_pass(originals):
    for name, data in originals[0].items():
        assert check(data) is None, name
        assert check(data, VM_MPY) is None, name
        assert images.parse_image(data).ok, name


@pytest.mark.parametrize("head, vm, expect", [
    (b"M\x06\x00\x1f", None, None),
    (b"M\x06\x00\x1f", VM_MPY, None),
    (b"M\x06\x03\x3f", VM_MPY, None),  # bytecode only: the sub-version does not matter
    (b"M\x05\x00\x1f", VM_MPY, "bytecode version 5, the VM loads 6"),
    (b"M\x07\x00\x1f", None, "bytecode version 7, the VM loads 6"),
    (b"C\x06\x00\x1f", VM_MPY, "not a .mpy file"),
    (b"M\x06", VM_MPY, "not a .mpy file"),
    (b"M\x06\x0b\x1f", VM_MPY, None),  # native x64 code, v6.3: this VM's own
    (b"M\x06\x0a\x1f", VM_MPY, "native code for another CPU (arch 2.2)"),  # another sub-version
    (b"M\x06\x27\x1f", VM_MPY, "native code for another CPU (arch 9.3)"),  # xtensa
    # a VM with no native code at all
    (b"M\x06\x27\x1f", 0x306, "native code for another CPU (arch 9.3)"),
    (b"M\x06\x27\x1f", None, None),  # the host cannot tell: the board decides
])
def test_mpy_headers(head, vm, expect):
    assert module_check.mpy_problem(head, vm) == expect


def test_a_module_in_another_slot_is_refused(originals):
    app = originals[0]["app"]
    info = mf.parse_header(app)
    problem = module_check.check(mf.bytes_reader(app), info, mf.FUNCTION_SYSTEM_PART, 2)
    assert problem == ("integrity", "a user-part 1 module, not one for this slot")


@pytest.mark.parametrize("name", sorted(hostile.HOSTILE))
def test_each_hostile_image_is_refused_for_what_it_holds(originals, name):
    make, reasons = hostile.HOSTILE[name]
    data = make(originals[0])
    image = images.parse_image(data, f"{name}.bin")
    assert image.crc_ok and image.sha256_ok  # sealed: intact as far as SHA and CRC go
    assert image.refusal is not None and image.refusal[0] in reasons, image.refusal
    assert not image.ok
    assert image.problem.startswith(f"{image.name}: the payload is not what the header says")
    # and the device's VM would refuse it the same way
    assert check(data, VM_MPY) == image.refusal


def test_native_code_for_another_cpu_is_left_to_the_board(originals):
    data = hostile.native_app(originals[0])
    assert images.parse_image(data).ok
    assert check(data, VM_MPY)[0] == "mpy"


# --- property: mutations of valid images ------------------------------------------------

BASES = ("bootloader", "system1", "system2", "app")
KINDS = {"bootloader": (mf.FUNCTION_BOOTLOADER, 0), "system1": (mf.FUNCTION_SYSTEM_PART, 1),
         "system2": (mf.FUNCTION_SYSTEM_PART, 2), "app": (mf.FUNCTION_USER_PART, 1)}
names = st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12)


def entries(base, platform=1):
    function, index = KINDS[base]
    return [f"{n}.mpy" for n in module_check.required(function, index, platform)]


@st.composite
def mutations(draw, images_by_name):
    """(image bytes, the reasons it may be refused for; empty: it must be accepted)."""
    base = draw(st.sampled_from(BASES))
    info, files = hostile.header_and_files(images_by_name[base])
    kind = draw(st.sampled_from(["header", "drop", "rename", "bad-mpy", "nest", "many",
                                 "hidden", "long-name", "benign"]))
    header = {}
    reasons = {"content"}
    if kind == "header":  # another module's header over this payload
        other = draw(st.sampled_from([b for b in BASES if b != base]))
        header = dict(zip(("function", "index"), KINDS[other]))
        if set(entries(other)) <= set(files):
            reasons = set()  # (cannot happen with Keel's parts: each has its own entries)
    elif kind == "drop":
        del files[draw(st.sampled_from(entries(base)))]
    elif kind == "rename":
        old = draw(st.sampled_from(entries(base)))
        new = draw(names.map(lambda n: n + ".mpy") | names.map(lambda n: f"{n}/{old}"))
        if new in entries(base):
            return images_by_name[base], set()
        files[new] = files.pop(old)
    elif kind == "bad-mpy":
        target = draw(st.sampled_from(sorted(p for p in files if p.endswith(".mpy"))))
        head = draw(st.binary(min_size=0, max_size=4).filter(
            lambda h: len(h) < 4 or h[0] != 0x4D or h[1] != 6))
        files[target] = head + (files[target][4:] if len(head) == 4 else b"")
        reasons = {"mpy"}
    elif kind == "nest":
        depth = draw(st.integers(romfs.MAX_DEPTH + 1, 60))
        files["/".join([draw(names)] * depth) + "/x.mpy"] = hostile.MPY_HEAD
    elif kind == "many":
        count = draw(st.integers(romfs.MAX_ENTRIES - len(files) + 1, romfs.MAX_ENTRIES + 300))
        prefix = draw(st.sampled_from(["", "many/"]))
        for i in range(count):
            files[f"{prefix}zz{i}.mpy"] = hostile.MPY_HEAD
    elif kind == "hidden":
        where = draw(st.sampled_from(["", "lib/", "hal/"]))
        files[where + "." + draw(names)] = draw(st.binary(max_size=64))
    elif kind == "long-name":
        files["n" * draw(st.integers(romfs.MAX_NAME + 1, 200))] = b""
    else:  # benign: another module or data file beside the code, within every bound
        name = draw(names.filter(lambda n: f"{n}.mpy" not in files and n not in files))
        if draw(st.booleans()):
            files[f"extra/{name}.mpy"] = hostile.MPY_HEAD + draw(st.binary(max_size=100))
        else:
            files[f"{name}.txt"] = draw(st.binary(max_size=100))
        reasons = set()
    return hostile.seal(info, build.make_romfs(files), **header), reasons


def _flash_bytes(path):
    return hashlib.sha256((path / vdev.FLASH_FILE).read_bytes()).digest()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_images_are_refused_everywhere_on_the_host(originals, board, data):
    image_bytes, reasons = data.draw(mutations(originals[0]))
    image = images.parse_image(image_bytes, "mutant.bin")
    assert image.crc_ok and image.sha256_ok
    if not reasons:
        assert image.ok, image.refusal
        return
    assert image.refusal is not None and image.refusal[0] in reasons, (reasons, image.refusal)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mutant.bin"
        path.write_bytes(image_bytes)
        # keel inspect: exit 1, the reason on stderr, and in --json
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert cli.main(["inspect", "--json", str(path)]) == 1
        doc = json.loads(out.getvalue())
        assert doc["content_ok"] is False and doc["refused"]["reason"] == image.refusal[0]
        assert "the payload is not what the header says" in err.getvalue()
        # keel vdev flash: refused, nothing written
        before = _flash_bytes(board)
        with pytest.raises(KeelError, match="the payload is not what the header says"):
            vdev.flash(board, [path])
        assert _flash_bytes(board) == before


# --- the CLI as a user runs it ---------------------------------------------------------


@pytest.mark.parametrize("name", ["app-as-bootloader", "system2-as-system1", "app-nested-deep"])
def test_keel_inspect_and_vdev_flash_say_why(keel_cli, expect_cli_error, originals, board,
                                             tmp_path, name):
    make, reasons = hostile.HOSTILE[name]
    path = tmp_path / f"{name}.bin"
    path.write_bytes(make(originals[0]))
    proc = keel_cli("inspect", path)
    assert proc.returncode == 1
    assert "content       REFUSED (content)" in proc.stdout
    expect_cli_error(proc, str(path), "the payload is not what the header says (content)")
    proc = keel_cli("inspect", "--json", path)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["refused"]["reason"] == "content"
    before = _flash_bytes(board)
    expect_cli_error(keel_cli("vdev", "flash", board, path), "not what the header says")
    assert _flash_bytes(board) == before


def test_keel_inspect_of_a_good_image_says_content_ok(keel_cli, originals, tmp_path):
    path = tmp_path / "app.bin"
    path.write_bytes(originals[0]["app"])
    proc = keel_cli("inspect", "--json", path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["content_ok"] is True and "refused" not in doc
