"""The virtual board's ADC, PWM, I2C (TMP102), SPI, UART and watchdog, driven by apps
on the real MicroPython VM through the HAL interface modules.

Each app's setup() prints `name=repr(value)` lines and then DONE; the host reads them
back, and reads what the board reported in <device>/io.log. Host commands are proven by
calling the handler the backend registered with the link, as link.poll() would."""

import json
import re

DONE = "DONE"
VALUE_ERROR = repr("ValueError")  # as show(name, error(...)) prints it

# Shared by every app: the checks run in checks(); a failure prints its traceback and
# still ends with DONE, so a broken check fails the test at once instead of timing out.
PRELUDE = """\
import sys


def show(name, value):
    print("%s=%r" % (name, value))


def error(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except OSError as e:
        return "OSError %d" % e.errno
    except Exception as e:
        return type(e).__name__
    return "no error"


def setup():
    try:
        checks()
    except Exception as e:
        print("CHECK FAILED")
        sys.print_exception(e)
    print("DONE")
"""


def run_app(device, make_app, name, checks):
    """Boot a device running an app made of PRELUDE + checks; returns (results, events)."""
    dev = device("1.1.0")
    dev.flash(make_app(name, {"main.py": PRELUDE + checks}))
    console = dev.run(until=DONE, seconds=20)
    assert DONE in console, console
    assert "CHECK FAILED" not in console, console
    results = dict(re.findall(r"^(\w[\w.]*)=(.*?)\r?$", console, re.MULTILINE))
    log = (dev.path / "io.log").read_text().splitlines()
    return results, [json.loads(line) for line in log if line]


ADC_APP = """
from hal.adc import ADC
from hal.ports.virtual import adc as backend
from hal.ports.virtual import link


def checks():
    a0 = ADC("A0")
    show("default", (a0.read_u16(), a0.read_uv()))
    show("not_analog", error(ADC, "D3"))
    show("no_pin", error(ADC, "Z9"))
    set_level = link._handlers["analog"]
    set_level({"op": "analog", "pin": "A1", "value": 32768})
    a1, again = ADC("A1"), ADC("A1")
    show("a1", (a1.read_u16(), a1.read_uv(), again.read_u16()))
    set_level({"op": "analog", "pin": "A1", "value": 65535})
    show("full", (a1.read_u16(), a1.read_uv()))
    show("a0_untouched", a0.read_u16())
    show("too_high", error(set_level, {"op": "analog", "pin": "A1", "value": 65536}))
    show("negative", error(set_level, {"op": "analog", "pin": "A1", "value": -1}))
    show("digital_pin", error(set_level, {"op": "analog", "pin": "D3", "value": 1}))
    show("kept", a1.read_u16())
    # A board with a 12-bit converter: 12 bits kept, scaled back to 0..65535.
    show("bits12", [backend._quantise(v, 12) for v in (0, 15, 0x8000, 0xFFFF)])
"""


def test_adc_reads_the_level_the_host_sets(device, make_app):
    r, events = run_app(device, make_app, "adc", ADC_APP)
    assert r["default"] == "(0, 0)"
    assert r["not_analog"] == r["no_pin"] == VALUE_ERROR
    assert r["a1"] == f"(32768, {32768 * 3300000 // 65535}, 32768)"
    assert r["full"] == "(65535, 3300000)"
    assert r["a0_untouched"] == "0"
    assert r["too_high"] == r["negative"] == r["digital_pin"] == VALUE_ERROR
    assert r["kept"] == "65535"
    assert r["bits12"] == "[0, 0, 32776, 65535]"
    # Only the host's settings are reported; reads are silent.
    analog = [e for e in events if e["k"] == "analog" or e.get("pin") in ("A0", "A1")]
    assert [(e["k"], e["pin"], e["value"]) for e in analog] == [
        ("analog", "A1", 32768),
        ("analog", "A1", 65535),
    ]


