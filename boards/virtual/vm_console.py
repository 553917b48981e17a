# The virtual board's REPL on its console (keel vdev run --pty), as MicroPython's
# shared/runtime/pyexec.c runs it on a board's UART or USB: the friendly REPL (">>> ")
# and the raw REPL (Ctrl-A) with its raw-paste mode, which mpremote speaks. The unix
# port's own REPL has no raw REPL, so the board's firmware part is here, in Python.
#
# vm_startup.py imports this once boot.py and main.py are done (or were interrupted)
# and calls repl(); it returns the REPL mode when a soft reboot is asked for. Ctrl-C
# reaches running code as SIGINT from the runner (the unix port's keyboard
# interrupt); the runner does so only while the control pipe says code runs (b"1"),
# as a port's UART turns Ctrl-C into an interrupt only while mp_interrupt_char is set.
import sys
import select
from micropython import const

_CTRL_A = const(1)  # raw REPL; with b"\x05A" before it, raw-paste mode
_CTRL_B = const(2)  # friendly REPL
_CTRL_C = const(3)
_CTRL_D = const(4)  # end of input; on an empty line, soft reboot
_CTRL_E = const(5)  # paste mode (friendly)
_WINDOW = const(128)  # raw-paste flow control: half a 256-byte stdin buffer, as on boards
_SOFT = const(0)  # what a REPL returns for a soft reboot; else the next mode
_RAW_BANNER = b"raw REPL; CTRL-B to exit\r\n"
_COMPOUND = ("if", "while", "for", "try", "with", "def", "class", "async")

_write = sys.stdout.buffer.write


class _Machine:
    """A minimal `machine` module, so host tools use the same snippets as on every
    board (mpremote reset: machine.reset()). Reset causes as esp32 numbers them."""

    PWRON_RESET = 1
    HARD_RESET = 2
    WDT_RESET = 3
    DEEPSLEEP_RESET = 4
    SOFT_RESET = 5
    _CAUSES = {"power-on": 1, "panic": 2, "watchdog": 3, "deep-sleep": 4, "soft-reset": 5}

    @staticmethod
    def reset():
        sys.modules["vboard"].reset()

    @staticmethod
    def soft_reset():
        raise SystemExit  # the REPL makes it a soft reboot, as ports do

    @staticmethod
    def reset_cause():
        return _Machine._CAUSES.get(sys.modules["vboard"].reset_cause(), 1)

    @staticmethod
    def unique_id():
        return bytes.fromhex(sys.modules["vboard"].uid)

    @staticmethod
    def idle():
        pass


def _banner(board):
    version = sys.version.split("; ", 1)[-1]
    return "%s; %s with %s\r\nType \"help()\" for more information.\r\n" % (
        version,
        board,
        sys.implementation._machine,
    )


def _starts_with_word(text, word):
    n = len(word)
    return text.startswith(word) and (len(text) == n or not (text[n].isalpha() or text[n] == "_"))


def _continues(text):
    # py/repl.c's mp_repl_continue_with_input(): does the friendly REPL need more lines?
    if not text:
        return False
    compound = text[0] == "@" or any(_starts_with_word(text, w) for w in _COMPOUND)
    depth = 0
    quote = None  # the open quote: ' " ''' or """
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quote is None:
            if c == "#":
                while i < n and text[i] != "\n":
                    i += 1
                continue
            if c in "'\"":
                quote = c * 3 if text[i : i + 3] == c * 3 else c
                i += len(quote)
                continue
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
        elif c == "\\":
            i += 1
        elif text[i : i + len(quote)] == quote:
            i += len(quote)
            quote = None
            continue
        i += 1
    if quote is not None and len(quote) == 3:
        return True
    if depth > 0 and quote is None:
        return True
    return text.endswith("\\") or (compound and not text.endswith("\n"))


