"""The keel command line. Each command parses its arguments and calls a library
function; errors the user can act on are printed on one line with exit status 1."""

import argparse
import json
import os
import sys
from pathlib import Path

from keel import build, images, twin_nrf, vdev, vio
from keel.errors import KeelError


def parse_size(text: str) -> int:
    """'192K', '2M' or a number of bytes."""
    scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale != 1 else text
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"invalid size '{text}' (e.g. 192K)")
    return int(digits) * scale


def _signer(keyfile: str | None):
    """The signer for --sign KEYFILE, or None."""
    if not keyfile:
        return None
    from keel import signing

    return signing.signer(signing.load_private_key(keyfile))


def _trusted(keyfiles: list[str]) -> list[bytes] | None:
    """The raw public keys of --trust KEYFILE.pub options, or None when none is given."""
    if not keyfiles:
        return None
    from keel import signing

    return [signing.load_public_key(k) for k in keyfiles]


def _fingerprint(raw: bytes) -> str:
    from keel import signing

    return signing.fingerprint(raw)


def cmd_build_system(args) -> int:
    sign = _signer(args.sign)
    trust_keys = _trusted(args.trust)
    if args.no_trust:
        trust_keys = []
    for path in build.build_system(args.platform, args.version, Path(args.output), sign,
                                   trust_keys):
        image = images.read_image(path)
        print(f"{path}  {image.name}" + (f"  signed by {image.signed_by[:16]}" if sign else ""))
    return 0


def cmd_build_app(args) -> int:
    path = build.build_app(
        Path(args.src), args.platform, args.target, Path(args.output), args.app_version,
        _signer(args.sign),
    )
    image = images.read_image(path)
    deps = ", ".join(
        f"{d['function']} {d['index']} >= {d['version']}" for d in image.to_dict()["dependencies"]
    )
    signed = f", signed by {image.signed_by[:16]}" if image.signed_by else ""
    print(f"{path}  user part, {len(image.data)} bytes, depends on {deps}{signed}")
    return 0


def cmd_keys_generate(args) -> int:
    from keel import signing

    fp = signing.generate_key(args.keyfile, force=args.force)
    print(f"wrote {args.keyfile} (the private key: keep it secret, off boards and out of git)")
    print(f"  and {signing.public_path(args.keyfile)} (the public key: boards trust it)")
    print(f"fingerprint {fp}")
    return 0


def cmd_keys_show(args) -> int:
    from keel import signing

    with open(args.keyfile, "rb") as f:
        private = b"PRIVATE KEY" in f.read()
    if private:
        raw = signing.raw_public(signing.load_private_key(args.keyfile).public_key())
    else:
        raw = signing.load_public_key(args.keyfile)
    print(f"{args.keyfile}: Ed25519 {'private' if private else 'public'} key, "
          f"fingerprint {signing.fingerprint(raw)}")
    return 0


def cmd_sign(args) -> int:
    from keel import signing

    key = signing.load_private_key(args.key)
    source = images.load_valid_image(args.file)
    signed = signing.sign_image(source.data, key)
    out = Path(args.output or args.file)
    build._write_atomic(out, signed)
    image = images.parse_image(signed, out)
    print(f"{out}  {image.name}, signed by {image.signed_by}")
    return 0


def cmd_inspect(args) -> int:
    image = images.read_image(args.file)
    refusal = None
    doc = image.to_dict()
    if args.trust:
        from keel import signing

        trusted = [signing.load_public_key(k) for k in args.trust]
        reason = signing.check_signature(image.data, image.info, trusted)
        doc["signature_ok"] = reason is None
        if reason:
            refusal = signing.refusal_text(reason, image.signed_by, trusted)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(images.describe(image))
        if args.trust:
            print(f"  signature     {'ok (a trusted key)' if refusal is None else 'REFUSED'}")
    if not image.ok:
        print(f"keel: error: {args.file}: {image.problem}", file=sys.stderr)
        return 1
    if refusal:
        print(f"keel: error: {args.file}: {refusal}", file=sys.stderr)
        return 1
    return 0


