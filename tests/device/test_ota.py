"""Over-the-air updates (docs/protocol.md, "Updates") on the real MicroPython VM: the
receiver (system/core/ota.py) against a real Mosquitto, with paho-mqtt playing the
cloud as keel-service, and the bootloader's apply step (bootloader/keel_boot.py)."""

import hashlib
import json
import random
import time

import pytest
from test_cloud_session import (  # noqa: F401 (fixtures)
    CONNECTED, MOSQUITTO, broker, cloud, led_states, pki, provision)

from keel import build, vdev, vio, wifi
from keel import module_format as mf

from conftest import on_both_paths, on_twins

# Mosquitto is a required part of the suite (make setup installs it): missing, these
# tests fail and say so, as the cloud tests do, rather than skip.
assert MOSQUITTO.is_file(), f"{MOSQUITTO} is needed: make setup installs Debian's mosquitto (as root)"

CHUNK = 1024


def app_source(marker: str, blob: int = 0) -> dict:
    # blob: an unimported module of incompressible text, to make the image span chunks
    rnd = random.Random(marker)
    files = {
        "main.py": f'print("{marker}")\n\ndef loop():\n    pass\n',
    }
    if blob:
        text = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(blob))
        files["blob.py"] = f'DATA = "{text}"\n'
    return files


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Built user parts: {name: bytes}."""
    base = tmp_path_factory.mktemp("ota-apps")
    out = {}
    for name, marker, blob, platform, version in (
        ("old", "OLD-APP-RUNNING", 0, "virtual", "1.0.0"),
        ("new", "NEW-APP-RUNNING", 40000, "virtual", "2.0.0"),
        ("esp32", "ESP32-APP", 0, "esp32", "1.0.0"),
    ):
        src = base / f"src-{name}"
        src.mkdir()
        for filename, text in app_source(marker, blob).items():
            (src / filename).write_text(text)
        path = build.build_app(src, platform, "1.1.0", base / f"{name}.bin", app_version=version)
        out[name] = path.read_bytes()
    # A system part whose dependency (system-part 1 >= 9.0.0) the device does not have
    info = mf.ModuleInfo(
        mf.FUNCTION_SYSTEM_PART, 2, mf.encode_version("9.0.0"), mf.platform_id("virtual"),
        [(mf.FUNCTION_SYSTEM_PART, 1, mf.encode_version("9.0.0"))],
    )
    part2 = {"keel.mpy": b"M\x06\x00\x1f" + b"\0" * 100}  # what a part 2 holds (module_check)
    out["sys-deps"] = mf.build_image(info, build.make_romfs(part2), hashlib.sha256)
    return out


@pytest.fixture(scope="module")
def _board_apps(tmp_path_factory):
    return tmp_path_factory.mktemp("ota-board-apps"), {}


@pytest.fixture
def board_images(_board_apps, platform):
    """The old and new apps for the board's platform: {name: bytes} (the new one, 2.0.0,
    spans chunks and fits the smallest user slot, the nRF's 32 KB)."""
    base, cache = _board_apps
    if platform not in cache:
        out = {}
        for name, marker, blob, version in (("old", "OLD-APP-RUNNING", 0, "1.0.0"),
                                            ("new", "NEW-APP-RUNNING", 20000, "2.0.0")):
            src = base / f"src-{name}-{platform}"
            src.mkdir()
            for filename, text in app_source(marker, blob).items():
                (src / filename).write_text(text)
            out[name] = build.build_app(src, platform, "1.1.0", base / f"{name}-{platform}.bin",
                                        app_version=version).read_bytes()
        cache[platform] = out
    return cache[platform]


