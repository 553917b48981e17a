# machine, as MicroPython v1.28.0's nrf port has it on an nRF52840 (ports/nrf/modules/
# machine/: modmachine.c, pin.c, adc.c, pwm.c, i2c.c, spi.c, uart.c; extmod/
# modmachine.c, machine_mem.c, machine_i2c.c), over the board's simulated hardware
# (boards/virtual/sim_*.py). The registers Keel drives through mem32 (FICR DEVICEID,
# the WDT, the GPIO pins the firmware's Pin does not know) are the nRF52840 Product
# Specification's. What is here, and the source each behaviour is copied from, is the
# table in docs/virtual-board.md; what the port has and Keel does not use is left out.
import sys
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

_board = {}  # the board's firmware (port.py BOARDS): pins.csv, UART REPL


def setup(board):
    _board.update(board)


# ---------------------------------------------------------------- resets (modmachine.c)

HARD_RESET = 0
WDT_RESET = 1
SOFT_RESET = 2
LOCKUP_RESET = 3
PWRON_RESET = 16
LPCOMP_RESET = 17
DEBUG_IF_RESET = 18
NFC_RESET = 19
# What started the boot (the runner's word) -> the RESETREAS bit machine_init() finds
# first. machine.reset() is NVIC_SystemReset (SREQ); a wake from System OFF is OFF
# (PWRON_RESET). A plain power-on sets no bit: reset_cause keeps its static value, 0,
# HARD_RESET. A soft reboot clears nothing new either: it keeps the cause of the boot
# before (port.py keeps it in the device directory, as the chip keeps the static).
# "panic": a fault the CPU cannot take (a fault in the HardFault handler) locks it up
# and the chip resets from LOCKUP. (A fault the port's HardFault_Handler returns from,
# or __fatal_error, hangs it instead, until the watchdog or the reset pin.)
_CAUSES = {"power-on": HARD_RESET, "reset": SOFT_RESET, "watchdog": WDT_RESET,
           "panic": LOCKUP_RESET, "deep-sleep": PWRON_RESET}
_cause = [HARD_RESET]


def reset_cause():
    return _cause[0]


def reset():
    vm_twin.halt(vm_exit.RESET)  # NVIC_SystemReset(): the chip restarts at once


def soft_reset():
    raise SystemExit  # extmod/modmachine.c: sys.exit, a soft reboot


def deepsleep(*args):
    reset()  # mp_machine_deepsleep is mp_machine_reset


def lightsleep(*args):
    vm_twin.sleep_ms(1)  # one __WFE(): the next event (at the latest the 1 ms tick) wakes it


sleep = lightsleep


def idle():
    vm_twin.poll()  # (the CPU waits for an interrupt)


def unique_id():
    return b""  # mp_machine_unique_id: the empty bytes (use FICR DEVICEID, below)


# ---------------------------------------------------------------- pins (pin.c)

_NAMES = {}  # pin number -> the board's name for it (P0.13 is 13, P1.01 is 33)


def _name(pin):
    if not _NAMES:
        for name, spec in sim_board.board()["pins"].items():
            _NAMES[spec["id"]] = name
    return _NAMES.get(pin) or "P%d.%02d" % (pin >> 5, pin & 31)


def _find(obj):
    # pin_find(): a Pin, a pin number of the firmware's pins.csv (machine_board_pin_obj),
    # a board name of pins.csv, or a cpu name ("P13") of a listed pin.
    if isinstance(obj, Pin):
        return obj
    pins = _board["pins"]
    if isinstance(obj, int):
        if obj in pins.values():
            return Pin._get(obj)
    elif isinstance(obj, str):
        pin = pins.get(obj)
        if pin is None and obj[:1] == "P" and obj[1:].isdigit() and int(obj[1:]) in pins.values():
            pin = int(obj[1:])
        if pin is not None:
            return Pin._get(pin)
    raise ValueError("not a valid pin identifier")


_lines = {}  # pin number -> its sim_pins line, for every pin the twin has touched


def _line(pin):
    line = _lines.get(pin)
    if line is None:
        line = _lines[pin] = sim_pins.any_line(_name(pin))
    return line


