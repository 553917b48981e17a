"""The firmware of the boards on the VM, compiled: what plays a port's C code.

The virtual board's simulated hardware (boards/virtual/sim_*.py), its REPL and fault
injection, and the twins' framework and port stand-ins (boards/twins/) are Python
that the VM imports while it runs. Compiled to .mpy once per version of their sources,
they load without the compiler's passing need for heap (which, on a board running
near its heap's end, is the difference between starting and not), as a port's
frozen modules do. vm_startup.py imports them from the directory this returns
(given in the KEEL_VM_FIRMWARE environment variable); without it, from the sources.

The compiled files live in <source tree>/build/vm/<digest of the sources>/, with the
layout of boards/: virtual/, twins/, twins/<port>/."""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from keel.build import compile_py
from keel.paths import mpy_cross, source_root

ENV = "KEEL_VM_FIRMWARE"
# What is compiled, under boards/: every module the VM imports from there while it runs
# (vm_startup.py itself runs as a script).
PARTS = ("virtual/sim_*.py", "virtual/vm_console.py", "virtual/vm_faults.py", "virtual/vm_exit.py",
         "twins/*.py", "twins/*/*.py")


def sources() -> list[Path]:
    boards = source_root() / "boards"
    found = set()
    for pattern in PARTS:
        found.update(boards.glob(pattern))
    return sorted(found)


def firmware_dir() -> Path:
    """The compiled firmware for these sources, built now if missing."""
    boards = source_root() / "boards"
    files = sources()
    digest = hashlib.sha256(Path(mpy_cross()).resolve().as_posix().encode())
    for path in files:
        digest.update(path.relative_to(boards).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    out = source_root() / "build" / "vm" / digest.hexdigest()[:16]
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".new-"))
    try:
        for path in files:
            rel = path.relative_to(boards)
            target = tmp / rel.with_suffix(".mpy")
            target.parent.mkdir(parents=True, exist_ok=True)
            # Tracebacks name firmware frames as the VM mounts them (/.vm/...), which
            # vm_startup.py leaves out of what it prints, as a port's C frames are.
            target.write_bytes(compile_py(path, f"/.vm/{rel.as_posix()}", f"boards/{rel.as_posix()}"))
        try:
            os.rename(tmp, out)
        except OSError:  # another run made it meanwhile: the same files
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
