#!/usr/bin/env python3
"""Keel's benchmarks: every figure of issue 7 side by side with its baseline, in one run.

    .venv/bin/python bench/run.py                 # every figure; writes bench/results.{md,json}
    .venv/bin/python bench/run.py --only heap     # one figure (name or number); updates its rows
    .venv/bin/python bench/run.py --smoke         # each figure once, tiny sizes, no files written
    .venv/bin/python bench/run.py --list

Benchmarks report; they do not fail: a figure that misses its goal says so (and what
limits it), and a figure that breaks becomes a row saying so, while the others go on.
Only --smoke exits non-zero, when a figure breaks or returns malformed rows (that is
what `make test` checks). The figure modules' contract is in bench/README.md."""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import Context, check_row, micropython  # noqa: E402

# The registry: (name, module), in the table's order. A figure is one module with
# FIGURE, TITLE and run(ctx) -> rows (bench/README.md). A module not written yet shows
# as "not built yet" in the table; adding a figure is adding its line here.
FIGURES = [
    ("boot", "bench.fig_boot"),            # 1: VM start to setup(), vs bare MicroPython
    ("heap", "bench.fig_heap"),            # 2: heap in use at app start, without/with the cloud session
    ("ota_alloc", "bench.fig_ota_alloc"),  # 3: bytes allocated per OTA chunk on the device
    ("ota", "bench.fig_ota"),              # 4: OTA goodput over shaped links vs a plain HTTP GET
    ("heal", "bench.fig_heal"),            # 5: healing time vs transfers at link rate + boots
    ("fleet", "bench.fig_fleet"),          # 6: fleet scale
    ("sign", "bench.fig_sign"),            # 7: checking a signed module on the device
]
NUMBERS = {"boot": 1, "heap": 2, "ota_alloc": 3, "ota": 4, "heal": 5, "fleet": 6, "sign": 7}  # (before they load)

RESULTS_JSON = ROOT / "bench" / "results.json"
RESULTS_MD = ROOT / "bench" / "results.md"


def load(module_name: str):
    if importlib.util.find_spec(module_name) is None:
        return None
    return importlib.import_module(module_name)