_GPIOTE_CHANNELS = 8  # the hi-accuracy IN channels nrfx_gpiote gives pins
_channels = {}  # pin number -> trigger, for pins holding a GPIOTE IN channel
_handlers = {}  # pin number -> handler (MP_STATE_PORT(pin_irq_handlers))


class Pin:
    IN = 0  # NRF_GPIO_PIN_DIR_INPUT
    OUT = 1
    PULL_DISABLED = 0  # NRF_GPIO_PIN_NOPULL
    PULL_DOWN = 1
    PULL_UP = 3
    IRQ_RISING = 1  # NRF_GPIOTE_POLARITY_LOTOHI
    IRQ_FALLING = 2  # NRF_GPIOTE_POLARITY_HITOLO
    _table = {}  # one object per pin, as the port's const table

    @classmethod
    def _get(cls, pin):
        found = cls._table.get(pin)
        if found is None:
            found = cls._table[pin] = object.__new__(cls)
            found.pin = pin
            found.line = _line(pin)
            found.line.on_edge = found._edge
        return found

    def __new__(cls, id, *args, **kwargs):
        return _find(id)

    def __init__(self, id, *args, **kwargs):
        if args or kwargs:  # only an id: the pin is not reconfigured
            self.init(*args, **kwargs)

    def init(self, mode, pull=None, af=-1, *, value=None, alt=-1):
        # pin_obj_init_helper: the output latch first, then PIN_CNF (IN connects the
        # input buffer, OUT disconnects it); only IN and OUT.
        if value is not None:
            self.line.out = 1 if value else 0
        if mode not in (Pin.IN, Pin.OUT):
            raise ValueError("invalid pin mode: %d" % mode)
        _configure(self.line, mode, pull or 0)
        if self.pin in _led_pins():
            _led_changed()

    def value(self, v=None):
        if v is None:
            # mp_hal_pin_read: the OUT register while the pin is an output, else IN
            vm_twin.poll()
            line = self.line
            return line.out if line.mode == sim_pins.OUT else line.level()
        self.line.write(1 if v else 0)

    def __call__(self, v=None):
        return self.value(v)

    def on(self):
        self.line.write(1)

    def off(self):
        self.line.write(0)

    high = on
    low = off

    def irq(self, handler, trigger=IRQ_RISING | IRQ_FALLING, wake=False):
        # pin_irq (1.24+): handler required, no `hard` (TypeError from the argument
        # parser), the pin's PIN_CNF untouched (skip_gpio_setup); returns None.
        pin = self.pin
        if handler is not None:
            if pin not in _channels:
                if len(_channels) < _GPIOTE_CHANNELS:  # else NRFX_ERROR_NO_MEM, ignored
                    _channels[pin] = trigger
            # a pin that holds a channel already: nrfx v2 answers NRFX_ERROR_BUSY, not
            # the INVALID_STATE pin.c re-initialises on, so its old trigger stays
        else:
            _channels.pop(pin, None)  # nrfx_gpiote_in_uninit
        _handlers[pin] = handler
        return None

    def _edge(self, _line, level):
        # The GPIOTE interrupt: the handler runs in it, with the GC locked (no
        # allocation); an exception disables the pin's interrupt.
        if self.pin in _led_pins():
            _led_changed()
        trigger = _channels.get(self.pin)
        if not trigger or not trigger & (Pin.IRQ_RISING if level else Pin.IRQ_FALLING):
            return
        handler = _handlers.get(self.pin)
        if handler is None:
            return
        _isr[0] = True  # mp_sched_lock(): what it schedules runs after it
        micropython.heap_lock()  # gc_lock()
        try:
            handler(self)
        except Exception as e:  # noqa: BLE001 - as pin_common_irq_handler's nlr catch
            micropython.heap_unlock()
            _handlers[self.pin] = None
            _channels.pop(self.pin, None)
            print("uncaught exception in interrupt handler for Pin('%s')" % self.name())
            sys.print_exception(e)
        else:
            micropython.heap_unlock()
        _isr[0] = False
        _run_deferred()

    def name(self):
        for name, pin in _board["pins"].items():
            if pin == self.pin:
                return name
        return "P%d" % self.pin

    def __repr__(self):
        line = self.line
        pull = {"up": "PULL_UP", "down": "PULL_DOWN"}.get(line.pull, "PULL_DISABLED")
        return "Pin(%d, mode=%s, pull=%s)" % (
            self.pin, "OUT" if line.mode == sim_pins.OUT else "IN", pull)


