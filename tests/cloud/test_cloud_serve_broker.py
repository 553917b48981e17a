"""keel cloud serve's broker (issue 15, its first part): where Mosquitto is installed it
runs it and watches it (the default, or --broker mosquitto); without it, the embedded
broker, and a line that says how to get Mosquitto; keel cloud status says what runs."""

import json
import os
import signal
import subprocess

import pytest

from keel import build, vdev, vio

from test_cloud_e2e import ROOT, Cloud, RunningDevice, wait_until

MOSQUITTO = "/usr/sbin/mosquitto"


def status(cloud):
    proc = cloud.keel("cloud", "status", "--json", check=False)
    return proc.returncode, json.loads(proc.stdout)


def broker_pids(cloud):
    conf = str(cloud.data / "mosquitto" / "mosquitto.conf")
    out = subprocess.run(["pgrep", "-f", f"mosquitto -c {conf}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_serve_runs_mosquitto_restarts_it_and_stops_it(tmp_path):
    """The default, with a mosquitto on PATH (Debian's, in /usr/sbin)."""
    if not os.access(MOSQUITTO, os.X_OK):
        pytest.fail(f"{MOSQUITTO} is missing: install Debian's mosquitto (make mosquitto)")
    system = tmp_path / "system"
    build.build_system("virtual", "1.1.0", system)
    cloud = Cloud(tmp_path / "cloud")
    cloud.env["PATH"] += os.pathsep + os.path.dirname(MOSQUITTO)
    cloud.env.pop("KEEL_MOSQUITTO", None)
    cloud.start()
    device = None
    try:
        code, doc = status(cloud)
        assert code == 0 and doc["running"] and doc["broker"] == "mosquitto", doc
        assert doc["address"] == f"mqtts://{cloud.mqtt}" and len(doc["instances"]) == 1
        [pid] = broker_pids(cloud)
        path = tmp_path / "d1"
        vdev.create(path, system)
        vdev.flash(path, [build.build_app(ROOT / "examples" / "hello", "virtual", None,
                                          tmp_path / "hello.bin")])
        cloud.keel("device", "provision", path, "--name", "d1")
        device = RunningDevice(path)
        wait_until(lambda: cloud.devices()["d1"]["online"], what="d1 online")
        assert status(cloud)[1]["devices"] == {"connected": 1, "known": 1}
        # Mosquitto dies: the service starts it again, and the device comes back to it.
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: broker_pids(cloud) not in ([], [pid]), timeout=15, what="a new mosquitto")
        log = (cloud.data / "mosquitto" / "mosquitto.log").read_text()
        assert log.count("mosquitto version") >= 2, log[-2000:]
        console = path / vio.CONSOLE_LOG
        wait_until(lambda: console.read_text().count("keel: cloud connected") >= 2
                   and cloud.devices()["d1"]["online"], timeout=30, what="d1 back on the new broker")
    finally:
        if device:
            device.stop()
        cloud.stop()
    # Stopped with the service; the record goes with it.
    assert broker_pids(cloud) == []
    code, doc = status(cloud)
    # (not running: the choice remembered, none here: auto)
    assert code == 1 and not doc["running"] and doc["broker"] == "auto" and doc["instances"] == []
    assert not (cloud.data / "serve.json").exists()


def test_without_mosquitto_the_embedded_broker_says_how_to_get_it(tmp_path):
    cloud = Cloud(tmp_path / "cloud")
    # PATH without it, as on a machine without Mosquitto (or a user's PATH on Debian)
    cloud.env["PATH"] = os.pathsep.join(p for p in cloud.env["PATH"].split(os.pathsep)
                                        if not os.path.exists(os.path.join(p, "mosquitto")))
    cloud.env.pop("KEEL_MOSQUITTO", None)
    proc = subprocess.Popen(["keel", "cloud", "serve", "--data", str(cloud.data), "--mqtt", cloud.mqtt,
                             "--http", cloud.http], env=cloud.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert "(the embedded broker)" in first, first
        assert "no mosquitto found (on PATH, or $KEEL_MOSQUITTO), so the embedded broker runs" \
            in second and "install Mosquitto (apt-get install mosquitto" in second, second
        code, doc = status(cloud)
        assert code == 0 and doc["broker"] == "embedded" and doc["broker_log"] is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


@pytest.mark.parametrize("broker, env, message", [
    ("mosquitto", {"KEEL_MOSQUITTO": ""}, "--broker mosquitto: no mosquitto on PATH"),
    ("mosquitto", {"KEEL_MOSQUITTO": "/bin/false"}, "mosquitto exited at start (1)"),
    ("rabbit", {}, "--broker must be auto, embedded, mosquitto or mqtts://HOST:PORT, not 'rabbit'"),
])
def test_a_broker_that_cannot_run_is_one_clear_error(tmp_path, broker, env, message):
    cloud = Cloud(tmp_path / "cloud", broker=broker)
    cloud.env.update(env)
    proc = subprocess.run(["keel", "cloud", "serve", "--data", str(cloud.data), "--mqtt", cloud.mqtt,
                           "--http", cloud.http, "--broker", broker], env=cloud.env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_mosquitto_goes_with_a_service_that_is_killed(tmp_path):
    """However the service dies (here SIGKILL: no handler runs), its Mosquitto goes too,
    and the port is free for the next start."""
    cloud = Cloud(tmp_path / "cloud", broker="mosquitto")
    cloud.start()
    try:
        assert broker_pids(cloud)
        cloud.proc.kill()
        cloud.proc.wait(10)
        wait_until(lambda: broker_pids(cloud) == [], timeout=10, what="mosquitto gone")
        cloud.start()  # the same port again
        assert status(cloud)[1]["running"]
    finally:
        cloud.stop()
    assert broker_pids(cloud) == []
