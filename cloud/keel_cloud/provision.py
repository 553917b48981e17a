"""Device identities: a key and a certificate (CN = the device id) signed by the
cloud's CA, plus the CA and the cloud's address, as the files the device reads
from /keel/cloud/. The device is registered under its name at the same time."""

import json
import re

from keel_cloud import keel_files
from keel_cloud.config import CloudDir, CloudError, device_address
from keel_cloud.registry import Registry, RegistryError

# The board's own id (hal/device_id.py): 12 hex digits on an ESP32 (its MAC), 16 on an
# nRF52840 (FICR), 24 on the virtual board; at most the protocol's MAX_DEVICE_ID (32).
_ID = re.compile(r"^[0-9a-f]{12,32}$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def identity_files(cloud_dir: CloudDir, device_id: str, name: str, platform: str | None = None,
                   install=None) -> dict[str, bytes]:
    """Issue the device's identity and register it; returns {device path: content}.
    install(files), when given, puts them on the device before the registry is changed:
    if it fails, nothing is registered or renamed (a failed provision changes nothing)."""
    if not _ID.match(device_id):
        raise CloudError(f"'{device_id}' is not a device id (12 to 32 lowercase hex digits)")
    if not _NAME.match(name):
        raise CloudError(f"invalid device name '{name}' (letters, digits, '.', '_', '-'; at most 64)")
    cloud_dir.require()
    config = cloud_dir.config()
    registry = Registry(config.database or cloud_dir.registry_path)
    try:
        other = registry.name_taken(name, device_id)
        if other:
            raise CloudError(f"the name '{name}' is taken by device {other}")
        ca = cloud_dir.ca()
        identity = ca.issue(device_id)
        host, port = device_address(config)
        settings = {"host": host, "port": port, "server_name": config.server_name,
                    "keepalive": config.keepalive}
        files = {
            keel_files.CLOUD_KEY_FILE: identity.key_der,
            keel_files.CLOUD_CERT_FILE: identity.cert_der,
            keel_files.CLOUD_CA_FILE: ca.cert_der,
            keel_files.CLOUD_FILE: json.dumps(settings).encode(),
        }
        if install is not None:
            install(files)
        registry.add_device(device_id, name, platform)
    except RegistryError as e:
        raise CloudError(str(e)) from None
    finally:
        registry.close()
    return files
