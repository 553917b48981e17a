"""Figure 2, heap: the heap in use when the app starts, on the virtual board with the
board's heap (boards/virtual/board.json: 192 KB), without and with an open cloud
session (TLS 1.2, mutual authentication, MQTT); and the same on the board twins at their
boards' heaps (twin_rows): the ESP32 (111,936 bytes; with the session: WiFi to the
twin's access point) playing the firmware Keel documents, built with ROMFS (code in
place from the romfs partition), and stock firmware (code extracted), and the nRF52840 DK (244,224 bytes, code in
place from its ROMFS segment; no network, so no session).

One app measures it: it imports keel at its top (as apps do: the core of the API, the
rest loads on first use), and setup() first does gc.collect() and prints gc.mem_alloc()
(and micropython.qstr_info(): the pools of interned names, which double when full); on
a provisioned device it then waits for the system's session to connect (read from the
session itself, so that the app's cloud calls, 4.8 KB, are not loaded), lets the system
loop run for 0.5 s and measures again. Keel, without: a device with no cloud identity, at setup().
Keel, with: a provisioned device of `keel cloud serve` (embedded broker), once its
session is up. Baselines: bare MicroPython (the same binary and heap) running the same
app from plain files at setup(); with a session, the same plus a TLS socket with the
device's own certificate and key to the same cloud, through which it has sent an MQTT
CONNECT and got the CONNACK (bench/heap_tls.py): what an open TLS session costs the
VM without Keel. The runs alternate Keel and baseline.

Breakdown (for "limits"): the modules the device holds at app start (sys.modules, from
the same app), and the names' pools."""

from bench.common import KB, Cloud, Goal, board_heap, keel_vm_command, median, micropython, row, time_to_marker

FIGURE = 2
TITLE = "Heap in use at app start (192 KB board; the ESP32 and nRF52840 twins)"

APP = '''\
import gc
import sys
import micropython

try:
    import keel  # at the top, as apps do (Keel imports the app before its session starts)
except ImportError:  # bare MicroPython
    keel = None


def heap(label):
    gc.collect()
    print(label, gc.mem_alloc(), gc.mem_free())
    micropython.qstr_info()


def setup():
    heap("HEAP-START")
    print("HEAP-MODULES", " ".join(sorted(sys.modules)))
    session = sys.modules.get("cloud_session")  # (the system's: not the app's cloud calls)
    session = session.current() if session else None
    if keel is None or session is None:  # bare MicroPython, or not provisioned
        print("HEAP-DONE")
        return
    t = keel.millis()
    while not session.connected() and keel.millis() - t < 10000:
        keel.delay(20)
    keel.delay(500)
    heap("HEAP-UP %s" % session.connected())
    print("HEAP-MODULES-UP", " ".join(sorted(sys.modules)))
    if sys.platform == "esp32":
        # (the twin reports the LED's frames to the host in Python, which allocates;
        # the chip's wire is C and does not: a silent one in its place)
        import machine

        def wire(pin, encoding, timing, buf):
            pass

        machine.bitstream = wire
    keel.delay(2000)  # (what follows a connection settles: the describe, the cloud's answers)
    gc.collect()
    before = gc.mem_alloc()
    keel.delay(3000)  # idle and connected: the system loop's passes
    print("HEAP-IDLE", session.connected(), gc.mem_alloc() - before)
    print("HEAP-DONE")


def loop():
    pass
'''

# Bare MicroPython with an open TLS session: the device's credentials (DER) and the
# cloud's address as arguments; the same measurement as the app's.
TLS = '''\
import gc
import sys
import socket
import tls
import micropython

def heap(label):
    gc.collect()
    print(label, gc.mem_alloc(), gc.mem_free())
    micropython.qstr_info()

def read(name):
    with open(name, "rb") as f:
        return f.read()

def main(folder, host, port, client_id):
    heap("HEAP-START")
    ctx = tls.SSLContext(tls.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = tls.CERT_REQUIRED
    ctx.load_verify_locations(read(folder + "/ca.der"))
    ctx.load_cert_chain(read(folder + "/cert.der"), read(folder + "/key.der"))
    s = socket.socket()
    s.connect(socket.getaddrinfo(host, int(port))[0][-1])
    s = ctx.wrap_socket(s, server_hostname="localhost")
    cid = client_id.encode()
    body = b"\\x00\\x04MQTT\\x04\\x02\\x00\\x1e" + len(cid).to_bytes(2, "big") + cid
    s.write(b"\\x10" + bytes([len(body)]) + body)
    ack = s.read(4)
    heap("HEAP-UP %s" % (ack[:2] == b"\\x20\\x02" and ack[3] == 0))
    print("HEAP-DONE")

main(*sys.argv[1:])
'''