def cmd_firmware_info(args) -> int:
    from keel import firmware

    found = firmware.info(args.file)
    print(json.dumps(found.to_dict(), indent=2) if args.json else firmware.text(found))
    return 0


def cmd_image_esp32(args) -> int:
    from keel import esp32image

    result = esp32image.build_image(
        args.board, args.firmware, args.output, args.system, args.app, args.bootloader,
        _trusted(args.trust),
    )
    fw = result.firmware
    desc = fw.app_image.app_desc or {}
    print(f"firmware        {args.firmware} ({fw.source}; {desc.get('project') or 'app'} "
          f"{desc.get('version') or ''}, {len(fw.app)} bytes)".replace(" ,", ","))
    if fw.has_romfs:
        print("ROMFS           yes (vfs.rom_ioctl): Keel's code runs in place from the romfs partition")
    else:
        print("ROMFS           no (a stock build): Keel extracts its code to the filesystem, and an "
              "update over the air may not fit beside the cloud session (docs/boards/esp32.md)")
    for f in result.files:
        print(f"  0x{f.offset:06x}  {f.name:<24} {len(f.data):>8} bytes  {f.what}")
    print(f"wrote {result.out_dir}/: the files above, {esp32image.MERGED_FILE} (the whole "
          f"flash), {esp32image.LAYOUT_FILE}, {esp32image.COMMAND_FILE}")
    print("write it to a board with:  keel flash --usb --esp32 "
          f"{result.out_dir} --port PORT   or:")
    print(result.command())
    return 0


def cmd_image_nrf52840(args) -> int:
    """The files an nRF52840 gets over its raw REPL: the factory files, then the modules."""
    from keel import esp32image, factory, keel_files
    from keel import module_format as mf
    from keel.boards import load_board
    from keel.images import module_label

    board = load_board(args.board)
    if board.platform != "nrf52840":
        raise KeelError(f"board {args.board} is a {board.platform} board, not an nrf52840 one")
    modules = esp32image.board_modules(board, Path(args.system) if args.system else None,
                                       [Path(a) for a in args.app])
    out = Path(args.output)
    boot = next(i for i in modules if i.info.function == mf.FUNCTION_BOOTLOADER)
    fs_files = factory.device_files(board.data, boot, _trusted(args.trust))
    esp32image.check_board_signatures(modules, fs_files, args.system)
    factory.write_tree(fs_files, out / "fs")
    (out / "modules").mkdir(parents=True, exist_ok=True)
    names = []
    for image in modules:
        name = module_label(image.info).replace(" ", "-") + ".bin"
        (out / "modules" / name).write_bytes(image.data)
        names.append(name)
    print(f"wrote {out}/fs (the board's filesystem: /boot.py, {keel_files.BOARD_FILE}, "
          f"{keel_files.BOOTLOADER_DIR}) "
          f"and {out}/modules ({', '.join(sorted(names))})")
    print("install (docs/boards/nrf52840.md):")
    print(f"  cd {out}/fs && mpremote connect PORT cp -r boot.py main.py keel :")
    print(f"  keel flash --usb {out}/modules/*.bin --port PORT")
    return 0


def cmd_flash_esp32(args) -> int:
    """keel flash --usb --esp32 DIR --port PORT: a blank ESP32 over its ROM bootloader."""
    from keel import esp32image

    if not args.usb:
        raise KeelError("--esp32 writes over USB: keel flash --usb --esp32 DIR --port PORT")
    files = esp32image.flash_usb(args.targets, args.port)
    print(f"wrote and verified {len(files)} part(s) on {args.port}; the board is starting")
    return 0


