"""What a device may send the cloud (docs/protocol.md, "Limits"): every message is checked
here, in one place, before it touches the registry, the healer or the OTA sender.

parse(topic, payload) returns a Message or raises Invalid with a short reason (written
by Keel: of what the device sent it quotes at most a clipped event name or sub-topic).
parse_describe() is the same check for a describe read back from the registry, where
older versions (or a hand) may have left anything.

Unknown keys are kept (within the size limits), so a device newer than its cloud can add
to its describe; every key this cloud reads must have the type and length below."""

import json
import re
from dataclasses import dataclass

# Sizes in bytes (of the MQTT payload), lengths in characters.
MAX_DEVICE_ID = 32  # the registry's column
MAX_DESCRIBE = 16 * 1024
MAX_EVENT_NAME = 64
MAX_EVENT_DATA = 1024
MAX_REPLY = 4096
MAX_REPLY_ERROR = 1024
MAX_REQUEST_ID = 64
MAX_OTA_STATUS = 2048
MAX_MODULES = 16
MAX_DEPENDENCIES = 16
MAX_MISSING = 16
MAX_NAMES = 32  # functions, variables (a device registers at most 20 of each)
MAX_NAME = 64  # a function's or variable's name
MAX_TEXT = 64  # board, mode, reasons, function names, versions, slots
MAX_PLATFORM = 32  # the registry's column
MAX_KEYS = 64  # keys of any one object
MAX_DEPTH = 6  # objects and lists within each other
MAX_INDEX = 255
MAX_TRUSTED_KEYS = 8  # the public keys a board says it trusts (fingerprints)
TRUST_MODES = ("development", "enforced")
MAX_COUNT = 2**31 - 1  # sizes, heap, chunk numbers
MAX_WINDOW = 1024  # OTA chunks a device may say it holds ahead of `next`
NETWORK_KINDS = ("wifi", "host", None)
NETWORK_STATES = ("none", "listening", "joining", "up", "waiting", "off")
OTA_STATES = ("receiving", "refused", "verifying", "failed", "pending", "installed")
STATUSES = {b"online": True, b"offline": False}
_HEX = re.compile(r"^[0-9a-fA-F]*$")


class Invalid(ValueError):
    """A message the protocol does not allow; str() is the reason."""


@dataclass(frozen=True)
class Message:
    device_id: str
    kind: str  # "status", "describe", "event", "reply", "ota_status"
    value: object  # status: online (bool); describe, reply, ota_status: dict;
    # event: (name, data or None)


def device_of(topic: str) -> str | None:
    """The device id of a devices/<id>/... topic; None for any other topic."""
    parts = topic.split("/", 2)
    if len(parts) < 3 or parts[0] != "devices" or not 0 < len(parts[1]) <= MAX_DEVICE_ID:
        return None
    return parts[1]


def parse(topic: str, payload: bytes) -> Message:
    """The message a device sent on topic; Invalid if the protocol does not allow it."""
    device_id = device_of(topic)
    if device_id is None:
        raise Invalid("not a device topic")
    rest = topic.split("/", 2)[2]
    if rest == "status":
        if payload not in STATUSES:
            raise Invalid(f"status: must be 'online' or 'offline' ({_size(payload)})")
        return Message(device_id, "status", STATUSES[payload])
    if rest == "describe":
        return Message(device_id, "describe", parse_describe(payload))
    if rest == "reply":
        return Message(device_id, "reply", _reply(_json(payload, MAX_REPLY, "reply")))
    if rest == "ota/status":
        return Message(device_id, "ota_status", _ota_status(_json(payload, MAX_OTA_STATUS,
                                                                  "ota/status")))
    if rest == "events" or rest.startswith("events/"):
        return Message(device_id, "event", _event(rest[len("events/"):], payload))
    raise Invalid(f"unknown topic 'devices/{device_id}/{_clip(rest)}'")


def parse_describe(payload: bytes) -> dict:
    """A describe's JSON text (as sent, or as stored) if the protocol allows it."""
    return check_describe(_json(payload, MAX_DESCRIBE, "describe"))


# Payloads


def _size(payload: bytes) -> str:
    return f"{len(payload)} bytes"


def _clip(text: str, limit: int = 32) -> str:
    """A bit of a device's text for a reason: printable, and short."""
    text = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return text + ("…" if len(text) == limit else "")


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _json(payload: bytes, limit: int, what: str):
    if len(payload) > limit:
        raise Invalid(f"{what}: {_size(payload)}, over the limit of {limit}")
    try:
        value = json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise Invalid(f"{what}: not UTF-8") from None
    except (ValueError, RecursionError):
        raise Invalid(f"{what}: not JSON") from None
    _check_depth(value, what)
    if not isinstance(value, dict):
        raise Invalid(f"{what}: a JSON {_kind(value)}, not an object")
    return value


