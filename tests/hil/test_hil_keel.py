"""Keel on a board, through its serial port only: the raw REPL and the keel CLI
(see conftest.py and docs/hil.md). The tests run in this order and build on each
other, as one session at a board would:

1. USB flashing: `keel flash --usb` puts the base system built from this tree (the
   modules the board does not already have) and a test app on the board; after the
   reset the app runs: it writes /keel_hil_app.txt, and the status says so.
2. Boot: after a hard reset (machine.reset()) Keel boots again and reports its status
   in /keel/status.json, read over the REPL once Keel has run.
3. Safe mode: an app built for a newer system, flashed with `keel flash --usb`: the
   board reports safe mode, reason dependency, and the system parts it misses; the
   app does not run.
4. Update: `keel update` with a release catalog holding that newer system brings the
   board to it (and the app of step 3 now runs); a second run does nothing.
5. The board's own modules, read off it before step 1, are flashed back.

Everything flashed is built from the tree for the board's platform (`keel build`), so
on an esp32 board they are esp32 modules. The console is only watched to know when to
look: what is checked is what the board wrote (output printed while the port is closed
is lost on a real board)."""

import base64
import json
import re
import time

import pytest

APP_MARK_FILE = "/keel_hil_app.txt"  # (conftest.py removes it at the end of the session)
STATUS_FILE = "/keel/status.json"
# A reset Keel did not ask for, as the port reports it: on an ESP32 machine.reset() reads
# HARD_RESET, as a panic does, and Keel takes it for one (bootloader/port_esp32.py).
PORT_CAUSES = {"power-on", "pin-reset", "soft-reset", "panic", "unknown"}
BOOT_S = 120  # the longest a boot may take, installs included (a real board's flash is slow)

APP = """\
# A test app of tests/hil/test_hil_keel.py: it says it ran in a file, then goes on
# saying so on the console (a board's console is only seen while the port is open).
import time

TOKEN = {token!r}
_last = [0]


def setup():
    with open({mark!r}, "w") as f:
        f.write(TOKEN)
    print("keel-hil app %s started" % TOKEN)


def loop():
    now = time.ticks_ms()
    if time.ticks_diff(now, _last[0]) >= 300:
        _last[0] = now
        print("keel-hil app %s running" % TOKEN)
"""

_READ_SLOT = """\
def _hil_read(label, at, n):
    from binascii import b2a_base64
    p = _PORT.Partition.find(label)
    bs = p.ioctl(5, 0)
    buf = bytearray(n)
    p.readblocks(at // bs, buf, at % bs)
    print(b2a_base64(buf).decode().strip())
"""


def _newer(version: str) -> str:
    major, minor, patch = map(int, re.match(r"(\d+)\.(\d+)\.(\d+)", version).groups())
    return f"{major}.{minor}.{patch + 1}"


