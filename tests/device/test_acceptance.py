"""The walking-skeleton story, through the keel CLI exactly as a user types it."""

import json
import subprocess
from pathlib import Path

HELLO_SRC = Path(__file__).resolve().parents[2] / "examples" / "hello"


def keel(env, *args, check=True):
    proc = subprocess.run(["keel", *map(str, args)], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"keel {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def test_cli_story(tmp_path, keel_env):
    s100, s110, app, dev = tmp_path / "s100", tmp_path / "s110", tmp_path / "app.bin", tmp_path / "d"
    keel(keel_env, "build", "system", "--platform", "virtual", "--version", "1.0.0", "-o", s100)
    keel(keel_env, "build", "system", "--platform", "virtual", "--version", "1.1.0", "-o", s110)
    keel(keel_env, "build", "app", HELLO_SRC, "--platform", "virtual", "--target", "1.1.0", "-o", app)
    info = json.loads(keel(keel_env, "inspect", app, "--json").stdout)
    assert info["function"] == "user-part"
    assert {"function": "system-part", "index": 2, "version": "1.1.0"} in info["dependencies"]

    keel(keel_env, "vdev", "create", dev, "--system", s100)
    keel(keel_env, "vdev", "flash", dev, app)
    out = keel(keel_env, "vdev", "run", dev, "--seconds", "3").stdout
    assert "hello from keel" not in out
    st = json.loads(keel(keel_env, "vdev", "status", dev, "--json").stdout)
    assert (st["mode"], st["safe_mode_reason"]) == ("safe", "dependency")
    assert st["missing"]

    keel(keel_env, "vdev", "flash", dev, *sorted(s110.glob("*")))
    out = keel(keel_env, "vdev", "run", dev, "--seconds", "3").stdout
    assert "hello from keel" in out
    st = json.loads(keel(keel_env, "vdev", "status", dev, "--json").stdout)
    assert (st["mode"], st["app"], st["vm"]["name"]) == ("normal", "running", "micropython")
