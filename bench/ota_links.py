#!/usr/bin/env python3
"""OTA over shaped links: one update per link profile (bench/linkshaper.py) from
`keel cloud serve` (embedded broker) to a virtual device on the MicroPython VM, the way
tests/cloud/test_ota_faults.py does it, and what it achieved:

    .venv/bin/python bench/ota_links.py                      # wifi cellular flaky chaos
    .venv/bin/python bench/ota_links.py cellular chaos -n 3  # three runs of each
    .venv/bin/python bench/ota_links.py --in-flight 3072     # the sender with a fixed bound
    .venv/bin/python bench/ota_links.py --json               # one JSON object per run

Per run: the image's size, the time from the offer to the last chunk acknowledged
("xfer", what the link limits; the device's SHA-256 check and install come after),
goodput (image bytes / xfer) as a fraction of the profile's rate, chunk bytes sent per
image byte (the sender's own count: 1.00 is nothing sent twice), chunks the device got
twice, the link's drops and stalls, and the sender's path estimate at the end (delivery
rate, minimum RTT, in-flight limit).

The shaper sits between the device and the cloud's MQTT port (both directions shaped
alike, TLS through it); the device connects over a clean link, the profile is switched
on for the transfer and off again for the install (set_profile restarts the profile's
drop and stall schedule, so every run of a profile meets the same faults at the same
link bytes). One device takes every run: each image differs (a random padding module),
and the bench waits for each to run before the next.

The cloud runs in a child process (this file with `_serve`), as `keel cloud serve`
does, with OtaSender.send wrapped to write each transfer's result and timings to a
file; `--in-flight N` makes that cloud's sender keep a fixed bound of N bytes instead
of its adaptive one (a comparison)."""

import argparse
import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import free_port, wait_until  # noqa: E402
from bench.linkshaper import PROFILES, LinkShaper, profile  # noqa: E402

KB = 1024
DEFAULT_PROFILES = ("wifi", "cellular", "flaky", "chaos")
DEFAULT_SIZE = 230 * KB  # issue 7's OTA figures: a module of about 230 KB (256 KB slot)
BIN = Path(sys.executable).parent


# The cloud, in a child process

def _serve(argv: list[str]) -> int:
    """`ota_links.py _serve RESULTS IN_FLIGHT SETTINGS serve-args…`: keel cloud serve,
    with each transfer's result (and timings) appended to RESULTS as a JSON line;
    SETTINGS: JSON {name: value} of keel_cloud.ota_sender's constants to change."""
    results, in_flight, settings, rest = argv[0], int(argv[1]), json.loads(argv[2]), argv[3:]
    import keel_cloud.ota_sender as ota
    import keel_cloud.fleet_service as service
    from keel.cli import main

    if os.environ.get("OTA_LINKS_LOG"):  # the sender's debug log, to a file
        import logging

        handler = logging.FileHandler(os.environ["OTA_LINKS_LOG"])
        handler.setFormatter(logging.Formatter("%(relativeCreated)d %(message)s"))
        logging.getLogger("keel.cloud.ota").addHandler(handler)
        logging.getLogger("keel.cloud.ota").setLevel(logging.DEBUG)
    for name, value in settings.items():
        if not hasattr(ota, name):
            raise SystemExit(f"keel_cloud.ota_sender has no {name}")
        setattr(ota, name, value)

    base = ota.OtaSender

    class Measured(base):
        def __init__(self, *args, **kwargs):
            if in_flight:
                kwargs["in_flight"] = in_flight
            super().__init__(*args, **kwargs)

        def send(self, device_id, image, module, progress_cb=None, **kwargs):
            times = {"offer": time.monotonic(), "first": None, "acked": None}

            def progress(done):
                now = time.monotonic()
                if done and times["first"] is None:
                    times["first"] = now
                if done >= len(image) and times["acked"] is None:
                    times["acked"] = now
                if progress_cb:
                    progress_cb(done)

            record = {"size": len(image)}
            try:
                result = super().send(device_id, image, module, progress, **kwargs)
                record.update(result)
                return result
            except ota.OtaError as e:
                record["error"] = str(e)
                raise
            finally:
                record["done"] = time.monotonic() - times["offer"]
                if times["acked"] is not None:
                    record["xfer"] = times["acked"] - times["offer"]
                with open(results, "a") as f:
                    f.write(json.dumps(record) + "\n")

    service.OtaSender = Measured
    return main(["cloud", "serve", *rest])


