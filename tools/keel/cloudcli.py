"""The keel commands that talk to Keel Cloud (cloud serve, device provision, list,
device show, get, call, publish, subscribe, release, flash, fleet). The cloud itself is the
keel_cloud package (cloud/).

Commands that change the catalog, the fleets or the registry (release, fleet create/add/
remove, device provision) write the cloud directory's database themselves, so they work
whether or not the cloud runs; those a running cloud must act on then tell it
(POST /api/rollout). Commands that show live state ask the running cloud."""

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from keel_cloud.client import ApiClient
from keel_cloud.config import CloudDir, CloudError

from keel import deviceid, images, keel_files, vdev
from keel import module_format as mf
from keel.errors import KeelError
from keel.progress import Progress


def cloud_dir(args) -> CloudDir:
    return CloudDir(getattr(args, "cloud", None))


@contextmanager
def open_registry(args):
    """The cloud directory's registry (SQLite, or the PostgreSQL database it names)."""
    from keel_cloud.registry import Registry

    directory = cloud_dir(args).require()
    registry = Registry(directory.config().database or directory.registry_path)
    try:
        yield registry
    finally:
        registry.close()


def tell_the_cloud(args) -> None:
    """A running cloud acts on a fleet change at once (else within its poll, or when it
    starts: devices describe themselves on every connect)."""
    try:
        ApiClient(cloud_dir(args)).rollout()
    except CloudError:
        print("Keel Cloud is not running here: its devices are updated once it runs")


def cmd_cloud_serve(args) -> int:
    from keel_cloud.serve import serve

    import logging

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    serve(CloudDir(args.data or args.cloud), args.mqtt, args.http, args.broker,
          out=lambda text: print(text, flush=True), instance=args.instance)
    return 0


def cmd_cloud_add_instance(args) -> int:
    from keel_cloud import pki
    from keel_cloud.serve import add_instance

    directory = cloud_dir(args).require()
    path, new = add_instance(directory, args.name)
    print(f"instance {args.name}: {'issued' if new else 'has'} {path} "
          f"(CN {pki.instance_cn(args.name)}); run it: keel cloud serve --instance {args.name} "
          "--broker mqtts://HOST:PORT --http HOST:PORT")
    return 0


def cmd_cloud_status(args) -> int:
    """What `keel cloud serve` runs for this cloud directory (CLOUD_DIR/serve.json and
    serve-NAME.json, while they run), the instances the registry knows, and what it says
    of the devices."""
    import os

    from keel_cloud.config import broker_kind, device_address
    from keel_cloud.leases import TTL_S
    from keel_cloud.registry import Registry

    directory = cloud_dir(args).require()
    config = directory.config()
    records = []
    for path in sorted(directory.path.glob("serve*.json")):
        try:
            record = json.loads(path.read_text())
            os.kill(record["pid"], 0)  # (signal 0: only whether it is alive)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        records.append(record)
    registry = Registry(config.database or directory.registry_path)
    try:
        devices = registry.devices()
        known_instances = registry.instances()
    finally:
        registry.close()
    # The one that runs the broker (or the single service) first.
    records.sort(key=lambda r: (r.get("broker") == "external", r.get("instance") or ""))
    record = records[0] if records else None
    now = time.time()
    instances = [{"name": r.get("instance"), "pid": r["pid"], "host": None, "http": r.get("http"),
                  "started": r["started"], "alive": True} for r in records if not r.get("instance")]
    for row in known_instances:
        alive = now - row["beat"] < TTL_S
        instances.append({"name": row["name"], "pid": row["pid"], "host": row["host"],
                          "http": row["http"], "started": row["started"], "alive": alive})
    running = any(i["alive"] for i in instances)
    kind = record["broker"] if record else broker_kind(config.broker)
    doc = {
        "running": running,
        "pid": record["pid"] if record else None,
        "broker": kind,
        "address": record["address"] if record else "mqtts://%s:%d" % device_address(config),
        "http": f"http://{config.http}/api/",
        "devices": {"connected": sum(1 for d in devices if d.get("online")) if running else 0,
                    "known": len(devices)},
        "instances": instances,
        "broker_log": record.get("broker_log") if record else None,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0 if running else 1
    if record:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["started"]))
        print(f"Keel Cloud      running (keel cloud serve, pid {record['pid']}, since {started})")
    elif running:
        print("Keel Cloud      running (instances elsewhere)")
    else:
        print(f"Keel Cloud      not running here (start it: keel cloud serve --cloud {directory.path})")
    print(f"broker          {'auto (Mosquitto where installed, else embedded)' if kind == 'auto' else kind}"
          f", devices connect to {doc['address']}"
          + (f" (log {doc['broker_log']})" if doc["broker_log"] else ""))
    print(f"API             {doc['http']}")
    print(f"devices         {doc['devices']['connected']} connected, {doc['devices']['known']} known")
    alive = [i for i in instances if i["alive"]]
    print(f"instances       {len(alive)} running" + (f", {len(instances) - len(alive)} gone"
                                                      if len(alive) < len(instances) else ""))
    for i in instances:
        print(f"  {i['name'] or '(single)':<14}{'running' if i['alive'] else 'gone   '} pid {i['pid']}"
              + (f" on {i['host']}" if i["host"] else "") + (f", API {i['http']}" if i["http"] else ""))
    return 0 if running else 1