def _indent(text):
    # readline's auto-indent for the line after text (which ends with "\n"): the last
    # line's indent, one more after a ":", none after two lines of only spaces.
    start = text.rfind("\n", 0, len(text) - 1) + 1
    last = text[start:-1]
    spaces = len(last) - len(last.lstrip(" "))
    if start > 0 and spaces == len(last):
        before = text[text.rfind("\n", 0, start - 1) + 1 : start - 1]
        if before.strip(" ") == "":
            return b""
    return b"    " * (spaces // 4 + (1 if last.endswith(":") else 0))


class _Repl:
    def __init__(self, ctl, g, print_exception, board):
        self._print_exception = print_exception
        self._board = board
        self._ctl = ctl
        self._g = g
        self._stdin = sys.stdin.buffer
        self._poll = select.poll()
        self._poll.register(sys.stdin, select.POLLIN)
        self._buf = bytearray(256)
        self._pos = 0
        self._end = 0
        self._last = 0
        self._auto_indent = True

    def getc(self):
        # stdin is non-blocking (the runner made it so): readinto() takes what is there.
        while self._pos >= self._end:
            try:
                self._poll.poll()
                n = self._stdin.readinto(self._buf)
            except KeyboardInterrupt:
                return _CTRL_C  # a Ctrl-C sent as code ended: it is the key itself
            if n == 0:
                sys.exit(0)  # the runner is gone
            if n:
                self._pos, self._end = 0, n
        c = self._buf[self._pos]
        self._pos += 1
        return c

    def execute(self, src, mode, eof):
        # As pyexec's parse_compile_execute(); True when the code asked for a soft
        # reboot (SystemExit). eof: the raw REPL's "\x04" after output and after errors.
        exc = None
        reboot = False
        try:
            try:
                code = compile(src if type(src) is str else bytes(src), "<stdin>", mode)
                self._ctl.write(b"1")
                exec(code, self._g)
            finally:
                self._ctl.write(b"0")
        except SystemExit:
            # A reset of the virtual board unwinds the stack (vboard.exiting set); a
            # twin's stops the VM at once and never gets here.
            if getattr(sys.modules.get("vboard"), "exiting", False):
                raise
            reboot = True
        except BaseException as e:  # noqa: BLE001 - reported on the console
            exc = e
        code = src = None
        self._ctl.write(b"0")  # again, should a Ctrl-C have cut the first one short
        if eof:
            _write(b"\x04")
        if exc is not None:
            self._print_exception(exc)
        if eof:
            _write(b"\x04")
        return reboot

    def raw(self):
        _write(_RAW_BANNER)
        line = bytearray()
        while True:
            _write(b">")
            line = bytearray()
            while True:
                c = self.getc()
                if c == _CTRL_A:
                    if len(line) == 2 and line[0] == _CTRL_E:
                        if self.raw_paste(line[1]):
                            return _SOFT
                        line = bytearray()
                        _write(b">")
                        continue
                    _write(_RAW_BANNER)
                    line = bytearray()
                    _write(b">")
                elif c == _CTRL_B:
                    _write(b"\r\n")
                    return "friendly"
                elif c == _CTRL_C:
                    line = bytearray()
                elif c == _CTRL_D:
                    break
                else:
                    line.append(c)
            _write(b"OK")
            if not line:
                _write(b"\r\n")
                return _SOFT
            if self.execute(line, "exec", True):
                return _SOFT

    def raw_paste(self, command):
        if command != 0x41:  # 'A'
            _write(b"R\x00")  # understood, not supported
            return False
        _write(b"R\x01")
        _write(bytes((_WINDOW & 0xFF, _WINDOW >> 8, 1)))
        src = bytearray()
        remain = _WINDOW
        while True:
            c = self.getc()
            if c == _CTRL_C or c == _CTRL_D:
                _write(b"\x04")  # end of data, seen
                if c == _CTRL_C:
                    _write(b"\x04")
                    self._print_exception(KeyboardInterrupt())
                    _write(b"\x04")
                    return False
                break
            src.append(c)
            remain -= 1
            if remain == 0:
                _write(b"\x01")  # another window's room
                remain = _WINDOW
        return self.execute(src, "exec", True)

    def readline(self, prompt, indent=b""):
        # shared/readline's readline(): returns (control key, None) or (0, the line).
        # Edits at the end of the line only (no cursor keys, history or completion).
        _write(prompt)
        line = bytearray(indent)
        _write(indent)
        just_indented = bool(indent)
        while True:
            c = self.getc()
            last, self._last = self._last, c
            if c == 10:
                if last == 13:
                    continue  # the \n of a \r\n
                c = 13
            if _CTRL_A <= c <= _CTRL_E and not line or c == _CTRL_C:
                return c, None
            if c == 13:
                _write(b"\r\n")
                return 0, line
            if just_indented and (c == 9 or c == 32):
                # Typing (or pasting) its own indent after an automatic one: auto-indent
                # off for this statement, and a space takes back 3 of the 4 spaces.
                self._auto_indent = False
                if c == 32:
                    line = line[:-3]
                    _write(b"\x08\x08\x08\x1b[K")
            elif c == 8 or c == 127:
                n = 4 if len(line) >= 4 and line == b" " * len(line) else 1
                if line:
                    line = line[:-n]
                    _write(b"\x08" * n + b"\x1b[K")
            elif c == 27:
                self.skip_escape()
            elif c == 9:
                if not line or line[-1] == 32:
                    line += b"    "
                    _write(b"    ")
            elif c >= 32:
                line.append(c)
                _write(bytes((c,)))
            just_indented = False

    def skip_escape(self):
        # Cursor keys and the like: ESC [ ... final byte. Not supported; dropped.
        c = self.getc()
        if c == 0x5B or c == 0x4F:
            while True:
                c = self.getc()
                if 0x40 <= c <= 0x7E:
                    return

    def paste(self):
        _write(b"\r\npaste mode; Ctrl-C to cancel, Ctrl-D to finish\r\n=== ")
        src = bytearray()
        while True:
            c = self.getc()
            if c == _CTRL_C:
                _write(b"\r\n")
                return False
            if c == _CTRL_D:
                _write(b"\r\n")
                return self.execute(src, "exec", False)
            src.append(c)
            _write(b"\r\n=== " if c == 13 else bytes((c,)))

    def friendly(self):
        _write(_banner(self._board))
        while True:
            key, line = self.readline(b">>> ")
            if key == _CTRL_A:
                _write(b"\r\n")
                return "raw"
            if key == _CTRL_B:
                _write(b"\r\n")
                _write(_banner(self._board))
                continue
            if key == _CTRL_C:
                _write(b"\r\n")
                continue
            if key == _CTRL_D:
                _write(b"\r\n")
                return _SOFT
            if key == _CTRL_E:
                if self.paste():
                    return _SOFT
                continue
            if not line:
                continue
            text = line.decode()
            self._auto_indent = True
            while _continues(text):
                text += "\n"
                indent = _indent(text) if self._auto_indent else b""
                key, more = self.readline(b"... ", indent)
                if key == _CTRL_C:
                    _write(b"\r\n")
                    text = None
                    break
                if key == _CTRL_D:
                    break
                if more:
                    text += more.decode()
            if text and self.execute(text, "single", False):
                return _SOFT


def repl(mode, ctl, g, print_exception, board):
    """Runs the REPL from mode ("friendly" or "raw") until a soft reboot; returns the
    mode the REPL is in then, which the next boot keeps. print_exception(e) prints
    a traceback as a port does (without the frames of the VM's start-up code); board
    names the board in the banner. The virtual board gets the small `machine` above;
    a twin has its port's."""
    if "vboard" in sys.modules:
        sys.modules["machine"] = _Machine
    r = _Repl(ctl, g, print_exception, board)
    while True:
        try:
            nxt = r.raw() if mode == "raw" else r.friendly()
        except KeyboardInterrupt:
            continue  # a Ctrl-C that came as code ended: the prompt again
        if nxt == _SOFT:
            return mode
        mode = nxt
