"""The release catalog: `keel release system DIR` and `keel release list`, with no cloud
service running (the catalog is the cloud directory's files and registry database)."""

import hashlib
import json
import shutil
import sqlite3

import pytest

from keel import build, images
from keel import module_format as mf
from keel.cli import main
from keel_cloud.config import CloudDir

BOOTLOADER = build.bootloader_version()  # what keel build system puts beside the parts


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    out = tmp_path_factory.mktemp("system")
    build.build_system("virtual", "1.1.0", out)
    return out


@pytest.fixture
def cloud_dir(tmp_path):
    cloud = CloudDir(tmp_path / "cloud")
    cloud.init()
    return cloud


def keel(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def stored_files(cloud_dir):
    root = cloud_dir.path / "releases"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_release_a_system_build_and_list_it(system, cloud_dir, capsys):
    code, out, err = keel(capsys, "release", "system", system, "--cloud", cloud_dir.path)
    assert code == 0, err
    assert "released 1.1.0 for virtual" in out
    assert stored_files(cloud_dir) == [
        f"virtual/bootloader-0-{BOOTLOADER}.bin", "virtual/system-part-1-1.1.0.bin", "virtual/system-part-2-1.1.0.bin",
    ]
    # The stored files are the images, byte for byte.
    assert (cloud_dir.path / "releases/virtual/system-part-1-1.1.0.bin").read_bytes() == \
        (system / "virtual-system-part1-1.1.0.bin").read_bytes()

    code, out, err = keel(capsys, "release", "list", "--json", "--cloud", cloud_dir.path)
    assert code == 0, err
    [release] = json.loads(out)
    assert (release["version"], release["platform"], release["prerelease"]) == ("1.1.0", "virtual", False)
    assert release["released"][:4].isdigit() and "T" in release["released"]
    modules = {(m["function"], m["index"]): m for m in release["modules"]}
    assert set(modules) == {("bootloader", 0), ("system-part", 1), ("system-part", 2)}
    part1 = (system / "virtual-system-part1-1.1.0.bin").read_bytes()
    assert modules[("system-part", 1)] == {
        "function": "system-part", "index": 1, "version": "1.1.0", "size": len(part1),
        "sha256": hashlib.sha256(part1).hexdigest(),
    }
    assert modules[("bootloader", 0)]["version"] == BOOTLOADER

    code, out, _ = keel(capsys, "release", "list", "--cloud", cloud_dir.path)
    assert code == 0 and out.splitlines()[0].startswith("1.1.0  virtual  released ")
    assert "system-part 1 1.1.0" in out and f"{len(part1)} bytes" in out
    code, out, _ = keel(capsys, "release", "list", "--json", "--platform", "esp32", "--cloud", cloud_dir.path)
    assert json.loads(out) == []

    # In the registry's database, next to the devices.
    with sqlite3.connect(cloud_dir.registry_path) as db:
        assert db.execute("SELECT COUNT(*) FROM release_modules").fetchone()[0] == 3


def test_corrupt_image_is_refused_and_nothing_is_stored(system, cloud_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(system, bad)
    part2 = bad / "virtual-system-part2-1.1.0.bin"
    data = bytearray(part2.read_bytes())
    data[200] ^= 0xFF
    part2.write_bytes(bytes(data))
    code, out, err = keel(capsys, "release", "system", bad, "--cloud", cloud_dir.path)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("keel: error: ") and "corrupt" in err
    assert stored_files(cloud_dir) == []
    code, out, _ = keel(capsys, "release", "list", "--json", "--cloud", cloud_dir.path)
    assert json.loads(out) == []


def test_duplicates(system, cloud_dir, tmp_path, capsys):
    assert keel(capsys, "release", "system", system, "--cloud", cloud_dir.path)[0] == 0
    before = {p: (cloud_dir.path / "releases" / p).read_bytes() for p in stored_files(cloud_dir)}

    # The same release again: nothing to do, success.
    code, out, err = keel(capsys, "release", "system", system, "--cloud", cloud_dir.path)
    assert code == 0 and "already released" in out, err

    # Same platform/function/index/version, other content: refused, nothing changes.
    other = tmp_path / "other"
    shutil.copytree(system, other)
    part2 = other / "virtual-system-part2-1.1.0.bin"
    image = images.read_image(part2)
    payload = image.data[image.info.header_size:image.info.header_size + image.info.payload_size]
    part2.write_bytes(mf.build_image(image.info, payload + b"\0" * 16, hashlib.sha256))
    assert images.load_valid_image(part2).ok  # a valid image, just different
    code, out, err = keel(capsys, "release", "system", other, "--cloud", cloud_dir.path)
    assert code == 1 and "different content" in err and err.count("\n") == 1
    assert {p: (cloud_dir.path / "releases" / p).read_bytes() for p in stored_files(cloud_dir)} == before

    # A new system version that reuses the same bootloader: stored, listed newest first.
    newer = tmp_path / "newer"
    build.build_system("virtual", "1.2.0-rc.1", newer)
    code, out, err = keel(capsys, "release", "system", newer, "--cloud", cloud_dir.path)
    assert code == 0, err
    assert "(prerelease)" in out and f"bootloader 0 {BOOTLOADER}" in out
    code, out, _ = keel(capsys, "release", "list", "--json", "--cloud", cloud_dir.path)
    listed = json.loads(out)
    assert [(r["version"], r["prerelease"]) for r in listed] == [("1.2.0-rc.1", True), ("1.1.0", False)]
    assert len(listed[0]["modules"]) == 3
    assert len(stored_files(cloud_dir)) == 5  # the bootloader file is shared


def test_the_catalog_is_created_on_first_use_without_a_cloud(tmp_path, system, capsys):
    """`keel release system` where no cloud ever ran (a user who only flashes over USB
    with `keel update`): the cloud directory and its catalog are made."""
    where = tmp_path / "nowhere"
    code, out, err = keel(capsys, "release", "system", system, "--cloud", where)
    assert code == 0 and "released" in out, err
    code, out, _ = keel(capsys, "release", "list", "--json", "--cloud", where)
    assert [r["version"] for r in json.loads(out)] == ["1.1.0"]
