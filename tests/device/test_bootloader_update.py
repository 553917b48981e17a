"""A new bootloader module installs itself at the next boot and resets once."""

import shutil
from pathlib import Path

from hostile_images import NEXT_BOOTLOADER
from keel import build

ROOT = Path(__file__).resolve().parents[2]


def test_flashed_bootloader_installs_itself(tmp_path, monkeypatch, device, hello_app):
    tree = tmp_path / "tree"
    for name in ("bootloader", "system", "app_loader", "hal", "lib", "boards"):
        shutil.copytree(ROOT / name, tree / name)
    (tree / "bootloader" / "VERSION").write_text(NEXT_BOOTLOADER + "\n")
    monkeypatch.setenv("KEEL_ROOT", str(tree))
    built = build.build_system("virtual", "1.1.0", tmp_path / "sys")
    monkeypatch.delenv("KEEL_ROOT")
    new_bootloader = [p for p in built if "bootloader" in p.name][0]

    dev = device("1.1.0")
    dev.flash(hello_app(), new_bootloader)
    console = dev.run(until="hello from keel")
    assert "bootloader updated, resetting" in console
    assert console.count("vdev: boot ") == 2
    st = dev.status()
    assert st["reset_reason"] == "update"
    boot = [m for m in st["modules"] if m["function"] == "bootloader"][0]
    assert (boot["version"], boot["valid"], boot["sha256_ok"]) == (NEXT_BOOTLOADER, True, True)

    # Installed once: the next boot goes straight to the app.
    console = dev.run(until="hello from keel")
    assert "bootloader updated" not in console
