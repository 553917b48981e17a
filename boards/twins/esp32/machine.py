# machine, as MicroPython v1.28.0's esp32 port has it on an ESP32 (ports/esp32/:
# modmachine.c, machine_pin.c, machine_adc.c, machine_pwm.c, machine_i2c.c,
# machine_hw_spi.c, machine_uart.c, machine_wdt.c, machine_bitstream.c; extmod/
# machine_*.c), over the board's simulated hardware (boards/virtual/sim_*.py). What is
# here, and the source each behaviour is copied from, is the table in
# docs/virtual-board.md; what the port has and Keel does not use is left out.
import time
import micropython
import sim_board
import sim_link
import sim_pins
import sim_analog
import sim_i2c
import extmod_buses
import sim_serial
import sim_watchdog
import vm_twin
import vm_exit

# ---------------------------------------------------------------- resets (modmachine.c)

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5
# What started the boot (the runner's word) -> what esp_reset_reason() maps to:
# machine.reset() is ESP_RST_SW and a panic ESP_RST_PANIC, both HARD_RESET; after a
# soft reboot is_soft_reset makes it SOFT_RESET, whatever reset came before.
_CAUSES = {"power-on": PWRON_RESET, "reset": HARD_RESET, "panic": HARD_RESET,
           "watchdog": WDT_RESET, "deep-sleep": DEEPSLEEP_RESET, "soft-reboot": SOFT_RESET}


def reset_cause():
    return _CAUSES.get(vm_twin.event, 0)  # ESP_RST_UNKNOWN and the rest read 0


def reset():
    vm_twin.halt(vm_exit.RESET)  # esp_restart(): the chip restarts, nothing unwinds


def soft_reset():
    raise SystemExit  # extmod/modmachine.c: pyexec's forced exit, a soft reboot


def deepsleep(ms=0):
    # The timer wakes the chip after ms (none: it sleeps until the run ends); it then
    # boots as after a reset (mp_machine_deepsleep ends in mp_machine_reset).
    sim_link.emit("deep-sleep", ms=ms if ms > 0 else None)
    vm_twin.halt(vm_exit.DEEP_SLEEP)


def lightsleep(ms=None):
    # The CPU stops with RAM kept; a timer wakes it. (Without one it would sleep until
    # another wake source: the twin has none, so it returns at once.)
    if ms:
        vm_twin.sleep_ms(ms)


def idle():
    vm_twin.poll()  # (the CPU waits for an interrupt)


def unique_id():
    # esp_efuse_mac_get_default(): the 6-byte base MAC from eFuse (DIR/uid, 12 hex digits)
    return bytes.fromhex(vm_twin.hw.uid or "000000000000")


# ---------------------------------------------------------------- pins (machine_pin.c)

_GPIOS = tuple(range(24)) + (25, 26, 27) + tuple(range(32, 40))
_FIRST_INPUT_ONLY = 34  # GPIO_FIRST_NON_OUTPUT
_IRQ_HANDLERS = {}  # GPIO -> handler (MP_STATE_PORT(machine_pin_irq_handler))
_IRQ_TRIGGERS = {}  # GPIO -> trigger (GPIO.pin[n].int_type)
_NAMES = {}  # GPIO -> the board's name for it


def _name(gpio):
    if not _NAMES:
        for name, spec in sim_board.board()["pins"].items():
            _NAMES[spec["id"]] = name
    return _NAMES.get(gpio) or "GPIO%d" % gpio


_UNSET = object()


def _gpio(pin):
    # machine_pin_find(): a Pin, a GPIO number or a board name; else "invalid pin"
    if isinstance(pin, Pin):
        return pin.gpio
    if isinstance(pin, int) and pin in _GPIOS:
        return pin
    raise ValueError("invalid pin")  # (no board pin names on ESP32_GENERIC)


