"""keel_cloud.protocol: what a device may send, at the limits docs/protocol.md states
(the service's side of it is in test_hostile_devices.py)."""

import json

import pytest

from keel_cloud import protocol
from keel_cloud.protocol import Invalid, parse

DEV = "0123456789abcdef01234567"
BASE = f"devices/{DEV}/"

# The describe of docs/protocol.md, and what a device's bootloader records for a module
# (bootloader/keel_boot.py Slot.to_dict), a rollback and a missing dependency.
DESCRIBE = {
    "platform": "virtual", "board": "virtual", "mode": "safe", "safe_mode_reason": "dependency",
    "missing": [{"function": "system-part", "index": 2, "version": "1.2.0"},
                {"function": "system-part", "index": 1, "version": None}],
    "reset_reason": "power-on", "vm": {"name": "micropython", "version": "1.29.0"},
    "heap_free": 104512, "app": "not-run",
    "modules": [
        {"function": "system-part", "index": 1, "version": "1.1.0", "platform": "virtual",
         "dependencies": [{"function": "bootloader", "index": 0, "version": "1.0.0"}],
         "size": 40960, "crc_ok": True, "sha256_ok": True, "valid": True, "slot": "system1",
         "sha256": "ab" * 32},
        {"function": "user-part", "index": 1, "version": None, "valid": False, "crc_ok": False,
         "sha256_ok": None, "slot": "user", "invalid_reason": "crc"},
    ],
    "functions": ["led"], "variables": ["temperature"],
    "rollback": {"function": "system-part", "index": 2, "version": "1.1.0", "sha256": "cd" * 32,
                 "restored": "1.0.0", "reason": "no-cloud"},
    "signed_by": "a newer device's key, kept as sent",
    "network": {"kind": "wifi", "state": "up", "connects": 2, "error": None, "ssid": "home",
                "rssi": -61, "ip": "192.168.10.20"},
}


def dumps(value) -> bytes:
    return json.dumps(value).encode()


def test_a_real_describe_passes_whole():
    message = parse(BASE + "describe", dumps(DESCRIBE))
    assert (message.device_id, message.kind, message.value) == (DEV, "describe", DESCRIBE)
    assert parse(BASE + "describe", b"{}").value == {}


def test_status():
    assert parse(BASE + "status", b"online").value is True
    assert parse(BASE + "status", b"offline").value is False
    for bad in (b"", b"Online", b"online ", b"1"):
        with pytest.raises(Invalid, match="status"):
            parse(BASE + "status", bad)


