"""keel cloud serve: the broker (embedded amqtt behind the gate, Mosquitto run and
watched by this process, or an external broker), the fleet service and the HTTP API, in
one process. What runs is recorded in CLOUD_DIR/serve.json for `keel cloud status`."""

import asyncio
import json
import logging
import os
import signal
import ssl
import threading
import time
from pathlib import Path

from keel_cloud import pki
from keel_cloud.config import (AUTO, EMBEDDED, EXTERNAL, INSTANCE_NAME, MOSQUITTO, TOKEN_FILE, CloudDir,
                               CloudError, broker_kind, device_address, parse_address)
from keel_cloud.http_api import ApiServer
from keel_cloud.registry import Registry
from keel_cloud.fleet_service import FleetService

log = logging.getLogger("keel.cloud")


# The addresses the broker's certificate names (keel_cloud.config.CloudDir.init).
CERTIFIED_HOSTS = {"localhost", "127.0.0.1", "::1"}
SERVE_FILE = "serve.json"  # what this directory's `keel cloud serve` runs, while it runs
def service_tls(cloud_dir: CloudDir, check_hostname: bool, instance: str | None = None,
                pem=None) -> ssl.SSLContext:
    """The fleet service's TLS: its certificate (instance NAME's own, with one; pem's,
    with pem), and the broker's verified against the cloud's CA (and its name too, with
    check_hostname)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cloud_dir.path / pki.CA_CERT))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(pem or (cloud_dir.instance_pem(instance)[0] if instance
                                    else cloud_dir.path / pki.SERVICE_PEM)))
    ctx.check_hostname = check_hostname
    return ctx


class _LoopThread:
    """An asyncio loop in a thread, for the embedded broker."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="keel-broker", daemon=True)
        self.thread.start()

    def run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Cloud:
    """A running Keel Cloud (what `keel cloud serve` starts)."""

    def __init__(self, cloud_dir: CloudDir, mqtt: str | None = None, http: str | None = None,
                 broker: str | None = None, instance: str | None = None):
        self.dir = cloud_dir
        self.instance = instance
        # An instance's addresses and broker are its own: the cloud directory's stay.
        self.config = cloud_dir.init(mqtt, http, broker, save=instance is None)
        self.registry = None
        self.broker = None
        self.supervisor = None
        self.loop = None
        self.service = None
        self.api = None

    def start(self) -> None:
        config = self.config
        kind = self.kind = self.chosen_broker()
        instance = self.instance
        if instance:
            if kind == EMBEDDED:
                raise CloudError("--instance needs Mosquitto or an external broker (mqtts://): the "
                                 "embedded broker has no shared subscriptions")
            add_instance(self.dir, instance)
        self.registry = Registry(config.database or self.dir.registry_path)
        if kind != EXTERNAL:
            self.registry.set_all_offline()  # a broker of its own, fresh: devices will say again
        if kind == EXTERNAL:
            host, port = device_address(config)
            tls = service_tls(self.dir, config.server_name is not None, instance)
        elif kind == MOSQUITTO:
            from keel_cloud.supervisor import MosquittoSupervisor

            listen, port = parse_address(config.mqtt, 8883)
            self.supervisor = MosquittoSupervisor(self.dir, listen, port)
            self.supervisor.start()
            host = "127.0.0.1" if listen in ("0.0.0.0", "") else listen
            tls = service_tls(self.dir, host in CERTIFIED_HOSTS, instance)
        else:
            from keel_cloud.broker import EmbeddedBroker

            self.loop = _LoopThread()
            self.broker = EmbeddedBroker(self.dir)
            self.loop.run(self.broker.start())
            # Through the gate, with the service's certificate, like every client: amqtt
            # has no socket of its own. The gate is this process's own listener, so its
            # certificate is checked against the CA, and its name when it is one the
            # certificate carries (a gate bound to another address of the host is not).
            host, port = self.broker.service_address
            tls = service_tls(self.dir, host in CERTIFIED_HOSTS)
        # A persistent session but with the embedded broker (which dies with this
        # process): the broker keeps what the service has not acknowledged (a message is
        # acknowledged once committed) across a lost connection, and the Mosquitto this
        # process runs across its own restarts (it is told to save it once subscribed).
        keep = kind != EMBEDDED
        def session_tls(name: str):
            """Instance NAME's TLS, to take up its session once it died (keel_cloud.adopt);
            None when this directory lacks its certificate (instances on other machines)."""
            if not INSTANCE_NAME.match(name):
                return None
            pem = self.dir.path / pki.INSTANCES_DIR / f"{name}.pem"
            return service_tls(self.dir, tls.check_hostname, pem=pem) if pem.is_file() else None

        self.service = FleetService(self.registry, host, port, tls, cloud_path=self.dir.path,
                                    trial_s=config.trial_s, instance=instance,
                                    http=f"http://{config.http}/api/", persistent=keep,
                                    on_subscribed=self.supervisor.save if self.supervisor else None,
                                    ack_after_commit=kind != EMBEDDED, session_tls=session_tls)
        self.service.start()
        http_host, http_port = parse_address(config.http, 8780)
        self.api = ApiServer((http_host, http_port), self.service, self.dir.token())
        self.api.start()

    def stop(self) -> None:
        if self.api:
            self.api.shutdown()
            self.api.server_close()
        if self.service:
            self.service.stop()
        if self.broker:
            self.loop.run(self.broker.stop())
            self.loop.stop()
        if self.supervisor:
            self.supervisor.stop()
        if self.registry:
            self.registry.close()

    def chosen_broker(self) -> str:
        """The broker to run: the one chosen, or (auto) Mosquitto where it is installed."""
        kind = broker_kind(self.config.broker)
        if kind == AUTO:
            from keel_cloud.supervisor import find_mosquitto

            kind = MOSQUITTO if find_mosquitto() else EMBEDDED
        return kind

    def record(self) -> dict:
        """What runs, for keel cloud status (CLOUD_DIR/serve.json)."""
        config = self.config
        kind = self.kind
        return {"pid": os.getpid(), "started": time.time(), "broker": kind, "instance": self.instance,
                "address": "mqtts://%s:%d" % device_address(config),
                "http": f"http://{config.http}/api/",
                "broker_log": str(self.supervisor.log_path) if self.supervisor else None}


