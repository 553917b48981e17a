"""The app API (import keel) on the real MicroPython VM, on the board's real heap."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_app(device, make_app, name, source, until, target="1.1.0"):
    dev = device("1.1.0")
    dev.flash(make_app(name, {"main.py": source}, target))
    return dev, dev.run(until=until)


def test_identity_and_versions(device, make_app):
    source = (
        "import keel\n"
        "def setup():\n"
        "    print('ID', keel.device_id(), keel.platform(), keel.board())\n"
        "    print('V', keel.system_version(), keel.app_version(), keel.target_version())\n"
        "    print('R', keel.reset_reason(), keel.API_VERSION)\n"
    )
    dev, out = run_app(device, make_app, "ident", source, "R ", target="1.0.0")
    uid = (dev.path / "uid").read_text().strip()
    assert f"ID {uid} virtual virtual" in out
    assert len(uid) == 24 and int(uid, 16) >= 0
    assert "V 1.1.0 1.0.0 1.0.0" in out
    assert "R power-on 1.0.0" in out


def test_device_ids_differ_between_devices(device):
    assert (device().path / "uid").read_text() != (device().path / "uid").read_text()


def test_millis_delay_and_timers(device, make_app):
    source = (
        "import keel\n"
        "ticks = []\n"
        "def setup():\n"
        "    t0 = keel.millis()\n"
        "    periodic = keel.Timer(50, lambda: ticks.append(keel.millis()))\n"
        "    periodic.start()\n"
        "    once = []\n"
        "    keel.Timer(120, lambda: once.append(1), one_shot=True).start()\n"
        "    keel.delay(400)\n"
        "    periodic.stop()\n"
        "    n = len(ticks)\n"
        "    keel.delay(150)\n"
        "    print('ELAPSED', keel.millis() - t0 >= 550)\n"
        "    print('PERIODIC', 6 <= n <= 9, len(ticks) == n, periodic.running)\n"
        "    print('ONCE', once)\n"
        "    try:\n"
        "        keel.Timer(0, print)\n"
        "    except ValueError:\n"
        "        print('BAD PERIOD REFUSED')\n"
    )
    _, out = run_app(device, make_app, "timers", source, "BAD PERIOD")
    assert "ELAPSED True" in out
    assert "PERIODIC True True False" in out
    assert "ONCE [1]" in out


def test_timers_fire_between_loop_calls_without_polling(device, make_app):
    source = (
        "import keel\n"
        "count = [0]\n"
        "def bump():\n"
        "    count[0] += 1\n"
        "    if count[0] == 5:\n"
        "        print('FIVE TICKS')\n"
        "def setup():\n"
        "    keel.Timer(20, bump).start()\n"
        "def loop():\n"
        "    pass\n"
    )
    _, out = run_app(device, make_app, "timer-loop", source, "FIVE TICKS")
    assert "FIVE TICKS" in out


def test_async_main_runs_beside_the_system(device, make_app):
    source = (
        "import asyncio, keel\n"
        "async def main():\n"
        "    fired = []\n"
        "    keel.Timer(30, lambda: fired.append(1), one_shot=True).start()\n"
        "    await asyncio.sleep_ms(200)\n"
        "    print('ASYNC', fired)\n"
    )
    _, out = run_app(device, make_app, "async", source, "ASYNC")
    assert "ASYNC [1]" in out  # the system task ran the timer while main awaited


def test_log_levels(device, make_app):
    source = (
        "import keel\n"
        "def setup():\n"
        "    keel.log.trace('hidden %d', 1)\n"
        "    keel.log.info('shown %s', 'info')\n"
        "    keel.log.set_level('warn')\n"
        "    keel.log.info('hidden too')\n"
        "    keel.log.warn('careful')\n"
        "    keel.log.error('bad %d', 2)\n"
        "    print('LEVEL', keel.log.level())\n"
    )
    _, out = run_app(device, make_app, "log", source, "LEVEL")
    assert "INFO shown info" in out and "WARN careful" in out and "ERROR bad 2" in out
    assert "hidden" not in out
    assert "LEVEL warn" in out


STORE_APP = (
    "import keel\n"
    "def setup():\n"
    "    boots = keel.store.get('boots', 0) + 1\n"
    "    keel.store.set('boots', boots)\n"
    "    keel.store.set('cfg', {'rate': 5, 'name': 'x'})\n"
    "    keel.store.set('tmp', 1)\n"
    "    keel.store.delete('tmp')\n"
    "    print('BOOTS', boots, sorted(keel.store.keys()), keel.store.get('cfg')['rate'])\n"
    "    try:\n"
    "        keel.store.set('big', 'x' * 5000)\n"
    "    except ValueError as e:\n"
    "        print('FULL', 'store full' in str(e), keel.store.get('big'))\n"
)


def test_store_survives_resets_and_module_updates(device, make_app, systems):
    dev = device("1.0.0")
    dev.flash(make_app("store", {"main.py": STORE_APP}, "1.0.0"))
    out = dev.run(until="FULL")
    assert "BOOTS 1 ['boots', 'cfg'] 5" in out
    assert "FULL True None" in out
    assert "BOOTS 2" in dev.run(until="FULL")
    dev.flash(*systems["1.1.0"].glob("*.bin"))  # a system update
    assert "BOOTS 3" in dev.run(until="FULL")
    dev.flash(make_app("store-v2", {"main.py": STORE_APP + "\n# v2\n"}, "1.0.0"))  # an app update
    assert "BOOTS 4" in dev.run(until="FULL")


def test_reset_is_recorded_as_user_reset_after_reset_pending(device, make_app):
    source = (
        "import keel\n"
        "def setup():\n"
        "    if keel.reset_reason() == 'user':\n"
        "        print('BACK AFTER RESET')\n"
        "        return\n"
        "    keel.on('reset-pending', lambda e, why: print('PENDING', why))\n"
        "    keel.reset()\n"
    )
    _, out = run_app(device, make_app, "reset", source, "BACK AFTER RESET")
    assert "PENDING user" in out
    assert out.count("vdev: boot ") == 2


def test_enter_safe_mode_lasts_one_boot(device, make_app):
    source = (
        "import keel\n"
        "def setup():\n"
        "    print('APP RUNS', keel.reset_reason())\n"
        "    if keel.reset_reason() == 'power-on':\n"
        "        keel.enter_safe_mode()\n"
    )
    dev, out = run_app(device, make_app, "safe-req", source, "SAFE MODE")
    assert "SAFE MODE (requested)" in out
    st = dev.status()
    assert (st["mode"], st["safe_mode_reason"], st["reset_reason"]) == ("safe", "requested", "safe-mode")
    out = dev.run(until="APP RUNS")
    assert "SAFE MODE" not in out
    assert dev.status()["mode"] == "normal"


def test_unknown_system_event_is_refused(device, make_app):
    source = (
        "import keel\n"
        "def setup():\n"
        "    print('EVENTS', len(keel.EVENTS))\n"
        "    try:\n"
        "        keel.on('no-such-event', print)\n"
        "    except ValueError as e:\n"
        "        print('REFUSED', e)\n"
    )
    _, out = run_app(device, make_app, "events", source, "REFUSED")
    assert "EVENTS 8" in out  # (cloud, update, reset, button and network events)
    assert "no-such-event" in out


def test_publish_queues_offline_and_drops_the_oldest(device, make_app):
    source = (
        "import keel\n"
        "def setup():\n"
        "    print('CONNECTED', keel.connected())\n"
        "    ok = [keel.publish('e%d' % i, str(i)) for i in range(34)]\n"
        "    st = keel.cloud_status()\n"
        "    print('QUEUE', st['queued'], st['dropped'], st['published'], ok[:32] == [True] * 32, ok[32:])\n"
        "    for bad in ('', 'x' * 65):\n"
        "        try:\n"
        "            keel.publish(bad)\n"
        "        except ValueError:\n"
        "            print('BAD NAME', len(bad))\n"
        "    try:\n"
        "        keel.publish('big', 'y' * 1025)\n"
        "    except ValueError:\n"
        "        print('BIG DATA REFUSED')\n"
    )
    dev, out = run_app(device, make_app, "publish", source, "BIG DATA")
    assert "CONNECTED False" in out
    assert "QUEUE 32 2 34 True [False, False]" in out
    assert "BAD NAME 0" in out and "BAD NAME 65" in out
    from keel import vio

    state = vio.fold(vio.read_records(dev.path))
    assert state["cloud"]["queued"] == 32
    assert state["cloud"]["events"][-1] == {"name": "e33", "data": "33", "sent": False}


FUNCTIONS_APP = (
    "import keel\n"
    "count = [0]\n"
    "def add(arg):\n"
    "    count[0] += int(arg)\n"
    "    return count[0]\n"
    "def setup():\n"
    "    keel.function('add', add)\n"
    "    keel.function('echo', lambda arg: 'echo:' + arg)\n"
    "    keel.function('bad', lambda arg: [arg])\n"
    "    keel.variable('count', lambda: count[0])\n"
    "    keel.subscribe('alerts/', lambda name, data: print('GOT', name, data))\n"
    "    print('READY')\n"
    "def loop():\n"
    "    pass\n"
)


def test_functions_variables_and_subscriptions_through_the_host_link(device, make_app):
    dev = device("1.1.0")
    dev.flash(make_app("functions", {"main.py": FUNCTIONS_APP}))
    with dev.start() as running:
        running.wait_for("READY")
        assert running.call("call", "add", "5") == 5
        assert running.call("call", "add", "2") == 7
        assert running.call("get", "count") == 7
        assert running.call("call", "echo", "hi") == "echo:hi"
        with pytest.raises(Exception, match="TypeError"):
            running.call("call", "bad", "x")
        with pytest.raises(Exception, match="no function"):
            running.call("call", "missing", "x")
        with pytest.raises(Exception, match="no variable"):
            running.call("get", "missing")
        running.send(op="event", name="alerts/fire", data="hot")
        running.send(op="event", name="other/x", data="ignored")
        running.wait_for("GOT alerts/fire hot")
        state = running.io()
        assert state["cloud"]["functions"] == ["add", "bad", "echo"]
        assert state["cloud"]["variables"] == ["count"]
    assert "ignored" not in running.console()


def test_status_led_in_normal_and_safe_mode(device, make_app, hello_app):
    from keel import vio

    dev = device("1.1.0")
    dev.flash(hello_app())
    dev.run(until="hello from keel")
    led = vio.fold(vio.read_records(dev.path))["status_led"]
    assert led == {"color": "white", "pattern": "breathing"}

    dev = device("1.0.0")
    dev.flash(hello_app("1.1.0"))
    dev.run(until="SAFE MODE")
    led = vio.fold(vio.read_records(dev.path))["status_led"]
    assert led == {"color": "magenta", "pattern": "breathing"}


def test_app_borrows_the_status_led(device, make_app):
    source = (
        "import keel\n"
        "def setup():\n"
        "    try:\n"
        "        keel.led.rgb(1, 2, 3)\n"
        "    except RuntimeError:\n"
        "        print('NOT YOURS')\n"
        "    keel.led.take()\n"
        "    keel.led.rgb(10, 20, 30)\n"
        "    print('OWNER', keel.led.owner())\n"
        "    keel.delay(100)\n"
        "    keel.led.release()\n"
        "    print('BACK', keel.led.owner(), keel.led.state())\n"
    )
    dev, out = run_app(device, make_app, "led", source, "BACK")
    assert "NOT YOURS" in out and "OWNER app" in out and "BACK system offline" in out
    from keel import vio

    records = [r for r in vio.read_records(dev.path) if r.get("k") == "led"]
    assert {"rgb": [10, 20, 30], "pattern": "solid"}.items() <= records[-2].items()
    assert (records[-1]["color"], records[-1]["pattern"]) == ("white", "breathing")


def test_gpio_input_edges_from_the_host(device, make_app):
    source = (
        "import keel\n"
        "from hal.gpio import Pin\n"
        "def edge(pin):\n"
        "    print('EDGE', pin.value())\n"
        "def setup():\n"
        "    p = Pin('D2', Pin.IN, Pin.PULL_UP)\n"
        "    print('IDLE', p.value())\n"
        "    p.irq(edge, Pin.IRQ_FALLING)\n"
        "    try:\n"
        "        Pin('D99', Pin.OUT)\n"
        "    except ValueError:\n"
        "        print('NO SUCH PIN')\n"
        "def loop():\n"
        "    pass\n"
    )
    dev = device("1.1.0")
    dev.flash(make_app("gpio-in", {"main.py": source}))
    with dev.start() as running:
        out = running.wait_for("NO SUCH PIN")
        assert "IDLE 1" in out  # pulled up
        running.send(op="set", pin="D2", value=0)
        running.wait_for("EDGE 0")
        running.send(op="set", pin="D2", value=1)  # rising: not asked for
        running.send(op="set", pin="D2", value=0)
        running.wait_for("EDGE 0", count=2)
    assert running.console().count("EDGE") == 2


def test_blink_example_toggles_the_led_pin(device, make_app):
    dev = device("1.1.0")
    dev.flash(make_app("blink", target="1.0.0", src_dir=ROOT / "examples/blink"))
    with dev.start() as running:
        running.wait_io(lambda s: "D7" in s["pins"])
        seen = set()
        for _ in range(60):
            seen.add(running.io()["pins"]["D7"]["value"])
            if seen == {0, 1}:
                break
            running.wait_for("", timeout=0.1)
            __import__("time").sleep(0.1)
    assert seen == {0, 1}
    times = [r["t"] for r in __import__("keel.vio", fromlist=["x"]).read_records(dev.path)
             if r.get("k") == "pin" and "mode" not in r]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps and all(450 <= g <= 700 for g in gaps), gaps


def test_button_example_publishes_on_press(device, make_app):
    dev = device("1.1.0")
    dev.flash(make_app("button", target="1.0.0", src_dir=ROOT / "examples/button"))
    with dev.start() as running:
        running.wait_for("keel: system")
        running.wait_io(lambda s: s["status_led"] is not None)
        running.send(op="press", button="MODE", ms=300)
        state = running.wait_io(lambda s: s["cloud"]["events"])
        event = state["cloud"]["events"][0]
        assert event["name"] == "button"
        assert 250 <= int(event["data"]) <= 600
        assert "button pressed for" in running.wait_for("button pressed for")


def test_sensor_example_reads_plausible_values(device, make_app):
    dev = device("1.1.0")
    dev.flash(make_app("sensor", target="1.0.0", src_dir=ROOT / "examples/sensor"))
    with dev.start() as running:
        running.wait_for("temperature", count=2)
        value = running.call("get", "temperature")
        assert 15.0 <= value <= 30.0
        running.send(op="sensor", model="tmp102", value=31.25)
        running.wait_for("temperature 31.25 C")
        assert running.call("get", "temperature") == 31.25
        assert running.call("call", "led", "on") == 1
        running.wait_io(lambda s: s["pins"].get("D7", {}).get("value") == 1)
        assert running.call("call", "led", "off") == 0
        running.wait_io(lambda s: s["pins"]["D7"]["value"] == 0)
        assert running.call("call", "led", "purple") == -1


def test_remaining_calls(device, make_app):
    """Calls not covered above: off(), Timer.change_period(), board-level HAL bits."""
    source = (
        "import keel\n"
        "from hal import power, button, device as hw\n"
        "seen = []\n"
        "def handler(e, d):\n"
        "    seen.append(d)\n"
        "def setup():\n"
        "    keel.on('reset-pending', handler)\n"
        "    keel.off('reset-pending', handler)\n"
        "    print('OFF', seen)\n"
        "    n = []\n"
        "    t = keel.Timer(1000, lambda: n.append(1))\n"
        "    t.start()\n"
        "    t.change_period(30)\n"
        "    keel.delay(200)\n"
        "    print('FAST', len(n) >= 4)\n"
        "    t0 = keel.millis()\n"
        "    power.sleep_ms(50)\n"
        "    print('SLEPT', keel.millis() - t0 >= 50)\n"
        "    print('CAUSE', power.reset_cause(), 'BUTTON', button.pressed())\n"
        "    print('UID', hw.unique_id() == keel.device_id())\n"
    )
    _, out = run_app(device, make_app, "remaining", source, "UID")
    assert "OFF []" in out and "FAST True" in out and "SLEPT True" in out
    assert "CAUSE power-on BUTTON False" in out and "UID True" in out


@pytest.mark.parametrize(
    "name, source",
    [
        (
            "timer-no-loop",
            "import keel\n"
            "def boom():\n"
            "    raise RuntimeError('timer failed')\n"
            "def setup():\n"
            "    keel.Timer(50, boom, one_shot=True).start()\n",
        ),
        (
            "timer-async",
            "import asyncio, keel\n"
            "def boom():\n"
            "    raise RuntimeError('timer failed')\n"
            "async def main():\n"
            "    keel.Timer(50, boom, one_shot=True).start()\n"
            "    while True:\n"
            "        await asyncio.sleep_ms(20)\n",
        ),
        (
            "event-handler",
            "import keel\n"
            "def boom(e, d):\n"
            "    raise RuntimeError('timer failed')\n"
            "def setup():\n"
            "    keel.on('reset-pending', boom)\n"
            "    import events\n"
            "    events.emit('reset-pending', 'test')\n",
        ),
    ],
)
def test_app_callback_errors_are_app_crashes(device, make_app, name, source):
    dev, out = run_app(device, make_app, name, source, "SAFE MODE")
    assert "SAFE MODE (app-crash)" in out
    assert out.count("RuntimeError: timer failed") >= 3
    assert dev.status()["app"] == "crashed"


def test_interrupt_and_subscription_handler_errors_are_app_crashes(device, make_app):
    source = (
        "import keel\n"
        "from hal.gpio import Pin\n"
        "def bad_irq(pin):\n"
        "    raise ValueError('irq handler failed')\n"
        "def setup():\n"
        "    Pin('D2', Pin.IN).irq(bad_irq, Pin.IRQ_RISING)\n"
        "    print('ARMED')\n"
    )
    dev = device("1.1.0")
    dev.flash(make_app("irq-crash", {"main.py": source}))
    with dev.start() as running:
        running.wait_for("ARMED")
        running.send(op="set", pin="D2", value=1)
        out = running.wait_for("ValueError: irq handler failed")
    assert "keel: app crashed" in out


def test_store_refuses_values_json_cannot_hold(device, make_app):
    source = (
        "import keel\n"
        "class Thing:\n"
        "    pass\n"
        "def setup():\n"
        "    keel.store.set('ok', (1, 2))\n"
        "    print('TUPLE READS BACK AS', keel.store.get('ok'))\n"
        "    for bad in (Thing(), float('nan')):\n"
        "        try:\n"
        "            keel.store.set('bad', bad)\n"
        "        except ValueError:\n"
        "            print('REFUSED')\n"
        "    keel.store.set('snow', '\\u2603' * 1300)\n"
        "    try:\n"
        "        keel.store.set('more', '\\u2603' * 200)\n"
        "    except ValueError as e:\n"
        "        print('BYTES', 'store full' in str(e))\n"
        "    print('KEYS', sorted(keel.store.keys()))\n"
    )
    dev, out = run_app(device, make_app, "store-json", source, "KEYS")
    assert "TUPLE READS BACK AS [1, 2]" in out
    assert out.count("REFUSED") == 2
    assert "BYTES True" in out  # 1300 + 200 snowmen are 4500 bytes of UTF-8
    assert "KEYS ['ok', 'snow']" in out
    assert "KEYS ['ok', 'snow']" in dev.run(until="KEYS")  # the file still parses
