"""Signed modules on the real MicroPython VM (docs/signing.md): a board that trusts a key
installs only modules signed by it, whichever way they come — written into a slot, staged
as an update, offered over the air (refused before a single chunk), or over USB (refused
by the host before anything is written) — and says why in its status and describe; a
board with no key is in development mode; a signed bootloader can bring new keys."""

import hashlib
import json
import time

import pytest
from conftest import Device
from test_cloud_session import (  # noqa: F401 (fixtures)
    MOSQUITTO, broker, cloud, pki, provision)
from test_ota import Updater
from hostile_images import NEXT_BOOTLOADER

from keel import build, keel_files, signing, trust, vdev
from keel.errors import KeelError
from keel.images import load_valid_image
from keel_cloud import signatures

APP = {"main.py": 'print("SIGNED-APP-RUNNING")\n\ndef loop():\n    pass\n'}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    base = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("release", "other", "next"):
        signing.generate_key(base / name)
        out[name] = signing.load_private_key(base / name)
        out[name + ".pub"] = signing.load_public_key(base / f"{name}.pub")
    return out


@pytest.fixture(scope="module")
def signed_system(keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("signed-1.1.0")
    build.build_system("virtual", "1.1.0", out, signing.signer(keys["release"]))
    return out


@pytest.fixture(scope="module")
def apps(keys, tmp_path_factory):
    """The same app: unsigned, signed by the trusted key, by another key, and with a
    signature that does not verify (the trusted key's id, CRC and SHA-256 all right)."""
    base = tmp_path_factory.mktemp("signed-apps")
    src = base / "src"
    src.mkdir()
    for name, text in APP.items():
        (src / name).write_text(text)
    out = {}
    for label, key in (("unsigned", None), ("signed", "release"), ("other", "other")):
        sign = signing.signer(keys[key]) if key else None
        out[label] = build.build_app(src, "virtual", "1.1.0", base / f"{label}.bin",
                                     sign=sign).read_bytes()
    forged = bytearray(out["signed"])
    image = load_valid_image(base / "signed.bin")
    at = image.info.header_size + image.info.payload_size + 64  # the signature's first byte
    forged[at] ^= 1
    import struct
    import zlib

    forged[-4:] = struct.pack("<I", zlib.crc32(bytes(forged[:-4])) & 0xFFFFFFFF)
    out["forged"] = bytes(forged)
    return out


def trusting(tmp_path, system_dir, keys=None, name="dev"):
    path = tmp_path / name
    vdev.create(path, system_dir, trusted=keys)
    return Device(path)


def write_into_slot(dev, image: bytes, label="user"):
    """What a tool that bypasses keel's checks would do: the image straight into its slot."""
    flash = dev.path / vdev.FLASH_FILE
    data = bytearray(flash.read_bytes())
    at = dev.slot_offset(label)
    data[at:at + len(image)] = image
    flash.write_bytes(data)


def user_module(status):
    return [m for m in status["modules"] if m["function"] == "user-part"][0]


def test_a_board_that_trusts_a_key_installs_only_what_it_signed(tmp_path, keys, signed_system,
                                                                 apps):
    dev = trusting(tmp_path, signed_system, [keys["release.pub"]])
    for label, reason in (("unsigned", "unsigned"), ("other", "untrusted"),
                          ("forged", "signature")):
        write_into_slot(dev, apps[label])
        console = dev.run(until="SAFE MODE")
        assert f"keel: refusing user 1.0.0 ({reason})" in console, console
        assert "SIGNED-APP-RUNNING" not in console
        status = dev.status()
        assert status["mode"] == "safe" and status["safe_mode_reason"] == reason
        assert user_module(status)["valid"] is False
        assert user_module(status)["invalid_reason"] == reason
        assert status["trust"] == {"mode": "enforced",
                                   "keys": [signing.fingerprint(keys["release.pub"])]}
        # No code of the refused module was written.
        with pytest.raises(Exception):
            vdev.read_file(dev.path, "/keel/m/app/main.mpy")
    write_into_slot(dev, apps["signed"])
    console = dev.run(until="SIGNED-APP-RUNNING")
    assert "SIGNED-APP-RUNNING" in console
    assert dev.status()["mode"] == "normal"


def test_the_host_refuses_what_the_board_would_refuse(tmp_path, keys, signed_system, apps):
    dev = trusting(tmp_path, signed_system, [keys["release.pub"]])
    before = (dev.path / vdev.FLASH_FILE).read_bytes()
    for label in ("unsigned", "other", "forged"):
        path = tmp_path / f"{label}.bin"
        path.write_bytes(apps[label])
        with pytest.raises(KeelError, match="nothing written"):
            dev.flash(path)
    assert (dev.path / vdev.FLASH_FILE).read_bytes() == before
    path = tmp_path / "signed.bin"
    path.write_bytes(apps["signed"])
    dev.flash(path)
    assert "SIGNED-APP-RUNNING" in dev.run(until="SIGNED-APP-RUNNING")


def test_a_board_without_keys_is_in_development_mode(device, apps, tmp_path):
    dev = device("1.1.0")
    path = tmp_path / "unsigned.bin"
    path.write_bytes(apps["unsigned"])
    dev.flash(path)
    console = dev.run(until="SIGNED-APP-RUNNING")
    assert "development mode: this board takes unsigned modules" in console
    assert dev.status()["trust"] == {"mode": "development", "keys": []}


def test_an_unreadable_trust_file_takes_nothing(tmp_path, keys, signed_system, apps):
    dev = trusting(tmp_path, signed_system, [keys["release.pub"]])
    dev.run(until="no app installed")  # the system goes in while the keys read
    vdev.write_files(dev.path, {keel_files.TRUST_FILE: b"{not json"})
    write_into_slot(dev, apps["signed"])
    dev.run(until="SAFE MODE")
    status = dev.status()
    assert user_module(status)["invalid_reason"] == "untrusted"
    assert status["trust"]["mode"] == "enforced" and status["trust"]["error"]
    # On a new board, nothing goes in: the bootloader waits for firmware, and says why.
    fresh = trusting(tmp_path, signed_system, [keys["release.pub"]], name="fresh")
    vdev.write_files(fresh.path, {keel_files.TRUST_FILE: b"[]"})
    assert "waiting for firmware" in fresh.run(until="waiting for firmware")
    status = fresh.status()
    assert status["stage"] == "bootloader" and status["safe_mode_reason"] == "untrusted"
    assert status["trust"]["error"]
    with pytest.raises(KeelError, match="nothing written"):  # the host reads it the same way
        path = tmp_path / "signed.bin"
        path.write_bytes(apps["signed"])
        dev.flash(path)


def test_a_staged_update_is_refused_before_it_is_copied(tmp_path, keys, signed_system, apps):
    dev = trusting(tmp_path, signed_system, [keys["release.pub"]])
    path = tmp_path / "signed.bin"
    path.write_bytes(apps["signed"])
    dev.flash(path)
    dev.run(until="SIGNED-APP-RUNNING")
    slot_before = (dev.path / vdev.FLASH_FILE).read_bytes()[dev.slot_offset("user"):][:4096]
    dev.stage_update("user", apps["other"])
    console = dev.run(until="SIGNED-APP-RUNNING")
    assert "keel: refusing the update for user (untrusted)" in console
    flash = (dev.path / vdev.FLASH_FILE).read_bytes()
    assert flash[dev.slot_offset("user"):][:4096] == slot_before  # nothing written
    status = dev.status()
    assert status["refused"]["reason"] == "untrusted" and status["refused"]["via"] == "install"
    assert status["refused"]["function"] == "user-part"


def test_a_signed_bootloader_can_bring_new_keys(tmp_path, keys, apps):
    """Rotation: the board trusts `release`; a bootloader signed by `release` that brings
    `next` is installed, and from then on only `next` signs what the board takes."""
    first = tmp_path / "sys-release"
    build.build_system("virtual", "1.1.0", first, signing.signer(keys["release"]))
    dev = trusting(tmp_path, first, [keys["release.pub"]])
    dev.run(until="no app installed")
    rotating = tmp_path / "sys-rotate"
    build.build_system("virtual", "1.1.0", rotating, signing.signer(keys["release"]),
                       trust_keys=[keys["next.pub"]])
    boot = next(rotating.glob("*bootloader*"))
    write_into_slot(dev, load_valid_image(boot).data, "bootloader")
    console = dev.run(until="no app installed", seconds=30)
    assert "brings the keys this board trusts" in console, console
    assert json.loads(vdev.read_file(dev.path, keel_files.TRUST_FILE)) == trust.document(
        [keys["next.pub"]])
    assert dev.status()["trust"]["keys"] == [signing.fingerprint(keys["next.pub"])]
    # The old key's app is refused now; one signed by the new key runs.
    write_into_slot(dev, apps["signed"])
    dev.run(until="SAFE MODE")
    assert user_module(dev.status())["invalid_reason"] == "untrusted"
    src = tmp_path / "src"
    src.mkdir()
    (src / "main.py").write_text(APP["main.py"])
    new = build.build_app(src, "virtual", "1.1.0", tmp_path / "next.bin",
                          sign=signing.signer(keys["next"]))
    dev.flash(new)
    assert "SIGNED-APP-RUNNING" in dev.run(until="SIGNED-APP-RUNNING")


def newer(image: bytes, key, version=NEXT_BOOTLOADER) -> bytes:
    """The same module as a new version (other bytes, so the board installs it), signed."""
    from keel import module_format as mf

    info = mf.parse_header(image)
    payload = image[info.header_size:info.header_size + info.payload_size]
    info.version = mf.encode_version(version)
    info.flags = 0
    return mf.build_image(info, payload, hashlib.sha256, signing.signer(key))


def test_a_bootloader_update_keeps_the_boards_keys(tmp_path, keys, signed_system):
    dev = trusting(tmp_path, signed_system, [keys["release.pub"]])
    dev.run(until="no app installed")
    boot = load_valid_image(next(signed_system.glob("*bootloader*"))).data
    # A new bootloader signed by a key the board does not trust: refused.
    write_into_slot(dev, newer(boot, keys["other"]), "bootloader")
    console = dev.run(until="keel: system", seconds=30)
    assert f"keel: refusing bootloader {NEXT_BOOTLOADER} (untrusted)" in console, console
    # Signed by the trusted key, bringing no keys of its own: the board keeps its keys.
    write_into_slot(dev, newer(boot, keys["release"]), "bootloader")
    console = dev.run(until="no app installed", seconds=30)
    assert "bootloader updated" in console, console
    assert [m["version"] for m in dev.status()["modules"]
            if m["function"] == "bootloader"] == [NEXT_BOOTLOADER]
    assert json.loads(vdev.read_file(dev.path, keel_files.TRUST_FILE)) == trust.document(
        [keys["release.pub"]])


# Over the air: the receiver, with a real Mosquitto and paho playing the cloud


class SignedUpdater(Updater):
    def offer_signed(self, image, signature=None, version="2.0.0"):
        """Offer image; signature: the offer's field (default: the image's own)."""
        self.image = image
        self.sha = hashlib.sha256(image).hexdigest()
        doc = {"sha256": self.sha, "function": "user-part", "index": 1, "version": version,
               "platform": "virtual", "size": len(image), "chunk_size": 1024}
        fields = signatures.offer_fields(image) if signature is None else signature
        doc.update(fields)
        self.service.client.publish(f"devices/{self.uid}/ota/offer", json.dumps(doc), qos=1)
        return self.next_status()


@pytest.mark.skipif(not MOSQUITTO.is_file(), reason="needs Mosquitto")
def test_over_the_air_a_refused_signature_is_refused_at_the_offer(
        tmp_path, keys, signed_system, apps, broker, cloud, pki):  # noqa: F811
    dev = trusting(tmp_path, signed_system, [keys["release.pub"]])
    path = tmp_path / "signed.bin"
    path.write_bytes(apps["signed"])
    dev.flash(path)
    uid = provision(dev, pki, broker.port)
    broker.start()
    service = cloud(broker)
    up = SignedUpdater(service, uid)
    with dev.start(seconds=60) as running:
        running.wait_for("SIGNED-APP-RUNNING")
        describe = service.describes(uid)[0]
        assert describe["trust"]["mode"] == "enforced"
        time.sleep(0.3)
        assert up.offer_signed(apps["unsigned"]) == {"state": "refused", "reason": "unsigned"}
        assert up.offer_signed(apps["other"]) == {"state": "refused", "reason": "untrusted"}
        assert up.offer_signed(apps["forged"]) == {"state": "refused", "reason": "signature"}
        # The trusted key's signature, offered for another image: refused after the
        # chunks, since the image does not carry what was offered.
        ack = up.offer_signed(apps["other"], signature=signatures.offer_fields(apps["signed"]))
        assert ack["state"] == "receiving"
        assert up.send(ack)["state"] == "verifying"
        failed = up.next_status()
        assert failed["state"] == "failed" and failed["reason"] == "signature"
        # The last refusal is in the describe sent again, and in the status file.
        found = service.wait(f"devices/{uid}/describe",
                             match=lambda p: json.loads(p).get("refused", {}).get("reason")
                             == "signature")
        refused = json.loads(found[-1])["refused"]
        assert refused["via"] == "ota" and refused["sha256"] == hashlib.sha256(
            apps["other"]).hexdigest()
        assert dev.status()["refused"]["reason"] == "signature"
        assert running.console().count("vdev: boot") == 1
    flash = (dev.path / vdev.FLASH_FILE).read_bytes()
    with pytest.raises(FileNotFoundError):
        vdev.read_file(dev.path, "/keel/ota/pending.json")
    assert flash[dev.slot_offset("user"):][:len(apps["signed"])] == apps["signed"]


@pytest.mark.skipif(not MOSQUITTO.is_file(), reason="needs Mosquitto")
def test_over_the_air_refused_offers_write_nothing(
        tmp_path, keys, signed_system, apps, broker, cloud, pki):  # noqa: F811
    dev = trusting(tmp_path, signed_system, [keys["release.pub"]])
    uid = provision(dev, pki, broker.port)
    broker.start()
    service = cloud(broker)
    up = SignedUpdater(service, uid)
    with dev.start(seconds=60) as running:
        running.wait_for("no app installed")
        service.describes(uid)
        time.sleep(0.3)
        before = (dev.path / vdev.FLASH_FILE).read_bytes()
        assert up.offer_signed(apps["unsigned"])["reason"] == "unsigned"
        time.sleep(0.3)
        after = (dev.path / vdev.FLASH_FILE).read_bytes()
        staging = dev.board().partition("staging")
        assert after[staging.offset:staging.offset + staging.size] == \
            before[staging.offset:staging.offset + staging.size]
        with pytest.raises(FileNotFoundError):
            vdev.read_file(dev.path, "/keel/ota/transfer.json")
        # A good one then goes through to pending and runs.
        ack = up.offer_signed(apps["signed"])
        assert ack["state"] == "receiving"
        assert up.send(ack)["state"] == "verifying"
        assert up.next_status() == {"state": "pending"}
        running.wait_for("SIGNED-APP-RUNNING", timeout=20)


# Over USB: the board says which keys it trusts, and the host refuses before writing


def test_flash_usb_refuses_what_the_board_would_refuse(tmp_path, keys, signed_system, apps):
    try:
        from test_usb_flash import keel, slot_bytes
        from test_vdev_pty import Board
    except ImportError:  # run from another directory
        from tests.device.test_usb_flash import keel, slot_bytes
        from tests.device.test_vdev_pty import Board

    dev = trusting(tmp_path, signed_system, [keys["release.pub"]])
    board = Board(dev, tmp_path / "tty")
    try:
        board.wait_for("no app installed")
        before = slot_bytes(dev, "user")
        for label, text in (("unsigned", "not signed"), ("other", "does not trust"),
                            ("forged", "does not verify")):
            path = tmp_path / f"{label}.bin"
            path.write_bytes(apps[label])
            proc = keel("flash", "--usb", path, "--port", board.tty)
            assert proc.returncode == 1 and text in proc.stderr and "nothing written" in \
                proc.stderr, proc.stdout + proc.stderr
            assert slot_bytes(dev, "user") == before
        path = tmp_path / "signed.bin"
        path.write_bytes(apps["signed"])
        proc = keel("flash", "--usb", path, "--port", board.tty)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        board.wait_for("SIGNED-APP-RUNNING")
    finally:
        board.stop()
