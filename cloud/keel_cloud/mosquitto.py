"""A Mosquitto 2.0 configuration for Keel Cloud (the production broker).

The same contract as the embedded broker's gate (docs/protocol.md):

- TLS >= 1.2 with a client certificate signed by the cloud's CA (`require_certificate`);
- the certificate's CN is the MQTT user name (`use_identity_as_username`), so nobody
  connects without a certificate and `allow_anonymous false` costs nothing;
- `use_username_as_clientid`: Mosquitto cannot compare the client id a client sends
  with its CN and refuse a mismatch the way the gate does (CONNACK 5), so it ignores the
  client id and uses the CN instead. A client with a valid certificate for X claiming to
  be device A is connected as X: it can only ever take over X's own session, and device
  A's session is never disturbed;
- the ACL: every user reads and writes `devices/<its CN>/#` only (a pattern with %u);
  the fleet service (`keel-service`) may use every topic. Mosquitto 2.0.11 answers a
  forbidden SUBSCRIBE with a granted SUBACK and then delivers nothing to it.
"""

import os
import pwd
import signal
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keel_cloud import pki
from keel_cloud.config import CloudDir

CONFIG_FILE = "mosquitto.conf"
ACL_FILE = "acl"
DB_FILE = "mosquitto.db"  # its state, with persistence
AUTOSAVE_S = 60
PID_FILE = "mosquitto.pid"  # written by keel_cloud.supervisor for the one it runs
CA_FILE = "ca.pem"
CERT_FILE = "server.crt"
KEY_FILE = "server.key"


def acl_text(service_cns=(pki.SERVICE_CN,)) -> str:
    """The ACL: devices their own prefix, the fleet service (and each of its instances,
    keel cloud serve --instance) everything."""
    if isinstance(service_cns, str):
        service_cns = [service_cns]
    text = ("# Keel Cloud topic ACL (written by keel_cloud.mosquitto).\n"
            "# Every client: its own prefix only (%u is its certificate's CN).\n"
            "pattern readwrite devices/%u/#\n")
    for cn in service_cns:
        text += f"\n# The fleet service{' instance' if cn != pki.SERVICE_CN else ''}: everything.\n"
        text += f"user {cn}\ntopic readwrite #\n"
    return text


def service_cns(cloud_dir: CloudDir, service_cn: str = pki.SERVICE_CN) -> list[str]:
    return [service_cn] + [pki.instance_cn(name) for name in cloud_dir.instances()]


def update_acl(cloud_dir: CloudDir, out_dir: Path | str) -> bool:
    """Rewrite out_dir's ACL (a configuration write_config wrote) with the instances the
    cloud directory has now, and tell the Mosquitto running it to read it again
    (SIGHUP, to the pid in out_dir/mosquitto.pid). True when one was told."""
    out = Path(out_dir)
    if not (out / ACL_FILE).is_file():
        return False
    _write(out / ACL_FILE, acl_text(service_cns(cloud_dir)).encode(), 0o644)
    try:
        pid = int((out / PID_FILE).read_text())
        os.kill(pid, signal.SIGHUP)
        return True
    except (OSError, ValueError):
        return False


def split_server_pem(pem: bytes) -> tuple[bytes, bytes]:
    """(certificate chain PEM, private key PEM) from a file holding both."""
    certs = x509.load_pem_x509_certificates(pem)
    key = serialization.load_pem_private_key(pem, None) if b"PRIVATE KEY" in pem else None
    if not certs or key is None:
        raise ValueError("server.pem must hold a certificate and its private key")
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return chain, key_pem


def write_config(cloud_dir: CloudDir | Path | str, out_dir: Path | str, port: int = 8883,
                 listen: str = "127.0.0.1", *, user: str | None = None,
                 service_cn: str = pki.SERVICE_CN, persistence: bool = False) -> Path:
    """Write mosquitto.conf, the ACL, the CA certificate and the broker's certificate and
    key (split out of server.pem) into out_dir; returns the configuration's path. Run it
    with `mosquitto -c PATH`.

    persistence: Mosquitto keeps its state in out_dir/mosquitto.db (written every
    AUTOSAVE_S, at a clean stop and on SIGUSR1), so a fleet service with a persistent
    session keeps its subscriptions across a restart of the broker, and what devices
    publish before it is back waits for it.

    user: the account Mosquitto switches to when started as root, before it reads the
    key (Mosquitto's default: 'mosquitto'). The key is readable by its owner only: when
    this runs as root, the files are given to that account (if it exists and is not
    root); it must also be able to reach out_dir."""
    if not isinstance(cloud_dir, CloudDir):
        cloud_dir = CloudDir(cloud_dir)
    src = cloud_dir.path
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    chain, key_pem = split_server_pem((src / pki.SERVER_PEM).read_bytes())
    _write(out / CA_FILE, (src / pki.CA_CERT).read_bytes(), 0o644)
    _write(out / CERT_FILE, chain, 0o644)
    _write(out / KEY_FILE, key_pem, 0o600)
    _write(out / ACL_FILE, acl_text(service_cns(cloud_dir, service_cn)).encode(), 0o644)

    lines = [
        "# Keel Cloud broker (written by keel_cloud.mosquitto; see docs/protocol.md).",
        "per_listener_settings false",
        "allow_anonymous false",
        *(["persistence true", f"persistence_location {out}/", f"autosave_interval {AUTOSAVE_S}"]
          if persistence else ["persistence false"]),
        f"acl_file {out / ACL_FILE}",
        # The fleet service is one subscriber for the whole fleet: when thousands of
        # devices reconnect at once, Mosquitto's default queue (1000 messages per client)
        # would drop their status and describe messages on the way to it.
        "max_queued_messages 200000",
        # The service acknowledges a message once its write is committed (keel_cloud.
        # ingest): with Mosquitto's default of 20 unacknowledged messages per client, it
        # would get 20 per commit. Devices are sent few messages (requests, and an
        # update's chunks, which the service sends a few at a time), so this is theirs too.
        "max_inflight_messages 1000",
        # Small messages (an OTA chunk's acknowledgement, a status) go at once: with
        # Nagle's algorithm on (Mosquitto's default) each waits for the previous one's TCP
        # acknowledgement, and an update's round trips grow by tens of ms each.
        "set_tcp_nodelay true",
    ]
    if user:
        lines.append(f"user {user}")
    lines += [
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "",
        f"listener {int(port)} {listen}",
        "protocol mqtt",
        f"cafile {out / CA_FILE}",
        f"certfile {out / CERT_FILE}",
        f"keyfile {out / KEY_FILE}",
        "tls_version tlsv1.2",  # the minimum; TLS 1.3 is allowed too
        "require_certificate true",
        "use_identity_as_username true",
        # The CN (the user name) is the client id, whatever the client sent: a spoofed
        # id cannot disturb another device's session.
        "use_username_as_clientid true",
        "",
    ]
    path = out / CONFIG_FILE
    _write(path, "\n".join(lines).encode(), 0o644)
    _give_to(user or "mosquitto", [out / CA_FILE, out / CERT_FILE, out / KEY_FILE,
                                   out / ACL_FILE, path])
    return path


def _give_to(account: str, paths: list[Path]) -> None:
    if os.geteuid() != 0 or account == "root":
        return
    try:
        entry = pwd.getpwnam(account)
    except KeyError:
        return
    for p in paths:
        os.chown(p, entry.pw_uid, entry.pw_gid)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    tmp.replace(path)