def cmd_cloud_mosquitto_config(args) -> int:
    from keel_cloud.mosquitto import write_config

    directory = cloud_dir(args).require()
    path = write_config(directory, Path(args.dir), port=args.port, listen=args.listen)
    print(f"wrote {path}; run: mosquitto -c {path}")
    print(f"then: keel cloud serve --broker mqtts://{args.listen}:{args.port}")
    return 0


def cmd_device_provision(args) -> int:
    from keel_cloud.provision import identity_files

    if args.port:
        if args.fleet:
            raise KeelError("--fleet works with a virtual device; add a board with keel fleet add")
        return _provision_board(args)
    device = vdev.VirtualDevice(args.dir)
    board = device.board()
    if device.running_pid():
        raise KeelError(f"{device.path}: the device is running; stop it first")
    device_id = deviceid.on_device(device.path)  # as its system will connect
    name = args.name or device.path.name
    if args.fleet:
        check_can_join(args, args.fleet, device_id, board.platform)
    extra = {}
    if args.wifi:
        extra[keel_files.WIFI_FILE] = _with_network(device, args)
    elif args.password is not None:
        raise KeelError("--password goes with --wifi SSID")
    # The device's files first, the registry last: a failure leaves both as they were.
    identity_files(cloud_dir(args), device_id, name, board.platform,
                   install=lambda files: vdev.write_files(device.path, files | extra))
    print(f"provisioned {name} (device id {device_id}); it connects at its next boot"
          + (f" (joining {args.wifi})" if args.wifi else ""))
    if args.fleet:
        with open_registry(args) as registry:
            registry.add_to_fleet(args.fleet, [device_id])
        print(f"{name} is in fleet {args.fleet}: it gets the fleet's app when it connects")
    return 0


def cmd_device_wifi(args) -> int:
    """Store (or list, or clear) a board's WiFi networks through its raw REPL; the
    board restarts Keel, which joins (docs/connecting.md)."""
    from keel import usb, wifi

    if sum(bool(x) for x in (args.ssid, args.list, args.clear)) != 1:
        raise KeelError("keel device wifi: give one of --ssid SSID, --list, --clear")
    password = args.password
    if args.ssid:
        wifi.check_ssid(args.ssid)
        password = wifi.ask_password(args.ssid, password)
    link = usb.BoardLink(args.port)
    try:
        if args.list:
            for ssid in wifi.board_networks(link):
                print(ssid)
            return 0
        if args.clear:
            wifi.clear_networks(link)
            print(f"{link.port}: no WiFi network stored; Keel restarts in listening mode")
        else:
            stored = wifi.store_network(link, args.ssid, password)
            print(f"{link.port}: stored {args.ssid} ({len(stored)} of {wifi.MAX_NETWORKS} "
                  "networks); Keel restarts and joins it")
    finally:
        link.restart()
        link.close()
    return 0