class Session:
    """What the tests share: the board, what was built, what the board had."""

    def __init__(self, board, tmp):
        from keel.build import system_version

        self.board = board
        self.tmp = tmp
        self.platform = board.data["platform"]
        self.base = system_version()
        self.newer = _newer(self.base)
        self.systems = {}
        self.apps = {}
        self.original = None  # {slot label: (slot dict, image bytes or None)}
        self.backup_dir = None
        self.restored = False

    # -- building, with the keel CLI

    def system(self, version):
        if version not in self.systems:
            out = self.tmp / f"system-{version}"
            self.check(self.board.keel("build", "system", "--platform", self.platform,
                                       "--version", version, "-o", out))
            self.systems[version] = sorted(out.glob("*.bin"))
        return self.systems[version]

    def app(self, token, target):
        if token not in self.apps:
            src = self.tmp / f"app-{token}"
            src.mkdir()
            (src / "main.py").write_text(APP.format(token=token, mark=APP_MARK_FILE))
            out = self.tmp / f"app-{token}.bin"
            self.check(self.board.keel("build", "app", src, "--platform", self.platform,
                                       "--target", target, "-o", out))
            self.apps[token] = out
        return self.apps[token]

    @staticmethod
    def check(proc):
        assert proc.returncode == 0, f"keel {proc.args[1:]} failed:\n{proc.stdout}{proc.stderr}"
        return proc

    # -- the board

    def probe(self, read_images=False):
        """What each slot holds (the bootloader's slot scan, as keel flash --usb sees
        it), and with read_images the images themselves, read off the flash."""
        from keel import usb

        self.board.release()
        link = usb.BoardLink(self.board.port)
        try:
            probe = link.probe()
            images = {}
            if read_images:
                link.transport.exec_raw(_READ_SLOT)
                for slot in probe["slots"]:
                    if slot.get("valid") and slot.get("size"):
                        images[slot["slot"]] = self._read(link, slot["slot"], slot["size"])
            return probe, images
        finally:
            link.close()

    @staticmethod
    def _read(link, label, size):
        data = bytearray()
        for at in range(0, size, 2048):  # 2 KB pieces never cross a 4 KB block
            out, err = link.transport.exec_raw(f"_hil_read({label!r}, {at}, {min(2048, size - at)})")
            assert not err, err.decode(errors="replace")
            data += base64.b64decode(out.strip())
        return bytes(data)

    def flash(self, files, wait_for):
        """keel flash --usb FILES, then wait for the board to print one of wait_for."""
        self.board.remove(STATUS_FILE, APP_MARK_FILE)
        proc = self.check(self.board.keel("flash", "--usb", *files, "--port", self.board.port))
        self.board.wait_output(wait_for, BOOT_S)
        return proc

    def status(self):
        """/keel/status.json, read with Keel stopped (after it ran)."""
        self.board.connect()
        text = self.board.read_file(STATUS_FILE)
        assert text is not None, "Keel wrote no /keel/status.json this boot"
        return json.loads(text)

    def app_mark(self):
        text = self.board.read_file(APP_MARK_FILE)
        return None if text is None else text.decode()

    def modules(self, status):
        return {(m["function"], m["index"]): m for m in status["modules"]}

    def restore(self):
        """Flash back the modules the board had; erase the app slot if it had none."""
        self.restored = True
        if self.original is None:
            return
        now, _ = self.probe()
        files = []
        erase = []
        for slot in now["slots"]:
            before, image = self.original.get(slot["slot"], (None, None))
            if before is None:
                continue
            if image is not None:
                if slot.get("sha256") != before.get("sha256"):
                    path = self.tmp / f"original-{slot['slot']}.bin"
                    path.write_bytes(image)
                    files.append(path)
            elif before.get("invalid_reason") == "empty" and slot.get("invalid_reason") != "empty":
                erase.append(slot["slot"])
        if erase:  # as keel flash --usb begins a write: the slot reads as empty
            self.board.connect()
            self.board.run("import sys\nsys.path.insert(0, '/keel/m/bl')\nimport handover\n" +
                           "".join(f"handover.port().Partition.find({label!r}).ioctl(6, 0)\n"
                                   for label in erase))
        self.board.remove(STATUS_FILE)
        if files:
            self.check(self.board.keel("flash", "--usb", *files, "--port", self.board.port))
        else:
            self.board.hard_reset()
        self.board.wait_output(["keel: system "], BOOT_S)
        time.sleep(3)  # the status is written as the app starts (an app we know nothing of)
        return files, erase


@pytest.fixture(scope="module")
def keel_board(hil_board, tmp_path_factory):
    hil_board.connect()
    if hil_board.read_file("/keel/m/bl/keel_boot.mpy") is None and \
            hil_board.read_file("/keel/m/bl/keel_boot.py") is None:
        pytest.skip("Keel is not installed on this board (docs/hil.md: installing Keel)")
    session = Session(hil_board, tmp_path_factory.mktemp("keel-hil"))
    probe, images = session.probe(read_images=True)
    assert probe["platform"] == session.platform, probe
    session.original = {s["slot"]: (s, images.get(s["slot"])) for s in probe["slots"]}
    backup = session.tmp / "original"
    backup.mkdir()
    for label, image in images.items():
        (backup / f"{label}.bin").write_bytes(image)
    session.backup_dir = backup
    try:
        yield session
    finally:
        if not session.restored:
            session.restore()


def test_original_modules_read_back_whole(keel_board):
    """The backup of step 5: every valid module read off the board hashes right."""
    from keel import usb
    from keel.images import parse_image

    for label, (slot, image) in keel_board.original.items():
        if image is None:
            continue
        parsed = parse_image(image, f"{label}.bin")
        assert parsed.ok, f"{label}: {parsed.problem}"
        assert usb.declared_sha256(parsed) == slot["sha256"], label


def test_usb_flash_installs_a_system_and_an_app_that_runs(keel_board):
    from keel import usb
    from keel.images import load_valid_image

    session = keel_board
    probe, _ = session.probe()
    have = {s["slot"]: s.get("sha256") for s in probe["slots"] if s.get("valid")}
    files = []
    for path in session.system(session.base):
        image = load_valid_image(path)
        slot = usb.slot_for(probe, image)
        if have.get(slot["slot"]) != usb.declared_sha256(image):
            files.append(path)  # (what the board has already is not written again)
    app = session.app("usb", session.base)
    proc = session.flash([*files, app], ["keel-hil app usb running", "keel: SAFE MODE",
                                         "keel: app crashed"])
    assert f"{probe['board']} ({session.platform})" in proc.stdout
    assert re.search(r"user-part \S+: written to user and verified", proc.stdout), proc.stdout
    assert "reset; the board installs and runs the new modules" in proc.stdout
    status = session.status()
    assert session.app_mark() == "usb", "the app flashed over USB did not run"
    assert (status["mode"], status["app"]) == ("normal", "running"), status
    modules = session.modules(status)
    assert modules[("system-part", 1)]["version"] == session.base
    assert modules[("system-part", 2)]["version"] == session.base
    user = modules[("user-part", 1)]
    assert user["valid"] and user["sha256"] == usb.declared_sha256(load_valid_image(app))


