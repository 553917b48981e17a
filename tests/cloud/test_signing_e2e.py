"""Issue acceptance, over the air with `keel cloud serve`: a board that trusts a key (keel
vdev create --trust) is sent only what that key signed. `keel flash` of an unsigned
module or one signed by another key is refused before anything is sent (the device's
describe says what it trusts), nothing changes on the device; the same module signed
with the right key installs and runs. `keel device show` says what the board trusts."""

import json

from keel import build, signing, vdev, vio

try:
    from test_cloud_e2e import Cloud, RunningDevice, wait_until
except ImportError:  # run from another directory
    from tests.cloud.test_cloud_e2e import Cloud, RunningDevice, wait_until


def test_keel_flash_sends_a_board_only_what_its_key_signed(tmp_path):
    for name in ("release", "other"):
        signing.generate_key(tmp_path / name)
    release = signing.signer(signing.load_private_key(tmp_path / "release"))
    other = signing.signer(signing.load_private_key(tmp_path / "other"))
    system = tmp_path / "system"
    build.build_system("virtual", "1.1.0", system, release)
    src = tmp_path / "app"
    src.mkdir()
    (src / "main.py").write_text("def setup():\n    print('signed over the air')\n")
    images = {label: build.build_app(src, "virtual", "1.1.0", tmp_path / f"{label}.bin",
                                     app_version="2.0.0", sign=sign)
              for label, sign in (("unsigned", None), ("other", other), ("signed", release))}

    cloud = Cloud(tmp_path / "cloud")
    cloud.start()
    dev_dir = tmp_path / "dev1"
    vdev.create(dev_dir, system, trusted=[signing.load_public_key(tmp_path / "release.pub")])
    cloud.keel("device", "provision", dev_dir, "--name", "dev1")
    device = RunningDevice(dev_dir)
    try:
        wait_until(lambda: cloud.devices()["dev1"]["online"] and cloud.devices()["dev1"]["mode"],
                   what="dev1 online and described")
        show = json.loads(cloud.keel("device", "show", "dev1", "--json").stdout)
        fingerprint = signing.fingerprint(signing.load_public_key(tmp_path / "release.pub"))
        assert show["trust"] == {"mode": "enforced", "keys": [fingerprint]}
        assert f"takes only modules signed by {fingerprint[:16]}" in \
            cloud.keel("device", "show", "dev1").stdout
        flash_before = (dev_dir / vdev.FLASH_FILE).read_bytes()

        refused = cloud.keel("flash", "dev1", images["unsigned"], check=False)
        assert refused.returncode == 1 and "not signed" in refused.stderr, refused.stderr
        refused = cloud.keel("flash", "dev1", images["other"], check=False)
        assert refused.returncode == 1 and "does not trust" in refused.stderr, refused.stderr
        staging = vdev.VirtualDevice(dev_dir).board().partition("staging")
        after = (dev_dir / vdev.FLASH_FILE).read_bytes()
        assert after[staging.offset:staging.offset + staging.size] == \
            flash_before[staging.offset:staging.offset + staging.size]  # nothing was sent

        assert cloud.keel("flash", "dev1", images["signed"]).returncode == 0
        console = dev_dir / vio.CONSOLE_LOG
        wait_until(lambda: "signed over the air" in console.read_text(), timeout=40,
                   what="the signed app running")
    finally:
        device.stop()
        cloud.stop()