def _with_network(device, args) -> bytes:
    """The device's networks file (keel_files.WIFI_FILE) with args.wifi added (newest last, at most 5)."""
    from keel import wifi

    wifi.check_ssid(args.wifi)
    password = wifi.ask_password(args.wifi, args.password)
    try:
        nets = json.loads(vdev.read_file(device.path, keel_files.WIFI_FILE))["networks"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        nets = []
    nets = [n for n in nets if isinstance(n, dict) and n.get("ssid") != args.wifi]
    nets.append({"ssid": args.wifi, "password": password})
    return json.dumps({"networks": nets[-wifi.MAX_NETWORKS:]}).encode()


def check_can_join(args, fleet_name: str, device_id: str, platform: str) -> None:
    """Before anything is provisioned: the fleet exists, is for the device's platform,
    and the device is in no other fleet."""
    with open_registry(args) as registry:
        fleet = registry.require_fleet(fleet_name)
        known = registry.device(device_id)
    if fleet["platform"] != platform:
        raise KeelError(f"the device is {platform}, fleet '{fleet_name}' is {fleet['platform']}")
    if known and known["fleet"] not in (None, fleet_name):
        raise KeelError(f"device '{known['name']}' is in fleet '{known['fleet']}': "
                        f"keel fleet remove {known['fleet']} {known['name']} first")


def _provision_board(args) -> int:
    """The same over a board's raw REPL (mpremote's transport)."""
    from mpremote.transport_serial import SerialTransport
    from keel_cloud.provision import identity_files

    password = args.password
    if args.wifi:
        from keel import wifi

        wifi.check_ssid(args.wifi)
        password = wifi.ask_password(args.wifi, password)
    elif password is not None:
        raise KeelError("--password goes with --wifi SSID")
    transport = SerialTransport(args.port, baudrate=115200)
    try:
        transport.enter_raw_repl()
        device_id = deviceid.on_board(transport, args.port)  # as its system will connect
        try:  # the platform Keel was installed for (sys.platform names the board on nrf)
            platform = json.loads(transport.fs_readfile(keel_files.BOARD_FILE))["platform"]
        except Exception:  # noqa: BLE001 - mpremote raises its own errors for a missing file
            raise KeelError(f"{args.port}: Keel is not installed on this board (no "
                            f"{keel_files.BOARD_FILE}): install it first (docs/boards/)") from None
        def install(files):  # on the board first, then the registry (identity_files)
            for path in (keel_files.KEEL_DIR, keel_files.CLOUD_DIR):
                transport.exec(f"import os\ntry:\n os.mkdir('{path}')\nexcept OSError:\n pass")
            for path, data in files.items():
                transport.fs_writefile(path, data)
            if args.wifi:
                from keel import wifi

                class _Link:  # what wifi.store_network needs of a board link
                    def _exec(self, code):
                        return transport.exec(code).decode(errors="replace")

                wifi.store_network(_Link(), args.wifi, password)

        identity_files(cloud_dir(args), device_id, args.name or device_id, platform, install=install)
        transport.exit_raw_repl()
        transport.serial.write(b"\x04")  # a soft reboot at the friendly REPL: Keel starts again
    finally:
        transport.close()
    print(f"provisioned {args.name or device_id} (device id {device_id}) on {args.port}"
          + (f"; Keel restarts and joins {args.wifi}" if args.wifi else "; Keel restarts and connects"))
    return 0


def cmd_list(args) -> int:
    devices = ApiClient(cloud_dir(args)).devices()
    if args.json:
        print(json.dumps(devices, indent=2))
        return 0
    if not devices:
        print("no devices (provision one with keel device provision)")
    for d in devices:
        state = "online" if d["online"] else "offline"
        mode = f" safe mode" if d["mode"] == "safe" else ""
        unknown = "  (describe unreadable)" if d.get("describe_error") else ""
        print(f"{d['name']:<20} {d['id']}  {d['platform'] or '-':<9} {state:<7} "
              f"system {d['system_version'] or '-'}{mode}{unknown}")
    return 0


def cmd_device_show(args) -> int:
    device = ApiClient(cloud_dir(args)).device(args.name)
    if args.json:
        print(json.dumps(device, indent=2))
        return 0
    print(f"{device['name']} ({device['id']})")
    print(f"  platform      {device['platform']}")
    print(f"  state         {'online' if device['online'] else 'offline'}, mode {device['mode']}"
          + (f" ({device['safe_mode_reason']})" if device.get("safe_mode_reason") else ""))
    print(f"  system        {device['system_version']}")
    print(f"  fleet         {device.get('fleet') or '-'}")
    print(f"  reset reason  {device.get('reset_reason')}")
    for dep in device.get("missing", []):
        print(f"  missing       {dep['function']} {dep['index']} >= {dep['version'] or 'any'}")
    heal = device.get("heal") or {"state": "idle"}
    print(f"  heal          {heal_line(heal)}")
    for r in device.get("rollbacks", []):
        print(f"  rolled back   {rollback_line(r)}")
    for m in device.get("modules", []):
        state = "valid" if m.get("valid") else f"INVALID ({m.get('invalid_reason')})"
        print(f"  module        {m['function']} {m['index']} {m.get('version')}  {state}")
    print(f"  trust         {trust_line(device.get('trust'))}")
    net = device.get("network")
    if net:
        from keel import wifi

        print(f"  network       {wifi.network_line(net)}")
    refused = device.get("refused")
    if refused:
        print(f"  refused       {refused.get('function')} {refused.get('index')} "
              f"{refused.get('version') or '?'}: {refused.get('reason')}"
              + (f" ({refused['via']})" if refused.get("via") else ""))
    print(f"  functions     {', '.join(device.get('functions', [])) or '-'}")
    print(f"  variables     {', '.join(device.get('variables', [])) or '-'}")
    if device.get("describe_error"):
        print(f"  describe      unknown: the stored one is unusable ({device['describe_error']})")
    print(f"  dropped       {dropped_line(device.get('dropped') or {})}")
    return 0


def trust_line(trust: dict | None) -> str:
    """What the board says of the keys it trusts (docs/signing.md)."""
    if not trust:
        return "unknown (its system does not say)"
    if trust.get("mode") == "development":
        return "development mode: takes unsigned modules"
    keys = ", ".join(k[:16] for k in trust.get("keys") or []) or "none readable"
    return f"takes only modules signed by {keys}" + (f" ({trust['error']})" if trust.get("error") else "")


def dropped_line(dropped: dict) -> str:
    """The device's dropped messages in one line: `3 message(s), the last at …: reason`."""
    count = dropped.get("count") or 0
    if not count:
        return "0 messages"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(dropped["ts"])) if dropped.get("ts") else "?"
    return f"{count} message(s), the last at {when}: {dropped.get('reason')}"


