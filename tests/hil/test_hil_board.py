"""The HAL on a board, peripheral by peripheral (see conftest.py and docs/hil.md).

Each test runs a snippet through the interface modules (hal.gpio, hal.adc, ...), so
what is checked is the whole path an app uses: board.json, the interface, the port
backend and the port's machine module. Keel is stopped meanwhile. The loopback tests
need the jumpers of boards/<board>/hil.json (simulated on the virtual board: keel vdev
run --wires). The watchdog test runs last: it lets the watchdog reset the board and
checks the reset cause afterwards.
"""

import time

import pytest

# What a machine.reset() reads back as on each port (test_power)
RESET_READS_AS = {"virtual": "soft-reset", "esp32": "panic", "nrf": "soft-reset"}



def test_board_identity(board):
    result = board.value("import hal, sys\nresult = (hal.PORT, hal.board()['name'], sys.platform, "
                         "getattr(sys.implementation, '_machine', ''))")
    port, name, platform, machine = result
    assert (port, name) == (board.data["port"], board.name)
    # What each port's firmware calls itself: the unix port behind the virtual board says
    # "linux"; the nrf port names its platform after the board ("nrf52840-PDK", but
    # "PARTICLE-XENON" on a Xenon), its machine string the chip ("XENON with NRF52840").
    if port == "virtual":
        assert platform == "linux", platform
    elif port == "nrf":
        assert platform.lower().startswith("nrf") or "nrf52840" in machine.lower(), (platform, machine)
    else:
        assert platform == port, platform


def test_gpio_loopback(board):
    for a, b in board.wiring("gpio_loopback"):
        for out, into in ((a, b), (b, a)):
            levels, readback, edges = board.value(f"""
import time
from hal.gpio import Pin
o = Pin({out!r}, Pin.OUT, value=0)
i = Pin({into!r}, Pin.IN)
levels, readback = [], []
for v in (1, 0, 1, 0):
    o.value(v)
    time.sleep_ms(2)
    levels.append(i.value())
    readback.append(o.value())
o.toggle()
time.sleep_ms(2)
levels.append(i.value())
o.off()
time.sleep_ms(20)
edges = []
# The handler allocates: in a hard IRQ that would raise MemoryError.
i.irq(lambda p: edges.append([p.value()]), Pin.IRQ_RISING | Pin.IRQ_FALLING)
for _ in range(4):
    o.toggle()
    time.sleep_ms(20)
i.irq(None)
o.init(Pin.IN)
result = (levels, readback, len(edges))
""")
            assert levels == [1, 0, 1, 0, 1], f"{out} -> {into}: read {levels}"
            assert readback == [1, 0, 1, 0], f"{out} as an output reads back {readback}"
            assert edges == 4, f"{out} -> {into}: {edges} interrupts for 4 edges"


def test_adc_reads_in_range(board):
    vref = board.data["adc"]["vref_uv"]
    analog = sorted(n for n, spec in board.data["pins"].items() if "analog" in spec.get("caps", ()))
    readings = board.value(f"""
from hal.adc import ADC
result = []
for name in {analog!r}:
    a = ADC(name)
    result.append((name, a.read_u16(), a.read_uv()))
""")
    assert readings, "the board has no analog pins"
    for name, u16, uv in readings:
        assert 0 <= u16 <= 65535, (name, u16)
        assert 0 <= uv <= vref * 12 // 10, (name, uv)


def test_adc_loopback(board):
    drive, analog = board.wiring("adc_loopback")
    vref = board.data["adc"]["vref_uv"]
    high, low = board.value(f"""
import time
from hal.gpio import Pin
from hal.adc import ADC
d = Pin({drive!r}, Pin.OUT, value=1)
a = ADC({analog!r})
time.sleep_ms(5)
high = (a.read_u16(), a.read_uv())
d.off()
time.sleep_ms(5)
low = (a.read_u16(), a.read_uv())
d.init(Pin.IN)
result = (high, low)
""")
    assert high[0] > 52000 and high[1] > vref * 7 // 10, f"{drive} high reads {high}"
    assert low[0] < 6500 and low[1] < vref // 10, f"{drive} low reads {low}"


def test_pwm_duty_and_freq(board):
    for name in board.wiring("pwm"):
        first, second = board.value(f"""
from hal.pwm import PWM
p = PWM({name!r}, freq=1000, duty_u16=32768)
first = (p.freq(), p.duty_u16())
p.freq(2000)
p.duty_u16(16384)
second = (p.freq(), p.duty_u16())
p.deinit()
result = (first, second)
""")
        assert abs(first[0] - 1000) <= 10 and abs(first[1] - 32768) <= 656, (name, first)
        assert abs(second[0] - 2000) <= 20 and abs(second[1] - 16384) <= 656, (name, second)


