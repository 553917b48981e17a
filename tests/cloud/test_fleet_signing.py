"""Fleets that require signed modules: `keel fleet create --require-signed`, `keel fleet
require-signed`, and `keel release app` refusing an app, or the system parts it needs
from the catalog, that are not signed by one of the fleet's keys (docs/signing.md)."""

import pytest

from keel import build, signing
from keel_cloud.config import CloudDir
from keel_cloud.fleet_releases import Fleets

try:
    from test_fleets import free_port, keel, refused
except ImportError:  # run from another directory
    from tests.cloud.test_fleets import free_port, keel, refused


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    base = tmp_path_factory.mktemp("keys")
    for name in ("release", "other"):
        signing.generate_key(base / name)
    return base


def signer(keys, name):
    return signing.signer(signing.load_private_key(keys / name))


@pytest.fixture(scope="module")
def systems(tmp_path_factory, keys):
    out = {}
    for label, sign in (("unsigned", None), ("signed", signer(keys, "release"))):
        out[label] = tmp_path_factory.mktemp(f"system-{label}")
        build.build_system("virtual", "1.1.0", out[label], sign)
    return out


@pytest.fixture(scope="module")
def apps(tmp_path_factory, keys):
    base = tmp_path_factory.mktemp("apps")
    src = base / "src"
    src.mkdir()
    (src / "main.py").write_text("def setup():\n    print('signed fleet app')\n")
    return {label: build.build_app(src, "virtual", "1.1.0", base / f"{label}.bin", sign=sign)
            for label, sign in (("unsigned", None), ("signed", signer(keys, "release")),
                                ("other", signer(keys, "other")))}


@pytest.fixture
def cloud(tmp_path):
    cloud = CloudDir(tmp_path / "cloud")
    cloud.init(mqtt=f"127.0.0.1:{free_port()}", http=f"127.0.0.1:{free_port()}")
    return cloud


def test_a_fleet_requiring_signatures_refuses_unsigned_and_foreign_apps(capsys, cloud, keys,
                                                                         systems, apps):
    c = ("--cloud", cloud.path)
    assert keel(capsys, "release", "system", systems["signed"], *c)[0] == 0
    code, out, _ = keel(capsys, "fleet", "create", "locked", "--platform", "virtual",
                        "--require-signed", keys / "release.pub", *c)
    assert code == 0 and "takes only modules signed by" in out
    err = refused(capsys, "release", "app", apps["unsigned"], "--fleet", "locked", *c)
    assert "not signed" in err
    err = refused(capsys, "release", "app", apps["other"], "--fleet", "locked", *c)
    assert "not by one of the keys" in err
    with Fleets.open(cloud) as fleets:
        assert fleets.current("locked") is None  # nothing stored
    code, out, _ = keel(capsys, "release", "app", apps["signed"], "--fleet", "locked", *c)
    assert code == 0, out
    with Fleets.open(cloud) as fleets:
        assert fleets.current("locked")["sha256"] == __import__("hashlib").sha256(
            apps["signed"].read_bytes()).hexdigest()


def test_the_system_parts_an_app_needs_must_be_signed_too(capsys, cloud, keys, systems, apps):
    c = ("--cloud", cloud.path)
    assert keel(capsys, "release", "system", systems["unsigned"], *c)[0] == 0
    keel(capsys, "fleet", "create", "locked", "--platform", "virtual",
         "--require-signed", keys / "release.pub", *c)
    err = refused(capsys, "release", "app", apps["signed"], "--fleet", "locked", *c)
    assert f"the app needs bootloader 0 {build.bootloader_version()} from the catalog" in err
    assert "not signed" in err and "could not be healed" in err


def test_require_signed_on_and_off(capsys, cloud, keys, systems, apps):
    c = ("--cloud", cloud.path)
    keel(capsys, "release", "system", systems["unsigned"], *c)
    keel(capsys, "fleet", "create", "open", "--platform", "virtual", *c)
    assert keel(capsys, "release", "app", apps["unsigned"], "--fleet", "open", *c)[0] == 0
    code, out, _ = keel(capsys, "fleet", "require-signed", "open", keys / "release.pub", *c)
    assert code == 0 and "takes only modules signed by" in out
    with Fleets.open(cloud) as fleets:
        assert fleets.signing_keys("open") == [signing.load_public_key(keys / "release.pub")]
    err = refused(capsys, "release", "app", apps["unsigned"], "--fleet", "open", *c)
    assert "not signed" in err
    code, out, _ = keel(capsys, "fleet", "require-signed", "open", "--off", *c)
    assert code == 0 and "unsigned modules again" in out
    with Fleets.open(cloud) as fleets:
        assert fleets.signing_keys("open") == []
    refused(capsys, "fleet", "require-signed", "open", *c)  # neither keys nor --off
    refused(capsys, "fleet", "require-signed", "nosuch", keys / "release.pub", *c)
    refused(capsys, "fleet", "require-signed", "open", keys / "release", *c)  # a private key