def heal_line(heal: dict) -> str:
    """The healer's state in one line: `healing: sending system-part 1 1.1.0 (40%), then …`."""
    state = heal.get("state", "idle")
    text = state
    sending = heal.get("sending")
    if sending:
        size = sending.get("size") or 0
        pct = 100 * (sending.get("acknowledged") or 0) // size if size else 0
        doing = "installing" if sending.get("installing") else "sending"
        text += f": {doing} {sending.get('module')}" + ("" if sending.get("installing") else f" ({pct}%)")
        rest = heal.get("plan", [])[1:]
        if rest:
            text += f", then {', '.join(rest)}"
    if heal.get("reason"):
        text += f": {heal['reason']}"
    return text


def rollback_line(r: dict) -> str:
    return (f"{r['function']} {r['index']} {r['version']} -> {r.get('restored') or '?'}"
            f" ({r.get('reason') or 'no reason given'})")


def cmd_get(args) -> int:
    value = ApiClient(cloud_dir(args)).get(args.name, args.variable)
    print(value if not isinstance(value, (dict, list)) else json.dumps(value))
    return 0


def cmd_call(args) -> int:
    print(ApiClient(cloud_dir(args)).call(args.name, args.function, args.arg))
    return 0


def cmd_publish(args) -> int:
    count = ApiClient(cloud_dir(args)).publish(args.event, args.data)
    print(f"published {args.event} to {count} device(s) online (an offline device does not get it)")
    return 0


