"""A system part sent over the air proves itself by reaching the cloud, or goes back:
end to end with `keel cloud serve`, `keel flash` and a virtual device on the real VM
(docs/boot-flow.md, "Updates and rollback")."""

import json
import shutil

import pytest

from keel import build
from keel.paths import source_root

try:
    from test_cloud_e2e import Cloud, RunningDevice, make_device, wait_until
except ImportError:  # run from another directory
    from tests.cloud.test_cloud_e2e import Cloud, RunningDevice, make_device, wait_until

SP = "system-part"


@pytest.fixture(scope="module")
def systems(tmp_path_factory):
    """1.1.0 (the device's), 1.1.1 (a good update of part 1) and 1.1.2 (a part 1 that
    fails as it starts)."""
    out = {}
    for version in ("1.1.0", "1.1.1"):
        out[version] = tmp_path_factory.mktemp(f"system{version}")
        build.build_system("virtual", version, out[version])
    tree = tmp_path_factory.mktemp("broken-tree")
    for name in ("bootloader", "app_loader", "system", "hal", "lib", "boards"):
        shutil.copytree(source_root() / name, tree / name, symlinks=True)
    core = tree / "system" / "core" / "keel_system.py"
    core.write_text(core.read_text().replace(
        "def start(board, slots, reset_reason):\n",
        "def start(board, slots, reset_reason):\n    raise RuntimeError('boom in 1.1.2')\n"))
    out["1.1.2"] = tmp_path_factory.mktemp("system1.1.2")
    mp = pytest.MonkeyPatch()
    mp.setenv("KEEL_ROOT", str(tree))
    try:
        build.build_system("virtual", "1.1.2", out["1.1.2"])
    finally:
        mp.undo()
    return out


def part1(system_dir):
    return next(system_dir.glob("*-system-part1-*.bin"))


def show(cloud, name):
    return json.loads(cloud.keel("device", "show", name, "--json").stdout)


def part1_version(d):
    return {(m["function"], m["index"]): m["version"] for m in d["modules"]}.get((SP, 1))


def test_a_part_that_reaches_the_cloud_stays_and_one_that_fails_goes_back(tmp_path, systems):
    cloud = Cloud(tmp_path / "cloud")
    cloud.start()
    dev_dir = make_device(tmp_path, systems["1.1.0"], cloud, "dev1", "hello")
    console = dev_dir / "console.log"
    device = RunningDevice(dev_dir)
    try:
        wait_until(lambda: (d := show(cloud, "dev1"))["online"] and part1_version(d) == "1.1.0",
                   what="dev1 online on 1.1.0")
        # A good part: swapped in, on trial, proves itself by reconnecting.
        cloud.keel("flash", "dev1", part1(systems["1.1.1"]))
        wait_until(lambda: "system1 1.1.1 reached the cloud: it stays" in console.read_text(),
                   timeout=60, what="the trial passed")
        d = wait_until(lambda: (d := show(cloud, "dev1"))["online"] and part1_version(d) == "1.1.1" and d,
                       what="dev1 on 1.1.1")
        assert "rollback" not in d or not d["rollback"]

        # A part that fails as it starts: the bootloader puts 1.1.1 back at once, and the
        # device tells the cloud.
        cloud.keel("flash", "dev1", part1(systems["1.1.2"]))
        wait_until(lambda: "system1 is back on 1.1.1" in console.read_text(), timeout=60,
                   what="the rollback")
        d = wait_until(lambda: (d := show(cloud, "dev1"))["online"] and d.get("rollback") and d,
                       timeout=30, what="the rollback reported")
        assert part1_version(d) == "1.1.1" and d["mode"] == "normal"
        assert d["rollback"]["version"] == "1.1.2" and d["rollback"]["restored"] == "1.1.1"
        assert d["rollback"]["reason"] == "RuntimeError: boom in 1.1.2"
        text = cloud.keel("device", "show", "dev1").stdout
        assert "1.1.2" in text and "rolled back" in text
        assert "hello from keel" in console.read_text().split("system1 is back on 1.1.1")[-1]
    finally:
        device.stop()
        cloud.stop()