PWM_APP = """
from hal.pwm import PWM


def checks():
    p = PWM("D3", freq=1000, duty_u16=32768)
    show("start", (p.freq(), p.duty_u16()))
    p.freq(2000)
    p.duty_u16(16384)
    show("changed", (p.freq(), p.duty_u16()))
    show("freq_zero", error(p.freq, 0))
    show("freq_high", error(p.freq, 40000001))
    show("duty_high", error(p.duty_u16, 65536))
    show("duty_negative", error(p.duty_u16, -1))
    show("kept", (p.freq(), p.duty_u16()))
    p.deinit()
    show("not_pwm", error(PWM, "A0"))
    show("no_pin", error(PWM, "Z9"))
    show("bad_start", error(PWM, "D4", freq=0))
    led = PWM("LED", freq=500, duty_u16=0)
    show("alias", led)
"""


def test_pwm_reports_every_change(device, make_app):
    r, events = run_app(device, make_app, "pwm", PWM_APP)
    assert r["start"] == "(1000, 32768)"
    assert r["changed"] == r["kept"] == "(2000, 16384)"
    for check in ("freq_zero", "freq_high", "duty_high", "duty_negative"):
        assert r[check] == VALUE_ERROR, check
    assert r["not_pwm"] == r["no_pin"] == r["bad_start"] == VALUE_ERROR
    assert r["alias"] == "PWM(D7, freq=500, duty_u16=0)"
    pwm = [{k: v for k, v in e.items() if k not in ("k", "t")} for e in events if e["k"] == "pwm"]
    assert pwm == [
        {"pin": "D3", "freq": 1000, "duty_u16": 32768},
        {"pin": "D3", "freq": 2000, "duty_u16": 32768},
        {"pin": "D3", "freq": 2000, "duty_u16": 16384},
        {"pin": "D3", "off": True},
        {"pin": "D7", "freq": 500, "duty_u16": 0},
    ]


I2C_APP = """
from hal.i2c import I2C
from hal.ports.virtual import link

backend = link.sim("sim_i2c")  # the board's TMP102 model, which reads the clock

TMP = 0x48


def celsius(data):
    raw = (data[0] << 8 | data[1]) >> 4
    return (raw - 4096 if raw & 0x800 else raw) * 0.0625


class Clock:
    now = 0

    def ticks_ms(self):
        return self.now


def drift():
    # The default reading over one whole period and a bit, on a clock the test moves.
    real, clock = backend.time, Clock()
    backend.time = clock
    try:
        seen = []
        for ms in range(0, (1 << 19) + (1 << 16), 1 << 12):
            clock.now = ms
            seen.append(celsius(bus.readfrom_mem(TMP, 0, 2)))
    finally:
        backend.time = real
    steps = [abs(b - a) for a, b in zip(seen, seen[1:])]
    return min(seen), max(seen), max(steps)


def checks():
    global bus
    bus = I2C(0)
    show("scan", bus.scan())
    show("regs", [bus.readfrom_mem(TMP, reg, 2) for reg in range(4)])
    t = celsius(bus.readfrom_mem(TMP, 0, 2))
    show("default_ok", 21.0 <= t <= 22.0 and t * 16 == int(t * 16))
    show("drift", drift())

    # Pointer-register semantics: a one-byte write selects, reads repeat the register.
    show("select_config", bus.writeto(TMP, b"\\x01"))
    show("config", (bus.readfrom(TMP, 2), bus.readfrom(TMP, 2)))
    bus.writeto(TMP, b"\\x00")
    show("temp_ok", 21.0 <= celsius(bus.readfrom(TMP, 2)) <= 22.0)
    show("write_tlow", bus.writeto(TMP, b"\\x02\\x4b\\x80"))
    show("tlow", bus.readfrom(TMP, 2))
    bus.writeto_mem(TMP, 3, b"\\x55\\x00")
    show("thigh", bus.readfrom_mem(TMP, 3, 2))
    bus.writeto_mem(TMP, 0, b"\\x00\\x00")
    show("temp_read_only", 21.0 <= celsius(bus.readfrom_mem(TMP, 0, 2)) <= 22.0)
    bus.writeto_mem(TMP, 1, b"\\x61\\xa0")  # conversion faults F0 = 1
    show("config_written", bus.readfrom_mem(TMP, 1, 2))
    bus.writeto_mem(TMP, 1, b"\\x00\\x00")  # R1 R0 and AL are read-only
    show("config_fixed_bits", bus.readfrom_mem(TMP, 1, 2))
    show("state_kept", I2C(0).readfrom_mem(TMP, 3, 2))

    hold = link._handlers["sensor"]
    hold({"op": "sensor", "model": "tmp102", "value": 25.0})
    show("held", bus.readfrom_mem(TMP, 0, 2))
    hold({"op": "sensor", "model": "tmp102", "value": -10.03})
    show("held_negative", celsius(bus.readfrom_mem(TMP, 0, 2)))
    hold({"op": "sensor", "model": "tmp102", "value": 150})
    show("held_clipped", celsius(bus.readfrom_mem(TMP, 0, 2)))
    bus.writeto_mem(TMP, 1, b"\\x60\\xb0")  # extended mode: 13 bits, to 150 C
    show("extended", bus.readfrom_mem(TMP, 0, 2))
    bus.writeto_mem(TMP, 1, b"\\x60\\xa0")
    hold({"op": "sensor", "model": "tmp102", "value": None})
    show("released_ok", 21.0 <= celsius(bus.readfrom_mem(TMP, 0, 2)) <= 22.0)
    show("bad_model", error(hold, {"op": "sensor", "model": "bmp280", "value": 1}))

    show("enodev", [
        error(bus.readfrom, 0x49, 2),
        error(bus.writeto, 0x49, b"\\x00"),
        error(bus.readfrom_mem, 0x49, 0, 2),
        error(bus.writeto_mem, 0x49, 0, b"\\x00"),
    ])
    show("no_bus", error(I2C, 1))
    show("bad_addrsize", error(bus.readfrom_mem, TMP, 0, 2, addrsize=12))
"""