def cmd_subscribe(args) -> int:
    client = ApiClient(cloud_dir(args))
    after = client.events(-1, args.name, 0)["last"]
    print(f"listening for events{f' of {args.name}' if args.name else ''} (Ctrl-C to stop)",
          file=sys.stderr, flush=True)
    seen = 0
    while args.count is None or seen < args.count:
        reply = client.events(after, args.name, wait=20)
        for event in reply["events"]:
            if args.json:
                print(json.dumps(event), flush=True)
            else:
                stamp = time.strftime("%H:%M:%S", time.localtime(event["ts"]))
                print(f"{stamp} {event['device']} {event['name']} {event['data'] or ''}", flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
        after = reply["last"]
    return 0


def _release_module(image: images.Image):
    from keel_cloud.releases import ReleaseModule

    info = image.info
    return ReleaseModule(
        function=mf.function_name(info.function), index=info.index,
        version=mf.decode_version(info.version), platform=mf.platform_name(info.platform),
        prerelease=mf.is_prerelease(info.version), data=image.data,
    )


def cmd_release_system(args) -> int:
    from keel_cloud.releases import Catalog

    directory = Path(args.dir)
    if not directory.is_dir():
        raise KeelError(f"{directory}: not a directory")
    files = sorted(p for p in directory.glob("*.bin") if p.is_file())
    if not files:
        raise KeelError(f"{directory}: no module images (*.bin); build them with keel build system")
    # Every image is checked before anything is stored.
    modules = [_release_module(images.load_valid_image(path)) for path in files]
    with Catalog(cloud_dir(args)) as catalog:
        result = catalog.add(modules)
    pre = " (prerelease)" if result["prerelease"] else ""
    if not result["added"]:
        print(f"release {result['version']}{pre} for {result['platform']} was already released; nothing to do")
        return 0
    print(f"released {result['version']}{pre} for {result['platform']}: {', '.join(result['added'])}"
          + (f" (already released: {', '.join(result['already'])})" if result["already"] else ""))
    return 0


def cmd_release_list(args) -> int:
    from keel_cloud.releases import Catalog

    with Catalog(cloud_dir(args)) as catalog:
        releases = catalog.releases(args.platform)
    if args.json:
        print(json.dumps(releases, indent=2))
        return 0
    if not releases:
        print("no releases (register one with keel release system DIR)")
    for r in releases:
        pre = "  prerelease" if r["prerelease"] else ""
        print(f"{r['version']}  {r['platform']}  released {r['released'][:10]}{pre}")
        for m in r["modules"]:
            print(f"    {m['function']} {m['index']} {m['version']:<12} {m['size']:>9} bytes  {m['sha256'][:12]}")
    return 0


def cmd_release_app(args) -> int:
    from keel_cloud.fleet_releases import AppImage, Fleets
    from keel_cloud.releases import Catalog

    image = images.load_valid_image(args.file)  # refuses a corrupt image
    info = image.info
    if info.function != mf.FUNCTION_USER_PART:
        raise KeelError(f"{args.file} is {image.name}, not an app (a user part): "
                        "release system parts with keel release system DIR")
    app = AppImage(version=mf.decode_version(info.version), index=info.index,
                   platform=mf.platform_name(info.platform),
                   dependencies=[mf.dependency_dict(d) for d in info.dependencies], data=image.data)
    with Fleets.open(cloud_dir(args)) as fleets, Catalog(cloud_dir(args)) as catalog:
        try:
            release = fleets.release(args.fleet, app, args.allow_prerelease, catalog)
        except CloudError as e:
            raise KeelError(f"{args.file} not released to fleet {args.fleet}: {e}") from None
        members = fleets.registry.fleet(args.fleet)["members"]
    if release["already"]:
        print(f"{args.file} is already release {release['number']} of fleet {args.fleet}; nothing to do")
        return 0
    needs = ", ".join(f"{d['function']} {d['index']} >= {d['version']}" for d in release["dependencies"])
    pre = "; prereleases allowed" if release["allow_prerelease"] else ""
    print(f"released app {release['version']} to fleet {args.fleet} as release {release['number']} "
          f"(needs {needs or 'nothing'}{pre}); {members} device(s) in the fleet")
    tell_the_cloud(args)
    return 0


def cmd_flash(args) -> int:
    image = images.load_valid_image(args.file)
    module = image.info.to_dict()
    module = {k: module[k] for k in ("function", "index", "version", "platform")}
    client = ApiClient(cloud_dir(args))
    device = client.device(args.name)
    if device.get("platform") and device["platform"] != module["platform"]:
        raise KeelError(f"{args.file} is for {module['platform']}, device '{args.name}' is "
                        f"{device['platform']}: nothing sent")
    if not device.get("online"):
        raise KeelError(f"device '{args.name}' is offline")
    if device.get("fleet") and module["function"] == "user-part":
        print(f"note: {args.name} is in fleet {device['fleet']}: once this app runs, the fleet's "
              f"release replaces it (keel fleet remove {device['fleet']} {args.name} to keep it)",
              file=sys.stderr)
    started = client.flash(args.name, image.data, module)
    total = started["size"]
    progress = Progress()
    while True:
        state = client.transfer(started["transfer"])
        progress.update(state["acknowledged"], total)
        if state["state"] != "sending":
            break
        time.sleep(0.2)
    progress.done()
    if state["state"] != "pending":
        raise KeelError(f"update of '{args.name}' failed: {state.get('error')}")
    print(f"sent {image.name} to {args.name} ({total} bytes); the device installs it at its reset")
    return 0


def cmd_flash_any(args) -> int:
    if args.usb:
        from keel import usb

        usb.flash(args.targets, args.port)
        return 0
    if args.port:
        raise KeelError("--port is for --usb: over the air, name the device")
    if len(args.targets) != 2:
        raise KeelError("keel flash NAME FILE sends one image to one device over the air; "
                        "to write modules over USB: keel flash --usb FILE...")
    args.name, args.file = args.targets
    return cmd_flash(args)


def cmd_update(args) -> int:
    from keel_cloud.releases import Catalog

    from keel import usb

    with Catalog(cloud_dir(args)) as catalog:
        usb.update(catalog, args.port, args.version, args.allow_downgrade)
    return 0


def cmd_fleet_create(args) -> int:
    try:
        mf.platform_id(args.platform)
    except mf.FormatError as e:
        raise KeelError(str(e)) from None
    keys = _public_keys(args.require_signed)
    with open_registry(args) as registry:
        registry.create_fleet(args.name, args.platform)
    if keys:
        from keel_cloud.fleet_releases import Fleets

        with Fleets.open(cloud_dir(args)) as fleets:
            fleets.require_signed(args.name, keys)
    signed = f"; it takes only modules signed by {_key_names(keys)}" if keys else ""
    print(f"created fleet {args.name} ({args.platform}){signed}; add devices with "
          f"keel fleet add {args.name} DEVICE")
    return 0


def _public_keys(paths: list[str]) -> list[bytes]:
    from keel import signing

    return [signing.load_public_key(p) for p in paths]


def _key_names(keys: list[bytes]) -> str:
    from keel import signing

    return ", ".join(signing.fingerprint(k)[:16] for k in keys)


def cmd_fleet_require_signed(args) -> int:
    """keel fleet require-signed NAME KEYFILE.pub... | --off"""
    from keel_cloud.fleet_releases import Fleets

    if args.off == bool(args.keys):
        raise KeelError("give the public keys the fleet's modules must be signed by, or --off")
    keys = [] if args.off else _public_keys(args.keys)
    with Fleets.open(cloud_dir(args)) as fleets:
        try:
            fleets.require_signed(args.name, keys)
        except CloudError as e:
            raise KeelError(str(e)) from None
    if keys:
        print(f"fleet {args.name} takes only modules signed by {_key_names(keys)}: its releases "
              "and the system parts sent to its devices")
    else:
        print(f"fleet {args.name} takes unsigned modules again")
    tell_the_cloud(args)
    return 0


def cmd_fleet_add(args) -> int:
    with open_registry(args) as registry:
        result = registry.add_to_fleet(args.name, args.devices)
    if result["added"]:
        print(f"added {', '.join(result['added'])} to fleet {args.name}")
    if result["already"]:
        print(f"already in fleet {args.name}: {', '.join(result['already'])}")
    if result["added"]:
        tell_the_cloud(args)
    return 0


def cmd_fleet_remove(args) -> int:
    with open_registry(args) as registry:
        removed = registry.remove_from_fleet(args.name, args.devices)
    print(f"removed {', '.join(removed)} from fleet {args.name} (they keep the app they run)")
    tell_the_cloud(args)
    return 0


def cmd_fleet_list(args) -> int:
    fleets = ApiClient(cloud_dir(args)).fleets()
    if args.json:
        print(json.dumps(fleets, indent=2))
        return 0
    if not fleets:
        print("no fleets (make one with keel fleet create NAME --platform P)")
    for f in fleets:
        print(f"{f['name']:<20} {f['platform']:<9} {f['members']} device(s)  {release_text(f['release'])}")
    return 0


def release_text(release: dict | None) -> str:
    if release is None:
        return "no release yet"
    pre = ", prereleases allowed" if release["allow_prerelease"] else ""
    return (f"release {release['number']}: app {release['version']} ({release['sha256'][:12]}), "
            f"released {release['released'][:19].replace('T', ' ')}{pre}")


def cmd_fleet_show(args) -> int:
    fleet = ApiClient(cloud_dir(args)).fleet(args.name)
    if args.json:
        print(json.dumps(fleet, indent=2))
        return 0
    print(f"fleet {fleet['name']} ({fleet['platform']}), {fleet['members']} device(s)")
    print(f"  {release_text(fleet['release'])}")
    if fleet.get("signed_by"):
        print(f"  takes only modules signed by {', '.join(k[:16] for k in fleet['signed_by'])}")
    for d in fleet["devices"]:
        state = "online" if d["online"] else "offline"
        print(f"  {d['name']:<20} {state:<7}  app {d['app_version'] or '-':<10} "
              f"system {d['system_version'] or '-':<10} {heal_line(d)}")
        for r in d.get("rollbacks", []):
            print(f"  {'':<20} rolled back {rollback_line(r)}")
    return 0


def add_commands(commands) -> None:
    def cloud_option(p):
        p.add_argument("--cloud", metavar="DIR", help="the cloud directory (default $KEEL_CLOUD or ~/.keel/cloud)")

    cloud = commands.add_parser("cloud", help="run Keel Cloud")
    clouds = cloud.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = clouds.add_parser("serve", help="start the cloud: broker, fleet service, HTTP API")
    # --data: the older name of --cloud here, still taken (not shown)
    p.add_argument("--data", metavar="DIR", help=argparse.SUPPRESS)
    cloud_option(p)
    p.add_argument("--mqtt", metavar="HOST:PORT", help="where devices connect (default 127.0.0.1:8883)")
    p.add_argument("--http", metavar="HOST:PORT", help="the HTTP API (default 127.0.0.1:8780)")
    p.add_argument("--broker", metavar="BROKER",
                   help="auto (the default: Mosquitto where it is installed, else the embedded "
                   "broker), embedded (amqtt behind the gate), mosquitto (run and watch the "
                   "Mosquitto installed here, on --mqtt), or mqtts://HOST:PORT of a broker run "
                   "elsewhere; remembered in the cloud directory (not with --instance)")
    p.add_argument("--instance", metavar="NAME",
                   help="run as instance NAME of several sharing one broker and one PostgreSQL "
                   "registry (its own certificate, issued on first use; docs/cloud.md, "
                   "\"Several instances\")")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_cloud_serve)
    p = clouds.add_parser("add-instance", help="issue a fleet service instance its certificate")
    p.add_argument("name", metavar="NAME")
    cloud_option(p)
    p.set_defaults(func=cmd_cloud_add_instance)
    p = clouds.add_parser("status", help="what the cloud here runs: its broker, address, devices")
    cloud_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cloud_status)
    p = clouds.add_parser("mosquitto-config", help="write a Mosquitto configuration and ACL")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--listen", default="127.0.0.1")
    cloud_option(p)
    p.set_defaults(func=cmd_cloud_mosquitto_config)

    device = commands.add_parser("device", help="devices in the cloud")
    devices = device.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = devices.add_parser("provision", help="give a device its identity and the cloud's address")
    p.add_argument("dir", metavar="DIR", nargs="?", help="a virtual device")
    p.add_argument("--name")
    p.add_argument("--port", help="a board's serial port instead of a virtual device")
    p.add_argument("--fleet", metavar="NAME", help="put the device in this fleet")
    p.add_argument("--wifi", metavar="SSID", help="also store this WiFi network on the device")
    p.add_argument("--password", help="with --wifi: its password (asked for when not given)")
    cloud_option(p)
    p.set_defaults(func=cmd_device_provision)
    p = devices.add_parser("wifi", help="a board's WiFi networks, over its USB console")
    p.add_argument("--port", required=True, help="the board's serial port (or a twin's pty)")
    p.add_argument("--ssid", help="store this network (the newest of at most 5)")
    p.add_argument("--password", help="its password (asked for when not given; "
                   "--password '' for an open network)")
    p.add_argument("--list", action="store_true", help="the networks stored (no passwords)")
    p.add_argument("--clear", action="store_true", help="forget every network")
    p.set_defaults(func=cmd_device_wifi)
    p = devices.add_parser("show", help="one device: state, versions, modules")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true")
    cloud_option(p)
    p.set_defaults(func=cmd_device_show)

    p = commands.add_parser("list", help="every device, online or not, with its system version")
    p.add_argument("--json", action="store_true")
    cloud_option(p)
    p.set_defaults(func=cmd_list)
    p = commands.add_parser("get", help="read a device's variable")
    p.add_argument("name", metavar="NAME")
    p.add_argument("variable", metavar="VARIABLE")
    cloud_option(p)
    p.set_defaults(func=cmd_get)
    p = commands.add_parser("call", help="call a device's function")
    p.add_argument("name", metavar="NAME")
    p.add_argument("function", metavar="FUNCTION")
    p.add_argument("arg", metavar="ARG", nargs="?", default="")
    cloud_option(p)
    p.set_defaults(func=cmd_call)
    p = commands.add_parser("publish", help="send an event to the devices")
    p.add_argument("event", metavar="NAME")
    p.add_argument("data", metavar="DATA", nargs="?")
    cloud_option(p)
    p.set_defaults(func=cmd_publish)
    p = commands.add_parser("subscribe", help="print events devices publish")
    p.add_argument("name", metavar="NAME", nargs="?", help="only this device")
    p.add_argument("--json", action="store_true")
    p.add_argument("--count", type=int, metavar="N", help="stop after N events")
    cloud_option(p)
    p.set_defaults(func=cmd_subscribe)

    release = commands.add_parser("release", help="system releases (the catalog) and fleet app releases")
    releases = release.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = releases.add_parser("system", help="register every module image in DIR (keel build system output)")
    p.add_argument("dir", metavar="DIR")
    cloud_option(p)
    p.set_defaults(func=cmd_release_system)
    p = releases.add_parser("app", help="make an app image its fleet's app: every member gets it")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--fleet", required=True, metavar="NAME")
    p.add_argument("--allow-prerelease", action="store_true",
                   help="let the fleet's devices be healed to prerelease system versions")
    cloud_option(p)
    p.set_defaults(func=cmd_release_app)
    p = releases.add_parser("list", help="the releases, newest first")
    p.add_argument("--json", action="store_true")
    p.add_argument("--platform", metavar="P")
    cloud_option(p)
    p.set_defaults(func=cmd_release_list)

    fleet = commands.add_parser("fleet", help="fleets: devices that run one app release")
    fleets = fleet.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = fleets.add_parser("create", help="a new fleet, for one platform")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--platform", required=True, metavar="P")
    p.add_argument("--require-signed", action="append", default=[], metavar="KEYFILE.pub",
                   help="the fleet takes only modules signed by this key (repeatable)")
    cloud_option(p)
    p.set_defaults(func=cmd_fleet_create)
    p = fleets.add_parser("require-signed",
                          help="the fleet takes only modules signed by these keys (or --off)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("keys", metavar="KEYFILE.pub", nargs="*")
    p.add_argument("--off", action="store_true", help="take unsigned modules again")
    cloud_option(p)
    p.set_defaults(func=cmd_fleet_require_signed)
    for what, func, about in (("add", cmd_fleet_add, "put devices in the fleet"),
                              ("remove", cmd_fleet_remove, "take devices out of the fleet")):
        p = fleets.add_parser(what, help=about)
        p.add_argument("name", metavar="NAME")
        p.add_argument("devices", metavar="DEVICE", nargs="+")
        cloud_option(p)
        p.set_defaults(func=func)
    p = fleets.add_parser("list", help="every fleet with its current release")
    p.add_argument("--json", action="store_true")
    cloud_option(p)
    p.set_defaults(func=cmd_fleet_list)
    p = fleets.add_parser("show", help="a fleet's release and its devices' update state")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true")
    cloud_option(p)
    p.set_defaults(func=cmd_fleet_show)

    p = commands.add_parser(
        "flash", help="send a module image to a device over the air (NAME FILE), or write "
        "modules onto a board over USB (--usb FILE...)",
        usage="keel flash NAME FILE | keel flash --usb FILE... [--port PORT]")
    p.add_argument("targets", metavar="ARG", nargs="+",
                   help="over the air: the device's name, then the image; over USB: the images")
    p.add_argument("--usb", action="store_true",
                   help="write the modules onto the board on a USB serial port (its raw REPL)")
    p.add_argument("--port", help="the board's serial port (default: the only USB board found)")
    cloud_option(p)
    p.set_defaults(func=cmd_flash_any)

    p = commands.add_parser(
        "update", help="bring a board on USB to the newest system release in the catalog")
    p.add_argument("--port", help="the board's serial port (default: the only USB board found)")
    p.add_argument("--version", help="this release instead of the newest (a prerelease only this way)")
    p.add_argument("--allow-downgrade", action="store_true",
                   help="write older modules than the board has")
    cloud_option(p)
    p.set_defaults(func=cmd_update)