def machine() -> dict:
    try:
        mp = subprocess.run([micropython(), "-c", "import sys; v = sys.implementation.version; "
                             "print('%d.%d.%d' % v[:3] + ('-' + v[3] if len(v) > 3 and v[3] else '') + ' ('"
                             " + sys.version.split('; ')[1].split(' ', 1)[1] + ')')"],
                            capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        mp = "?"
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load_avg = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load_avg = None
    return {"nproc": os.cpu_count(), "cpu": cpu, "os": platform.platform(), "python": platform.python_version(),
            "micropython": mp, "load_at_start": load_avg}


def run_figure(name: str, module_name: str, args, scratch: Path) -> dict:
    """One figure: its entry in results.json ({name, figure, title, duration_s, rows,
    error}). A figure that raises gets one row saying so."""
    module = load(module_name)
    if module is None:
        return {"name": name, "figure": NUMBERS.get(name), "title": None, "duration_s": 0, "error": None,
                "missing": True, "rows": []}
    work = scratch / name
    work.mkdir(parents=True)
    ctx = Context(smoke=args.smoke, work=work, quiet=args.quiet, _systems=args.systems, _name=name)
    started = time.monotonic()
    error = None
    rows = []
    print(f"figure {module.FIGURE} ({name}): {module.TITLE}", file=sys.stderr, flush=True)
    try:
        rows = list(module.run(ctx))
    except Exception:  # noqa: BLE001 - a broken figure is reported, the others go on
        error = traceback.format_exc()
        print(error, file=sys.stderr)
    duration = time.monotonic() - started
    if error is None:
        for r in rows:
            problems = check_row(r)
            if problems:
                error = f"malformed row {r.get('what')!r}: {'; '.join(problems)}"
                print(error, file=sys.stderr)
    if error is not None and not args.smoke:
        last = error.strip().splitlines()[-1]
        rows.append({"figure": module.FIGURE, "what": f"{module.TITLE}: not measured", "keel": None,
                     "baseline": None, "unit": "", "ratio": None, "goal": None, "met": None, "runs": {},
                     "spread": {}, "limits": f"the benchmark failed: {last}", "notes": None})
    print(f"figure {module.FIGURE} ({name}): {duration:.1f} s", file=sys.stderr, flush=True)
    return {"name": name, "figure": module.FIGURE, "title": module.TITLE, "duration_s": round(duration, 1),
            "error": error, "rows": rows}


# The table

def fmt(x, unit="") -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if abs(x) >= 100:
            text = f"{x:.0f}"
        elif abs(x) >= 10:
            text = f"{x:.1f}"
        else:
            text = f"{x:.3g}"
    else:
        text = str(x)
    return f"{text} {unit}".strip()


def fmt_spread(r: dict) -> str:
    parts = []
    for who, s in r.get("spread", {}).items():
        if s and s.get("n", 0) > 1:
            parts.append(f"{who} {fmt(s['min'])}–{fmt(s['max'])} (n={s['n']})")
        elif s:
            parts.append(f"{who} n=1")
    return "; ".join(parts)


def met_text(met) -> str:
    return {True: "yes", False: "**missed**", None: "—"}[met]


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(doc: dict) -> str:
    m = doc["machine"]
    out = [
        "# Keel benchmarks",
        "",
        f"Written by `make bench` (`bench/run.py`) on {doc['date']} in {doc['duration_s'] / 60:.1f} min: "
        f"{m['nproc']} CPUs ({m['cpu'] or 'unknown CPU'}), load {m['load_at_start']} at the start, "
        f"Python {m['python']}, MicroPython {m['micropython']}. Each figure is the median of its runs, "
        f"taken in the same run as its baseline (interleaved where both are measured); the spread is "
        f"min–max over the runs. A missed goal is reported as missed, with what limits it. How each is "
        f"measured: [bench/README.md](README.md).",
        "",
        "| figure | what | Keel | baseline | ratio | goal | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for fig in doc["figures"]:
        if fig.get("missing"):
            out.append(f"| {fig['figure'] or '?'} | {fig['name']}: not built yet | — | — | — | — | — |")
            continue
        for r in fig["rows"]:
            ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}×"
            out.append(f"| {r['figure']} | {cell(r['what'])} | {cell(fmt(r['keel'], r['unit']))} | "
                       f"{cell(fmt(r['baseline'], r['unit']))} | {ratio} | {cell(r['goal'] or '—')} | "
                       f"{met_text(r['met'])} |")
    out.append("")
    for fig in doc["figures"]:
        if fig.get("missing"):
            continue
        out += [f"## {fig['figure']}. {fig['title']}", "", f"Took {fig['duration_s']:.0f} s.", ""]
        for r in fig["rows"]:
            out.append(f"- **{r['what']}**: Keel {fmt(r['keel'], r['unit'])}, baseline "
                       f"{fmt(r['baseline'], r['unit'])}, goal {r['goal'] or '—'}: {met_text(r['met'])}.")
            sp = fmt_spread(r)
            if sp:
                out.append(f"  Spread: {sp}.")
            if r.get("limits"):
                out.append(f"  {'Limits' if r['met'] is False else 'Note'}: {r['limits']}")
            if r.get("notes"):
                out.append(f"  How: {r['notes']}")
        out.append("")
    return "\n".join(out)


def write(doc: dict) -> None:
    RESULTS_JSON.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    RESULTS_MD.write_text(markdown(doc))


def merge(old: dict | None, new: dict) -> dict:
    """--only: the new figure's entry replaces its old one; the rest stays."""
    if not old:
        return new
    by_name = {f["name"]: f for f in old.get("figures", [])}
    for f in new["figures"]:
        by_name[f["name"]] = f
    order = [name for name, _ in FIGURES] + [n for n in by_name if n not in dict(FIGURES)]
    out = dict(old)
    out["figures"] = [by_name[n] for n in order if n in by_name]
    out.setdefault("partial_updates", []).append(
        {"date": new["date"], "figures": [f["name"] for f in new["figures"]], "duration_s": new["duration_s"]})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="each figure once with tiny sizes; writes nothing; exits 1 if a figure breaks")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this figure (name or number; repeatable)")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results.*")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress lines from the figures")
    parser.add_argument("--list", action="store_true", help="list the figures")
    args = parser.parse_args(argv)

    if args.list:
        for name, module_name in FIGURES:
            module = load(module_name)
            print(f"{name:10s} {module.FIGURE if module else NUMBERS.get(name, '?')}  "
                  f"{module.TITLE if module else '(not built yet)'}")
        return 0
    chosen = FIGURES
    if args.only:
        chosen = []
        for want in args.only:
            match = [(n, m) for n, m in FIGURES if want == n or want == str(NUMBERS.get(n)) or
                     (load(m) is not None and want == str(load(m).FIGURE))]
            if not match:
                parser.error(f"no figure {want!r} (known: {', '.join(n for n, _ in FIGURES)})")
            chosen += match

    started = time.monotonic()
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info = machine()
    scratch = Path(tempfile.mkdtemp(prefix="keel-bench-"))
    args.systems = {}
    try:
        figures = [run_figure(name, module_name, args, scratch / "figures") for name, module_name in chosen]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    doc = {"date": date, "machine": info, "smoke": args.smoke, "duration_s": round(time.monotonic() - started, 1),
           "figures": figures}
    print(f"bench: {doc['duration_s']:.0f} s in all", file=sys.stderr)
    if args.json:
        print(json.dumps(doc, indent=1, ensure_ascii=False))
    else:
        print(markdown(doc))
    if args.smoke:
        broken = [f["name"] for f in figures if f.get("error")]
        if broken:
            print(f"bench --smoke: broken: {', '.join(broken)}", file=sys.stderr)
            return 1
        return 0
    if not args.no_write:
        old = None
        if args.only and RESULTS_JSON.exists():
            old = json.loads(RESULTS_JSON.read_text())
        write(merge(old, doc) if args.only else doc)
        print(f"bench: wrote {RESULTS_MD.relative_to(ROOT)} and {RESULTS_JSON.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
