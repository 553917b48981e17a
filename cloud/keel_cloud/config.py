"""The cloud directory: CA, certificates, API token, addresses and the registry.

Found in this order: an explicit path (--cloud DIR), $KEEL_CLOUD, ~/.keel/cloud."""

import json
import os
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from keel_cloud import pki

CONFIG_FILE = "cloud.json"
TOKEN_FILE = "token"
REGISTRY_FILE = "registry.db"
DEFAULT_MQTT = "127.0.0.1:8883"
DEFAULT_HTTP = "127.0.0.1:8780"
SERVER_NAME = "localhost"


class CloudError(Exception):
    """A problem the user can act on (printed on one line by the CLI)."""


def default_dir() -> Path:
    env = os.environ.get("KEEL_CLOUD")
    return Path(env) if env else Path.home() / ".keel" / "cloud"


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        host, port = text, str(default_port)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise CloudError(f"invalid address '{text}' (expected HOST:PORT)")
    return host, int(port)


AUTO, EMBEDDED, MOSQUITTO, EXTERNAL = "auto", "embedded", "mosquitto", "external"


def broker_kind(broker: str | None) -> str:
    """"auto" (none chosen: Mosquitto where it is installed, else the embedded broker),
    "embedded" (amqtt behind the gate), "mosquitto" (run and watched by keel cloud
    serve) or "external" (mqtts://HOST:PORT, run by someone else)."""
    if broker in (None, "", AUTO):
        return AUTO
    if broker == EMBEDDED:
        return EMBEDDED
    if broker == MOSQUITTO:
        return MOSQUITTO
    url = urlparse(broker)
    if url.scheme != "mqtts" or not url.hostname:
        raise CloudError(f"--broker must be auto, embedded, mosquitto or mqtts://HOST:PORT, "
                         f"not '{broker}'")
    return EXTERNAL


def device_address(config: "CloudConfig") -> tuple[str, int]:
    """(host, port) devices connect to: the external broker's, else --mqtt's."""
    if broker_kind(config.broker) == EXTERNAL:
        url = urlparse(config.broker)
        return url.hostname, url.port or 8883
    return parse_address(config.mqtt, 8883)


@dataclass
class CloudConfig:
    mqtt: str = DEFAULT_MQTT  # where devices connect (the gate, or the external broker)
    http: str = DEFAULT_HTTP
    server_name: str = SERVER_NAME  # the broker certificate's name devices check
    # None (auto: Mosquitto where installed, else embedded), "embedded" (amqtt behind the
    # gate), "mosquitto" (run by keel cloud serve), mqtts://HOST:PORT of an external broker
    broker: str | None = None
    database: str | None = None  # a URL (postgresql://…) instead of the SQLite registry
    keepalive: int = 30  # seconds, given to devices at provisioning
    # seconds a device on a new system part has to reach the cloud before its bootloader
    # rolls the part back (sent in every update offer)
    trial_s: int = 300
    extra: dict = field(default_factory=dict)


class CloudDir:
    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path else default_dir()

    def exists(self) -> bool:
        return (self.path / CONFIG_FILE).is_file()

    def require(self) -> "CloudDir":
        if not self.exists():
            raise CloudError(
                f"no Keel Cloud at {self.path}: start one with 'keel cloud serve' "
                "(or name it with --cloud DIR or KEEL_CLOUD)"
            )
        return self

    def config(self) -> CloudConfig:
        data = json.loads((self.path / CONFIG_FILE).read_text())
        known = {k: data.pop(k) for k in list(data) if k in CloudConfig.__dataclass_fields__}
        return CloudConfig(**known, extra=data)

    def save_config(self, config: CloudConfig) -> None:
        data = asdict(config)
        data.update(data.pop("extra"))
        tmp = self.path / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.path / CONFIG_FILE)

    def token(self) -> str:
        return (self.path / TOKEN_FILE).read_text().strip()

    @property
    def registry_path(self) -> Path:
        return self.path / REGISTRY_FILE

    def ca(self) -> pki.CertificateAuthority:
        return pki.CertificateAuthority.load(self.path)

    def instances(self) -> list[str]:
        """The names of the fleet service instances issued a certificate here."""
        folder = self.path / pki.INSTANCES_DIR
        return sorted(p.stem for p in folder.glob("*.pem")) if folder.is_dir() else []

    def instance_pem(self, name: str) -> tuple[Path, bool]:
        """Instance NAME's certificate and key (issued by the cloud's CA on first use), and
        whether it was issued now."""
        if not INSTANCE_NAME.match(name or ""):
            raise CloudError(f"invalid instance name '{name}' (1 to 32 lowercase letters, digits "
                             "and '-', a letter or digit first)")
        path = self.path / pki.INSTANCES_DIR / f"{name}.pem"
        new = not path.is_file()
        if new:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            _write_private(path, self.ca().issue(pki.instance_cn(name)).pem)
        return path, new

    def init(self, mqtt: str | None = None, http: str | None = None,
             broker: str | None = None, save: bool = True) -> CloudConfig:
        """Create the directory on first start (CA, broker and service certificates,
        API token); later starts keep them and only update the addresses given (in
        the returned config only, with save=False: an instance's own options)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.path.chmod(0o700)
        if not (self.path / pki.CA_KEY).is_file():
            ca = pki.CertificateAuthority.create()
            ca.save(self.path)
        ca = self.ca()
        if not (self.path / pki.SERVER_PEM).is_file():
            server = ca.issue(SERVER_NAME, [SERVER_NAME, "127.0.0.1", "::1"], client=False)
            _write_private(self.path / pki.SERVER_PEM, server.pem)
        if not (self.path / pki.SERVICE_PEM).is_file():
            service = ca.issue(pki.SERVICE_CN)
            _write_private(self.path / pki.SERVICE_PEM, service.pem)
        if not (self.path / TOKEN_FILE).is_file():
            _write_private(self.path / TOKEN_FILE, (secrets.token_urlsafe(32) + "\n").encode())
        config = self.config() if self.exists() else CloudConfig()
        if mqtt:
            parse_address(mqtt, 8883)
            config.mqtt = mqtt
        if http:
            parse_address(http, 8780)
            config.http = http
        if broker is not None:
            config.broker = None if broker_kind(broker) == AUTO else broker
        if save:
            self.save_config(config)
        return config


INSTANCE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)