# The breakdown: a copy of a device whose /main.py imports, before starting Keel as
# stage 0 does, the modules the system holds at the measurement one by one (leaves
# first), printing gc.mem_alloc() after each; Keel then finds them loaded. Where the
# code runs in place, the copy first mounts the modules' payloads as the bootloader does
# (its scan and mount: boot_check and the module format are then in the start figure).
ORDER = ("flashfs", "handover", "module_format", "boot_check", "keel_boot", "hal", "hal.device", "hal.ports", "hal.ports.virtual",
         "hal.ports.virtual.link", "hal.status_led", "hal.ports.virtual.status_led", "hal.button",
         "hal.ports.virtual.button", "events", "led", "runtime", "app_loader", "trial", "mqtt", "ota",
         "cloud_session", "keel_system", "timers", "store", "log", "cloud", "keel")
INSTRUMENTED_MAIN = '''\
import gc
import sys
sys.path[:] = ["/keel/m/s1", "/keel/m/s2", "/keel/m/bl", ".frozen", "/lib"]
%s
gc.collect()
print("IMP (start)", gc.mem_alloc())
for name in %r:
    try:
        __import__(name)
    except Exception as e:
        print("IMP-FAILED", name, repr(e))
    gc.collect()
    print("IMP", name, gc.mem_alloc())
del name
sys.path[:] = ["/keel/m/bl"]
import keel_boot
keel_boot.main()
'''


MOUNT_IN_PLACE = '''\
sys.path[:] = ["/keel/m/bl"]
import json
import boot_check
import module_format
with open("/keel/board.json") as f:
    board = json.load(f)
slots = boot_check.load_slots(board)
for s in slots:
    boot_check.scan(s, module_format.platform_id(board["platform"]))
boot_check.mount_in_place(slots)
sys.path[:] = [s.code_dir for s in slots if s.view is not None] + ["/keel/m/bl", ".frozen", "/lib"]
del f, board, slots, s
'''


def breakdown(ctx, device, modules, label, heap, in_place=False) -> tuple[list, int | None]:
    """[(module, bytes its import added)], the total at the same measurement point, and
    what the heap held when /main.py began (the VM, vm_startup's vboard, the mount)."""
    import shutil

    from keel import vdev

    copy = ctx.work / f"{device.name}-instrumented"
    shutil.copytree(device, copy)
    order = [m for m in ORDER if m in modules] + sorted(
        m for m in modules if m not in ORDER and m not in ("main", "vboard", "__main__") and "." not in m)
    vdev.write_files(copy, {"/main.py": (INSTRUMENTED_MAIN % (MOUNT_IN_PLACE if in_place else "",
                                                              order)).encode()})
    console = time_to_marker(keel_vm_command(copy, heap), "HEAP-DONE", timeout=60)[1]
    steps, last, start = [], None, None
    for line in console.splitlines():
        if line.startswith("IMP "):
            name, value = line.split()[1], int(line.split()[2])
            if last is not None:
                steps.append((name, value - last))
            else:
                start = value
            last = value
        elif line.startswith("IMP-FAILED"):
            ctx.log(line)
    total = parse(console).get(label, {}).get("alloc")
    return steps, total, start


_VIRTUAL_START = ("the VM and the virtual board's start-up, vm_startup.py: vboard, its Partition class, "
                  "the mounted filesystem; a real port does this in C")
_TWIN_START = ("on the twin, what the port's start-up allocates after the heap is counted: the "
               "filesystem mounted, sys.path; on the board the same")
_MOUNTED = ("; and here the bootloader's scan and mount of the payloads (boot_check, the module "
            "format, the slots), which a boot releases before the app")


def _split_text(split, total, start, startup):
    kb = lambda x: None if x is None else round(x / KB, 1)  # noqa: E731
    if not split or total is None or start is None:
        return "(the instrumented run failed)"
    biggest = sorted(split, key=lambda x: -x[1])
    imported = sum(b for _, b in split)
    return (f"Breakdown, from an instrumented run (a copy of the device whose /main.py imports these "
            f"modules one by one, gc.collect() and gc.mem_alloc() after each, then starts Keel; "
            f"{kb(total)} KB at the same point): {kb(start)} KB before /main.py ({startup}); the imports "
            f"{kb(imported)} KB: " + ", ".join(f"{n} {kb(b)}" for n, b in biggest if b >= 256)
            + " (each with the names it interns: the pools grow when full, so an import that "
            f"starts a new pool pays for it); the rest, {kb(total - imported - start)} KB, is what "
            f"the boot builds: the board definition, slots, status record, services' state, buffers")


