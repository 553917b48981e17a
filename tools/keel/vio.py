"""The host's view of a running virtual board's pins and peripherals (keel vdev io).

The VM appends state changes to <device>/io.log as JSON lines (new each boot) and
reads commands appended to <device>/io.in; the runner keeps the console in
<device>/console.log. See docs/virtual-board.md."""

import itertools
import json
import os
import time
from pathlib import Path

from keel.errors import KeelError

IO_LOG = "io.log"
IO_IN = "io.in"
CONSOLE_LOG = "console.log"
CONSOLE_LINES = 20
EVENT_LINES = 20


def read_records(device_dir: Path) -> list[dict]:
    path = Path(device_dir) / IO_LOG
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line the VM is still writing
    return records


# The status LED's colours as the system draws them (system/core/led.py COLORS).
LED_COLORS = {"white": (255, 255, 255), "green": (0, 255, 0), "cyan": (0, 255, 255),
              "magenta": (255, 0, 255), "yellow": (255, 255, 0), "red": (255, 0, 0),
              "blue": (0, 0, 255)}
LED_FRAMES = 25  # about a second of a twin's frames (only changes are reported)


def _shade_of(frame, rgb) -> bool:
    level = max(frame)
    return all(c == (level if on else 0) for c, on in zip(frame, rgb))


def led_from_frames(frames: list) -> tuple[str, str] | None:
    """(colour, pattern) that the last frames of a twin's LED show, where the system
    draws them (an ESP32's NeoPixel): blinking is one colour at full level and dark,
    breathing one colour at changing levels, solid one level; None when they show
    none of these (too few frames, or a mix)."""
    frames = [tuple(f) for f in frames[-LED_FRAMES:]]
    lit = {f for f in frames if any(f)}
    if len(frames) < 10 or not lit:
        return None
    for name, rgb in LED_COLORS.items():
        if all(_shade_of(f, rgb) for f in lit):
            if lit == {rgb}:
                return name, "blinking" if (0, 0, 0) in frames else "solid"
            if len(lit) > 3:
                return name, "breathing"
    return None


def fold(records: list[dict]) -> dict:
    """The current state, from the records of this boot."""
    frames = []
    state: dict = {
        "pins": {},
        "pwm": {},
        "analog": {},
        "sensors": {},
        "status_led": None,
        "button": {"presses": 0},
        "uart": {},
        "watchdog": None,
        "cloud": {"queued": 0, "events": [], "functions": [], "variables": []},
        "errors": [],
    }
    for rec in records:
        kind = rec.get("k")
        if kind == "pin":
            pin = state["pins"].setdefault(rec["pin"], {})
            pin.update({k: v for k, v in rec.items() if k not in ("k", "t", "pin")})
        elif kind == "pwm":
            if rec.get("off"):
                state["pwm"].pop(rec["pin"], None)
            else:
                state["pwm"][rec["pin"]] = {"freq": rec.get("freq"), "duty_u16": rec.get("duty_u16")}
        elif kind == "analog":
            state["analog"][rec.get("pin")] = rec.get("value")
        elif kind == "sensor":
            state["sensors"][rec.get("model")] = rec.get("value")
        elif kind == "led":
            led = {"color": rec.get("color"), "pattern": rec.get("pattern")}
            if "rgb" in rec:
                # the app's RGB ("solid"), or a twin's LED as its pixels show it, frame by
                # frame ("frames": the system animates it; the colour's name is not seen)
                drawn = rec.get("pattern") == "frames"
                led = {"color": None if drawn else "app", "pattern": rec.get("pattern", "solid"),
                       "rgb": rec["rgb"]}
                if drawn:
                    frames.append(rec["rgb"])
            state["status_led"] = led
        elif kind == "button":
            state["button"]["presses"] += 1
        elif kind == "uart":
            state["uart"][str(rec.get("bus"))] = {"last_tx": rec.get("tx")}
        elif kind == "wdt":
            state["watchdog"] = {"timeout_ms": rec.get("timeout")}
        elif kind == "publish":
            cloud = state["cloud"]
            cloud["events"].append({"name": rec["name"], "data": rec.get("data"), "sent": rec.get("sent")})
            cloud["events"] = cloud["events"][-EVENT_LINES:]
            cloud["queued"] = rec.get("queued", cloud["queued"])
        elif kind == "registry":
            state["cloud"]["functions"] = rec.get("functions", [])
            state["cloud"]["variables"] = rec.get("variables", [])
        elif kind == "error":
            state["errors"].append(rec.get("message"))
    led = state["status_led"]
    if led and led.get("pattern") == "frames":  # what the last second shows, as a person sees it
        led["seen"] = led_from_frames(frames)
    return state