# micropython.schedule as code in an interrupt handler sees it: the scheduler is locked
# there (mp_sched_lock), so what it schedules waits until the handler has returned.
# (The VM's own scheduler would run it at once, inside the handler, its heap locked.)
_SCHED_DEPTH = 4  # MICROPY_SCHEDULER_DEPTH
_isr = [False]
_deferred = [None] * (2 * _SCHED_DEPTH)  # function, argument: no allocation in a handler
_n_deferred = [0]


def _schedule(fn, arg):
    if not _isr[0]:
        return micropython.schedule(fn, arg)
    n = _n_deferred[0]
    if n == _SCHED_DEPTH:
        raise RuntimeError("schedule queue full")
    _deferred[2 * n] = fn
    _deferred[2 * n + 1] = arg
    _n_deferred[0] = n + 1


def _run_deferred():
    for i in range(_n_deferred[0]):
        micropython.schedule(_deferred[2 * i], _deferred[2 * i + 1])
        _deferred[2 * i] = _deferred[2 * i + 1] = None
    _n_deferred[0] = 0


def _configure(line, direction, pull):
    line.configure(sim_pins.OUT if direction == Pin.OUT else sim_pins.IN,
                   {Pin.PULL_UP: "up", Pin.PULL_DOWN: "down"}.get(pull))


# ---------------------------------------------------------------- ADC (adc.c)

_AIN = {2: 0, 3: 1, 4: 2, 5: 3, 28: 4, 29: 5, 30: 6, 31: 7}  # nrf52_af.csv: pin -> AINn


class ADC:
    _objs = {}

    def __new__(cls, id=-1):
        # adc_find(): an AIN channel number, or a pin with an ADC function
        if isinstance(id, int):
            channel = id
        else:
            pin = _find(id).pin
            channel = _AIN.get(pin)
            if channel is None:
                raise ValueError("invalid Pin for ADC")
        if not 0 <= channel < 8:
            raise ValueError("ADC doesn't exist")
        found = cls._objs.get(channel)
        if found is None:
            found = cls._objs[channel] = object.__new__(cls)
            found._id = channel
        return found

    def __init__(self, id=-1):
        pass

    def _raw(self):
        # SAADC, 8 bits, gain 1/4 against VDD/4: full scale is VDD
        vm_twin.poll()
        for pin, channel in _AIN.items():
            if channel == self._id:
                name = sim_board.canonical(_name(pin))
                if sim_board.has(name, "analog"):
                    return sim_analog.level(name) >> 8
        return 0

    def read_u16(self):
        raw = self._raw()
        return raw << 8 | raw

    def value(self):
        return self._raw()

    def __repr__(self):
        return "ADC(%u)" % self._id


# ---------------------------------------------------------------- PWM (pwm.c)

_MODULES = 4  # PWM0..3 on the nRF52840
_FREE, _STOPPED, _RUNNING = 0, 1, 2
_active = [_FREE] * _MODULES
_freq = [0] * _MODULES  # one frequency per module (its p_config)
_pins = [[None] * 4 for _ in range(_MODULES)]  # the pin on each channel
_duty = [[None] * 4 for _ in range(_MODULES)]  # duty_u16 per channel, None: not set