def parse(console: str) -> dict:
    """{label: (mem_alloc, qstr pool bytes)} and the modules line."""
    out = {}
    lines = console.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("HEAP-"):
            parts = line.split()
            if parts[0] in ("HEAP-START", "HEAP-UP"):
                label = parts[0] if parts[0] == "HEAP-START" else "HEAP-UP"
                qstr = next((int(x.rsplit("n_total_bytes=", 1)[1]) for x in lines[i + 1:i + 3]
                             if "n_total_bytes=" in x), None)
                out[label] = {"alloc": int(parts[-2]), "qstr": qstr,
                              "up": parts[1] == "True" if label == "HEAP-UP" else None}
            elif parts[0] == "HEAP-MODULES":
                out["modules"] = parts[1:]
            elif parts[0] == "HEAP-MODULES-UP":
                out["modules_up"] = parts[1:]
            elif parts[0] == "HEAP-IDLE" and parts[1] == "True":
                out["idle"] = int(parts[2])
    return out


def run(ctx):
    from keel import vdev

    runs = ctx.runs(7)
    heap = board_heap()
    src, image = ctx.app("heap", {"main.py": APP})
    (src / "bare_main.py").write_text("import main\nmain.setup()\n")
    tls_script = ctx.work / "heap_tls.py"
    tls_script.write_text(TLS)
    plain = ctx.device("heap-plain", "1.1.0", [image])
    cloud = Cloud(ctx.work / "cloud")
    try:
        online = ctx.device("heap-cloud", "1.1.0", [image])
        cloud.keel("device", "provision", online, "--name", "heap")
        creds = ctx.work / "creds"
        creds.mkdir()
        for name in ("ca.der", "cert.der", "key.der"):
            (creds / name).write_bytes(vdev.read_file(online, f"/keel/cloud/{name}"))
        device_id = (online / "uid").read_text().strip()
        commands = {
            "keel": keel_vm_command(plain, heap),
            "keel_tls": keel_vm_command(online, heap),
            "bare": [micropython(), "-X", f"heapsize={heap}", str(src / "bare_main.py")],
            "bare_tls": [micropython(), "-X", f"heapsize={heap}", str(tls_script), str(creds), "127.0.0.1",
                         str(cloud.mqtt_port), device_id],
        }
        for name in ("keel", "keel_tls"):  # warm-up: the first boot installs the code
            time_to_marker(commands[name], "HEAP-DONE", timeout=60)
        got = {name: [] for name in commands}
        for _ in range(runs):
            for name, cmd in commands.items():
                got[name].append(parse(time_to_marker(cmd, "HEAP-DONE", timeout=60)[1]))
        modules = next((g["modules"] for g in got["keel"] if "modules" in g), [])
        modules_up = next((g["modules_up"] for g in got["keel_tls"] if "modules_up" in g), [])
        split0, total0, start0 = breakdown(ctx, plain, modules, "HEAP-START", heap)
        split1, total1, start1 = breakdown(ctx, online, modules_up, "HEAP-UP", heap)
    finally:
        cloud.stop()

    def series(name, label):
        return [g[label]["alloc"] for g in got[name] if label in g]

    keel0, bare0 = series("keel", "HEAP-START"), series("bare", "HEAP-START")
    keel1 = [g["HEAP-UP"]["alloc"] for g in got["keel_tls"] if g.get("HEAP-UP", {}).get("up")]
    bare1 = [g["HEAP-UP"]["alloc"] for g in got["bare_tls"] if g.get("HEAP-UP", {}).get("up")]
    keel1_idle = series("keel_tls", "HEAP-START")
    qstr = {name: median([g["HEAP-START"]["qstr"] for g in got[name] if g.get("HEAP-START", {}).get("qstr")])
            for name in ("keel", "bare", "keel_tls")}
    qstr_up = median([g["HEAP-UP"]["qstr"] for g in got["keel_tls"] if g.get("HEAP-UP", {}).get("qstr")])
    bare_modules = next((g["modules"] for g in got["bare"] if "modules" in g), [])
    ctx.log(f"without: keel {median(keel0)} bare {median(bare0)}; with: keel {median(keel1)} bare {median(bare1)}")

    kb = lambda x: None if x is None else round(x / KB, 1)  # noqa: E731

    holds = (f"At app start the heap holds {len(modules)} modules ({len(bare_modules)} in bare MicroPython); "
             f"of the {kb(median(keel0))} KB, {kb(qstr['keel'])} KB are the interned names' pools (bare: "
             f"{kb(qstr['bare'])} KB). " + _split_text(split0, total0, start0, _VIRTUAL_START))
    rows = [
        row(FIGURE, "heap in use at setup(), no cloud session", kb(median(keel0)), kb(median(bare0)), "KB",
            Goal.at_most(32, "≤ 32 KB"), runs={"keel": [kb(x) for x in keel0], "baseline": [kb(x) for x in bare0]},
            notes=f"gc.collect() then gc.mem_alloc() in the app's setup(), median of {runs} runs each, heap "
                  f"{heap // KB} KB; baseline: bare MicroPython, same heap, the same app from plain files"),
        row(FIGURE, "heap in use with the cloud session open (TLS + MQTT)", kb(median(keel1)), kb(median(bare1)),
            "KB", Goal.at_most(48, "≤ 48 KB"), runs={"keel": [kb(x) for x in keel1], "baseline": [kb(x) for x in bare1]},
            notes=f"the same app on a provisioned device of `keel cloud serve`: measured once keel.connected() "
                  f"and 0.5 s of system loop later (at setup(), before connecting: {kb(median(keel1_idle))} KB; "
                  f"interned names {kb(qstr['keel_tls'])} KB, {kb(qstr_up)} KB once connected); baseline: bare "
                  f"MicroPython with a mutual-TLS socket to the same cloud (the device's certificate and key) "
                  f"after an MQTT CONNECT/CONNACK, nothing else; {len(keel1)}/{runs} Keel runs connected"),
    ]
    rows.append(_idle_row("", [g["idle"] for g in got["keel_tls"] if "idle" in g], runs))
    if rows[0]["met"] is False:
        rows[0]["limits"] = (f"the system holds {kb(median(keel0) - median(bare0))} KB more than bare MicroPython. "
                             + holds)
    if not ctx.smoke:  # (the twins' boots: the full run; make test's smoke run skips them)
        rows += twin_rows(ctx)
    if rows[1]["met"] is False:
        rows[1]["limits"] = (f"the session adds {kb(median(keel1) - median(keel0))} KB to the device without one "
                             f"(an open TLS session with an MQTT CONNECT costs bare MicroPython "
                             f"{kb(median(bare1) - median(bare0))} KB of its heap on this port); the rest is the "
                             f"session's code and state (cloud_session, mqtt, ota, part 2's keel API and cloud "
                             f"service, their buffers) and interned names (+{kb((qstr_up or 0) - (qstr['keel'] or 0))} "
                             f"KB over the device without a session: the pools double when full); on top of the "
                             f"{kb(median(keel0))} KB of the row above. " + _split_text(split1, total1, start1, _VIRTUAL_START))
    return rows