def test_i2c_scan_runs(board):
    wiring = board.wiring("i2c")
    found = board.value(f"from hal.i2c import I2C\nresult = I2C({wiring['bus']}).scan()")
    assert isinstance(found, list)
    assert all(0x08 <= addr <= 0x77 for addr in found), found
    # The devices the wiring says are on the bus (a TMP102 at 0x48 on the virtual board)
    # must answer: a scan that finds nothing is a broken bus there.
    missing = set(wiring.get("expect", [])) - set(found)
    assert not missing, f"no answer from {sorted(hex(a) for a in missing)} on I2C {wiring['bus']}: {found}"


def test_spi_loopback(board):
    bus = board.wiring("spi_loopback")["bus"]
    sent, got, read = board.value(f"""
from hal.spi import SPI
s = SPI({bus}, baudrate=1000000)
out = bytes(range(0, 256, 7))
into = bytearray(len(out))
s.write_readinto(out, into)
s.write(b"keel")
result = (out, bytes(into), s.read(4, 0xA5))
""")
    assert got == sent, "MOSI is not looped back to MISO"
    assert read == b"\xa5" * 4


def test_uart_loopback(board):
    bus = board.wiring("uart_loopback")["bus"]
    waiting, line = board.value(f"""
import time
from hal.uart import UART
u = UART({bus}, baudrate=115200, timeout=100)
while u.any():
    u.read()
u.write(b"keel-hil\\n")
time.sleep_ms(50)
result = (u.any(), u.readline())
""")
    assert waiting == 9 and line == b"keel-hil\n", (waiting, line)


def test_unique_id_stable(board):
    ids = board.value(f"""
import sys
from hal import device
first = [device.unique_id(), device.unique_id()]
for k in ("hal.device", "hal.ports.{board.data["port"]}.device"):
    sys.modules.pop(k, None)
from hal import device
result = first + [device.unique_id()]
""")
    assert len(set(ids)) == 1, ids
    uid = ids[0]
    assert len(uid) >= 12 and uid == uid.lower() and int(uid, 16) >= 0, uid


def test_button_idle(board):
    assert board.value("from hal import button\nresult = button.pressed()") is False


def test_power(board):
    slept = board.value("""
import time
from hal import power
start = time.ticks_ms()
power.sleep_ms(50)
result = time.ticks_diff(time.ticks_ms(), start)
""")
    assert slept >= 45, slept  # it slept (a light sleep may run over, not fall short)
    # A reset on request (machine.reset(), what hal.power.reset() does) reads back as the
    # port reports it: the ESP32 cannot tell it from a panic (both HARD_RESET,
    # hal/ports/esp32/power.py), the nRF52840 reads SOFT_RESET (NVIC_SystemReset).
    board.hard_reset()
    # Keel starting (or saying it is not installed): /boot.py ran to its end. A Ctrl-C
    # sooner would stop it, on an nRF52840 before it has put the filesystem at /.
    board.wait_output(["keel:"], timeout=15)
    board.reconnect(wait_s=15)
    cause = board.value("from hal import power\nresult = power.reset_cause()")
    assert cause == RESET_READS_AS[board.data["port"]], cause


def test_status_led(board):
    animate = board.value("""
import time
from hal import status_led
status_led.show("cyan", "breathing")
for rgb in ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)):
    status_led.set_rgb(*rgb)
    time.sleep_ms(100)
result = status_led.ANIMATE
""")
    expected = board.data["status_led"]["type"] in ("neopixel", "rgb")
    assert animate is expected


def test_watchdog_feeds_then_resets(board):
    """Last: started, fed for a second (the board lives), then left alone (it resets)."""
    timeout = board.hil.get("watchdog_ms", 2000)
    fed = board.value(f"""
import time
from hal.watchdog import Watchdog
w = Watchdog(timeout_ms={timeout})
for n in range(10):
    time.sleep_ms(100)
    w.feed()
result = n + 1
""")
    assert fed == 10
    # Left alone at the raw REPL it must reset within the timeout: reaching the REPL
    # any sooner would find the board before the reset.
    time.sleep(timeout / 1000 * 2 + 1)
    board.reconnect(wait_s=15)
    cause = board.value("from hal import power\nresult = power.reset_cause()")
    if cause != "watchdog":
        pytest.fail(f"after the watchdog ran out the reset cause is {cause!r}")