class PWM:
    def __init__(self, pin=None, *, freq=-1, duty=-1, duty_u16=-1, duty_ns=-1, invert=-1,
                 device=-1, channel=-1):
        if pin is None:
            raise ValueError("Pin missing")
        line = _find(pin).line
        if device != -1:
            if not 0 <= device < _MODULES:
                raise ValueError("invalid PWM id")
            module = device
            ch = channel if 0 <= channel < 4 else 0
        else:
            # hard_pwm_find(): a module not yet taken, its channel 0. A module is
            # taken once started; deinit() stops it but never frees it.
            free = [m for m in range(_MODULES) if _active[m] == _FREE]
            if not free:
                raise ValueError("all PWM devices in use")
            module, ch = free[0], 0
        if module == 0 and _active[0] == _FREE:
            _active[0] = _STOPPED  # (pwm.c marks hard_configs[pwm_id]: right only for 0)
        self._module, self._ch, self._line = module, ch, line
        _pins[module][ch] = line
        _duty[module][ch] = None
        # init_helper: every setting first (defer_start), then one start
        if freq != -1:
            _check_freq(freq)
            _freq[module] = freq
        if duty_u16 != -1:
            _duty[module][ch] = duty_u16
        elif duty != -1:
            _duty[module][ch] = duty * 65535 // 100
        self._start()

    def _start(self):
        m = self._module
        if _freq[m] and _duty[m][self._ch] is not None:
            _active[m] = _RUNNING
            sim_link.emit("pwm", pin=self._line.name, freq=_freq[m],
                          duty_u16=_duty[m][self._ch])

    def freq(self, value=None):
        m = self._module
        if value is None:
            return _freq[m]
        _check_freq(value)
        _freq[m] = value
        self._start()

    def duty_u16(self, value=None):
        d = _duty[self._module][self._ch]
        if value is None:
            return -1 if d is None else d
        _duty[self._module][self._ch] = value  # not range-checked by the port
        self._start()

    def deinit(self):
        _active[self._module] = _STOPPED
        for line in _pins[self._module]:
            if line is not None:
                sim_link.emit("pwm", pin=line.name, off=True)

    def __repr__(self):
        return "<PWM: Pin=%s freq=%dHz id=%u channel=%u>" % (
            self._line.name, _freq[self._module], self._module, self._ch)


def _check_freq(value):
    # PWM_MAX_BASE_FREQ / 3 and PWM_MIN_BASE_FREQ / PWM_MAX_PERIOD: 4 Hz..5.33 MHz
    if value > 16000000 // 3 or value <= 125000 // 32768:
        raise ValueError("frequency out of range")


# ---------------------------------------------------------------- I2C (i2c.c)


class I2C(extmod_buses.I2CBus):  # (its transfers: extmod_buses.py)
    _objs = {}

    def __new__(cls, id, scl, sda, *, freq=-1):
        if not 0 <= id < 2:
            raise ValueError("I2C doesn't exist")
        found = cls._objs.get(id)
        if found is None:
            found = cls._objs[id] = object.__new__(cls)
            found._id = id
        return found

    def __init__(self, id, scl, sda, *, freq=-1):
        self._scl, self._sda = _find(scl), _find(sda)
        # 100k up to 150 kHz, 250k below 320 kHz, else 400k (the default)
        self._freq = 400000 if freq == -1 or freq >= 320000 else (
            100000 if freq <= 150000 else 250000)

    def _devices(self):
        vm_twin.poll()
        return sim_i2c.on_pins(self._sda.line.name, self._scl.line.name)

    def __repr__(self):
        return "I2C(%u)" % self._id


# ---------------------------------------------------------------- SPI (spi.c)

_SPI_RATES = (125000, 250000, 500000, 1000000, 2000000, 4000000, 8000000, 16000000,
              32000000)


class SPI(extmod_buses.SPIBus):  # (its transfers: extmod_buses.py)
    MSB = 0
    LSB = 1

    def __init__(self, id=-1, baudrate=1000000, polarity=0, phase=0, bits=8, firstbit=MSB,
                 sck=None, mosi=None, miso=None):
        if not isinstance(id, int) or not 0 <= id < 4:  # SPIM0..3
            raise ValueError("SPI doesn't exist")
        self._id = id
        if sck is not None and mosi is not None and miso is not None:
            sck, mosi, miso = _find(sck).pin, _find(mosi).pin, _find(miso).pin
        else:  # the board's MICROPY_HW_SPI0_* pins
            sck, mosi, miso = _board["spi0"]
        self._wires = sim_serial.SPIWires(_name(mosi), _name(miso))
        self.init(baudrate, polarity, phase, bits, firstbit)

    def init(self, baudrate=1000000, polarity=0, phase=0, bits=8, firstbit=MSB):
        # the next rate up, up to 32 MHz; above that 1 MHz. `bits` is not used.
        self._baudrate = 1000000
        for rate in _SPI_RATES:
            if baudrate <= rate:
                self._baudrate = rate
                break
        self._polarity, self._phase = polarity, phase

    def __repr__(self):
        return "SPI(%u, baudrate=%u, polarity=%u, phase=%u)" % (
            self._id, self._baudrate, self._polarity, self._phase)