def _add_esp32_flashing(commands) -> None:
    """--esp32 beside keel flash --usb (whose raw-REPL path lives in cloudcli/usb.py):
    with it, the board is written from its ROM bootloader by esptool instead."""
    flash = commands.choices.get("flash")
    if flash is None:
        return
    flash.add_argument("--esp32", action="store_true",
                       help="with --usb: write a blank ESP32 with esptool from a directory "
                       "made by 'keel image esp32' (erase, write, verify)")
    raw_repl = flash.get_default("func")

    def dispatch(args):
        return cmd_flash_esp32(args) if args.esp32 else raw_repl(args)

    flash.set_defaults(func=dispatch)


def cmd_vdev_create(args) -> int:
    trusted = _trusted(args.trust)
    written = vdev.create(args.dir, args.system, args.board, trusted, args.firmware)
    mode = (f"trusts {len(trusted)} key(s): " + ", ".join(_fingerprint(k)[:16] for k in trusted)
            if trusted else "development mode: takes unsigned modules")
    print(f"created virtual device {args.dir} (board {args.board}; {mode})")
    for image in written:
        print(f"  {image.name}")
    return 0


def cmd_vdev_flash(args) -> int:
    for image in vdev.flash(args.dir, args.files):
        print(f"flashed {image.name} ({len(image.data)} bytes) from {image.path}")
    return 0


def cmd_vdev_run(args) -> int:
    vdev.run(args.dir, seconds=args.seconds, heap=args.heap, pty=args.pty, wires=args.wires)
    return 0


def cmd_vdev_status(args) -> int:
    doc = vdev.status(args.dir)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    if doc["mode"] == vdev.BOOT_LOOP:
        print(f"mode            boot-loop ({doc[vdev.BOOT_ATTEMPTS]} boots in a row did not get "
              "as far as recording their status)")
        if doc.get("boot_error"):
            print(f"  error         {doc['boot_error']}")
        if doc["console"]:
            print("  console (the last lines of the last run):")
            for line in doc["console"]:
                print(f"    {line}")
        if doc["recorded_mode"] is None:
            print("no status was ever recorded")
            return 0
        print("the last status recorded, before the loop:")
        doc = {**doc, "mode": doc["recorded_mode"]}
    print(f"mode            {doc['mode']}" + (f" ({doc['safe_mode_reason']})" if doc["safe_mode_reason"] else ""))
    for dep in doc["missing"]:
        print(f"  missing       {dep['function']} {dep['index']} >= {dep['version'] or 'any'}")
    print(f"app             {doc['app']}")
    print(f"reset reason    {doc['reset_reason']}")
    print(f"vm              {doc['vm']['name']} {doc['vm']['version']}")
    build = Path(args.dir) / twin_nrf.FIRMWARE_FILE  # the MicroPython build a twin plays
    if build.is_file():
        played = json.loads(build.read_text())
        print(f"twin firmware   {played.get('build', '?')} ("
              + ("ROMFS: Keel's code can run in place)" if played.get("vfs_rom")
                 else "no ROMFS: Keel's code is extracted)"))
    mem = doc["mem"]
    free = mem["heap_free_at_app_start"]
    connected = mem.get("heap_free_connected")
    print(f"heap            {mem['heap_total']} bytes, free at app start {'-' if free is None else free}"
          + ("" if connected is None else f", with the cloud session up {connected}"))
    for m in doc["modules"]:
        state = "valid" if m["valid"] else f"INVALID ({m.get('invalid_reason')})"
        where = "  (in place)" if m.get("in_place") else ""
        print(f"module          {m['function']} {m['index']} {m['version'] or '-'}  {state}{where}")
    trust = doc.get("trust")
    if trust:
        keys = ", ".join(k[:16] for k in trust.get("keys") or []) or "none readable"
        print("trust           " + ("development mode: takes unsigned modules"
                                    if trust["mode"] == "development"
                                    else f"takes only modules signed by {keys}")
              + (f" ({trust['error']})" if trust.get("error") else ""))
    net = doc.get("network")
    if isinstance(net, dict):
        from keel import wifi

        print(f"network         {wifi.network_line(net)}")
    if doc.get("cloud") == "no-memory":
        print("cloud           offline: the session did not fit in the heap")
    elif doc.get("cloud") == "no-network":
        print("cloud           offline: this board has no network")
    refused = doc.get("refused")
    if refused:
        print(f"refused         {refused.get('function')} {refused.get('index')} "
              f"{refused.get('version') or ''} ({refused.get('via')}): {refused.get('reason')}")
    return 0