class Pin:
    IN = 1  # GPIO_MODE_INPUT
    OUT = 3  # GPIO_MODE_INPUT_OUTPUT: the pad reads back
    OPEN_DRAIN = 7  # GPIO_MODE_INPUT_OUTPUT_OD
    PULL_DOWN = 1
    PULL_UP = 2
    IRQ_RISING = 1  # GPIO_INTR_POSEDGE
    IRQ_FALLING = 2  # GPIO_INTR_NEGEDGE
    WAKE_LOW = 4
    WAKE_HIGH = 5
    DRIVE_0 = 0
    DRIVE_1 = 1
    DRIVE_2 = 2
    DRIVE_3 = 3
    _table = {}  # one object per GPIO, as the port's const table

    def __new__(cls, id, *args, **kwargs):
        gpio = _gpio(id)
        found = cls._table.get(gpio)
        if found is None:
            found = cls._table[gpio] = object.__new__(cls)
            found.gpio = gpio
            found.line = sim_pins.any_line(_name(gpio))
            found.od = False
            found.line.on_edge = found._edge
            found.irq_obj = _IRQ(found)
        return found

    def __init__(self, id, *args, **kwargs):
        if args or kwargs:  # only an id: the pin is not reconfigured
            self.init(*args, **kwargs)

    def init(self, mode=None, pull=-1, *, value=None, drive=None, hold=None):
        line = self.line
        if value is not None:
            line.out = 1 if value else 0  # (set before the mode, as the port does)
        if mode is not None and mode & 2 and self.gpio >= _FIRST_INPUT_ONLY:
            raise ValueError("pin can only be input")
        new_mode, new_pull = line.mode, line.pull
        if mode is not None:
            self.od = mode == Pin.OPEN_DRAIN
            new_mode = sim_pins.OUT if mode & 2 else sim_pins.IN
        if pull != -1:
            new_pull = None if pull is None else ("up" if pull & Pin.PULL_UP else
                                                   "down" if pull & Pin.PULL_DOWN else None)
        if self.gpio >= _FIRST_INPUT_ONLY:
            new_pull = None  # GPIO34..39 have no pull resistors (the IDF's error is ignored)
        if self.od:  # open drain: drives 0, lets go of 1
            new_mode = sim_pins.OUT if line.out == 0 else sim_pins.IN
        line.configure(new_mode, new_pull)

    def value(self, v=None):
        if v is None:
            vm_twin.poll()
            return self.line.level()  # gpio_get_level(): the pad, outputs included
        self._set(1 if v else 0)

    def __call__(self, v=None):
        return self.value(v)

    def _set(self, level):
        line = self.line
        if self.od:
            line.out = level
            line.configure(sim_pins.OUT if level == 0 else sim_pins.IN, line.pull)
        else:
            line.write(level)

    def on(self):
        self._set(1)

    def off(self):
        self._set(0)

    def toggle(self):
        self._set(1 - self.line.out)  # from the output latch (mp_hal_pin_read_output)

    def irq(self, handler=_UNSET, trigger=IRQ_FALLING | IRQ_RISING, wake=None, **kwargs):
        if kwargs:  # mp_arg_parse_all: only handler, trigger and wake
            raise TypeError("extra keyword arguments given")
        if handler is _UNSET:
            if trigger == Pin.IRQ_FALLING | Pin.IRQ_RISING and wake is None:
                return self.irq_obj  # no arguments: the IRQ object, nothing configured
            handler = None
        if trigger in (Pin.WAKE_LOW, Pin.WAKE_HIGH) and wake is not None:
            return self.irq_obj  # a wake source (ext0): no interrupt handler
        if handler is None:
            trigger = 0
        _IRQ_HANDLERS[self.gpio] = handler
        _IRQ_TRIGGERS[self.gpio] = trigger
        return self.irq_obj

    def _edge(self, _line, level):
        # The GPIO ISR: a matching edge schedules the handler with the Pin (soft IRQ).
        # Edges the pin drives itself count too: OUT is input and output.
        trigger = _IRQ_TRIGGERS.get(self.gpio, 0)
        if trigger and trigger & (Pin.IRQ_RISING if level else Pin.IRQ_FALLING):
            self.irq_obj()

    def __repr__(self):
        return "Pin(%d)" % self.gpio