# ---------------------------------------------------------------- UART (uart.c)

_UART_RX = 64  # rx_ringbuf_array[64]


class _Ring(sim_serial.Ring):
    """py/ringbuf: of its 64 bytes it holds 63, and a byte that comes when it is full
    is dropped (ringbuf_put fails; uart_event_handler ignores it)."""

    def put(self, data):
        room = self.size - 1 - self.count
        if room > 0:
            sim_serial.Ring.put(self, memoryview(data)[:room])


class UART:
    _obj = []  # UART(0), the only one

    def __new__(cls, id, baudrate, *, timeout=1, timeout_char=1):
        if id != 0:
            raise ValueError("UART doesn't exist")
        if not cls._obj:
            cls._obj.append(object.__new__(cls))
            cls._obj[0].attached_to_repl = False
            cls._obj[0]._wires = None
        return cls._obj[0]

    def __init__(self, id, baudrate, *, timeout=1, timeout_char=1):
        if not 1200 <= baudrate <= 1000000:
            raise ValueError("UART baudrate not supported")
        self._baudrate, self._timeout = baudrate, timeout
        if self._wires is None:  # the board's MICROPY_HW_UART1_TX/RX
            tx, rx = _board["uart0"]
            wires = sim_serial.UARTWires(_name(tx), _name(rx), _bus(tx), _UART_RX)
            wires.ring = sim_serial._rings[wires.rx.name] = _Ring(_UART_RX)
            self._wires = wires
        self._ring = self._wires.ring
        self._ring.count = self._ring.head = 0  # make_new empties the ring buffer
        self._open = True

    def deinit(self):
        self._open = False

    def write(self, buf):
        if isinstance(buf, str):
            buf = buf.encode()
        self._wires.send(buf)
        return len(buf)

    def _held(self):
        # While the UART is attached to the REPL every byte it receives goes to the
        # REPL's input, none to the UART's ring buffer (uart_event_handler).
        vm_twin.poll()
        if self.attached_to_repl or not self._open:
            self._ring.count = 0
        return self._ring.count

    def any(self):
        return self._held()

    def read(self, nbytes=None):
        count = self._held()
        if not count and self._timeout:
            vm_twin.sleep_ms(self._timeout)  # waits for the first byte
            count = self._held()
        if not count:
            return None
        return self._ring.take(count if nbytes is None else min(nbytes, count))

    def readline(self):
        if not self._held():
            return None
        return self._ring.take(self._ring.line_length())

    def __repr__(self):
        return "UART(0)"


def _bus(tx):
    for spec in sim_board.board().get("uart", ()):  # the host sees Keel's bus number
        if sim_board.canonical(spec["tx"]) == _name(tx):
            return spec["bus"]
    return 0


def os_dupterm(stream=None, index=0):
    """os.dupterm (extmod/modos.c with the port's mp_os_dupterm_stream_detached_attached):
    the REPL's second stream; attaching UART(0) sends what it receives to the REPL."""
    old = _dupterm[0]
    if old is not None and isinstance(old, UART):
        old.attached_to_repl = False
    _dupterm[0] = stream
    if stream is not None and isinstance(stream, UART):
        stream.attached_to_repl = True
    return old


_dupterm = [None]


# ---------------------------------------------------------------- mem32 (machine_mem.c)

_DEVICEID0 = 0x10000060  # FICR.DEVICEID[0], [1] at + 4
_WDT = 0x40010000
_GPIO = 0x50000000  # P0; P1 at + 0x300
_RELOAD = 0x6E524635