def cmd_vdev_wifi(args) -> int:
    from keel import wifi

    device = vdev.VirtualDevice(args.dir)
    device.board()  # (a KeelError if DIR is not a virtual device)
    if args.ap:
        wifi.put_ap(device.path, args.ap, args.password, args.rssi)
    if args.remove:
        wifi.remove_ap(device.path, args.remove)
    aps = wifi.read_air(device.path)
    if not aps:
        print("no access point on the air")
    for line in wifi.describe_air(aps):
        print(line)
    if (args.ap or args.remove) and device.running_pid() is not None:
        print("(the board hears the change at its next boot; --ap-down/--ap-up act at once)")
    return 0


def cmd_vdev_io(args) -> int:
    device = vdev.VirtualDevice(args.dir)
    board = device.board().data
    running = device.running_pid() is not None
    if args.ap_down or args.ap_up:
        from keel import wifi

        for ssid, up in [(s, False) for s in args.ap_down] + [(s, True) for s in args.ap_up]:
            command = wifi.switch_ap(device.path, ssid, up)
            if running:
                vio.send(device.path, command)
            print(f"{ssid}: {'on' if up else 'off'} the air")
        if not (args.set or args.analog or args.press or args.sensor or args.event
                or args.call or args.get):
            return 0
    drive = vio.commands(board, args.set, args.analog, args.press, args.sensor, args.event)
    asks = [("call", *vio._split(c, "--call NAME[=ARG]")) for c in args.call]
    asks += [("get", name, None) for name in args.get]
    if (drive or asks) and not running:
        raise KeelError(f"{args.dir}: the device is not running (start it with keel vdev run)")
    for command in drive:
        vio.send(device.path, command)
    for op, name, arg in asks:
        result = vio.call(device.path, op, name, arg)
        print(json.dumps(result) if args.json else result)
    if drive or asks:
        return 0
    state = vio.snapshot(device.path, running)
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    print(f"running         {'yes' if running else 'no'}")
    led = state["status_led"] or {}
    if led.get("pattern") == "frames":  # a twin's LED drawn by the system, frame by frame
        seen = led.get("seen")
        print(f"status LED      {' '.join(seen) if seen else 'changing'} (its pixel now "
              f"{tuple(led['rgb'])})")
    else:
        print(f"status LED      {led.get('color')} {led.get('pattern')}")
    for name, pin in sorted(state["pins"].items()):
        print(f"pin {name:<11} {pin.get('mode', 'in')} {pin.get('value')}")
    for name, pwm in sorted(state["pwm"].items()):
        print(f"pwm {name:<11} {pwm['freq']} Hz duty {pwm['duty_u16']}/65535")
    cloud = state["cloud"]
    print(f"cloud           {cloud['queued']} events queued; functions {cloud['functions']}; variables {cloud['variables']}")
    print("console (last lines):")
    for line in state["console"]:
        print(f"  {line}")
    return 0