def test_i2c_tmp102(device, make_app):
    r, events = run_app(device, make_app, "i2c", I2C_APP)
    assert r["scan"] == "[72]"
    # Temperature (checked separately: it drifts), config 0x60A0, TLOW 75 C, THIGH 80 C.
    assert r["regs"].endswith(", b'`\\xa0', b'K\\x00', b'P\\x00']")
    assert r["default_ok"] == "True"
    # +-0.5 C around 21.5 C, in steps of at most 1/16 C every 4 s.
    assert r["drift"] == "(21.0, 22.0, 0.0625)"
    assert r["select_config"] == "1"
    assert r["config"] == "(b'`\\xa0', b'`\\xa0')"
    assert r["temp_ok"] == r["temp_read_only"] == "True"
    assert r["write_tlow"] == "3"
    assert r["tlow"] == "b'K\\x80'"
    assert r["thigh"] == r["state_kept"] == "b'U\\x00'"
    assert r["config_written"] == "b'a\\xa0'"
    assert r["config_fixed_bits"] == "b'` '"  # 0x6020
    assert r["held"] == "b'\\x19\\x00'"  # 25.0 C = 400/16, left-aligned
    assert r["held_negative"] == "-10.0"
    assert r["held_clipped"] == "127.9375"
    assert r["extended"] == "b'K\\x01'"  # 150 C = 2400/16, 13 bits, EM flag in bit 0
    assert r["released_ok"] == "True"
    assert r["bad_model"] == VALUE_ERROR
    assert r["enodev"] == "['OSError 19', 'OSError 19', 'OSError 19', 'OSError 19']"
    assert r["no_bus"] == r["bad_addrsize"] == VALUE_ERROR
    held = [e["value"] for e in events if e["k"] == "sensor"]
    assert held == [25.0, -10.0, 150.0, None]