class CloudProcess:
    def __init__(self, data: Path, in_flight: int, settings: dict):
        self.data = data
        self.results = data.parent / "results.jsonl"
        self.mqtt_port = free_port()
        self.env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", KEEL_CLOUD=str(data))
        cmd = [sys.executable, __file__, "_serve", str(self.results), str(in_flight), json.dumps(settings),
               "--data", str(data), "--mqtt", f"127.0.0.1:{self.mqtt_port}", "--http", f"127.0.0.1:{free_port()}"]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        if "Keel Cloud:" not in line:
            raise RuntimeError(line + self.proc.stdout.read())
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def keel(self, *args) -> str:
        proc = subprocess.run(["keel", *map(str, args)], env=self.env, capture_output=True, text=True, timeout=300)
        if proc.returncode:
            raise RuntimeError(f"keel {args}: {proc.stderr}")
        return proc.stdout

    def online(self, name: str) -> bool:
        return any(d["name"] == name and d["online"] for d in json.loads(self.keel("list", "--json")))

    def last_result(self) -> dict:
        return json.loads(self.results.read_text().splitlines()[-1])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)


# The device and its images

def padded_app(folder: Path, marker: str, padding: int, seed: int) -> Path:
    """An app whose image is about `padding` bytes bigger than its code: a module the app
    never imports holds random (incompressible) text (as test_ota_faults.py builds it)."""
    from keel import build

    src = folder / f"app-{seed}"
    src.mkdir()
    (src / "main.py").write_text(f"def setup():\n    print({marker!r})\n\n\ndef loop():\n    pass\n")
    text = base64.b64encode(random.Random(seed).randbytes(padding * 3 // 4)).decode()
    lines = "\n".join(f"    {text[i:i + 76]!r}" for i in range(0, len(text), 76))
    (src / "padding.py").write_text(f"DATA = (\n{lines}\n)\n")
    return build.build_app(src, "virtual", None, folder / f"app-{seed}.bin", app_version="3.0.0")


class Device:
    def __init__(self, path: Path):
        from keel import vdev

        self.path = path
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(
            target=vdev.run, args=(path,),
            kwargs={"seconds": 24 * 3600, "out": io.BytesIO(), "stop_when": lambda c: self.stop_flag.is_set()},
            daemon=True)
        self.thread.start()

    def console(self) -> str:
        from keel import vio

        try:
            return (self.path / vio.CONSOLE_LOG).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self):
        self.stop_flag.set()
        self.thread.join(10)


# One transfer

def run_one(cloud: CloudProcess, shaper: LinkShaper, device: Device, work: Path, name,
            size: int, seed: int, timeout: float) -> dict:
    """One transfer over a link profile (a name in PROFILES or a Profile); the result
    also names the image (`image`: its path) and counts the bytes the link carried down,
    cloud -> device, lost at drops included (`link_down`: TLS and MQTT included)."""
    from keel_cloud.client import ApiClient
    from keel_cloud.config import CloudDir

    prof = profile(name)
    name = prof.name
    marker = f"padded app {seed} is running"
    image = padded_app(work, marker, size, seed)
    data = image.read_bytes()
    module = {"function": "user-part", "index": 1, "version": "3.0.0", "platform": "virtual"}
    api = ApiClient(CloudDir(cloud.data))
    before = shaper.stats()
    shaper.set_profile(prof)
    transfer = api.flash("bench", data, module)["transfer"]
    deadline = time.monotonic() + timeout
    while (record := api.transfer(transfer))["state"] == "sending":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: the transfer did not finish in {timeout:g} s")
        time.sleep(0.2)
    link = shaper.stats()
    shaper.set_profile("clean")
    if record["state"] != "pending":
        raise RuntimeError(f"{name}: {record.get('error')}")
    result = cloud.last_result()
    wait_until(lambda: marker in device.console(), 120, f"the new app running after '{name}'")
    wait_until(lambda: cloud.online("bench"), 60, "the device back online")
    rate = prof.rate
    xfer = result.get("xfer") or result["done"]
    return {
        "profile": name, "size": len(data), "xfer_s": round(xfer, 2), "done_s": round(result["done"], 2),
        "goodput": round(len(data) / xfer), "link_rate": rate,
        "of_link": round(len(data) / xfer / rate, 3) if rate else None,
        "sent_per_byte": round(result["bytes_sent"] / len(data), 4),
        "resent": result.get("resent"), "duplicates": result.get("duplicates"),
        "offers": result.get("offers"), "path": result.get("path"),
        "drops": link["drops"] - before["drops"], "stalls": link["stalls"] - before["stalls"],
        "connections": link["connections"] - before["connections"],
        "link_down": link["bytes_down"] + link["lost_down"] - before["bytes_down"] - before["lost_down"],
        "image": str(image),
    }


def line(r: dict) -> str:
    of = f"{r['of_link']:.2f} of link" if r["of_link"] else "(no rate)"
    path = r.get("path") or {}
    est = ""
    if path:
        est = (f"  est {path.get('rate', 0) / KB:.1f} KB/s, rtt {1000 * (path.get('min_rtt') or 0):.0f} ms,"
               f" limit {path.get('limit', 0) / KB:.1f} KB")
    return (f"{r['profile']:9s} {r['size'] / KB:6.1f} KB  xfer {r['xfer_s']:6.2f} s  "
            f"{r['goodput'] / KB:6.1f} KB/s = {of:12s}  sent/byte {r['sent_per_byte']:.3f}  "
            f"dups {r['duplicates']}  drops {r['drops']} stalls {r['stalls']}{est}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_serve"]:
        return _serve(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profiles", nargs="*", default=list(DEFAULT_PROFILES),
                        help=f"link profiles (default: {' '.join(DEFAULT_PROFILES)}; known: {', '.join(PROFILES)})")
    parser.add_argument("-n", "--runs", type=int, default=1, help="runs of each profile (default 1)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image padding in bytes (default 230 KB)")
    parser.add_argument("--in-flight", type=int, default=0,
                        help="a fixed in-flight bound in bytes instead of the adaptive one (0: adaptive)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="change a constant of keel_cloud.ota_sender in the cloud (e.g. GAIN=1.25)")
    parser.add_argument("--seed", type=int, default=5, help="the shaper's seed (drop and stall points)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per transfer")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run")
    args = parser.parse_args(argv)
    for name in args.profiles:
        if name not in PROFILES:
            parser.error(f"no link profile '{name}' (known: {', '.join(PROFILES)})")

    from keel import build, vdev

    with tempfile.TemporaryDirectory(prefix="ota-links-") as tmp:
        work = Path(tmp)
        system = work / "system"
        build.build_system("virtual", "1.1.0", system)
        settings = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
        cloud = CloudProcess(work / "cloud", args.in_flight, settings)
        shaper = device = None
        try:
            dev_dir = work / "bench"
            vdev.create(dev_dir, system)
            vdev.flash(dev_dir, [build.build_app(ROOT / "examples" / "hello", "virtual", None, work / "hello.bin")])
            cloud.keel("device", "provision", dev_dir, "--name", "bench")
            shaper = LinkShaper(0, "127.0.0.1", cloud.mqtt_port, "clean", seed=args.seed).start()
            conn = json.loads(vdev.read_file(dev_dir, "/keel/cloud/cloud.json"))
            conn.update(host="127.0.0.1", port=shaper.port)
            vdev.write_files(dev_dir, {"/keel/cloud/cloud.json": json.dumps(conn).encode()})
            device = Device(dev_dir)
            wait_until(lambda: cloud.online("bench"), 60, "the device online")
            mode = f"fixed {args.in_flight} B in flight" if args.in_flight else "adaptive in-flight limit"
            if settings:
                mode += " " + " ".join(f"{k}={v}" for k, v in settings.items())
            if not args.json:
                print(f"# {mode}; padding {args.size / KB:.0f} KB; seed {args.seed}", flush=True)
            seed = 100
            for _ in range(args.runs):
                for name in args.profiles:
                    seed += 1
                    r = run_one(cloud, shaper, device, work, name, args.size, seed, args.timeout)
                    r["mode"] = mode
                    print(json.dumps(r) if args.json else line(r), flush=True)
        finally:
            if device:
                device.stop()
            if shaper:
                shaper.stop()
            cloud.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