def _check_depth(value, what: str) -> None:
    """No container deeper than MAX_DEPTH and no object with more than MAX_KEYS keys
    (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise Invalid(f"{what}: nested deeper than {MAX_DEPTH}")
            if isinstance(item, dict) and len(item) > MAX_KEYS:
                raise Invalid(f"{what}: an object with more than {MAX_KEYS} keys")
            inner = item.values() if isinstance(item, dict) else item
            stack.extend((v, depth + 1) for v in inner)


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


# Fields


def _text(obj: dict, key: str, where: str, limit: int = MAX_TEXT, required: bool = False,
          empty: bool = False) -> None:
    value = obj.get(key)
    if value is None:
        if required:
            raise Invalid(f"{where}.{key}: missing")
        return
    if not isinstance(value, str):
        raise Invalid(f"{where}.{key}: a {_kind(value)}, not a string")
    if len(value) > limit or (not value and not empty):
        raise Invalid(f"{where}.{key}: {len(value)} characters, not 1 to {limit}")


def _integer(obj: dict, key: str, where: str, low: int, high: int, required: bool = False) -> None:
    value = obj.get(key)
    if value is None:
        if required:
            raise Invalid(f"{where}.{key}: missing")
        return
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise Invalid(f"{where}.{key}: not an integer from {low} to {high}")


def _boolean(obj: dict, key: str, where: str) -> None:
    value = obj.get(key)
    if value is not None and not isinstance(value, bool):
        raise Invalid(f"{where}.{key}: a {_kind(value)}, not true or false")


def _hex(obj: dict, key: str, where: str, length: int | None = None, limit: int = 64) -> None:
    value = obj.get(key)
    if value is None:
        return
    if not isinstance(value, str) or not _HEX.match(value) or len(value) > limit \
            or (length is not None and len(value) != length):
        wanted = f"{length}" if length is not None else f"at most {limit}"
        raise Invalid(f"{where}.{key}: not {wanted} hex digits")


def _list(obj: dict, key: str, where: str, limit: int) -> list:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise Invalid(f"{where}.{key}: a {_kind(value)}, not a list")
    if len(value) > limit:
        raise Invalid(f"{where}.{key}: {len(value)} entries, more than {limit}")
    return value


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise Invalid(f"{where}: a {_kind(value)}, not an object")
    return value


def _module_key(entry: dict, where: str, version_required: bool) -> None:
    """function, index, version: what names a module (and a dependency)."""
    _text(entry, "function", where, required=True)
    _integer(entry, "index", where, 0, MAX_INDEX, required=True)
    _text(entry, "version", where, required=version_required)


# Messages


def check_describe(describe) -> dict:
    """The describe if the protocol allows it; else Invalid (docs/protocol.md, Describe)."""
    where = "describe"
    _object(describe, where)
    _text(describe, "platform", where, limit=MAX_PLATFORM)
    for key in ("board", "mode", "safe_mode_reason", "reset_reason", "app"):
        _text(describe, key, where)
    _integer(describe, "heap_free", where, 0, MAX_COUNT)
    vm = describe.get("vm")
    if vm is not None:
        _object(vm, f"{where}.vm")
        _text(vm, "name", f"{where}.vm")
        _text(vm, "version", f"{where}.vm")
    for i, module in enumerate(_list(describe, "modules", where, MAX_MODULES)):
        at = f"{where}.modules[{i}]"
        _object(module, at)
        _module_key(module, at, version_required=False)
        for key in ("platform", "slot", "invalid_reason"):
            _text(module, key, at)
        for key in ("valid", "crc_ok", "sha256_ok", "in_place"):
            _boolean(module, key, at)
        _integer(module, "size", at, 0, MAX_COUNT)
        _hex(module, "sha256", at, length=64)
        for j, dependency in enumerate(_list(module, "dependencies", at, MAX_DEPENDENCIES)):
            _module_key(_object(dependency, f"{at}.dependencies[{j}]"), f"{at}.dependencies[{j}]",
                        version_required=True)
    _missing(describe, where)
    for key in ("functions", "variables"):
        for i, name in enumerate(_list(describe, key, where, MAX_NAMES)):
            if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
                raise Invalid(f"{where}.{key}[{i}]: not a name of 1 to {MAX_NAME} characters")
    rollback = describe.get("rollback")
    if rollback is not None:
        at = f"{where}.rollback"
        _module_key(_object(rollback, at), at, version_required=True)
        _hex(rollback, "sha256", at, length=64)
        _text(rollback, "restored", at)
        _text(rollback, "reason", at)
    trust = describe.get("trust")
    if trust is not None:
        at = f"{where}.trust"
        _object(trust, at)
        if trust.get("mode") not in TRUST_MODES:
            raise Invalid(f"{at}.mode: not one of {', '.join(TRUST_MODES)}")
        for i, key in enumerate(_list(trust, "keys", at, MAX_TRUSTED_KEYS)):
            if not isinstance(key, str) or not _HEX.match(key) or len(key) != 64:
                raise Invalid(f"{at}.keys[{i}]: not a fingerprint (64 hex digits)")
        _text(trust, "error", at)
    network = describe.get("network")
    if network is not None:
        at = f"{where}.network"
        _object(network, at)
        if network.get("kind") not in NETWORK_KINDS:
            raise Invalid(f"{at}.kind: not one of wifi, host or null")
        if network.get("state") not in NETWORK_STATES:
            raise Invalid(f"{at}.state: not one of {', '.join(NETWORK_STATES)}")
        _integer(network, "connects", at, 0, MAX_COUNT)
        _integer(network, "rssi", at, -128, 127)
        _text(network, "ssid", at, limit=32)
        _text(network, "ip", at, limit=45)
        error = network.get("error")
        if isinstance(error, int) and not isinstance(error, bool):
            _integer(network, "error", at, 0, 65535)  # (a raw reason the port passes on)
        else:
            _text(network, "error", at)
    refused = describe.get("refused")
    if refused is not None:
        at = f"{where}.refused"
        _module_key(_object(refused, at), at, version_required=False)
        _hex(refused, "sha256", at, length=64)
        _text(refused, "reason", at, required=True)
        _text(refused, "via", at)
    return describe


def _missing(obj: dict, where: str) -> None:
    for i, dependency in enumerate(_list(obj, "missing", where, MAX_MISSING)):
        at = f"{where}.missing[{i}]"
        _module_key(_object(dependency, at), at, version_required=False)


def _reply(reply: dict) -> dict:
    where = "reply"
    request_id = reply.get("id")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID:
        raise Invalid(f"{where}.id: a {_kind(request_id)}, not a request id "
                      f"(a string of 1 to {MAX_REQUEST_ID} characters)")
    if not isinstance(reply.get("ok"), bool):
        raise Invalid(f"{where}.ok: a {_kind(reply.get('ok'))}, not true or false")
    if reply["ok"]:
        result = reply.get("result")
        if isinstance(result, (dict, list)):
            raise Invalid(f"{where}.result: a {_kind(result)}, "
                          "not a string, number, boolean or null")
    else:
        _text(reply, "error", where, limit=MAX_REPLY_ERROR, empty=True)
    return reply


def _ota_status(status: dict) -> dict:
    where = "ota/status"
    state = status.get("state")
    if state not in OTA_STATES:
        raise Invalid(f"{where}.state: not one of {', '.join(OTA_STATES)}")
    _integer(status, "next", where, 0, MAX_COUNT)
    _integer(status, "window", where, 1, MAX_WINDOW)
    _integer(status, "ack", where, 1, MAX_WINDOW)
    _integer(status, "duplicates", where, 0, MAX_COUNT)
    _hex(status, "bitmap", where, limit=2 * ((MAX_WINDOW + 7) // 8))
    bitmap = status.get("bitmap")
    if bitmap is not None and len(bitmap) % 2:
        raise Invalid(f"{where}.bitmap: an odd number of hex digits")
    _text(status, "reason", where)
    _text(status, "version", where)
    _missing(status, where)
    return status


def _event(name: str, payload: bytes) -> tuple[str, str | None]:
    if not 0 < len(name) <= MAX_EVENT_NAME or "\x00" in name:
        raise Invalid(f"event name: {len(name)} characters, not 1 to {MAX_EVENT_NAME}")
    if len(payload) > MAX_EVENT_DATA:
        raise Invalid(f"event '{_clip(name)}': {_size(payload)} of data, over the limit of "
                      f"{MAX_EVENT_DATA}")
    try:
        data = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid(f"event '{_clip(name)}': the data is not UTF-8") from None
    return name, (data if data else None)