def _version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from keel.paths import source_root

    try:
        tools = version("keel-tools")
    except PackageNotFoundError:
        tools = "unknown"
    try:
        system = (source_root() / "system" / "VERSION").read_text().strip()
    except OSError:
        system = "unknown"
    return f"keel {tools} (tools); builds system {system} by default"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keel", description="Keel firmware tools")
    parser.add_argument("--version", action="version", version=_version_text(),
                        help="the tools' version and the system version they build by default")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fw = commands.add_parser("firmware", help="MicroPython firmware: what it is, whether Keel runs on it")
    fws = fw.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = fws.add_parser("info", help="version, port, board, what Keel needs, frozen modules, heap")
    p.add_argument("file", metavar="FILE",
                   help="an ELF (micropython.elf, or the VM: .venv/bin/micropython) or an ESP32 .bin")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_firmware_info)

    build_cmd = commands.add_parser("build", help="build module images")
    builds = build_cmd.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = builds.add_parser("system", help="build the bootloader and the system parts")
    p.add_argument("--platform", required=True)
    p.add_argument("--version", help="system version (default: system/VERSION)")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--sign", metavar="KEYFILE", help="sign every module with this private key")
    trust_opts = p.add_mutually_exclusive_group()
    trust_opts.add_argument(
        "--trust", action="append", default=[], metavar="KEYFILE.pub",
        help="the bootloader brings these keys: a board installing it trusts exactly them "
        "(key rotation; repeatable)")
    trust_opts.add_argument(
        "--no-trust", action="store_true",
        help="the bootloader brings an empty key list: a board installing it goes back to "
        "development mode")
    p.set_defaults(func=cmd_build_system)
    p = builds.add_parser("app", help="compile an app into a user part")
    p.add_argument("src", metavar="SRC_DIR")
    p.add_argument("--platform", required=True)
    p.add_argument("--target", help="system version the app needs (default: the current one)")
    p.add_argument("--app-version", default="1.0.0", help="the app's own version (default 1.0.0)")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--sign", metavar="KEYFILE", help="sign the module with this private key")
    p.set_defaults(func=cmd_build_app)

    p = commands.add_parser("inspect", help="show what a module image is and check it")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true")
    p.add_argument("--trust", action="append", default=[], metavar="KEYFILE.pub",
                   help="check the signature as a board trusting this key would (repeatable)")
    p.set_defaults(func=cmd_inspect)

    keys_cmd = commands.add_parser("keys", help="signing keys")
    keys = keys_cmd.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = keys.add_parser("generate", help="make an Ed25519 key pair: KEYFILE and KEYFILE.pub")
    p.add_argument("keyfile", metavar="KEYFILE")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=cmd_keys_generate)
    p = keys.add_parser("show", help="a key's fingerprint (the id modules it signs carry)")
    p.add_argument("keyfile", metavar="KEYFILE")
    p.set_defaults(func=cmd_keys_show)

    p = commands.add_parser("sign", help="sign a module image (in place, or into -o FILE)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--key", required=True, metavar="KEYFILE", help="the private key")
    p.add_argument("-o", "--output", metavar="FILE", help="write the signed module here")
    p.set_defaults(func=cmd_sign)

    image_cmd = commands.add_parser("image", help="build what goes on a blank real board")
    image_kinds = image_cmd.add_subparsers(dest="what", required=True, metavar="CHIP")
    p = image_kinds.add_parser(
        "esp32", help="a blank ESP32: MicroPython firmware, partition table, filesystem, modules")
    p.add_argument("--board", required=True, help="e.g. esp32_generic")
    p.add_argument("--firmware", required=True, metavar="FILE",
                   help="MicroPython for the board (the OTA variant's full-flash .bin, or an app "
                   ".bin with --bootloader)")
    p.add_argument("--bootloader", metavar="FILE",
                   help="the ESP-IDF bootloader.bin, when --firmware is an app image alone")
    p.add_argument("--system", metavar="SYSTEM_DIR",
                   help="module images to install (default: build the system from this tree)")
    p.add_argument("--app", action="append", default=[], metavar="FILE",
                   help="a user part to install too")
    p.add_argument("--trust", action="append", default=[], metavar="KEYFILE.pub",
                   help="the board installs only modules signed by this key (repeatable)")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.set_defaults(func=cmd_image_esp32)

    p = image_kinds.add_parser(
        "nrf52840", help="an nRF52840 running MicroPython: the files Keel puts on it over USB")
    p.add_argument("--board", required=True, help="e.g. nrf52840_dk")
    p.add_argument("--system", metavar="SYSTEM_DIR",
                   help="module images to install (default: build the system from this tree)")
    p.add_argument("--app", action="append", default=[], metavar="FILE",
                   help="a user part to install too")
    p.add_argument("--trust", action="append", default=[], metavar="KEYFILE.pub",
                   help="the board installs only modules signed by this key (repeatable)")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.set_defaults(func=cmd_image_nrf52840)

    vdev_cmd = commands.add_parser("vdev", help="virtual devices")
    vdevs = vdev_cmd.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = vdevs.add_parser("create", help="make a virtual device with a system installed")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--system", required=True, metavar="SYSTEM_DIR")
    p.add_argument("--board", default="virtual")
    p.add_argument("--trust", action="append", default=[], metavar="KEYFILE.pub",
                   help="the board installs only modules signed by this key (repeatable); "
                   "without it, it is in development mode")
    p.add_argument("--firmware", metavar="BUILD",
                   help="nRF52840 and ESP32 twins: the MicroPython build it plays "
                   "(boards/twins/<port>/firmware.json, e.g. v1.28-generic on an ESP32; "
                   "default: the one Keel documents)")
    p.set_defaults(func=cmd_vdev_create)
    p = vdevs.add_parser("flash", help="write modules into a virtual device's flash")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_vdev_flash)
    p = vdevs.add_parser("run", help="boot a virtual device on the MicroPython VM")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--seconds", type=float, metavar="N")
    p.add_argument("--heap", type=parse_size, metavar="SIZE", help="e.g. 192K (default: the board's heap, else its RAM)")
    p.add_argument("--pty", metavar="PATH",
                   help="also give the console as a pty linked at PATH (mpremote connect PATH)")
    p.add_argument("--wires", metavar="FILE",
                   help="jumper pins for the run: a JSON file with a \"wires\" list of pin pairs "
                        "(e.g. boards/virtual/hil.json)")
    p.set_defaults(func=cmd_vdev_run)
    p = vdevs.add_parser("status", help="what the device recorded at its last boot")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_vdev_status)
    p = vdevs.add_parser("io", help="see and drive a running virtual board's pins and peripherals")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="PIN=VALUE",
                   help="drive an input pin: 0, 1 or float")
    p.add_argument("--press", action="append", default=[], metavar="BUTTON[=SECONDS]",
                   help="press the button (default 0.1 s)")
    p.add_argument("--analog", action="append", default=[], metavar="PIN=VALUE",
                   help="set an analog input, 0..65535")
    p.add_argument("--sensor", action="append", default=[], metavar="MODEL=VALUE",
                   help="set a simulated sensor's reading (tmp102=25.0; tmp102=none to release it)")
    p.add_argument("--call", action="append", default=[], metavar="NAME[=ARG]",
                   help="call a cloud function on the device")
    p.add_argument("--get", action="append", default=[], metavar="NAME",
                   help="read a cloud variable on the device")
    p.add_argument("--event", action="append", default=[], metavar="NAME[=DATA]",
                   help="deliver a cloud event to the device's subscriptions")
    p.add_argument("--ap-down", action="append", default=[], metavar="SSID",
                   help="take an access point off the air (keel vdev wifi)")
    p.add_argument("--ap-up", action="append", default=[], metavar="SSID",
                   help="put an access point back on the air")
    p.set_defaults(func=cmd_vdev_io)
    p = vdevs.add_parser("wifi", help="the WiFi access points around a virtual ESP32")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--ap", metavar="SSID", help="put an access point on the air (or change it)")
    p.add_argument("--password", default="", help="its WPA2 password (none: an open network)")
    p.add_argument("--rssi", type=int, default=-55, metavar="DBM", help="its signal (default -55)")
    p.add_argument("--remove", metavar="SSID", help="take an access point away")
    p.set_defaults(func=cmd_vdev_wifi)

    from keel import cloudcli

    cloudcli.add_commands(commands)
    _add_esp32_flashing(commands)
    _fill_help(parser, ["keel"])
    return parser