class _Mem:
    """machine.mem32: whole words at 4-aligned addresses, read back as signed 32-bit
    ints (mp_obj_new_int((mp_int_t)uint32)). The twin models the registers Keel uses;
    any other address is refused, as nothing backs it here."""

    def __init__(self):
        self._wdt = {0x504: 0xFFFFFFFF, 0x508: 1, 0x50C: 1}  # CRV, RREN, CONFIG resets
        self._running = False
        self._cnf = {}  # pin -> PIN_CNF written

    def _check(self, addr):
        if addr & 3:
            raise ValueError("address %08x is not aligned to 4 bytes" % addr)

    def __getitem__(self, addr):
        self._check(addr)
        value = self._read(addr)
        return value - 0x100000000 if value & 0x80000000 else value

    def _read(self, addr):
        if addr in (_DEVICEID0, _DEVICEID0 + 4):
            uid = vm_twin.hw.uid or "0" * 16
            return int(uid[:8] if addr != _DEVICEID0 else uid[8:16], 16)
        if addr == _WDT + 0x400:  # RUNSTATUS
            return 1 if self._running else 0
        if _WDT + 0x504 <= addr <= _WDT + 0x50C:
            return self._wdt[addr - _WDT]
        port, reg = _gpio_reg(addr)
        if reg == 0x510:  # IN: the level of each pin of the port
            vm_twin.poll()
            word = 0
            for pin, line in _lines.items():
                if pin >> 5 == port and line.level():
                    word |= 1 << (pin & 31)
            return word
        if 0x700 <= reg < 0x780:
            return self._cnf.get(port * 32 + (reg - 0x700) // 4, 2)  # reset: input disconnected
        raise NotImplementedError("twin: mem32[0x%08x] is not modelled" % addr)

    def __setitem__(self, addr, value):
        self._check(addr)
        value &= 0xFFFFFFFF
        if addr == _WDT:  # TASKS_START
            if value & 1 and not self._running:
                self._running = True
                sim_watchdog.start((self._wdt[0x504] + 1) * 1000 // 32768)
            return
        if _WDT + 0x504 <= addr <= _WDT + 0x50C:
            if not self._running:  # CRV, RREN, CONFIG cannot change while it runs
                self._wdt[addr - _WDT] = value
            return
        if _WDT + 0x600 <= addr < _WDT + 0x620:  # RR[n]: a reload request
            n = (addr - _WDT - 0x600) // 4
            if self._running and value == _RELOAD and self._wdt[0x508] & (1 << n):
                sim_watchdog.feed()
            return
        port, reg = _gpio_reg(addr)
        if 0x700 <= reg < 0x780:  # PIN_CNF[n]: DIR bit 0, INPUT bit 1 (1 = off), PULL 2-3
            pin = port * 32 + (reg - 0x700) // 4
            self._cnf[pin] = value
            _configure(_line(pin), value & 1, (value >> 2) & 3)
            return
        raise NotImplementedError("twin: mem32[0x%08x] = 0x%x is not modelled" % (addr, value))


def _gpio_reg(addr):
    # (port, register offset) of a GPIO register: P0's at 0x50000500..0x5000077F,
    # P1's 0x300 further
    off = addr - _GPIO
    for port in (0, 1):
        reg = off - 0x300 * port
        if 0x500 <= reg < 0x780:
            return port, reg
    return -1, -1


mem32 = _Mem()


# ---------------------------------------------------------------- the board's LEDs and button

_led = [None, 0, None, None]  # last colour reported, when, the one pending, LED pins


def _led_pins():
    # The status LED of board.json "rgb": three pins, reported as one colour to the
    # host when any of them changes (at most every 100 ms; a timer sends the last).
    if _led[3] is None:
        spec = sim_board.board().get("status_led", {})
        names = spec.get("pins", ()) if spec.get("type") == "rgb" else ()
        _led[3] = [sim_board.pin_spec(n)["id"] for n in names]
    return _led[3]


def _led_changed():
    spec = sim_board.board()["status_led"]
    on = 0 if spec.get("active", "high") == "low" else 1
    rgb = []
    for pin in _led_pins():
        line = _lines.get(pin)
        rgb.append(255 if line is not None and line.mode == sim_pins.OUT and line.out == on
                   else 0)
    if rgb == _led[0]:
        return
    _led[2] = rgb
    now = time.ticks_ms()
    if _led[0] is None or time.ticks_diff(now, _led[1]) >= 100:
        _report_led()
    else:
        vm_twin.after(100, _report_led)


def _report_led():
    rgb = _led[2]
    if rgb is None or rgb == _led[0]:
        return
    _led[0], _led[1], _led[2] = rgb, time.ticks_ms(), None
    sim_link.emit("led", rgb=rgb, pattern="frames")