LOOPBACK_APP = """
from hal.spi import SPI
from hal.uart import UART


def checks():
    spi = SPI(0, baudrate=8000000)
    show("spi_write", spi.write(b"\\x01\\x02"))
    show("spi_read", (spi.read(3, 0xA5), spi.read(2)))
    buf = bytearray(4)
    spi.readinto(buf, 0x3C)
    show("spi_readinto", buf)
    spi.write_readinto(b"\\x10\\x20\\x30\\x40", buf)
    show("spi_loop", buf)
    show("spi_unequal", error(spi.write_readinto, b"\\x01", buf))
    show("spi_no_bus", error(SPI, 1))
    show("spi_mode", error(SPI, 0, polarity=2))

    u = UART(1, baudrate=9600)
    show("uart_empty", (u.any(), u.read(), u.readline()))
    show("uart_write", u.write(b"one\\ntwo\\nthr"))
    show("uart_any", u.any())
    show("uart_lines", (u.readline(), u.readline(), u.readline(), u.readline()))
    u.write(b"abcdef")
    show("uart_read", (u.read(2), UART(1).read(), u.read()))
    u.write(bytes(range(200)))
    u.write(bytes(range(100)))  # 300 bytes into 256: the oldest 44 are dropped
    show("uart_full", u.any())
    data = u.read()
    show("uart_kept", (len(data), data[0], data[155], data[156], data[-1]))
    show("uart_str", (u.write("hi\\n"), u.readline()))
    show("uart_no_bus", error(UART, 0))
"""


def test_spi_and_uart_loopbacks(device, make_app):
    r, events = run_app(device, make_app, "loopback", LOOPBACK_APP)
    assert r["spi_write"] == "None"
    assert r["spi_read"] == "(b'\\xa5\\xa5\\xa5', b'\\x00\\x00')"
    assert r["spi_readinto"] == "bytearray(b'<<<<')"
    assert r["spi_loop"] == "bytearray(b'\\x10 0@')"
    assert r["spi_unequal"] == r["spi_no_bus"] == r["spi_mode"] == VALUE_ERROR

    assert r["uart_empty"] == "(0, None, None)"
    assert r["uart_write"] == "11"
    assert r["uart_any"] == "11"
    assert r["uart_lines"] == "(b'one\\n', b'two\\n', b'thr', None)"
    assert r["uart_read"] == "(b'ab', b'cdef', None)"
    assert r["uart_full"] == "256"
    assert r["uart_kept"] == "(256, 44, 199, 0, 99)"
    assert r["uart_str"] == "(3, b'hi\\n')"
    assert r["uart_no_bus"] == VALUE_ERROR
    tx = [(e["bus"], e["tx"], e["n"]) for e in events if e["k"] == "uart"]
    assert tx[:2] == [(1, b"one\ntwo\nthr".hex(), 11), (1, b"abcdef".hex(), 6)]
    assert tx[2] == (1, bytes(range(64)).hex(), 200)  # at most 64 bytes shown
    assert tx[3] == (1, bytes(range(64)).hex(), 100)
    assert tx[4] == (1, b"hi\n".hex(), 3)


WATCHDOG_APP = """
import time
from hal.watchdog import Watchdog


def checks():
    wdt = Watchdog(400)
    feeds = 0
    start = time.ticks_ms()
    while time.ticks_diff(time.ticks_ms(), start) < 1000:
        wdt.feed()
        feeds += 1
    show("feeds", feeds)
    show("too_short", error(Watchdog, 0))
    Watchdog(2000).feed()  # started again: a new timeout, and that start is a feed
"""


def test_watchdog_reports_timeout_and_throttled_feeds(device, make_app):
    r, events = run_app(device, make_app, "watchdog", WATCHDOG_APP)
    assert int(r["feeds"]) > 1000
    assert r["too_short"] == VALUE_ERROR
    wdt = [e for e in events if e["k"] in ("wdt", "wdt-feed")]
    assert wdt[0] == {"k": "wdt", "timeout": 400, "t": wdt[0]["t"]}
    assert wdt[-1]["k"] == "wdt" and wdt[-1]["timeout"] == 2000
    feeds = [e["t"] for e in wdt[1:-1]]
    assert all(e["k"] == "wdt-feed" for e in wdt[1:-1])
    # A feed at most every 100 ms (timeout / 4): about 10 in one second, not thousands.
    assert 5 <= len(feeds) <= 10
    gaps = [b - a for a, b in zip([wdt[0]["t"], *feeds], feeds)]
    assert min(gaps) >= 100
