"""keel vdev io and what the runner simulates outside the CPU (watchdog, deep sleep)."""

import json
import subprocess

import pytest


def keel(env, *args):
    return subprocess.run(["keel", *map(str, args)], capture_output=True, text=True, env=env)


def test_io_needs_a_running_device_to_drive_it(device, keel_env):
    dev = device("1.1.0")
    proc = keel(keel_env, "vdev", "io", dev.path, "--set", "D2=1")
    assert proc.returncode == 1 and "not running" in proc.stderr
    state = json.loads(keel(keel_env, "vdev", "io", dev.path, "--json").stdout)
    assert state["running"] is False


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "D99=1"], "no pin D99"),
        (["--set", "D2=7"], "0, 1 or float"),
        (["--analog", "D2=5"], "not an analog pin"),
        (["--analog", "A0=70000"], "0..65535"),
        (["--press", "NOPE"], "no button NOPE"),
        (["--sensor", "tmp102=warm"], "must be a number"),
    ],
)
def test_io_refuses_bad_commands(device, keel_env, args, message):
    dev = device("1.1.0")
    proc = keel(keel_env, "vdev", "io", dev.path, *args)
    assert proc.returncode == 1
    assert message in proc.stderr and proc.stderr.count("\n") == 1


def test_io_cli_against_a_running_board(device, make_app, keel_env):
    source = (
        "import keel\n"
        "from hal.gpio import Pin\n"
        "from hal.adc import ADC\n"
        "out = Pin('D3', Pin.OUT)\n"
        "inp = Pin('D2', Pin.IN, Pin.PULL_DOWN)\n"
        "a0 = None\n"
        "def setup():\n"
        "    global a0\n"
        "    keel.delay(500)  # the host's commands arrive before ADC exists: they wait\n"
        "    a0 = ADC('A0')\n"
        "    keel.on('button', lambda e, ms: print('PRESSED', ms >= 150))\n"
        "    print('READY')\n"
        "def loop():\n"
        "    out.value(inp.value())\n"
        "    if a0.read_u16() == 40000:\n"
        "        print('ANALOG SEEN')\n"
        "        a0.read_u16 = lambda: 0\n"
        "    keel.delay(20)\n"
    )
    dev = device("1.1.0")
    dev.flash(make_app("io-cli", {"main.py": source}))
    with dev.start() as running:
        running.wait_for("keel: system")
        assert keel(keel_env, "vdev", "io", dev.path, "--analog", "A0=40000").returncode == 0
        running.wait_for("READY")
        running.wait_for("ANALOG SEEN")
        assert keel(keel_env, "vdev", "io", dev.path, "--set", "D2=1", "--press", "BUTTON=0.2").returncode == 0
        running.wait_for("PRESSED True")
        state = running.wait_io(lambda s: s["pins"].get("D3", {}).get("value") == 1)
        assert state["pins"]["D2"]["value"] == 1
        shown = json.loads(keel(keel_env, "vdev", "io", dev.path, "--json").stdout)
        assert shown["running"] is True
        assert shown["pins"]["D3"]["value"] == 1
        assert shown["analog"]["A0"] == 40000
        assert shown["status_led"] == {"color": "white", "pattern": "breathing"}
        assert any("READY" in line for line in shown["console"])
        text = keel(keel_env, "vdev", "io", dev.path).stdout
        assert "status LED      white breathing" in text


def test_watchdog_resets_a_stuck_app(device, make_app):
    source = (
        "import keel\n"
        "from hal.watchdog import Watchdog\n"
        "def setup():\n"
        "    if keel.reset_reason() == 'watchdog':\n"
        "        print('RESET BY WATCHDOG')\n"
        "        return\n"
        "    wdt = Watchdog(300)\n"
        "    for _ in range(10):\n"
        "        wdt.feed()\n"
        "        keel.delay(100)\n"
        "    print('FED FOR A SECOND, NOW STUCK')\n"
        "    while True:\n"
        "        pass\n"
    )
    dev = device("1.1.0")
    dev.flash(make_app("wdt", {"main.py": source}))
    out = dev.run(until="RESET BY WATCHDOG")
    assert "FED FOR A SECOND" in out
    assert "watchdog expired" in out
    assert dev.status()["reset_reason"] == "watchdog"


def test_deep_sleep_restarts_after_the_time(device, make_app):
    source = (
        "import keel\n"
        "from hal import power\n"
        "def setup():\n"
        "    if keel.reset_reason() == 'deep-sleep':\n"
        "        print('WOKE UP')\n"
        "        return\n"
        "    print('SLEEPING')\n"
        "    power.deep_sleep(700)\n"
    )
    dev = device("1.1.0")
    dev.flash(make_app("sleep", {"main.py": source}))
    out = dev.run(until="WOKE UP")
    assert "deep sleep for 700 ms" in out
    assert dev.status()["reset_reason"] == "deep-sleep"


def _breath(rgb):
    return [[c * level // 255 for c in rgb] for level in range(0, 256, 10)]


@pytest.mark.parametrize("frames, seen", [
    (_breath((0, 255, 255)), ("cyan", "breathing")),  # the session up (Device OS)
    (_breath((0, 255, 0)), ("green", "breathing")),
    ([[0, 0, 255], [0, 0, 0]] * 8, ("blue", "blinking")),  # listening mode
    ([[255, 255, 255]] * 12, ("white", "solid")),
    ([[255, 0, 0], [0, 255, 0]] * 8, None),  # a mix: no one colour
    ([[0, 0, 0]] * 12, None),
    ([[0, 0, 255]] * 3, None),  # too few frames to tell
])
def test_a_twins_led_frames_read_as_a_colour_and_pattern(frames, seen):
    """A twin whose system draws the LED frame by frame (an ESP32's NeoPixel): keel vdev
    io names what its last second of frames shows, as a person would see it."""
    from keel import vio

    assert vio.led_from_frames(frames) == seen
    state = vio.fold([{"k": "led", "rgb": f, "pattern": "frames"} for f in frames])
    assert state["status_led"]["seen"] == seen and state["status_led"]["rgb"] == frames[-1]