class _IRQ:
    """The pin's IRQ object: calling it runs the ISR; trigger() reads or sets it."""

    def __init__(self, pin):
        self._pin = pin

    def __call__(self):
        handler = _IRQ_HANDLERS.get(self._pin.gpio)
        if handler is not None:
            try:
                micropython.schedule(handler, self._pin)
            except RuntimeError:
                pass  # the queue is full: the port's ISR drops it too

    def trigger(self, new=None):
        old = _IRQ_TRIGGERS.get(self._pin.gpio, 0)
        if new is not None:
            _IRQ_TRIGGERS[self._pin.gpio] = new
        return old


# ---------------------------------------------------------------- ADC (machine_adc.c)

_ADC1 = {36: 0, 37: 1, 38: 2, 39: 3, 32: 4, 33: 5, 34: 6, 35: 7}
_ADC2 = {4: 0, 0: 1, 2: 2, 15: 3, 13: 4, 12: 5, 14: 6, 27: 7, 25: 8, 26: 9}
_width = {1: 12, 2: 12}  # per ADC block, bits


class ADC:
    ATTN_0DB = 0
    ATTN_2_5DB = 1
    ATTN_6DB = 2
    ATTN_11DB = 3
    WIDTH_9BIT = 9
    WIDTH_10BIT = 10
    WIDTH_11BIT = 11
    WIDTH_12BIT = 12

    def __init__(self, pin, *, atten=ATTN_11DB):
        gpio = _gpio(pin)
        if gpio not in _ADC1 and gpio not in _ADC2:
            raise ValueError("invalid pin")
        self._gpio = gpio
        self._unit = 1 if gpio in _ADC1 else 2
        self._atten = atten

    def atten(self, atten):
        self._atten = atten

    def width(self, bits):
        if bits not in (9, 10, 11, 12):
            raise ValueError("invalid bit-width")
        _width[self._unit] = bits

    def read(self):
        """The raw reading at the block's width."""
        vm_twin.poll()
        if self._unit == 2 and _wifi_on():
            return 0  # ADC2 is the WiFi driver's: v1.28 ignores the read's error
        name = sim_board.canonical(_name(self._gpio))
        level = sim_analog.level(name) if sim_board.has(name, "analog") else 0
        return level >> (16 - _width[self._unit])

    def read_u16(self):
        bits = _width[self._unit]
        raw = self.read()
        return raw << (16 - bits) | raw >> (2 * bits - 16)

    def read_uv(self):
        # The calibrated reading, in whole mV. The twin's full scale is the board's
        # (board.json "adc" "vref_uv": the 11 dB range Keel uses).
        bits = _width[self._unit]
        vref = sim_board.board().get("adc", {}).get("vref_uv", 3100000)
        return self.read() * vref // ((1 << bits) - 1) // 1000 * 1000

    def __repr__(self):
        return "ADC(Pin(%d), atten=%d)" % (self._gpio, self._atten)


def _wifi_on():
    import sys

    network = sys.modules.get("network")
    return network is not None and network.WLAN._started


# ---------------------------------------------------------------- PWM (machine_pwm.c)

_MODES = 2  # LEDC high- and low-speed groups
_CHANNELS = 8
_TIMERS = 4
_chans = [[-1] * _CHANNELS for _ in range(_MODES)]  # GPIO on each channel, -1 free
_chan_timer = [[-1] * _CHANNELS for _ in range(_MODES)]
_timer_freq = [[-1] * _TIMERS for _ in range(_MODES)]
_timer_res = [[0] * _TIMERS for _ in range(_MODES)]
_APB_HZ = 80000000  # LEDC_USE_APB_CLK
_REF_HZ = 1000000  # LEDC_USE_REF_TICK, below 10 Hz