# Sending: the healer and the offer


try:
    from test_healer import FakeCatalog, FakeOta, describe, settle, system
except ImportError:  # run from another directory
    from tests.cloud.test_healer import FakeCatalog, FakeOta, describe, settle, system


class SignedCatalog(FakeCatalog):
    """The healer tests' catalog, its images signed with sign (or unsigned: None)."""

    def __init__(self, releases, sign):
        super().__init__(releases)
        self.sign = sign

    def image(self, platform, function, index, version):
        data = super().image(platform, function, index, version)
        return signing.sign_image(data, self.sign) if self.sign else data


class KeyedFleets:
    def __init__(self, keys):
        self.keys = keys

    def target(self, device_id):
        return None

    def rollbacks(self, device_id):
        return []

    def device_signing_keys(self, device_id):
        return self.keys


def heal(catalog_key, fleet_keys, trust=None, expect="blocked"):
    from keel_cloud.healer import Healer

    ota = FakeOta()
    healer = Healer(ota, SignedCatalog([system("1.0.0"), system("1.1.0")], catalog_key),
                    KeyedFleets(fleet_keys), recheck=0)
    try:
        d = describe("1.0.0", [("system-part", 2, "1.1.0")])
        if trust is not None:
            d["trust"] = trust
        healer.on_describe("dev", d)
        status = settle(healer, "dev", expect)
        return status, ota.sent
    finally:
        healer.stop()


def test_the_healer_sends_a_fleet_nothing_its_keys_did_not_sign(keys):
    release_key = signing.load_private_key(keys / "release")
    release_pub = signing.load_public_key(keys / "release.pub")
    other_pub = signing.load_public_key(keys / "other.pub")
    status, sent = heal(None, [release_pub])
    assert sent == [] and "requires signed modules" in status["reason"]
    assert "not signed" in status["reason"]
    status, sent = heal(release_key, [other_pub])
    assert sent == [] and "not by one of the keys" in status["reason"]
    status, sent = heal(release_key, [release_pub], {"mode": "development", "keys": []},
                        expect="healing")
    assert sent == [("system-part", 1, "1.1.0")] and status["state"] == "healing"


def test_the_healer_sends_a_board_that_trusts_keys_only_what_they_signed(keys):
    release_key = signing.load_private_key(keys / "release")
    fp = signing.fingerprint(signing.load_public_key(keys / "release.pub"))
    other = signing.fingerprint(signing.load_public_key(keys / "other.pub"))
    status, sent = heal(None, [], {"mode": "enforced", "keys": [fp]})
    assert sent == [] and "takes only modules signed by its keys" in status["reason"]
    status, sent = heal(release_key, [], {"mode": "enforced", "keys": [other]})
    assert sent == [] and "does not trust" in status["reason"]
    ota = FakeOta()
    from keel_cloud.healer import Healer

    healer = Healer(ota, SignedCatalog([system("1.0.0"), system("1.1.0")], release_key),
                    KeyedFleets([]), recheck=0)
    try:
        d = describe("1.0.0", [("system-part", 2, "1.1.0")]) | {"trust": {"mode": "enforced",
                                                                           "keys": [fp]}}
        healer.on_describe("dev", d)
        settle(healer, "dev", "healing")
        assert ota.sent == [("system-part", 1, "1.1.0")]
    finally:
        healer.stop()


def test_an_offer_carries_a_signed_modules_signature(keys):
    import hashlib
    import json

    from keel import images
    from keel_cloud import signatures

    data = signing.sign_image(FakeCatalog([]).image("virtual", "system-part", 2, "1.1.0"),
                              signing.load_private_key(keys / "release"))
    fields = signatures.offer_fields(data)["signature"]
    image = images.parse_image(data)
    assert fields["key"] == image.signed_by
    end = image.info.header_size + image.info.payload_size
    assert fields["digest"] == data[end:end + 32].hex()
    assert fields["sig"] == data[end + 64:end + 128].hex()
    unsigned = FakeCatalog([]).image("virtual", "system-part", 2, "1.1.0")
    assert signatures.offer_fields(unsigned) == {}
    # The OTA sender puts them in its offer.
    from keel_cloud.ota_sender import OtaSender

    sent = []
    sender = OtaSender(lambda topic, payload, qos: sent.append((topic, payload)), silence=0.2)
    with pytest.raises(Exception):
        sender.send("dev", data, {"function": "system-part", "index": 2, "version": "1.1.0",
                                  "platform": "virtual"}, timeout=0.5)
    offer = json.loads(next(p for t, p in sent if t.endswith("/ota/offer")))
    assert offer["signature"] == fields and offer["sha256"] == hashlib.sha256(data).hexdigest()