def serve_file(cloud_dir: CloudDir, instance: str | None = None) -> Path:
    """What a running `keel cloud serve` (of instance NAME) runs: serve.json (serve-NAME.json)."""
    return cloud_dir.path / (f"serve-{instance}.json" if instance else SERVE_FILE)


def add_instance(cloud_dir: CloudDir, name: str) -> tuple[Path, bool]:
    """Instance NAME's certificate (issued if new); a Mosquitto this cloud directory runs
    learns it (its ACL gives instances every topic). (its path, whether it was new)"""
    path, new = cloud_dir.instance_pem(name)
    if new:
        from keel_cloud.mosquitto import update_acl
        from keel_cloud.supervisor import FOLDER

        if update_acl(cloud_dir, cloud_dir.path / FOLDER):
            time.sleep(0.5)  # Mosquitto reads it again at its next loop: before we connect
    return path, new


def serve(cloud_dir: CloudDir, mqtt=None, http=None, broker=None, out=print, instance=None) -> None:
    cloud = Cloud(cloud_dir, mqtt, http, broker, instance)
    try:
        cloud.start()
    except (OSError, CloudError) as e:
        cloud.stop()
        raise CloudError(f"cannot start the cloud: {e}") from None
    config = cloud.config
    record = cloud.record()
    # Recorded before the first line is printed: whoever waits for that line finds it.
    record_file = serve_file(cloud_dir, instance)
    tmp = record_file.with_name(record_file.name + ".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(record_file)
    where = {EMBEDDED: f"mqtts://{config.mqtt} (the embedded broker)",
             MOSQUITTO: f"mqtts://{config.mqtt} (Mosquitto, run by this service: "
                        f"{cloud.supervisor.binary if cloud.supervisor else ''})",
             EXTERNAL: config.broker}[record["broker"]]
    out(f"Keel Cloud{f' instance {instance}' if instance else ''}: devices connect to {where}; "
        f"API on http://{config.http}/api/; data in {cloud_dir.path}")
    if record["broker"] == EMBEDDED and broker_kind(config.broker) == AUTO:
        out("Keel Cloud: no mosquitto found (on PATH, or $KEEL_MOSQUITTO), so the embedded "
            "broker runs: it suits development and small fleets. For more, install Mosquitto "
            "(apt-get install mosquitto; Debian puts it in /usr/sbin) and start again "
            "(docs/cloud.md)")
    out(f"Keel Console: http://{config.http}/ (sign in with the token in {cloud_dir.path / TOKEN_FILE})")
    # A plain flag: the handler must not take a lock the main thread may hold.
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    while not stop:
        time.sleep(0.2)
    out("Keel Cloud: stopping")
    try:
        if json.loads(record_file.read_text()).get("pid") == os.getpid():
            record_file.unlink()
    except (OSError, ValueError):
        pass
    cloud.stop()