# Help for the arguments that share a meaning across commands, by command and argument
# (tests/host/test_cli_help.py: every argument of every command has help).
_HELP = {
    "--json": "print JSON instead of text",
    "--platform": "the board family: virtual, esp32 or nrf52840",
    "--output": "where to write",
    "--verbose": "log what the service does (debug level)",
    ("build system", "--output"): "the folder to write the bootloader and system parts to",
    ("build app", "--output"): "the app image (.bin) to write",
    ("build app", "src"): "the app's folder, with its main.py",
    ("inspect", "file"): "a module image (.bin)",
    ("keys generate", "keyfile"): "the private key file to write (its public key goes to KEYFILE.pub)",
    ("keys show", "keyfile"): "a private or public key file",
    ("sign", "file"): "the module image to sign (rewritten in place, or to -o)",
    ("image esp32", "--output"): "the folder to write the flash files to (for esptool)",
    ("image nrf52840", "--output"): "the folder to write the installation's files to",
    ("vdev create", "dir"): "the device's folder (created)",
    ("vdev create", "--system"): "a folder of system modules to install (keel build system -o DIR)",
    ("vdev create", "--board"): "the board it plays (default: virtual; e.g. esp32_generic, nrf52840_dk)",
    ("vdev flash", "files"): "module images, or folders of them (in dependency order)",
    ("vdev run", "--seconds"): "cut the power after this many seconds (default: run until Ctrl-C)",
    ("cloud add-instance", "name"): "the instance's name (lowercase letters, digits, '-')",
    ("cloud mosquitto-config", "dir"): "the folder to write mosquitto.conf, the ACL and the certificates to",
    ("cloud mosquitto-config", "--port"): "the port Mosquitto listens on (default 8883)",
    ("cloud mosquitto-config", "--listen"): "the address Mosquitto listens on (default 127.0.0.1)",
    ("device provision", "--name"): "the device's name in the registry (default: the folder's name)",
    ("get", "variable"): "the cloud variable to read",
    ("call", "function"): "the cloud function to call",
    ("call", "arg"): "its argument (text)",
    ("publish", "event"): "the event's name",
    ("publish", "data"): "its data (text)",
    ("release system", "dir"): "a folder of system modules (keel build system -o DIR)",
    ("release app", "file"): "the app image (.bin)",
    ("release app", "--fleet"): "the fleet to release it to",
    ("release list", "--platform"): "only this platform's releases",
    ("fleet create", "--platform"): "the platform of the fleet's devices",
    ("fleet require-signed", "keys"): "the public keys (.pub) its modules must be signed by",
    ("fleet add", "devices"): "devices to add, by name or id",
    ("fleet remove", "devices"): "devices to remove, by name or id",
}
_BY_DEST = {"dir": "the device's folder", "file": "a module image (.bin)"}


def _fill_help(parser: argparse.ArgumentParser, path: list[str]) -> None:
    command = " ".join(path[1:])
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                _fill_help(sub, path + [name])
        elif not action.help:
            key = action.option_strings[-1] if action.option_strings else action.dest
            if (command, key) in _HELP:
                action.help = _HELP[command, key]
            elif action.dest == "name" and not action.option_strings:
                action.help = "the fleet's name" if command.startswith("fleet") else \
                    "the device's name (or id)"
            else:
                action.help = _HELP.get(key) or _BY_DEST.get(action.dest)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeelError as e:
        print(f"keel: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`keel list | head -1`): what is left has nowhere to go,
        # and Python's own flush at exit would fail again on stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a command killed by SIGPIPE
    except Exception as e:  # noqa: BLE001 - the cloud's own user-facing errors
        if type(e).__name__ not in ("CloudError", "RegistryError"):
            raise
        print(f"keel: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
