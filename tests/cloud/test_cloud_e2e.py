"""Issue acceptance: provisioned virtual devices running the examples against
`keel cloud serve`, driven through the keel CLI, with the embedded broker and with
Mosquitto behind `--broker`."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from keel import build, vdev, vio

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Cloud:
    def __init__(self, data: Path, broker: str | None = None):
        self.data = data
        self.mqtt = f"127.0.0.1:{free_port()}"
        self.http = f"127.0.0.1:{free_port()}"
        self.broker = broker
        self.proc = None
        self.env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", KEEL_CLOUD=str(data))

    def start(self):
        cmd = ["keel", "cloud", "serve", "--data", str(self.data), "--mqtt", self.mqtt, "--http", self.http]
        if self.broker:
            cmd += ["--broker", self.broker]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        assert "Keel Cloud:" in line, line + self.proc.stdout.read()
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)

    def keel(self, *args, check=True):
        proc = subprocess.run(["keel", *map(str, args)], env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode:
            raise AssertionError(f"keel {args}: {proc.stderr}")
        return proc

    def devices(self):
        return {d["name"]: d for d in json.loads(self.keel("list", "--json").stdout)}


class RunningDevice:
    def __init__(self, path: Path):
        self.path = path
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(
            target=vdev.run, args=(path,),
            kwargs={"seconds": 120, "out": io.BytesIO(), "stop_when": lambda c: self.stop_flag.is_set()},
            daemon=True,
        )
        self.thread.start()

    def stop(self):
        self.stop_flag.set()
        self.thread.join(10)


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    out = tmp_path_factory.mktemp("system")
    build.build_system("virtual", "1.1.0", out)
    return out


def make_device(tmp_path, system, cloud, name, example):
    path = tmp_path / name
    vdev.create(path, system)
    vdev.flash(path, [build.build_app(ROOT / "examples" / example, "virtual", None, tmp_path / f"{example}.bin")])
    cloud.keel("device", "provision", path, "--name", name)
    return path


def fleet_story(tmp_path, system, cloud):
    sensor_dir = make_device(tmp_path, system, cloud, "sensor1", "sensor")
    button_dir = make_device(tmp_path, system, cloud, "button1", "button")
    sensor, button = RunningDevice(sensor_dir), RunningDevice(button_dir)
    try:
        devices = wait_until(
            lambda: (d := cloud.devices()) and all(x["online"] and x["system_version"] for x in d.values()) and d,
            what="both devices online",
        )
        assert set(devices) == {"sensor1", "button1"}
        assert {d["system_version"] for d in devices.values()} == {"1.1.0"}
        assert {d["platform"] for d in devices.values()} == {"virtual"}

        assert "to 2 device(s)" in cloud.keel("publish", "maintenance", "tonight").stdout
        value = float(cloud.keel("get", "sensor1", "temperature").stdout)
        assert 15 <= value <= 30
        assert cloud.keel("call", "sensor1", "led", "on").stdout.strip() == "1"
        wait_until(lambda: vio.fold(vio.read_records(sensor_dir))["pins"].get("D7", {}).get("value") == 1,
                   what="the LED pin on")
        missing = cloud.keel("get", "sensor1", "nope", check=False)
        assert missing.returncode == 1 and "no variable" in missing.stderr

        show = json.loads(cloud.keel("device", "show", "sensor1", "--json").stdout)
        assert {(m["function"], m["index"]) for m in show["modules"]} >= {("system-part", 1), ("system-part", 2)}
        assert show["functions"] == ["led"] and show["variables"] == ["temperature"]

        sub = subprocess.Popen(["keel", "subscribe", "button1", "--json", "--count", "1"],
                               env=cloud.env, stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        vio.send(button_dir, {"op": "press", "button": "MODE", "ms": 200})
        out, _ = sub.communicate(timeout=20)
        event = json.loads(out)
        assert (event["device"], event["name"]) == ("button1", "button")

        button.stop()
        wait_until(lambda: not cloud.devices()["button1"]["online"], timeout=15, what="button1 offline")
        assert "to 1 device(s) online" in cloud.keel("publish", "maintenance", "now").stdout
        return sensor_dir, sensor
    except BaseException:
        sensor.stop()
        button.stop()
        raise


def test_fleet_on_the_embedded_broker(tmp_path, system):
    cloud = Cloud(tmp_path / "cloud", broker="embedded")
    cloud.start()
    sensor = None
    try:
        sensor_dir, sensor = fleet_story(tmp_path, system, cloud)
        # The cloud restarts: the registry is kept and the device reconnects by itself.
        cloud.stop()
        cloud.start()
        devices = cloud.devices()
        assert set(devices) == {"sensor1", "button1"}
        wait_until(lambda: cloud.devices()["sensor1"]["online"], timeout=90, what="sensor1 back online")
        assert 15 <= float(cloud.keel("get", "sensor1", "temperature").stdout) <= 30
    finally:
        if sensor:
            sensor.stop()
        cloud.stop()


def test_fleet_on_mosquitto(tmp_path, system):
    cloud = Cloud(tmp_path / "cloud")
    port = free_port()
    from keel_cloud.config import CloudDir
    from keel_cloud.mosquitto import write_config

    CloudDir(cloud.data).init(cloud.mqtt, cloud.http)
    out = cloud.keel("cloud", "mosquitto-config", tmp_path / "mosq-cli", "--port", port).stdout
    assert "mosquitto -c" in out and (tmp_path / "mosq-cli").is_dir()
    # pytest's temporary folders are private to root, so Mosquitto runs as root here.
    conf = write_config(CloudDir(cloud.data), tmp_path / "mosq", port=port, user="root")
    mosq = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, what="mosquitto")
        cloud.broker = f"mqtts://127.0.0.1:{port}"
        cloud.start()
        sensor = None
        try:
            _, sensor = fleet_story(tmp_path, system, cloud)
        finally:
            if sensor:
                sensor.stop()
            cloud.stop()
    finally:
        mosq.terminate()
        mosq.wait(10)


def test_http_api_refuses_missing_or_wrong_token(tmp_path):
    import urllib.error
    import urllib.request

    cloud = Cloud(tmp_path / "cloud")
    cloud.start()
    try:
        for header in (None, "Bearer wrong", "Basic " + (cloud.data / "token").read_text().strip()):
            request = urllib.request.Request(f"http://{cloud.http}/api/devices")
            if header:
                request.add_header("Authorization", header)
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(request, timeout=5)
            assert e.value.code == 401
        request = urllib.request.Request(f"http://{cloud.http}/api/devices")
        request.add_header("Authorization", "Bearer " + (cloud.data / "token").read_text().strip())
        assert json.loads(urllib.request.urlopen(request, timeout=5).read()) == []
    finally:
        cloud.stop()


def test_keel_flash_updates_the_app_over_the_air(tmp_path, system):
    cloud = Cloud(tmp_path / "cloud")
    cloud.start()
    dev_dir = make_device(tmp_path, system, cloud, "dev1", "hello")
    new_app = tmp_path / "v2"
    new_app.mkdir()
    (new_app / "main.py").write_text("def setup():\n    print('version two is running')\n")
    image = build.build_app(new_app, "virtual", None, tmp_path / "v2.bin", app_version="2.0.0")
    device = RunningDevice(dev_dir)
    try:
        wait_until(lambda: cloud.devices()["dev1"]["online"], what="dev1 online")
        other = build.build_app(new_app, "esp32", None, tmp_path / "esp32.bin")
        refused = cloud.keel("flash", "dev1", other, check=False)
        assert refused.returncode == 1 and "is for esp32" in refused.stderr and "nothing sent" in refused.stderr

        done = cloud.keel("flash", "dev1", image)
        assert done.returncode == 0
        console = dev_dir / vio.CONSOLE_LOG
        wait_until(lambda: "version two is running" in console.read_text(), timeout=30,
                   what="the new app running")

        def app_version():
            show = json.loads(cloud.keel("device", "show", "dev1", "--json").stdout)
            apps = [m for m in show["modules"] if m["function"] == "user-part"]
            return show["online"] and apps and apps[0]["version"] == "2.0.0"

        wait_until(app_version, timeout=30, what="the cloud seeing app 2.0.0")
    finally:
        device.stop()
        cloud.stop()


def test_a_failed_provision_changes_nothing(tmp_path, system):
    """All or nothing: a provision that fails leaves the registry (keel list) and the
    device's files as they were."""
    cloud = Cloud(tmp_path / "cloud")
    cloud.start()
    try:
        first = make_device(tmp_path, system, cloud, "a1", "hello")
        make_device(tmp_path, system, cloud, "b1", "hello")
        before = cloud.devices()
        identity = vdev.read_file(first, "/keel/cloud/cert.der")
        # The name is another device's: refused before anything is written.
        taken = cloud.keel("device", "provision", first, "--name", "b1", check=False)
        assert taken.returncode == 1 and "taken by device" in taken.stderr
        assert vdev.read_file(first, "/keel/cloud/cert.der") == identity
        # A running device: refused, and not renamed.
        device = RunningDevice(first)
        try:
            wait_until(lambda: cloud.devices()["a1"]["online"], what="a1 online")
            running = cloud.keel("device", "provision", first, "--name", "a2", check=False)
            assert running.returncode == 1 and "stop it first" in running.stderr
        finally:
            device.stop()
        # A WiFi network for a board without WiFi: refused.
        wifi = cloud.keel("device", "provision", first, "--name", "a3", "--wifi", "lab", check=False)
        assert wifi.returncode == 1
        after = cloud.devices()
        assert {n: d["id"] for n, d in after.items()} == {n: d["id"] for n, d in before.items()}
        assert vdev.read_file(first, "/keel/cloud/cert.der") == identity
    finally:
        cloud.stop()