def _idle_row(where, idle, runs):
    """Bytes allocated in 3 s of the system loop, idle and connected (the same app)."""
    return row(FIGURE, f"{where}bytes allocated in 3 s idle with the session up", median(idle) if idle else None,
               None, "B", Goal.at_most(0, "0 (nothing lasting or passing)"), runs={"keel": idle},
               met=None if idle else False,
               notes=f"2 s after the row above (what follows a connection settles), gc.mem_alloc() before and "
                     f"after keel.delay(3000), no gc.collect() between: everything the passes allocated, garbage "
                     f"included; {len(idle)}/{runs} runs connected; on the ESP32 twin a silent NeoPixel wire (the "
                     f"twin's reports the LED's frames to the host in Python). A keepalive every second is in "
                     f"tests/device/test_cloud_session.py (idle test)")


# ---------------------------------------------------------------- the twins

# (board, platform, label, the firmware build the twin plays: boards/twins/<port>/firmware.json)
TWINS = (("esp32_generic", "esp32", "ESP32 twin", None),
         ("esp32_generic", "esp32", "ESP32 twin, stock firmware", "v1.28-generic"),
         ("nrf52840_dk", "nrf52840", "nRF52840 DK twin", None))


def _twin_console(path, heap=None, seconds=40.0):
    import io

    from keel import vdev

    console = vdev.run(path, seconds=seconds, out=io.BytesIO(), heap=heap,
                       stop_when=lambda c: c.contains("HEAP-DONE"))
    return console.text.decode(errors="replace")