def test_boot_after_a_hard_reset_reports_status(keel_board):
    session = keel_board
    board = session.board
    board.connect()
    board.remove(STATUS_FILE, APP_MARK_FILE)
    board.hard_reset()
    seen = board.wait_output(["keel-hil app usb running", "keel: SAFE MODE", "keel: app crashed"],
                             BOOT_S)
    status = session.status()
    assert seen == "keel-hil app usb running", status
    assert session.app_mark() == "usb", "the app did not run after the reset"
    assert status["stage"] == "system"
    assert (status["mode"], status["safe_mode_reason"], status["missing"]) == ("normal", None, [])
    assert status["reset_reason"] in PORT_CAUSES, status["reset_reason"]
    assert status["app"] == "running"
    assert status["vm"]["name"] == "micropython"
    mem = status["mem"]
    assert 0 < mem["heap_free_at_app_start"] < mem["heap_total"], mem
    modules = session.modules(status)
    assert {("bootloader", 0), ("system-part", 1), ("system-part", 2), ("user-part", 1)} <= set(modules)
    for m in status["modules"]:
        assert m["valid"] and m["crc_ok"] and m["sha256_ok"] is not False, m
        assert m["platform"] == session.platform, m


def test_safe_mode_when_the_app_needs_a_newer_system(keel_board):
    session = keel_board
    app = session.app("newer", session.newer)
    proc = session.flash([app], ["keel: SAFE MODE", "keel-hil app newer running"])
    assert f"needs system-part 1 >= {session.newer}" in proc.stdout, proc.stdout
    assert "it will start in safe mode" in proc.stdout, proc.stdout
    status = session.status()
    assert (status["mode"], status["safe_mode_reason"]) == ("safe", "dependency"), status
    missing = {(d["function"], d["index"]): d["version"] for d in status["missing"]}
    assert missing == {("system-part", 1): session.newer, ("system-part", 2): session.newer}, missing
    assert status["app"] == "not-run"
    assert session.app_mark() is None, "the app ran in safe mode"


def test_update_brings_the_newer_system_then_does_nothing(keel_board):
    from keel_cloud.config import CloudDir

    session = keel_board
    cloud = CloudDir(session.tmp / "cloud")
    cloud.init()
    for version in (session.base, session.newer):
        session.system(version)
        session.check(session.board.keel("release", "system", session.tmp / f"system-{version}",
                                         cloud=cloud.path))
    session.board.remove(STATUS_FILE, APP_MARK_FILE)
    proc = session.check(session.board.keel("update", "--port", session.board.port, cloud=cloud.path))
    out = proc.stdout
    assert f"system {session.newer}" in out, out
    assert f"system-part 1 {session.newer}: written to system1 and verified" in out, out
    assert f"system-part 2 {session.newer}: written to system2 and verified" in out, out
    seen = session.board.wait_output(["keel-hil app newer running", "keel: SAFE MODE",
                                      "keel: app crashed"], BOOT_S)
    status = session.status()
    assert seen == "keel-hil app newer running", status
    modules = session.modules(status)
    assert modules[("system-part", 1)]["version"] == session.newer
    assert modules[("system-part", 2)]["version"] == session.newer
    assert (status["mode"], status["app"]) == ("normal", "running"), status
    assert session.app_mark() == "newer", "the app waiting for the newer system did not run"
    digests = {k: m["sha256"] for k, m in modules.items()}

    session.board.remove(APP_MARK_FILE)
    again = session.check(session.board.keel("update", "--port", session.board.port,
                                             cloud=cloud.path))
    assert f"already runs system {session.newer}: nothing to do" in again.stdout, again.stdout
    assert "written" not in again.stdout
    # Keel was stopped to look, and started again (a soft reboot at the friendly REPL).
    seen = session.board.wait_output(["keel-hil app newer running"], BOOT_S)
    status = session.status()
    assert seen and session.app_mark() == "newer", "Keel did not run again after keel update"
    assert {k: m["sha256"] for k, m in session.modules(status).items()} == digests


def test_the_board_gets_its_own_modules_back(keel_board):
    session = keel_board
    files, erased = session.restore()
    status = session.status()
    now = {m["slot"]: m for m in status["modules"]}
    for label, (slot, image) in session.original.items():
        if image is not None:
            assert now[label]["sha256"] == slot["sha256"], f"{label} is not the original"
            assert now[label]["valid"], now[label]
        elif slot.get("invalid_reason") == "empty":
            assert label not in now, f"{label} was empty and is not: {now[label]}"
    assert status["stage"] == "system"
