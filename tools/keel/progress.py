"""A progress bar on stderr: redrawn in place on a terminal, a line per step otherwise."""

import sys


def bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // total if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * done // max(total, 1):3d}% {done}/{total} bytes"


class Progress:
    def __init__(self, label: str = "", stream=None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.shown = None

    def update(self, done: int, total: int) -> None:
        if done == self.shown:
            return
        if not self.tty and self.shown is not None and done < total and \
                100 * done // max(total, 1) // 10 == 100 * self.shown // max(total, 1) // 10:
            return  # off a terminal: a line per tenth, not per step
        self.shown = done
        text = (self.label + " " if self.label else "") + bar(done, total)
        self.stream.write(("\r" + text) if self.tty else text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self.shown is not None:
            self.stream.write("\n")
            self.stream.flush()