def test_events_at_their_limits():
    name = "n" * protocol.MAX_EVENT_NAME
    data = "é" * (protocol.MAX_EVENT_DATA // 2)  # 1024 bytes, 512 characters
    assert parse(BASE + f"events/{name}", data.encode()).value == (name, data)
    assert parse(BASE + "events/a/b", b"").value == ("a/b", None)
    with pytest.raises(Invalid, match="limit of 1024"):
        parse(BASE + "events/x", (data + "x").encode())
    with pytest.raises(Invalid, match="event name"):
        parse(BASE + f"events/{name}x", b"")
    for topic in ("events", "events/"):
        with pytest.raises(Invalid, match="event name"):
            parse(BASE + topic, b"x")


def test_describe_limits():
    module = {"function": "system-part", "index": 1, "version": "1.0.0"}
    parse(BASE + "describe", dumps({"modules": [module] * protocol.MAX_MODULES}))
    with pytest.raises(Invalid, match="modules: 17 entries"):
        parse(BASE + "describe", dumps({"modules": [module] * (protocol.MAX_MODULES + 1)}))
    padded = {"board": "b", "pad": "x" * (protocol.MAX_DESCRIBE - 30)}
    size = len(dumps(padded))
    padded["pad"] += "x" * (protocol.MAX_DESCRIBE - size)
    assert len(dumps(padded)) == protocol.MAX_DESCRIBE
    parse(BASE + "describe", dumps(padded))
    padded["pad"] += "x"
    with pytest.raises(Invalid, match="over the limit"):
        parse(BASE + "describe", dumps(padded))
    nested = {"x": [[[[{}]]]]}  # 6 deep: the limit
    parse(BASE + "describe", dumps(nested))
    with pytest.raises(Invalid, match="nested"):
        parse(BASE + "describe", dumps({"x": [[[[[{}]]]]]}))
    parse(BASE + "describe", dumps({"functions": ["f" * 64] * protocol.MAX_NAMES}))


@pytest.mark.parametrize("change, where", [
    ({"modules": [{"index": 1}]}, "modules[0].function: missing"),
    ({"modules": [{"function": "user-part", "index": -1}]}, "modules[0].index"),
    ({"modules": [{"function": "user-part", "index": 1, "size": "big"}]}, "modules[0].size"),
    ({"modules": [{"function": "user-part", "index": 1, "valid": 1}]}, "modules[0].valid"),
    ({"modules": [{"function": "user-part", "index": 1, "dependencies": [{"function": "x", "index": 0}]}]},
     "dependencies[0].version: missing"),
    ({"missing": [{"function": "system-part"}]}, "missing[0].index: missing"),
    ({"rollback": {"function": "system-part", "index": 2, "version": "1.1.0", "sha256": "ab"}},
     "rollback.sha256"),
    ({"vm": {"name": 3}}, "vm.name"),
    ({"network": ["wifi"]}, "network: a list"),
    ({"network": {"kind": "lte", "state": "up"}}, "network.kind"),
    ({"network": {"kind": "wifi", "state": "flying"}}, "network.state"),
    ({"network": {"kind": "wifi", "state": "up", "rssi": 900}}, "network.rssi"),
    ({"network": {"kind": "wifi", "state": "up", "ssid": "s" * 33}}, "network.ssid"),
    ({"network": {"kind": "wifi", "state": "up", "error": ["x"]}}, "network.error"),
    ({"mode": ""}, "mode"),
])
def test_describe_fields(change, where):
    with pytest.raises(Invalid) as e:
        parse(BASE + "describe", dumps(dict(DESCRIBE, **change)))
    assert where in str(e.value)


def test_replies():
    ok = {"id": "0123456789abcdef", "ok": True, "result": 21.5}
    assert parse(BASE + "reply", dumps(ok)).value == ok
    failed = {"id": "x", "ok": False, "error": "KeyError: no variable 'nope'"}
    assert parse(BASE + "reply", dumps(failed)).value == failed
    for result in (None, "text", 3, True):
        parse(BASE + "reply", dumps(dict(ok, result=result)))
    for bad in ({"id": 7, "ok": True}, {"id": "x"}, {"id": "x", "ok": 1}, dict(ok, result=[1]),
                {"id": "x", "ok": False, "error": "e" * (protocol.MAX_REPLY_ERROR + 1)}):
        with pytest.raises(Invalid, match="reply"):
            parse(BASE + "reply", dumps(bad))


def test_ota_statuses_the_device_sends():
    for status in ({"state": "receiving", "next": 12, "bitmap": "0f", "window": 8, "ack": 2},
                   {"state": "refused", "reason": "dependency",
                    "missing": [{"function": "system-part", "index": 1, "version": "1.2.0"}]},
                   {"state": "verifying", "duplicates": 0}, {"state": "failed", "reason": "sha256"},
                   {"state": "pending"}, {"state": "installed", "version": "1.1.0"},
                   {"state": "installed", "version": None}):
        assert parse(BASE + "ota/status", dumps(status)).value == status
    for bad in ({"state": "receiving", "ack": 0}, {"state": "receiving", "next": 1.5},
                {"state": "receiving", "bitmap": "0" * 258}, {"state": None}):
        with pytest.raises(Invalid, match="ota/status"):
            parse(BASE + "ota/status", dumps(bad))


@pytest.mark.parametrize("topic", ["elsewhere", "devices", "devices/", f"devices/{'x' * 33}/status",
                                   f"{BASE}foo", f"{BASE}ota/offer", f"{BASE}call"])
def test_topics_that_are_not_a_device_message(topic):
    with pytest.raises(Invalid):
        parse(topic, b"online")


def test_stored_describes_read_by_the_same_rules():
    assert protocol.parse_describe(dumps(DESCRIBE)) == DESCRIBE
    for stored in (b"[]", b"{", b'{"modules": {}}', b"\xff"):
        with pytest.raises(Invalid, match="describe"):
            protocol.parse_describe(stored)