def twin_rows(ctx):
    """Figure 2 on the twins: Keel at setup() (and, on the ESP32, with the session up)
    against bare MicroPython on the same twin (vdev.ask: the port started, the
    filesystem mounted, the same app run from source)."""
    from keel import build, vdev

    runs = ctx.runs(5)
    rows = []
    cloud = None
    try:
        for board, platform, label, firmware in TWINS:
            system = ctx.work / f"system-{platform}"
            if not system.exists():
                build.build_system(platform, "1.1.0", system)
            src = ctx.work / f"src-heap-{platform}"
            src.mkdir(exist_ok=True)
            (src / "main.py").write_text(APP)
            image = build.build_app(src, platform, "1.1.0", ctx.work / f"heap-{platform}.bin")
            path = ctx.work / f"heap-{board}-{firmware or 'default'}"
            vdev.create(path, system, board, firmware=firmware)
            vdev.flash(path, [image])
            _twin_console(path)  # the first boot installs
            keel0, bare0, qstr0 = [], [], []
            for _ in range(runs):
                got = parse(_twin_console(path))
                if "HEAP-START" in got:
                    keel0.append(got["HEAP-START"]["alloc"])
                    qstr0.append(got["HEAP-START"]["qstr"])
                asked = parse(vdev.ask(path, APP + "\nsetup()\n").stdout)
                if "HEAP-START" in asked:
                    bare0.append(asked["HEAP-START"]["alloc"])
            in_place = _in_place(path)
            heap = board_heap(board)
            kb = lambda x: None if x is None else round(x / KB, 1)  # noqa: E731
            k0, b0 = median(keel0) if keel0 else None, median(bare0) if bare0 else None
            r = row(FIGURE, f"{label}: heap in use at setup(), no cloud session", kb(k0), kb(b0), "KB",
                    Goal.at_most(32, "≤ 32 KB"), runs={"keel": [kb(x) for x in keel0],
                                                      "baseline": [kb(x) for x in bare0]},
                    notes=f"the board's heap {heap} bytes; Keel's code {in_place}; gc.collect() then "
                          f"gc.mem_alloc() in setup(), median of {runs} boots; baseline: bare MicroPython "
                          f"on the same twin, the same app from source; interned names' pools "
                          f"{kb(median(qstr0)) if qstr0 else '?'} KB (the twin's own included)")
            if r["met"] is False:
                r["limits"] = (f"Keel holds {kb(k0 - b0) if b0 is not None else '?'} KB more than bare "
                               f"MicroPython on this twin. "
                               f"{TWIN_LIMITS if firmware else IN_PLACE_LIMITS}")
                if platform == "esp32":
                    modules = next((g["modules"] for g in [got] if "modules" in g), [])
                    split, total, start = breakdown(ctx, path, modules, "HEAP-START",
                                                    heap + vdev.twin_firmware_room(path),
                                                    in_place=not firmware)
                    r["limits"] += " " + _split_text(split, total, start, _TWIN_START if firmware else
                                                     _TWIN_START + _MOUNTED)
            rows.append(r)
            if platform == "esp32" and not ctx.smoke:  # (the session's path: the full run only)
                if cloud is None:
                    cloud = Cloud(ctx.work / "cloud-twins")
                rows += _esp32_session_rows(ctx, cloud, path, k0, runs, label, not firmware)
    finally:
        if cloud is not None:
            cloud.stop()
    return rows


# What the twin rows' limits say, beside the figures (boot-flow.md, "What stays in the heap").
TWIN_LIMITS = ("The twin is the 64-bit unix VM: every pointer (dict entries, lists, function objects, "
               "the VM's own tables of interned names) takes 8 bytes where the chip's take 4, so the "
               "figure is above what the board would show; the pools of Keel's interned names are "
               "charged as the board grows them, at the chip's sizes (virtual-board.md, \"Interned "
               "names\"). On the ESP32 the code is extracted (stock firmware "
               "has no VfsRom), so every imported module's bytecode is on the heap: the system "
               "(keel_system, the app loader, events, led, runtime, the connection manager, the HAL "
               "with its port) and the names it interns; the boot's code and the module format are "
               "released before the app starts, and the board definition is kept as a pin table.")