class Updater:
    """The cloud's side of one transfer."""

    def __init__(self, service, uid):
        self.service = service
        self.uid = uid
        self.topic = f"devices/{uid}/ota/status"
        self.seen = 0

    def statuses(self):
        with self.service.cond:
            return [json.loads(p) for t, p, _ in self.service.messages if t == self.topic]

    def next_status(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        with self.service.cond:
            while True:
                found = [p for t, p, _ in self.service.messages if t == self.topic]
                if len(found) > self.seen:
                    self.seen += 1
                    return json.loads(found[self.seen - 1])
                left = deadline - time.monotonic()
                assert left > 0, f"no ota/status within {timeout} s; had {found}"
                self.service.cond.wait(left)

    def offer(self, image, platform="virtual", function="user-part", index=1, sha=None,
              version="2.0.0"):
        self.image = image
        self.sha = sha or hashlib.sha256(image).hexdigest()
        doc = {"sha256": self.sha, "function": function, "index": index, "version": version,
               "platform": platform, "size": len(image), "chunk_size": CHUNK}
        self.service.client.publish(f"devices/{self.uid}/ota/offer", json.dumps(doc), qos=1)
        return self.next_status()

    def chunk(self, n):
        data = self.image[n * CHUNK:(n + 1) * CHUNK]
        payload = bytes.fromhex(self.sha[:16]) + n.to_bytes(4, "big") + data
        self.service.client.publish(f"devices/{self.uid}/ota/chunk", payload, qos=0)

    def send(self, ack, stop_at=None):
        """Send what each acknowledgement asks for until the device says something
        other than receiving (returned), or chunk stop_at is reached."""
        count = -(-len(self.image) // CHUNK)
        while ack["state"] == "receiving":
            nxt, window = ack["next"], ack["window"]
            bits = int.from_bytes(bytes.fromhex(ack["bitmap"]), "little")
            for i in range(window):
                n = nxt + i
                if n >= count:
                    break
                if stop_at is not None and n >= stop_at:
                    return ack
                if not bits & (1 << i):
                    self.chunk(n)
            ack = self.next_status(timeout=10)
        return ack


def _with_old_app(device, images, boot=False):
    """A 1.1.0 device with the old app flashed (and booted once, running it)."""
    dev = device("1.1.0")
    app = dev.path.parent / "old.bin"
    app.write_bytes(images["old"])
    dev.flash(app)
    if boot:
        assert "OLD-APP-RUNNING" in dev.run(until="OLD-APP-RUNNING")
    return dev


def _in_staging(dev, image: bytes) -> bytearray:
    """The device's flash with image in its staging partition (written back by the
    caller)."""
    data = bytearray((dev.path / vdev.FLASH_FILE).read_bytes())
    staging = dev.slot_offset("staging")
    data[staging:staging + len(image)] = image
    return data


def test_update_over_the_air(device, broker, cloud, pki, images, systems):  # noqa: F811
    dev = _with_old_app(device, images)
    uid = provision(dev, pki, broker.port)
    broker.start()
    service = cloud(broker)
    up = Updater(service, uid)
    with dev.start(seconds=80) as running:
        running.wait_for("OLD-APP-RUNNING")
        service.describes(uid)
        time.sleep(0.3)  # (the subscriptions)

        # Wrong platform, unknown function: refused at the offer
        assert up.offer(images["esp32"], platform="esp32") == {"state": "refused", "reason": "platform"}
        assert up.offer(images["old"], function="system-part", index=7)["reason"] == "function"
        assert up.offer(b"\0" * 300_000)["reason"] == "too-big"

        # A system part whose dependency is not met: failed at verification
        ack = up.offer(images["sys-deps"], function="system-part", index=2, version="9.0.0")
        assert ack["state"] == "receiving" and ack["next"] == 0 and ack["window"] == 8
        end = up.send(ack)
        assert end["state"] == "verifying"
        failed = up.next_status()
        assert failed["state"] == "failed" and failed["reason"] == "dependency"
        assert failed["missing"] == [{"function": "system-part", "index": 1, "version": "9.0.0"}]

        # The "full" check: an older system part 1 would break system part 2 (1.1.0)
        older = (systems["1.0.0"] / "virtual-system-part1-1.0.0.bin").read_bytes()
        ack = up.offer(older, function="system-part", index=1, version="1.0.0")
        assert up.send(ack)["state"] == "verifying"
        failed = up.next_status()
        assert failed["state"] == "failed" and failed["reason"] == "dependency"
        assert {"function": "system-part", "index": 1, "version": "1.1.0"} in failed["missing"]

        # A corrupt image: the header is fine, a payload byte is not
        bad = bytearray(images["new"])
        bad[len(bad) // 2] ^= 0x40
        ack = up.offer(images["new"], version="2.0.0")
        up.image = bytes(bad)
        assert up.send(ack)["state"] == "verifying"
        assert up.next_status() == {"state": "failed", "reason": "sha256"}
        time.sleep(0.5)
        assert running.console().count("vdev: boot") == 1  # no reset, the old app runs on
        assert "OLD-APP-RUNNING" in running.console()
        states = led_states(running)
        assert ("magenta", "blinking") in states and states[-1] == CONNECTED  # updating, and back

        # Half a transfer, then a power cut
        ack = up.offer(images["new"])
        assert ack == {"state": "receiving", "next": 0, "bitmap": "00", "window": 8, "ack": 2}
        count = -(-len(images["new"]) // CHUNK)
        assert count >= 40
        ack = up.send(ack, stop_at=18)
        assert ack["next"] % 2 == 0 and 0 < ack["next"] <= 18  # acknowledged every 2 chunks
        # chunks stop coming: after 2 s the device says what it has (acks still queued
        # from the chunks before come first)
        status = up.next_status(timeout=5)
        while status["next"] < 18:
            status = up.next_status(timeout=5)
        assert status == {"state": "receiving", "next": 18, "bitmap": "00", "window": 8, "ack": 2}
    assert "NEW-APP-RUNNING" not in running.console()

    with dev.start(seconds=60) as running:
        running.wait_for("OLD-APP-RUNNING")
        service.describes(uid, count=2)
        time.sleep(0.3)
        ack = up.offer(images["new"])
        assert ack["state"] == "receiving" and ack["next"] == 18, ack  # resumed
        assert up.send(ack)["state"] == "verifying"
        assert up.next_status() == {"state": "pending"}
        running.wait_for("NEW-APP-RUNNING", timeout=20)
        assert up.next_status(timeout=15) == {"state": "installed", "version": "2.0.0"}
        console = running.console()
        assert "keel: installing the update into user" in console
        status = vdev.status(dev.path)
        assert status["reset_reason"] == "update" and status["app"] == "running"
        user = [m for m in status["modules"] if m["function"] == "user-part"][0]
        assert user["version"] == "2.0.0" and user["valid"]
        for name in ("pending.json", "apply.json", "transfer.json", "bitmap", "installed.json"):
            with pytest.raises(FileNotFoundError):
                vdev.read_file(dev.path, f"/keel/ota/{name}")


@pytest.mark.parametrize("board_name", ["esp32_generic"], indirect=True)
def test_an_update_survives_the_access_point_going_away(device, broker, cloud, pki,  # noqa: F811
                                                         board_images, platform, tmp_path):
    """Half a transfer over WiFi, then the access point goes (keel vdev io --ap-down):
    the connection manager sees the link lost and the session drops; when it is back the
    board joins again, the cloud offers the update again and the transfer goes on from
    where it was (every chunk acknowledged before the drop kept), and installs. On the
    ESP32 twin at the board's own heap, playing the firmware Keel documents, with ROMFS
    (Keel's code runs in place); with stock firmware the receiver does not fit beside
    the session (the next test)."""
    dev = _with_old_app(device, board_images)
    src = tmp_path / "big"
    src.mkdir()
    for filename, text in app_source("NEW-APP-RUNNING", 56000).items():  # (a 64 KB slot)
        (src / filename).write_text(text)
    new = build.build_app(src, platform, "1.1.0", tmp_path / "big.bin",
                          app_version="2.0.0").read_bytes()
    service, uid, up = _online_over_wifi(dev, broker, cloud, pki)
    sent = []
    chunk = up.chunk
    up.chunk = lambda n: (sent.append(n), chunk(n))
    with dev.start(seconds=150) as running:
        running.wait_for("keel: network: joined home", timeout=30)
        running.wait_for("OLD-APP-RUNNING", timeout=30)
        service.describes(uid, timeout=30)
        time.sleep(0.3)
        count = -(-len(new) // CHUNK)
        half = count // 2
        ack = up.send(up.offer(new, platform=platform), stop_at=half)
        while ack["next"] < half:  # (the acknowledgements of the last chunks sent)
            ack = up.next_status(timeout=5)
        assert ack["state"] == "receiving" and ack["next"] == half

        vio.send(dev.path, wifi.switch_ap(dev.path, "home", False))
        running.wait_for("keel: network: lost home", timeout=15)
        running.wait_for("keel: cloud lost (network down)", timeout=15)
        time.sleep(3)
        vio.send(dev.path, wifi.switch_ap(dev.path, "home", True))
        running.wait_for("keel: network: joined home", count=2, timeout=60)
        service.describes(uid, count=2, timeout=30)
        time.sleep(0.3)
        ack = up.offer(new, platform=platform)
        assert ack["state"] == "receiving" and ack["next"] == half, ack  # nothing lost
        sent.clear()
        assert up.send(ack)["state"] == "verifying"
        assert sorted(set(sent)) == list(range(half, count))  # only the rest went
        assert up.next_status(timeout=20) == {"state": "pending"}
        running.wait_for("NEW-APP-RUNNING", timeout=60)
    status = vdev.status(dev.path)
    user = [m for m in status["modules"] if m["function"] == "user-part"][0]
    assert user["version"] == "2.0.0" and status["reset_reason"] == "update"


def _online_over_wifi(dev, broker, cloud, pki):
    """An ESP32 twin with an access point on the air and its credentials stored,
    provisioned for the broker: (the cloud service, the device's id, an Updater)."""
    wifi.put_ap(dev.path, "home", "home-pass-1")
    vdev.write_files(dev.path, {"/keel/wifi.json": json.dumps(
        {"networks": [{"ssid": "home", "password": "home-pass-1"}]}).encode()})
    uid = provision(dev, pki, broker.port)
    broker.start()
    service = cloud(broker)
    return service, uid, Updater(service, uid)


@pytest.mark.parametrize("board_name", ["esp32_stock"], indirect=True)
def test_an_offer_that_does_not_fit_is_refused_and_the_session_stays(device, broker, cloud,  # noqa: F811
                                                                      pki, board_images, platform):
    """On the ESP32 twin with stock firmware (no ROMFS: the code extracted) at the
    board's own heap the session runs over WiFi, but the OTA receiver does not fit
    beside it: the offer is refused with no-memory, the session stays up (no reconnect)
    and the old app runs on."""
    dev = _with_old_app(device, board_images)
    service, uid, up = _online_over_wifi(dev, broker, cloud, pki)
    with dev.start(seconds=90) as running:
        running.wait_for("OLD-APP-RUNNING", timeout=40)
        service.describes(uid, timeout=40)
        time.sleep(0.3)
        ack = up.offer(board_images["new"], platform=platform)
        assert ack == {"state": "refused", "reason": "no-memory"}, ack
        running.wait_for("refusing the update", timeout=10)
        time.sleep(1)
        console = running.console()
        assert "keel: cloud lost" not in console, console[-2000:]
        status = vdev.status(dev.path)
        assert status["mem"]["heap_free_connected"] > 0
    assert vdev.status(dev.path)["mode"] == "normal"


def _stage(dev, image: bytes, copied: int, damage_slot: bool):
    """What ota.py and a bootloader cut off mid-copy leave in flash."""
    data = _in_staging(dev, image)
    user = dev.slot_offset("user")
    if damage_slot:
        data[user:user + copied] = image[:copied]  # the first half went in...
        data[user + copied:user + len(image)] = b"\x5a" * (len(image) - copied)  # ...the rest is torn
    (dev.path / vdev.FLASH_FILE).write_bytes(data)
    sha = hashlib.sha256(image).hexdigest()
    files = {"/keel/ota/pending.json": json.dumps({"slot": "user", "size": len(image), "sha256": sha})}
    if copied:
        files["/keel/ota/apply.json"] = json.dumps({"op": "copy", "sha256": sha, "copied": copied})
    vdev.write_files(dev.path, {k: v.encode() for k, v in files.items()})


@on_both_paths
def test_power_cut_during_the_bootloaders_copy(device, board_images):
    dev = _with_old_app(device, board_images, boot=True)
    image = board_images["new"]
    _stage(dev, image, copied=(len(image) // 2) & ~4095, damage_slot=True)
    console = dev.run(until="NEW-APP-RUNNING")
    assert "resuming the update at byte" in console and "NEW-APP-RUNNING" in console
    status = vdev.status(dev.path)
    assert status["reset_reason"] == "update" and status["mode"] == "normal"
    assert json.loads(vdev.read_file(dev.path, "/keel/ota/installed.json"))["version"] == "2.0.0"
    with pytest.raises(FileNotFoundError):
        vdev.read_file(dev.path, "/keel/ota/pending.json")


@on_both_paths
def test_damaged_staged_image_keeps_the_old_firmware(device, board_images):
    # Booted once, as a device that received an update has (on the ESP32 twin a first
    # boot's installs and this check together leave the system too little heap: issue 14)
    dev = _with_old_app(device, board_images, boot=True)
    image = bytearray(board_images["new"])
    _stage(dev, bytes(image), copied=0, damage_slot=False)
    flash_path = dev.path / vdev.FLASH_FILE
    data = bytearray(flash_path.read_bytes())
    data[dev.slot_offset("staging") + 5000] ^= 1  # the staged copy rotted
    flash_path.write_bytes(data)
    console = dev.run(until="OLD-APP-RUNNING")
    assert "staged update is damaged" in console and "OLD-APP-RUNNING" in console
    with pytest.raises(FileNotFoundError):
        vdev.read_file(dev.path, "/keel/ota/pending.json")


def _received(dev, image: bytes, function: str, index: int, slot: str):
    """What a receiver whose checks did not fit leaves: the image in staging, its
    transfer and bitmap, and received.json (system/core/ota.py)."""
    (dev.path / vdev.FLASH_FILE).write_bytes(_in_staging(dev, image))
    sha = hashlib.sha256(image).hexdigest()
    count = -(-len(image) // CHUNK)
    transfer = {"sha256": sha, "function": mf.function_id(function), "index": index,
                "version": "9.0.0", "platform": "virtual", "size": len(image),
                "chunk_size": CHUNK, "slot": slot, "trial_s": 0}
    vdev.write_files(dev.path, {
        "/keel/ota/transfer.json": json.dumps(transfer).encode(),
        "/keel/ota/bitmap": bytes([0xFF] * (count // 8) + ([(1 << count % 8) - 1] if count % 8 else [])),
        "/keel/ota/received.json": json.dumps({"sha256": sha}).encode()})


def test_checks_left_to_the_next_boot_install_what_passes(device, images):
    """An update received while its checks did not fit beside the session and the app
    is checked at the start of the next boot, on a fresh heap: it passes, the device
    resets and the bootloader installs it."""
    dev = _with_old_app(device, images, boot=True)
    _received(dev, images["new"], "user-part", 1, "user")
    console = dev.run(until="NEW-APP-RUNNING")
    assert "keel: ota: checking the update received at the last boot" in console, console
    assert "keel: ota: user verified; pending install" in console, console
    assert "NEW-APP-RUNNING" in console
    for name in ("received.json", "transfer.json", "pending.json"):
        with pytest.raises(FileNotFoundError):
            vdev.read_file(dev.path, f"/keel/ota/{name}")


def test_checks_left_to_the_next_boot_refuse_an_unmet_dependency(device, images):
    """The same checks as the receiver's: a system part 2 that needs system part 1 >=
    9.0.0 fails (dependency), the running firmware stays, and what the checks said waits
    for the cloud (checked.json, sent once connected)."""
    dev = _with_old_app(device, images, boot=True)
    _received(dev, images["sys-deps"], "system-part", 2, "system2")
    console = dev.run(until="OLD-APP-RUNNING")
    assert "keel: ota: update failed (dependency)" in console, console
    checked = json.loads(vdev.read_file(dev.path, "/keel/ota/checked.json"))
    assert checked["state"] == "failed" and checked["reason"] == "dependency", checked
    assert checked["missing"] == [{"function": "system-part", "index": 1, "version": "9.0.0"}]
    status = vdev.status(dev.path)
    part2 = [m for m in status["modules"] if m["function"] == "system-part" and m["index"] == 2][0]
    assert part2["version"] == "1.1.0" and status["mode"] == "normal"
    for name in ("received.json", "transfer.json", "pending.json"):
        with pytest.raises(FileNotFoundError):
            vdev.read_file(dev.path, f"/keel/ota/{name}")


DEFERRED_APP = """\
import sys
import json
import hashlib
import binascii
import keel_system
import ota


class NoRoom:  # the checks' module, as if it did not fit in the heap
    def verify(self, *args):
        raise MemoryError("memory allocation failed, allocating 393 bytes")


sent = []
COUNT = 3
CS = 1024


def setup():
    data = bytes((n * 7) & 0xFF for n in range(COUNT * CS))
    sha = binascii.hexlify(hashlib.sha256(data).digest()).decode()
    r = ota.Receiver(sent.append, "virtual", keel_system.SLOTS, None)
    r.offer_message(json.dumps({"sha256": sha, "function": "user-part", "index": 1,
        "version": "9.9.9", "platform": "virtual", "size": COUNT * CS, "chunk_size": CS}))
    tag = binascii.unhexlify(sha[:16])
    for n in range(COUNT):
        r.chunk_message(tag + bytes([0, 0, 0, n]) + data[n * CS:(n + 1) * CS])
    sys.modules["ota_check"] = NoRoom()
    r.service()  # verifies
    print("DEFERRED", sent[-1], open("/keel/ota/received.json").read())
    print("CHECKS-DROPPED", "ota_check" in sys.modules)
    print("NO-PENDING", "pending.json" not in __import__("os").listdir("/keel/ota"))
    r.drop()
"""


def test_checks_that_do_not_fit_are_left_to_the_next_boot(device, make_app):
    """The receiver's checks (ota_check.py) raising MemoryError: the transfer still ends
    pending for the cloud, its SHA-256 checked, with received.json for the next boot to
    check the rest (nothing for the bootloader to install yet); the checks' modules are
    dropped again."""
    dev = device("1.1.0")
    dev.flash(make_app("deferred", {"main.py": DEFERRED_APP}))
    console = dev.run(until="NO-PENDING True")  # (the last line: the run stops at it)
    line = [x for x in console.splitlines() if x.startswith("DEFERRED ")][0]
    decoder = json.JSONDecoder()
    status, end = decoder.raw_decode(line, len("DEFERRED "))
    pending, _ = decoder.raw_decode(line, end + 1)
    assert status == {"state": "pending", "checked": "sha256"}, line
    assert set(pending) == {"sha256"} and len(pending["sha256"]) == 64, line
    assert "NO-PENDING True" in console  # (nothing for the bootloader to install yet)
    assert "CHECKS-DROPPED False" in console
    assert "its checks at the next boot" in console


ALLOC_APP = """\
import gc
import hashlib
import binascii
import json
import keel_system
import ota

COUNT = 130
CS = 1024
rx = bytearray(1536)
AT = 40  # where a chunk's payload starts in the session's buffer (after its topic)
payload = memoryview(rx)[AT:AT + 12 + CS]
sent = [None, 0]  # the last text, how many (kept in place: the stub allocates nothing)

def publish(text):
    sent[0] = text
    sent[1] += 1

def setup():
    h = hashlib.sha256()
    block = bytearray(CS)
    for n in range(COUNT):
        for i in range(CS):
            block[i] = (n * 7 + i) & 0xFF
        h.update(block)
    sha = binascii.hexlify(h.digest()).decode()
    r = ota.Receiver(publish, "virtual", keel_system.SLOTS, rx)
    r.offer_message(json.dumps({"sha256": sha, "function": "user-part", "index": 1,
        "version": "9.9.9", "platform": "virtual", "size": COUNT * CS, "chunk_size": CS}))
    rx[AT:AT + 8] = binascii.unhexlify(sha[:16])
    quiet = 0
    acks = 0
    acked = 0  # bytes allocated by the chunks that were acknowledged
    spikes = [0] * 16  # (n, bytes) of chunks that allocated: filled in place
    nspikes = 0
    gc.collect()
    before = gc.mem_alloc()
    gc.disable()
    for n in range(COUNT - 2):  # all but two: no verification
        rx[AT + 8] = 0
        rx[AT + 9] = 0
        rx[AT + 10] = n >> 8
        rx[AT + 11] = n & 0xFF
        rx[AT + 12] = n & 0xFF  # (the data: one byte differs per chunk)
        a = gc.mem_alloc()
        k = sent[1]
        r.chunk_message(payload)
        got = gc.mem_alloc() - a
        if got and nspikes < 8:
            spikes[2 * nspikes] = n
            spikes[2 * nspikes + 1] = got
            nspikes += 1
        if sent[1] == k:
            quiet += got
        else:
            acks += 1
            acked += got
    total = gc.mem_alloc() - before
    gc.enable()
    last = json.loads(sent[0])
    print("OTA-ALLOC", COUNT - 2, quiet, acks, total, last["next"], r.stored, acked)
    print("OTA-SPIKES", " ".join(str(x) for x in spikes[:2 * nspikes]))
    r.drop()
"""


def test_receiver_allocates_nothing_per_chunk(device, make_app):
    dev = device("1.1.0")
    dev.flash(make_app("ota-alloc", {"main.py": ALLOC_APP}))
    console = dev.run(until="OTA-ALLOC", seconds=30)
    line = [x for x in console.splitlines() if x.startswith("OTA-ALLOC")]
    assert line, console
    chunks, quiet, acks, total, nxt, stored, acked = map(int, line[0].split()[1:])
    spikes = [x for x in console.splitlines() if x.startswith("OTA-SPIKES")][0].split()[1:]
    spikes = {int(n): int(b) for n, b in zip(spikes[::2], spikes[1::2])}
    # Chunk 0 makes the memoryview into the receive buffer that every chunk reuses.
    # The virtual board's flash erases a block with b"\xff" * 4096 (vm_startup.py, a
    # Python block device): LittleFS erases one when it compacts the metadata the
    # bitmap's updates append to, about every 60 chunks. A real port's is in C.
    first = spikes.pop(0, 0)
    erases = {n: b for n, b in spikes.items() if 4096 <= b <= 4096 + 128}
    own = quiet + acked - first - sum(erases.values())
    print(f"receiver: {chunks} chunks; steady state {own} bytes allocated, the {acks} "
          f"acknowledgements included (first chunk {first}, {len(erases)} LittleFS block "
          f"erases in the virtual flash {sum(erases.values())}); {total} bytes in all")
    assert stored == chunks and nxt == chunks
    assert acks == chunks // 2  # ACK_EVERY
    assert first <= 64 and own == 0 and spikes == erases and len(erases) <= 4
