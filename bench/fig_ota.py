"""Figure 4, OTA goodput over shaped links: a 256 KB module (a user part of 255 KB,
the user slot being 256 KB) sent by Keel's OTA against one plain HTTP GET of the same
image by the same (virtual) device, through the same link profile of
bench/linkshaper.py.

Keel (bench/ota_links.py's run_one): `keel cloud serve` (embedded broker) in a child
process, a provisioned virtual device on the MicroPython VM (the board's 192 KB heap)
whose MQTT connection (TLS) goes through a LinkShaper; the device connects over a clean
link, the profile is switched on for the transfer and off for the install. Each run
sends a new image (random padding, incompressible). Measured by the cloud's sender:
the time from the offer to the last chunk acknowledged ("xfer"; the device's SHA-256
check and install come after), and the chunk bytes it published (resent ones
included). The bench waits for each image to run before the next.

Baseline (bench/http_baseline.py): the same image served by http.server on the host,
through a second LinkShaper with the same profile, fetched on the MicroPython VM (same
heap) by a small HTTP GET client of its own (not Keel's code), which writes it block by
block into a file-backed staging partition and after a drop starts over from byte 0
(what simple MicroPython OTA libraries do). Measured on the device: first connect to
the last byte written; bytes: what the link carried down from the server, lost at drops
included (the shaper's count: the HTTP headers are ~160 bytes per attempt).

Rows: goodput (image bytes / time) as a fraction of the link rate on "wifi"
(500 KB/s, 10 ms RTT) and "cellular" (16 KB/s, 300 ms), goal ≥ 0.85; bytes sent per
image byte on "flaky" (cellular with the connection dropped every 64 KB of link
bytes), goal ≤ 1.05. On flaky the baseline never completes (every attempt is cut at
64 KB of a 255 KB image): it is capped at 8 attempts, twice the image's bytes, and its
figure is a lower bound. Runs are interleaved (per round: wifi, cellular, flaky, each
Keel then baseline on the same image); medians of 3 runs on wifi and cellular; on
flaky 2 Keel runs (each takes about a minute at ~0.25 of the link: after the first drop
the sender keeps 2 chunks in flight, and the device reconnects after each drop) and 1 baseline run
(deterministic to the byte: every attempt is cut at the same link offset), to keep the
figure near its 5-minute budget.

Smoke: an 8 KB image, one run of each, with "flaky" on the wifi rate dropping once,
4 KB into the transfer (a reconnection's TLS handshake takes a few KB of link bytes)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common import KB, Goal, median, point_device_at, row
from bench.linkshaper import PROFILES, LinkShaper

FIGURE = 4
TITLE = "OTA goodput over shaped links (256 KB module) vs a plain HTTP GET"

PADDING = 255 * KB  # the image: ~255.2 KB, in the 256 KB user slot
SMOKE_PADDING = 8 * KB
GOODPUT_GOAL = 0.85
BYTES_GOAL = 1.05
CAP_ATTEMPTS = 8  # the flaky baseline: 8 x 64 KB = twice the image, then it gives up
SMOKE_CAP = 2


def profiles(smoke: bool) -> dict:
    if not smoke:
        return {name: PROFILES[name] for name in ("wifi", "cellular", "flaky")}
    return {"wifi": PROFILES["wifi"], "cellular": PROFILES["cellular"],
            "flaky": PROFILES["flaky"].but(rate=PROFILES["wifi"].rate, rtt=0.010, drop_every=4 * KB, max_drops=1)}


def measure_baseline(ctx, shaper: LinkShaper, prof, image: bytes, cap: int) -> dict:
    from bench.http_baseline import fetch

    before = shaper.stats()
    shaper.set_profile(prof)
    try:
        r = fetch(ctx.work / "http", shaper.port, image, max_attempts=cap if prof.drop_every else 1)
    finally:
        after = shaper.stats()
        shaper.set_profile("clean")
    r["link_down"] = after["bytes_down"] + after["lost_down"] - before["bytes_down"] - before["lost_down"]
    r["drops"] = after["drops"] - before["drops"]
    if not prof.drop_every and not r["sha_ok"]:
        raise RuntimeError(f"the HTTP GET over {prof.name} did not deliver the image: {r}")
    if r["done"] and r["seconds"] > 0:
        r["of_link"] = round(len(image) / r["seconds"] / prof.rate, 3)
    r["per_byte"] = round(r["link_down"] / len(image), 4)
    return r


def run(ctx) -> list[dict]:
    from keel import build, vdev

    from bench.http_baseline import ImageServer
    from bench.ota_links import CloudProcess, Device, run_one, wait_until

    n = ctx.runs(3)
    # runs per profile, Keel / baseline: a flaky Keel transfer takes about a minute, its baseline
    # is deterministic to the byte (and capped): the figure's budget is ~5-6 minutes
    counts = {"wifi": (n, n), "cellular": (n, n), "flaky": (ctx.runs(2), ctx.runs(1))}
    size = SMOKE_PADDING if ctx.smoke else PADDING
    cap = SMOKE_CAP if ctx.smoke else CAP_ATTEMPTS
    profs = profiles(ctx.smoke)
    keel = {name: [] for name in profs}
    base = {name: [] for name in profs}
    started = time.monotonic()

    cloud = CloudProcess(ctx.work / "cloud", 0, {})
    shaper = http_shaper = server = device = None
    try:
        dev = ctx.work / "bench"
        vdev.create(dev, ctx.system("1.1.0"))
        vdev.flash(dev, [build.build_app(Path(__file__).resolve().parents[1] / "examples" / "hello", "virtual",
                                         None, ctx.work / "hello.bin")])
        cloud.keel("device", "provision", dev, "--name", "bench")
        shaper = LinkShaper(0, "127.0.0.1", cloud.mqtt_port, "clean", seed=5).start()
        point_device_at(dev, shaper.port)
        device = Device(dev)
        wait_until(lambda: cloud.online("bench"), 90, "the device online")
        ctx.log(f"device online after {time.monotonic() - started:.1f} s")
        server = ImageServer(b"").start()
        http_shaper = LinkShaper(0, "127.0.0.1", server.port, "clean", seed=5).start()
        seed = 100
        for i in range(n):
            for name, prof in profs.items():
                seed += 1
                if i < counts[name][0]:
                    k = run_one(cloud, shaper, device, ctx.work, prof, size, seed, timeout=300)
                    keel[name].append(k)
                    ctx.log(f"run {i + 1} {name}: keel {k['xfer_s']} s, {k['of_link']} of link, "
                            f"{k['sent_per_byte']} B/B")
                    server.image = Path(k["image"]).read_bytes()
                if i < counts[name][1]:
                    b = measure_baseline(ctx, http_shaper, prof, server.image, cap)
                    base[name].append(b)
                    ctx.log(f"run {i + 1} {name}: http {b['seconds']} s, {b.get('of_link')} of link, "
                            f"{b['per_byte']} B/B, {b['attempts']} attempts{'' if b['done'] else ' (gave up)'}")
    finally:
        if device:
            device.stop()
        for thing in (shaper, http_shaper, server):
            if thing:
                thing.stop()
        cloud.stop()
    ctx.log(f"figure 4 measured in {time.monotonic() - started:.0f} s")
    (ctx.work / "runs.json").write_text(json.dumps({"keel": keel, "baseline": base}, indent=1))
    return rows(keel, base, profs, size, cap, ctx.smoke)


def _desc(prof) -> str:
    text = f"{prof.rate / KB:g} KB/s, {1000 * prof.rtt:g} ms"
    if prof.drop_every:
        text += f", drop every {prof.drop_every // KB} KB"
    return text


def rows(keel: dict, base: dict, profs: dict, size: int, cap: int, smoke: bool) -> list[dict]:
    out = []
    image_kb = (keel["wifi"][0]["size"] / KB) if keel["wifi"] else size / KB
    for name in ("wifi", "cellular"):
        prof = profs[name]
        k = [r["of_link"] for r in keel[name]]
        b = [r["of_link"] for r in base[name]]
        km, bm = median(k), median(b)
        limits = None
        if km is not None and km < GOODPUT_GOAL:
            limits = LIMITS.get(name, "see the method")
        notes = (f"{image_kb:.0f} KB image; Keel: offer → last chunk acknowledged, at the cloud "
                 f"(median {median([r['xfer_s'] for r in keel[name]])} s, "
                 f"{median([r['link_down'] / r['size'] for r in keel[name]]):.3f} link bytes down per image "
                 f"byte with TLS and MQTT); HTTP GET: first connect → last byte written, on the device "
                 f"(median {median([r['seconds'] for r in base[name]])} s). Fraction of the link's "
                 f"{prof.rate / KB:g} KB/s; medians of {len(k)} interleaved runs.")
        out.append(row(FIGURE, f"goodput, {name} ({_desc(prof)})", km, bm, "of link rate",
                       Goal(f"≥ {GOODPUT_GOAL} of the link rate", lambda r: r["keel"] >= GOODPUT_GOAL),
                       runs={"keel": k, "baseline": b}, limits=limits, notes=notes))
    prof = profs["flaky"]
    k = [r["sent_per_byte"] for r in keel["flaky"]]
    b = [r["per_byte"] for r in base["flaky"]]
    done = sum(1 for r in base["flaky"] if r["done"])
    km, bm = median(k), median(b)
    per_attempt = base["flaky"][0]["per_attempt"] if base["flaky"] else []
    notes = (f"{image_kb:.0f} KB image. Keel: chunk bytes the cloud published (resent included) per image byte "
             f"(median {median([r['link_down'] / r['size'] for r in keel['flaky']]):.3f} link bytes down per "
             f"image byte with TLS and MQTT; {median([r['drops'] for r in keel['flaky']])} drops; "
             f"{median([r['of_link'] for r in keel['flaky']])} of the link rate). HTTP GET: bytes the link carried "
             f"down from the server (lost at drops included) per image byte; it completed in {done} of "
             f"{len(b)} runs (body bytes per attempt: {per_attempt}), starting over after each drop")
    if done < len(b):
        notes += (f"; every attempt is cut at the next drop before the end of the image, so it never completes: "
                  f"capped at {cap} attempts, its figure is a lower bound (unbounded in fact)")
    notes += f". Medians of {len(k)} interleaved runs."
    limits = None
    if km is not None and km > BYTES_GOAL:
        limits = ("chunks in flight at each drop are lost and sent again: the in-flight limit "
                  "(rate × min RTT, ≤ 4 % of the bytes between drops) is what a drop costs")
    out.append(row(FIGURE, f"bytes sent per image byte, flaky ({_desc(prof)})", km, bm, "B/B",
                   Goal.at_most(BYTES_GOAL, f"≤ {BYTES_GOAL} B/B"), runs={"keel": k, "baseline": b},
                   limits=limits, notes=notes))
    return out


LIMITS = {
    "wifi": ("the device's receive window of 8 chunks (rate × min RTT ≈ 300 KB/s × 24 ms + 1 chunk fills "
             "it) and its speed on the MicroPython VM: per 1 KB chunk a TLS record decrypted, an MQTT message "
             "parsed, a flash write and a bitmap write, an acknowledgement (TLS, MQTT QoS 1) every 2 chunks; "
             "the plain GET on the same VM has none of that (no TLS, 4 KB writes). A window of 32 gave 0.56 "
             "(still short of 0.85: ~10-12 KB in flight, VM-bound) but 1.11 B/B on flaky: not kept "
             "(docs/protocol.md)"),
    "cellular": ("per-chunk overhead (MQTT and TLS framing: ~90 B on 1024-byte chunks ≈ 0.91 of the link at "
                 "best), the offer's round trip and the slow start from 3 chunks at 300 ms RTT"),
}