# The nRF52840 DK twin and an ESP32 with ROMFS run the code in place: what stays in the
# heap is not the bytecode.
IN_PLACE_LIMITS = ("The twin is the 64-bit unix VM: every pointer (dict entries, lists, function objects, "
              "the VM's own tables of interned names) takes 8 bytes where the chip's take 4, so the "
              "figure is above what the board would show; the pools of Keel's interned names are "
              "charged as the board grows them, at the chip's sizes (virtual-board.md, \"Interned "
              "names\"). The code runs in place from the ROMFS segment (nRF52840) or the romfs "
              "partition (ESP32) through VfsRom, so the bytecode "
              "stays in flash; what the heap holds is each module's objects (function objects, "
              "globals dicts, classes), the names they intern and the state the system builds.")


def _in_place(path):
    import json as _json

    from keel import vdev

    try:
        doc = _json.loads(vdev.read_file(path, "/keel/status.json"))
    except (FileNotFoundError, ValueError):
        return "(no status)"
    places = {m.get("in_place") for m in doc.get("modules", []) if m.get("function") != "bootloader"}
    return "runs in place (VfsRom)" if places == {True} else "is extracted"


def _esp32_session_rows(ctx, cloud, template, keel0, runs, label, in_place):
    """The ESP32 twin provisioned, with its access point: the session up (or why not)."""
    import json as _json
    import shutil

    from keel import vdev

    path = template.parent / (template.name + "-cloud")
    shutil.copytree(template, path)
    cloud.keel("device", "provision", path, "--name", path.name, "--wifi", "bench-ap",
               "--password", "bench-pass-1")
    cloud.keel("vdev", "wifi", path, "--ap", "bench-ap", "--password", "bench-pass-1")
    ups, frees, idles, why = [], [], [], None
    for _ in range(runs):
        got = parse(_twin_console(path, seconds=60))
        up = got.get("HEAP-UP", {})
        if up.get("up"):
            ups.append(up["alloc"])
        if "idle" in got:
            idles.append(got["idle"])
        status = _json.loads(vdev.read_file(path, "/keel/status.json"))
        running = status.get("mode") == "normal" and status.get("app") == "running"
        if running and status.get("mem", {}).get("heap_free_connected") is not None:
            frees.append(status["mem"]["heap_free_connected"])
        if status.get("safe_mode_reason") == "app-crash":
            try:
                crash = vdev.read_file(path, "/keel/crash.txt").decode().strip().splitlines()[-1]
            except FileNotFoundError:
                crash = "?"
            why = (f"the app, which imports keel, crashed at each boot ({crash}) and the device "
                   f"went to safe mode: with the session's code loaded, the API does not fit")
        elif status.get("cloud"):
            why = f"the status says cloud {status['cloud']!r}"
    kb = lambda x: None if x is None else round(x / KB, 1)  # noqa: E731
    k1 = median(ups) if ups else None
    r1 = row(FIGURE, f"{label}: heap in use with the cloud session open (TLS + MQTT)", kb(k1), None, "KB",
             Goal.at_most(48, "≤ 48 KB"), runs={"keel": [kb(x) for x in ups]},
             met=None if ups else False,
             notes=f"provisioned, joined to the twin's access point, {len(ups)}/{runs} boots connected; "
                   f"no bare baseline on the twin (its TLS baseline is the virtual board's row)")
    free = median(frees) if frees else None
    r2 = row(FIGURE, f"{label}: free heap the app has with the session up", kb(free), None, "KB",
             Goal(text="≥ 60 KB", test=lambda r: r["keel"] is not None and r["keel"] >= 60),
             runs={"keel": [kb(x) for x in frees]}, met=None if frees else False,
             notes="status mem.heap_free_connected (gc.collect() once the session first came up), "
                   "from boots where the app was running (not safe mode)")
    text = IN_PLACE_LIMITS if in_place else TWIN_LIMITS
    if not ups:
        text = (f"the app never saw the session up: {why or 'no connection within 10 s'} "
                f"(Keel at setup() {kb(keel0)} KB of the board's {kb(board_heap('esp32_generic'))} KB, "
                f"the session's code on top). " + TWIN_LIMITS)
    r3 = _idle_row(f"{label}: ", idles, runs)
    for r in (r1, r2, r3):
        if r["met"] is False:
            r["limits"] = text
    return [r1, r2, r3]