def _resolution(freq):
    # ledc_find_suitable_duty_resolution() (ESP-IDF), then the port: at most 16 bits,
    # and one less at the timer's full 20.
    src = _REF_HZ if freq < 10 else _APB_HZ
    div = (src + freq // 2) // freq
    res = 0
    while div > 1:
        div >>= 1
        res += 1
    res = min(res, 20, 16)
    return res - 1 if res >= 20 else res


def _actual_freq(freq, res):
    # ledc_get_freq(): what the timer's divider gives (8 fractional bits)
    src = _REF_HZ if freq < 10 else _APB_HZ
    precision = 1 << res
    div = ((src << 8) + freq * precision // 2) // (freq * precision)
    return ((src << 8) + precision * div // 2) // (precision * div)


class PWM:
    def __init__(self, pin, freq=-1, *, duty=-1, duty_u16=-1, duty_ns=-1, invert=False,
                 lightsleep=False):
        self._gpio = _gpio(pin)
        self._mode = self._channel = self._timer = -1
        self._duty = 32768  # PWM_DUTY: 50 %
        self._line = sim_pins.any_line(_name(self._gpio))
        self.init(freq, duty=duty, duty_u16=duty_u16, duty_ns=duty_ns, invert=invert)

    def init(self, freq=-1, *, duty=-1, duty_u16=-1, duty_ns=-1, invert=False,
             lightsleep=False):
        if freq != -1:
            _check_freq(freq)
        if duty_u16 >= 0:
            self._duty = _check_duty_u16(duty_u16)
        elif duty >= 0:
            if duty > 1023:
                raise ValueError("duty must be from 0 to 1023")
            self._duty = (1024 if duty == 1023 else duty) << 6
        mode, channel = self._find_channel(freq)
        if channel < 0:
            raise RuntimeError("out of PWM channels:%d" % (_MODES * _CHANNELS))
        self._mode, self._channel = mode, channel
        if freq == -1:
            timer = _chan_timer[mode][channel]
            freq = _timer_freq[mode][timer] if timer >= 0 else -1
            if freq <= 0:
                freq = 5000  # PWM_FREQ
        self._set_freq_duty(freq)

    def _find_channel(self, freq):
        for mode in range(_MODES):  # its own channel first, then a free one
            for channel in range(_CHANNELS):
                if _chans[mode][channel] == self._gpio:
                    return mode, channel
        for mode in range(_MODES):
            free_timer = any(f < 0 or f == freq for f in _timer_freq[mode])
            for channel in range(_CHANNELS):
                if _chans[mode][channel] < 0 and free_timer:
                    return mode, channel
        return -1, -1

    def _select_timer(self, freq):
        mode = timer = -1
        for m in range(_MODES):  # a timer already at this frequency
            if any(p < 0 or p == self._gpio for p in _chans[m]):
                if freq in _timer_freq[m]:
                    mode, timer = m, _timer_freq[m].index(freq)
                    break
        if timer < 0 and self._timer >= 0 and not self._timer_shared():
            mode, timer = self._mode, self._timer  # its own, used by no other channel
        if timer < 0:
            for m in range(_MODES):
                if any(p < 0 or p == self._gpio for p in _chans[m]) and -1 in _timer_freq[m]:
                    mode, timer = m, _timer_freq[m].index(-1)
                    break
        if timer < 0:
            raise RuntimeError("out of PWM timers:%d" % (_MODES * _TIMERS))
        if timer != self._timer or mode != self._mode:
            if self._channel >= 0 and _chans[self._mode][self._channel] == self._gpio:
                _chans[self._mode][self._channel] = -1
                _chan_timer[self._mode][self._channel] = -1
            self._mode, self._timer = mode, timer
            if _chans[mode][self._channel] >= 0 and _chans[mode][self._channel] != self._gpio:
                self._channel = _chans[mode].index(-1)
            _chan_timer[mode][self._channel] = timer

    def _timer_shared(self):
        mode, timer = self._mode, self._timer
        for channel in range(_CHANNELS):
            if channel != self._channel and _chan_timer[mode][channel] == timer and \
                    _chans[mode][channel] >= 0:
                return True
        return False

    def _set_freq_duty(self, freq):
        self._select_timer(freq)
        mode, timer = self._mode, self._timer
        _timer_freq[mode][timer] = freq
        _timer_res[mode][timer] = _resolution(freq)
        self._apply()

    def _apply(self):
        mode, channel = self._mode, self._channel
        _chans[mode][channel] = self._gpio
        _chan_timer[mode][channel] = self._timer
        sim_link.emit("pwm", pin=self._line.name, freq=self.freq(), duty_u16=self.duty_u16())

    def _active(self):
        if self._timer < 0:
            raise RuntimeError("PWM is inactive")

    def freq(self, freq=None):
        self._active()
        mode, timer = self._mode, self._timer
        if freq is None:
            return _actual_freq(_timer_freq[mode][timer], _timer_res[mode][timer])
        _check_freq(freq)
        if freq != _timer_freq[mode][timer]:
            self._set_freq_duty(freq)

    def duty_u16(self, duty=None):
        self._active()
        if duty is None:
            res = _timer_res[self._mode][self._timer]
            value = (self._duty >> (16 - res)) << (16 - res)  # the channel's resolution
            return 65535 if value == 65536 else value
        self._duty = _check_duty_u16(duty)
        self._apply()

    def duty(self, duty=None):
        if duty is None:
            return self.duty_u16() >> 6
        self.init(duty=duty)

    def deinit(self):
        mode, channel = self._mode, self._channel
        if mode >= 0 and channel >= 0:
            timer = _chan_timer[mode][channel]
            if timer >= 0 and not self._timer_shared():
                _timer_freq[mode][timer] = -1
                _timer_res[mode][timer] = 0
            _chans[mode][channel] = -1
            _chan_timer[mode][channel] = -1
            sim_link.emit("pwm", pin=self._line.name, off=True)
        self._mode = self._channel = self._timer = -1

    def __repr__(self):
        if self._timer < 0:
            return "PWM(Pin(%d))" % self._gpio
        return "PWM(Pin(%d), freq=%d, duty_u16=%d)" % (self._gpio, self.freq(), self.duty_u16())


def _check_freq(freq):
    if not 0 < freq <= 40000000:
        raise ValueError("frequency must be from 1Hz to 40MHz")


def _check_duty_u16(duty):
    if not 0 <= duty <= 65535:
        raise ValueError("duty_u16 must be from 0 to 65536")
    return 65536 if duty == 65535 else duty


# ---------------------------------------------------------------- I2C (machine_i2c.c)

class _I2CBus(extmod_buses.I2CBus):
    """The controller's transfers (extmod_buses.py), on the devices its pins reach."""

    def _devices(self):
        vm_twin.poll()
        return sim_i2c.on_pins(_name(self._sda), _name(self._scl))


class I2C(_I2CBus):
    _objs = {}  # one per controller: the port keeps its settings

    def __new__(cls, id=0, *, scl=None, sda=None, freq=-1, timeout=-1):
        if not 0 <= id < 2:
            raise ValueError("I2C(%d) doesn't exist" % id)
        found = cls._objs.get(id)
        if found is None:
            found = cls._objs[id] = object.__new__(cls)
            found._id = id
            found._scl, found._sda = (18, 19) if id == 0 else (25, 26)
            found._freq, found._timeout = 400000, 50000
        return found

    def __init__(self, id=0, *, scl=None, sda=None, freq=-1, timeout=-1):
        if scl is not None:
            self._scl = _gpio(scl)
        if sda is not None:
            self._sda = _gpio(sda)
        if freq != -1:
            self._freq = freq
        if timeout != -1:
            self._timeout = timeout

    def __repr__(self):
        return "I2C(%d, scl=%d, sda=%d, freq=%d, timeout=%d)" % (
            self._id, self._scl, self._sda, self._freq, self._timeout)


class SoftI2C(_I2CBus):
    def __init__(self, scl, sda, *, freq=400000, timeout=50000):
        self._scl, self._sda = _gpio(scl), _gpio(sda)
        self._freq, self._timeout = freq, timeout

    def __repr__(self):
        return "SoftI2C(scl=%d, sda=%d, freq=%d)" % (self._scl, self._sda, self._freq)


# ---------------------------------------------------------------- SPI (machine_hw_spi.c)


class SPI(extmod_buses.SPIBus):  # (its transfers: extmod_buses.py)
    MSB = 0
    LSB = 1
    _PINS = {1: (14, 13, 12), 2: (18, 23, 19)}  # HSPI, VSPI: sck, mosi, miso

    def __init__(self, id, baudrate=500000, *, polarity=0, phase=0, bits=8, firstbit=MSB,
                 sck=None, mosi=None, miso=None):
        if id not in SPI._PINS:
            raise ValueError("SPI(%d) doesn't exist" % id)
        self._id = id
        sck_, mosi_, miso_ = SPI._PINS[id]
        self._sck = _gpio(sck) if sck is not None else sck_
        self._mosi = _gpio(mosi) if mosi is not None else mosi_
        self._miso = _gpio(miso) if miso is not None else miso_
        self._wires = sim_serial.SPIWires(_name(self._mosi), _name(self._miso))
        self.init(baudrate, polarity=polarity, phase=phase, bits=bits, firstbit=firstbit)

    def init(self, baudrate=500000, *, polarity=0, phase=0, bits=8, firstbit=MSB, **pins):
        self._baudrate, self._polarity, self._phase = baudrate, polarity, phase
        self._bits, self._firstbit = bits, firstbit

    def __repr__(self):
        return "SPI(id=%d, baudrate=%d, polarity=%d, phase=%d, bits=%d, firstbit=%d, " \
               "sck=%d, mosi=%d, miso=%d)" % (self._id, self._baudrate, self._polarity,
                                             self._phase, self._bits, self._firstbit,
                                             self._sck, self._mosi, self._miso)


# ---------------------------------------------------------------- UART (machine_uart.c)


class UART:
    _objs = {}
    _PINS = {0: (1, 3), 1: (10, 9), 2: (17, 16)}  # tx, rx

    def __new__(cls, id, *args, **kwargs):
        if id not in UART._PINS:
            raise ValueError("UART(%d) does not exist" % id)
        found = cls._objs.get(id)
        if found is None:
            found = cls._objs[id] = object.__new__(cls)
            found._id = id
            found._tx, found._rx = UART._PINS[id]
            found._baudrate, found._bits, found._parity, found._stop = 115200, 8, None, 1
            found._rxbuf, found._timeout = 256, 0
        return found

    def __init__(self, id, baudrate=-1, bits=-1, parity=-1, stop=-1, *, tx=None, rx=None,
                 rts=None, cts=None, txbuf=-1, rxbuf=-1, timeout=-1, timeout_char=-1,
                 invert=-1, flow=-1):
        self.init(baudrate, bits, parity, stop, tx=tx, rx=rx, rxbuf=rxbuf, timeout=timeout)

    def init(self, baudrate=-1, bits=-1, parity=-1, stop=-1, *, tx=None, rx=None, rts=None,
             cts=None, txbuf=-1, rxbuf=-1, timeout=-1, timeout_char=-1, invert=-1, flow=-1):
        if baudrate > 0:
            self._baudrate = baudrate
        if bits != -1:
            if not 5 <= bits <= 8:
                raise ValueError("invalid data bits")
            self._bits = bits
        if parity != -1:
            self._parity = parity
        if stop != -1:
            if stop not in (1, 2):
                raise ValueError("invalid stop bits")
            self._stop = stop
        if tx is not None:
            self._tx = _gpio(tx)
        if rx is not None:
            self._rx = _gpio(rx)
        if rxbuf > 0:
            self._rxbuf = rxbuf
        if timeout != -1:
            self._timeout = timeout
        bus = self._id
        for spec in sim_board.board().get("uart", ()):  # the host sees Keel's bus number
            if sim_board.canonical(spec["tx"]) == _name(self._tx):
                bus = spec["bus"]
        self._wires = sim_serial.UARTWires(_name(self._tx), _name(self._rx), bus, self._rxbuf)
        self._ring = self._wires.ring

    def deinit(self):
        pass

    def write(self, buf):
        self._wires.send(buf)
        return len(buf)

    def any(self):
        vm_twin.poll()
        return self._ring.count

    def read(self, nbytes=-1):
        vm_twin.poll()
        count = self._ring.count
        if not count and self._timeout:
            vm_twin.sleep_ms(self._timeout)  # waits for the first byte
            count = self._ring.count
        if not count:
            return None
        return self._ring.take(count if nbytes is None or nbytes < 0 else min(nbytes, count))

    def readinto(self, buf, nbytes=-1):
        data = self.read(len(buf) if nbytes < 0 else nbytes)
        if data is None:
            return None
        buf[: len(data)] = data
        return len(data)

    def readline(self):
        if not self._ring.count:
            return None
        return self._ring.take(self._ring.line_length())

    def flush(self):
        pass

    def txdone(self):
        return True

    def __repr__(self):
        return "UART(%d, baudrate=%d, bits=%d, parity=%s, stop=%d, tx=%d, rx=%d)" % (
            self._id, self._baudrate, self._bits, self._parity, self._stop, self._tx,
            self._rx)


# ---------------------------------------------------------------- WDT (machine_wdt.c)


class WDT:
    def __init__(self, id=0, timeout=5000):
        if id != 0:
            raise ValueError("WDT(%d) doesn't exist" % id)
        if timeout <= 0:
            raise ValueError("WDT timeout too short")
        sim_watchdog.start(timeout)  # creating another reconfigures the timeout

    def feed(self):
        sim_watchdog.feed()


# ---------------------------------------------------------------- bitstream


_led = [None, None, 0, False]  # the colour last reported, the one pending, when, a timer set


def bitstream(pin, encoding, timing, buf):
    # extmod/machine_bitstream.c: encoding 0 only, high/low times in ns. What the
    # twin watches on the wire: the NeoPixel the board wires as its status LED
    # (board.json "status_led" "neopixel"), whose first pixel (G, R, B) it reports.
    if encoding != 0:
        raise ValueError("encoding")
    if len(timing) != 4 or len(buf) < 3:
        return
    led = sim_board.board().get("status_led", {})
    if led.get("type") != "neopixel" or sim_board.canonical(led["pin"]) != pin.line.name:
        return
    rgb = (buf[1], buf[0], buf[2])
    if rgb == _led[0]:
        return
    _led[1] = rgb
    now = time.ticks_ms()
    # A frame every 20 ms while it breathes: reported at most every 100 ms, the last
    # one always (a timer reports what is pending).
    if _led[0] is None or time.ticks_diff(now, _led[2]) >= 100:
        _report_led()
    elif not _led[3]:
        _led[3] = True
        vm_twin.after(100, _report_led)


def _report_led():
    _led[3] = False
    rgb = _led[1]
    if rgb is None or rgb == _led[0]:
        return
    _led[0], _led[1], _led[2] = rgb, None, time.ticks_ms()
    sim_link.emit("led", rgb=list(rgb), pattern="frames")