def console_tail(device_dir: Path, lines: int = CONSOLE_LINES) -> list[str]:
    path = Path(device_dir) / CONSOLE_LOG
    if not path.is_file():
        return []
    return path.read_text(errors="replace").splitlines()[-lines:]


def snapshot(device_dir: Path, running: bool) -> dict:
    state = {"running": running}
    state.update(fold(read_records(device_dir)))
    state["console"] = console_tail(device_dir)
    return state


_ids = itertools.count(int(time.time() * 1000) % 1_000_000)


def send(device_dir: Path, command: dict) -> int:
    """Append one command for the VM; returns its id."""
    command = dict(command, id=next(_ids))
    line = json.dumps(command) + "\n"
    fd = os.open(Path(device_dir) / IO_IN, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one write: the VM never sees half a command
    finally:
        os.close(fd)
    return command["id"]


def wait_reply(device_dir: Path, command_id: int, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec in read_records(device_dir):
            if rec.get("k") == "reply" and rec.get("id") == command_id:
                return rec
        time.sleep(0.02)
    raise KeelError(f"no answer from the device within {timeout:g} s (is the app running?)")


def _split(text: str, what: str) -> tuple[str, str | None]:
    name, eq, value = text.partition("=")
    if not name:
        raise KeelError(f"invalid {what} '{text}'")
    return name, (value if eq else None)


def _pin_command(board: dict, text: str) -> dict:
    name, value = _split(text, "--set PIN=VALUE")
    canonical = board.get("aliases", {}).get(name, name)
    if canonical not in board["pins"]:
        raise KeelError(f"board {board['name']} has no pin {name}")
    if value not in ("0", "1", "float"):
        raise KeelError(f"--set {text}: the value is 0, 1 or float (for analog use --analog)")
    return {"op": "set", "pin": canonical, "value": None if value == "float" else int(value)}


def _analog_command(board: dict, text: str) -> dict:
    name, value = _split(text, "--analog PIN=VALUE")
    canonical = board.get("aliases", {}).get(name, name)
    if "analog" not in board["pins"].get(canonical, {}).get("caps", ()):
        raise KeelError(f"{name} is not an analog pin on board {board['name']}")
    if value is None or not value.isdigit() or int(value) > 65535:
        raise KeelError(f"--analog {text}: the value is 0..65535")
    return {"op": "analog", "pin": canonical, "value": int(value)}


def _press_command(board: dict, text: str) -> dict:
    name, seconds = _split(text, "--press BUTTON[=SECONDS]")
    button = board.get("button", {}).get("pin")
    if board.get("aliases", {}).get(name, name) != button:
        raise KeelError(f"board {board['name']} has no button {name} (it has {button})")
    try:
        ms = int(float(seconds) * 1000) if seconds is not None else 100
    except ValueError:
        raise KeelError(f"--press {text}: SECONDS must be a number") from None
    return {"op": "press", "button": button, "ms": max(1, ms)}


def _sensor_command(text: str) -> dict:
    model, value = _split(text, "--sensor MODEL=VALUE")
    if value == "none":  # back to the simulated reading
        return {"op": "sensor", "model": model, "value": None}
    try:
        return {"op": "sensor", "model": model, "value": float(value)}
    except (TypeError, ValueError):
        raise KeelError(f"--sensor {text}: VALUE must be a number") from None


def commands(board: dict, sets=(), analogs=(), presses=(), sensors=(), events=()) -> list[dict]:
    """Turn the CLI's drive options into commands, refusing bad ones before any is sent."""
    out = [_pin_command(board, s) for s in sets]
    out += [_analog_command(board, a) for a in analogs]
    out += [_press_command(board, p) for p in presses]
    out += [_sensor_command(s) for s in sensors]
    for text in events:
        name, data = _split(text, "--event NAME[=DATA]")
        out.append({"op": "event", "name": name, "data": data})
    return out


def call(device_dir: Path, op: str, name: str, arg: str | None = None, timeout: float = 5.0):
    """Call a cloud function (op "call") or read a variable (op "get") on the device."""
    command_id = send(device_dir, {"op": op, "name": name, "arg": arg})
    reply = wait_reply(device_dir, command_id, timeout)
    if not reply.get("ok"):
        raise KeelError(f"{name}: {reply.get('error')}")
    return reply.get("result")
