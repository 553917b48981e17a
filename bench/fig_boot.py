"""Figure 1, boot: the time from starting the VM to the app's setup() on the virtual
board, against bare MicroPython running the same app from plain files.

Both are wall time from just before the process starts to the line the app's setup()
prints, read from the process's stdout; the process is killed at that line. Keel: the
command `keel vdev run` starts for one boot (micropython -X heapsize=<board heap>
vm_startup.py DEVICE power-on), a device with system 1.1.0 and the hello app, after one
warm-up boot (the first boot installs the modules' code). Baseline: the same micropython
binary with the same heap running a runner script that imports the app's main.py (the
same source, a plain file, compiled at import) and calls setup(). Runs alternate Keel,
baseline, Keel, ... so a noisy machine slows both alike."""

from bench.common import KB, Goal, board_heap, keel_vm_command, median, micropython, row, time_to_marker

FIGURE = 1
TITLE = "Boot: VM start to the app's setup()"

APP = '''\
# The hello app (examples/hello), its marker made unmistakable.
def setup():
    print("BENCH-SETUP hello from keel")


def loop():
    pass
'''

RUNNER = "import main\nmain.setup()\n"
MARKER = "BENCH-SETUP"


def measure(ctx, runs: int):
    """Interleaved runs: Keel, the baseline, and (for the breakdown) the VM alone
    printing the marker from an otherwise empty script. Keel's runs also time its
    first "keel: system ..." line (the bootloader done, the system starting)."""
    heap = board_heap()
    src, image = ctx.app("boot", {"main.py": APP})
    device = ctx.device("boot-dev", "1.1.0", [image])
    (src / "bare_main.py").write_text(RUNNER)
    (src / "empty.py").write_text(f"print({MARKER!r})\n")
    keel_cmd = keel_vm_command(device, heap)
    bare_cmd = [micropython(), "-X", f"heapsize={heap}", str(src / "bare_main.py")]
    empty_cmd = [micropython(), "-X", f"heapsize={heap}", str(src / "empty.py")]
    time_to_marker(keel_cmd, MARKER, timeout=60)  # warm-up: installs the modules' code
    time_to_marker(bare_cmd, MARKER)
    keel, bare, empty, system = [], [], [], []
    for i in range(runs):
        stamps = []
        keel.append(time_to_marker(keel_cmd, MARKER, stamps=stamps)[0])
        system.append(next((t for t, line in stamps if line.startswith("keel: system ")), None))
        bare.append(time_to_marker(bare_cmd, MARKER)[0])
        empty.append(time_to_marker(empty_cmd, MARKER)[0])
    return keel, bare, empty, [t for t in system if t is not None], heap


def run(ctx):
    runs = ctx.runs(21)
    keel, bare, empty, system, heap = measure(ctx, runs)
    ctx.log(f"keel {median(keel):.3f} s, bare {median(bare):.3f} s over {runs} runs")
    ms = lambda x: f"{1000 * x:.0f} ms"  # noqa: E731
    breakdown = (f"medians: the VM alone (an empty script) {ms(median(empty))}; Keel's \"keel: system\" line "
                 f"(port start-up + bootloader done) at {ms(median(system))}, setup() at {ms(median(keel))}; "
                 f"the bare app's setup() at {ms(median(bare))}")
    r = row(FIGURE, "boot to setup()", round(median(keel), 4), round(median(bare), 4), "s",
            Goal("≤ 1.5× baseline", lambda r: r["ratio"] is not None and r["ratio"] <= 1.5),
            runs={"keel": [round(x, 4) for x in keel], "baseline": [round(x, 4) for x in bare]},
            notes=f"median of {runs} interleaved runs each; heap {heap // KB} KB; baseline: same micropython, "
                  f"same heap, the app's main.py as a plain file; {breakdown}")
    if r["met"] is False:
        r["limits"] = (f"Keel adds {ms(median(keel) - median(bare))} to a start whose floor is the VM's own "
                       f"{ms(median(empty))}: up to the \"keel: system\" line "
                       f"{ms(median(system) - median(empty))} (port start-up: mounting the LittleFS flash "
                       f"through a Python block device; the bootloader: board.json, a CRC32 scan of every slot "
                       f"through a 512-byte buffer, importing the system), then "
                       f"{ms(median(keel) - median(system))} to setup() (the system's start, its status record "
                       f"in flash, the app loader's checks). The ratio is against a baseline that is mostly "
                       f"the process start, so tens of ms decide it")
    return [r]
