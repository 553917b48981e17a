"""Fleets that require signed modules: `keel fleet create --require-signed`, `keel fleet
require-signed`, and `keel release app` refusing an app, or the system parts it needs
from the catalog, that are not signed by one of the fleet's keys (docs/signing.md)."""

import socket

import pytest

from keel import build, signing
from keel.cli import main
from keel_cloud.config import CloudDir
from keel_cloud.fleets import Fleets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keel(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args) -> str:
    code, out, err = keel(capsys, *args)
    assert code == 1 and err.startswith("keel: error: ") and err.count("\n") == 1, (code, out, err)
    return err


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
    assert "the app needs bootloader 0 1.0.0 from the catalog" in err
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
