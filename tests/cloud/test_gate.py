"""The MQTT packet helpers and the broker gate in front of the embedded broker (amqtt):
what the gate refuses and answers itself, and that a refused client never reaches amqtt.
The isolation tests shared with Mosquitto are in test_mosquitto_acl.py."""

import asyncio
import dataclasses
import struct
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keel_cloud import gate as gate_mod
from keel_cloud import mqtt_packets as mp
from keel_cloud.gate import Gate, server_context

WAIT = 5.0
QUIET = 1.0


# --- mqtt_packets ----------------------------------------------------------------------

@pytest.mark.parametrize("n, encoded", [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"), (2_097_151, b"\xff\xff\x7f"),
    (2_097_152, b"\x80\x80\x80\x01"), (268_435_455, b"\xff\xff\xff\x7f"),
])
def test_remaining_length(n, encoded):
    assert mp.encode_remaining_length(n) == encoded
    assert mp.decode_remaining_length(b"\x30" + encoded) == (n, 1 + len(encoded))


def test_remaining_length_limits():
    with pytest.raises(mp.PacketError):
        mp.encode_remaining_length(268_435_456)
    with pytest.raises(mp.PacketError):
        mp.encode_remaining_length(-1)
    with pytest.raises(mp.PacketError):
        mp.decode_remaining_length(b"\x30\xff\xff\xff\xff\x01")
    assert mp.decode_remaining_length(b"\x30\xff\xff") is None  # needs more bytes


@given(st.integers(0, mp.MAX_REMAINING_LENGTH))
def test_remaining_length_round_trip(n):
    encoded = mp.encode_remaining_length(n)
    assert len(encoded) <= 4
    assert mp.decode_remaining_length(encoded, 0) == (n, len(encoded))


def test_split_packet():
    two = mp.build_puback(7) + mp.build_suback(3, [1, 0x80])
    packet, used = mp.split_packet(two)
    assert (packet.type, packet.body, used) == (mp.PUBACK, b"\x00\x07", 4)
    packet, used = mp.split_packet(two[used:])
    assert packet.name == "SUBACK"
    assert mp.parse_suback(packet.body) == (3, [1, 0x80])
    for cut in range(len(two[:4])):
        assert mp.split_packet(two[:cut]) == (None, 0)
    with pytest.raises(mp.PacketError):
        mp.split_packet(mp.build_publish("t", b"x" * 100), max_size=50)


@pytest.mark.parametrize("header", [b"\x00\x00", b"\xf0\x00", b"\x80\x00", b"\x12\x00",
                                    b"\x36\x00", b"\x60\x00", b"\xe1\x00"])
def test_invalid_fixed_headers(header):
    # reserved types, SUBSCRIBE/CONNECT/PUBREL/DISCONNECT with wrong flags, PUBLISH QoS 3
    with pytest.raises(mp.PacketError):
        mp.split_packet(header)


def test_built_packets_are_exact():
    assert mp.build_connack(5) == b"\x20\x02\x00\x05"
    assert mp.build_connack(0, session_present=True) == b"\x20\x02\x01\x00"
    assert mp.build_puback(0x1234) == b"\x40\x02\x12\x34"
    assert mp.build_pubrec(1) == b"\x50\x02\x00\x01"
    assert mp.build_pubrel(1) == b"\x62\x02\x00\x01"
    assert mp.build_pubcomp(1) == b"\x70\x02\x00\x01"
    assert mp.build_suback(3, [0x80, 0x80]) == b"\x90\x04\x00\x03\x80\x80"
    assert mp.build_subscribe(10, [("a/b", 1)]) == b"\x82\x08\x00\x0a\x00\x03a/b\x01"
    assert mp.build_publish("a", b"hi", qos=1, packet_id=2, retain=True) == \
        b"\x33\x07\x00\x01a\x00\x02hi"
    assert mp.PINGREQ_BYTES == b"\xc0\x00" and mp.DISCONNECT_BYTES == b"\xe0\x00"


def test_connect_round_trip():
    raw = mp.build_connect("dev1", keepalive=30, will_topic="devices/dev1/status",
                           will_message=b"offline", will_qos=1, will_retain=True,
                           username="u", password=b"p\x00w")
    packet, used = mp.split_packet(raw)
    assert used == len(raw) and packet.type == mp.CONNECT
    c = mp.parse_connect(packet.body)
    assert c == mp.Connect("MQTT", 4, True, 30, "dev1", "devices/dev1/status", b"offline", 1,
                           True, "u", b"p\x00w")
    assert c.has_will
    bare = mp.parse_connect(mp.split_packet(mp.build_connect("", keepalive=0,
                                                             clean_session=False))[0].body)
    assert (bare.client_id, bare.keepalive, bare.clean_session, bare.has_will,
            bare.username, bare.password) == ("", 0, False, False, None, None)


@given(client_id=st.text(st.characters(blacklist_characters="\x00",
                                        blacklist_categories=("Cs",)), max_size=40),
       keepalive=st.integers(0, 65535), will=st.booleans(), qos=st.integers(0, 2),
       payload=st.binary(max_size=300))
def test_connect_round_trip_any(client_id, keepalive, will, qos, payload):
    kwargs = {"will_topic": "w/" + client_id, "will_message": payload, "will_qos": qos} if will else {}
    packet, _ = mp.split_packet(mp.build_connect(client_id, keepalive=keepalive, **kwargs))
    c = mp.parse_connect(packet.body)
    assert (c.client_id, c.keepalive) == (client_id, keepalive)
    assert c.will_topic == (("w/" + client_id) if will else None)
    assert c.will_message == (payload if will else None)


def _connect_body(flags: int, payload: bytes, name: bytes = b"MQTT", level: int = 4) -> bytes:
    return struct.pack(">H", len(name)) + name + bytes([level, flags]) + b"\x00\x1e" + payload


@pytest.mark.parametrize("body", [
    _connect_body(0x03, b"\x00\x01a"),  # reserved flag
    _connect_body(0x1e, b"\x00\x01a\x00\x01t\x00\x00"),  # will QoS 3
    _connect_body(0x22, b"\x00\x01a"),  # will retain without will
    _connect_body(0x42, b"\x00\x01a\x00\x01p"),  # password without user name
    _connect_body(0x02, b"\x00\x01a!"),  # trailing bytes
    _connect_body(0x02, b"\x00\x05a"),  # truncated client id
    _connect_body(0x02, b"\x00\x02\xc3\x28"),  # not UTF-8
    _connect_body(0x02, b"\x00\x02a\x00"),  # U+0000
    b"\x00\x04MQ",  # truncated protocol name
])
def test_malformed_connect(body):
    with pytest.raises(mp.PacketError):
        mp.parse_connect(body)


def test_publish_parse():
    for qos, pid in ((0, None), (1, 9), (2, 10)):
        packet, _ = mp.split_packet(mp.build_publish("devices/x/a", b"\x00data", qos=qos,
                                                     packet_id=pid, dup=bool(qos)))
        p = mp.parse_publish(packet.flags, packet.body)
        assert p == mp.Publish("devices/x/a", b"\x00data", qos, False, bool(qos), pid)
    with pytest.raises(mp.PacketError):  # packet id 0
        mp.parse_publish(0x02, b"\x00\x01a\x00\x00")
    with pytest.raises(mp.PacketError):  # no room for the packet id
        mp.parse_publish(0x02, b"\x00\x01a\x00")
    with pytest.raises(mp.PacketError):
        mp.build_publish("a", qos=1)


def test_subscribe_parse():
    packet, _ = mp.split_packet(mp.build_subscribe(5, [("a/#", 1), ("b/+", 0)]))
    assert mp.parse_subscribe(packet.body) == mp.Subscribe(5, [("a/#", 1), ("b/+", 0)])
    for body in (b"\x00\x05", b"\x00\x05\x00\x01a\x03", b"\x00\x05\x00\x01a\x04",
                 b"\x00\x00\x00\x01a\x01", b"\x00\x05\x00\x01a"):
        with pytest.raises(mp.PacketError):
            mp.parse_subscribe(body)
    packet, _ = mp.split_packet(mp.build_unsubscribe(6, ["a/#", "b"]))
    assert mp.parse_unsubscribe(packet.body) == mp.Unsubscribe(6, ["a/#", "b"])
    with pytest.raises(mp.PacketError):
        mp.parse_unsubscribe(b"\x00\x06")


def test_read_packet_from_stream():
    async def run(data: bytes, eof: bool = True):
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        if eof:
            reader.feed_eof()
        out = []
        try:
            while (p := await mp.read_packet(reader, max_size=1000)) is not None:
                out.append(p)
        except mp.PacketError as exc:
            out.append(exc)
        return out

    got = asyncio.run(run(mp.PINGREQ_BYTES + mp.build_publish("t", b"x" * 200)))
    assert [p.type for p in got] == [mp.PINGREQ, mp.PUBLISH]
    assert isinstance(asyncio.run(run(mp.build_puback(1)[:3]))[0], mp.PacketError)
    assert isinstance(asyncio.run(run(b"\x30\xff\xff\xff\xff\x7f"))[0], mp.PacketError)
    assert isinstance(asyncio.run(run(mp.build_publish("t", b"x" * 2000)))[0], mp.PacketError)
    assert asyncio.run(run(b"")) == []


@pytest.mark.parametrize("topic_filter, valid", [
    ("a", True), ("a/b/c", True), ("#", True), ("a/#", True), ("+", True), ("a/+/c", True),
    ("/", True), ("", False), ("a#", False), ("a/#/b", False), ("a+/b", False), ("a/b#", False),
])
def test_topic_filters(topic_filter, valid):
    assert mp.valid_topic_filter(topic_filter) is valid


@pytest.mark.parametrize("topic_filter, topic, match", [
    ("a/b", "a/b", True), ("a/b", "a/c", False), ("a/+", "a/b", True), ("a/+", "a/b/c", False),
    ("a/#", "a", True), ("a/#", "a/b/c", True), ("#", "a/b", True), ("+/+", "a/b", True),
    ("+", "/a", False), ("+/a", "/a", True), ("#", "$SYS/x", False), ("+/x", "$SYS/x", False),
    ("$SYS/#", "$SYS/x", True), ("a/b/c", "a/b", False), ("a/+/c", "a/b/c", True),
])
def test_topic_matches(topic_filter, topic, match):
    assert mp.topic_matches(topic_filter, topic) is match


DEV = "0123456789abcdef01234567"


@pytest.mark.parametrize("topic_filter, allowed", [
    (f"devices/{DEV}/#", True), (f"devices/{DEV}/call", True), (f"devices/{DEV}/+/x", True),
    (f"devices/{DEV}/inbox/#", True), (f"devices/{DEV}", False), (f"devices/{DEV}/a#", False),
    ("#", False), ("devices/#", False), ("devices/+/call", False), ("+/+/+", False),
    (f"devices/{DEV}x/#", False), (f"devices/{DEV[:-1]}/#", False), ("$SYS/#", False),
    (f"devices/ffffffffffffffffffffffff/#", False),
])
def test_subscribe_acl(topic_filter, allowed):
    assert gate_mod.may_subscribe(DEV, topic_filter) is allowed


@pytest.mark.parametrize("topic, allowed", [
    (f"devices/{DEV}/status", True), (f"devices/{DEV}/events/a/b", True),
    (f"devices/{DEV}/+", False), (f"devices/{DEV}/#", False), (f"devices/{DEV}", False),
    (f"devices/{DEV}x/status", False), ("devices/other/status", False), ("status", False),
])
def test_publish_acl(topic, allowed):
    assert gate_mod.may_publish(DEV, topic) is allowed


def test_safe_identity():
    assert gate_mod.safe_identity(DEV) and gate_mod.safe_identity("keel-service")
    for bad in ("", None, "a/b", "+", "#", "a\x00"):
        assert not gate_mod.safe_identity(bad)


# --- the gate in front of amqtt --------------------------------------------------------

@pytest.fixture
def broker(embedded_broker):
    """The tests below are about the embedded broker only."""
    return embedded_broker


def amqtt_session(broker, client_id):
    entry = broker.embedded.amqtt.sessions.get(client_id)
    return entry[0] if entry else None


def wait_until(predicate, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_spoofed_id_never_reaches_amqtt(clients, make_identity):
    gate = clients.broker.embedded.gate
    a = clients.device()
    a.subscribe(f"devices/{a.ident.cn}/#")
    session = amqtt_session(clients.broker, a.ident.cn)
    assert session is not None
    relayed, refused = gate.stats.relayed, gate.stats.refused

    spoofer = clients.raw(make_identity())
    spoofer.send(mp.build_connect(a.ident.cn, clean_session=True))
    assert spoofer.sock.recv(16) == b"\x20\x02\x00\x05"  # CONNACK, not authorised
    assert spoofer.closed_within(WAIT)
    assert gate.stats.relayed == relayed
    assert gate.stats.refused == refused + 1
    assert amqtt_session(clients.broker, a.ident.cn) is session  # untouched

    service = clients.service()
    service.publish(f"devices/{a.ident.cn}/call", "hi")
    assert a.expect(f"devices/{a.ident.cn}/call").payload == b"hi"
    assert not a.disconnected.is_set()


@pytest.mark.parametrize("case", ["empty id", "foreign will", "wildcard will"])
def test_connect_refused_with_5(clients, make_identity, case):
    ident = make_identity()
    kwargs = {}
    client_id = ident.cn
    if case == "empty id":
        client_id = ""
    elif case == "foreign will":
        kwargs = {"will_topic": "devices/ffffffffffffffffffffffff/status", "will_message": b"x"}
    else:
        kwargs = {"will_topic": f"devices/{ident.cn}/#", "will_message": b"x"}
    relayed = clients.broker.embedded.gate.stats.relayed
    raw = clients.raw(ident)
    assert raw.connect(client_id, **kwargs) == mp.CONNACK_NOT_AUTHORIZED
    assert raw.closed_within(WAIT)
    assert clients.broker.embedded.gate.stats.relayed == relayed


def test_other_protocol_levels_refused(clients, make_identity):
    ident = make_identity()
    raw = clients.raw(ident)
    body = _connect_body(0x02, struct.pack(">H", len(ident.cn)) + ident.cn.encode(),
                         name=b"MQIsdp", level=3)
    raw.send(mp.encode_packet(mp.CONNECT, 0, body))
    packet = raw.read_packet()
    assert mp.parse_connack(packet.body) == (False, mp.CONNACK_BAD_PROTOCOL)
    assert raw.closed_within(WAIT)


@pytest.mark.parametrize("first", [
    mp.PINGREQ_BYTES,  # not a CONNECT
    b"\x10\xff\xff\xff\xff\x7f",  # remaining length of five bytes
    b"\x10\xff\xff\x7f",  # a CONNECT far too big for one
    mp.encode_packet(mp.CONNECT, 0, b"\x00\x04MQTT\x04\x02\x00"),  # truncated CONNECT
])
def test_garbage_first_packet_closes(clients, make_identity, first):
    relayed = clients.broker.embedded.gate.stats.relayed
    raw = clients.raw(make_identity())
    raw.send(first)
    assert raw.closed_within(WAIT)
    assert clients.broker.embedded.gate.stats.relayed == relayed


def test_connect_timeout(clients, make_identity):
    b = clients.broker
    context = server_context(b.ca_file, b.cloud.path / "server.pem")
    gate = Gate(context, b.embedded.open_upstream, connect_timeout=0.5)
    _, port = b.run(gate.start("127.0.0.1", 0))
    try:
        raw = clients.raw(make_identity(), port=port)
        start = time.monotonic()
        # closed, and not before its 0.5 s (a loaded machine may take longer: 10 s)
        assert raw.closed_within(10.0)
        assert 0.4 < time.monotonic() - start
        assert gate.stats.refused == 1 and gate.stats.relayed == 0
    finally:
        b.run(gate.stop())


def test_forbidden_publish_is_acknowledged_and_dropped(clients, make_identity):
    gate = clients.broker.embedded.gate
    service = clients.service()
    service.subscribe("devices/#")
    ident = make_identity()
    raw = clients.raw(ident)
    assert raw.connect(ident.cn) == mp.CONNACK_ACCEPTED
    dropped = gate.stats.dropped_publishes
    other = "devices/ffffffffffffffffffffffff/call"

    raw.send(mp.build_publish(other, b"q0"))
    raw.send(mp.build_publish(other, b"q1", qos=1, packet_id=11))
    assert raw.read_packet() == mp.Packet(mp.PUBACK, 0, b"\x00\x0b")
    raw.send(mp.build_publish(other, b"q2", qos=2, packet_id=12))
    assert raw.read_packet() == mp.Packet(mp.PUBREC, 0, b"\x00\x0c")
    raw.send(mp.build_pubrel(12))
    assert raw.read_packet() == mp.Packet(mp.PUBCOMP, 0, b"\x00\x0c")
    raw.send(mp.build_publish(f"devices/{ident.cn}/+", b"wild", qos=1, packet_id=13))
    assert raw.read_packet() == mp.Packet(mp.PUBACK, 0, b"\x00\x0d")
    assert gate.stats.dropped_publishes == dropped + 4

    # The connection is still fine, and its own topics still go through.
    raw.send(mp.build_publish(f"devices/{ident.cn}/events/ok", b"ok", qos=1, packet_id=14))
    assert raw.read_packet() == mp.Packet(mp.PUBACK, 0, b"\x00\x0e")
    assert service.expect(f"devices/{ident.cn}/events/ok").payload == b"ok"
    assert [m.topic for m in service.received(0.3)] == []
    raw.send(mp.PINGREQ_BYTES)
    assert raw.read_packet().type == mp.PINGRESP


def test_forbidden_subscribe_refused_whole(clients, make_identity):
    gate = clients.broker.embedded.gate
    service = clients.service()
    ident = make_identity()
    raw = clients.raw(ident)
    assert raw.connect(ident.cn) == mp.CONNACK_ACCEPTED
    refused = gate.stats.refused_subscribes
    mine = f"devices/{ident.cn}/call"
    raw.send(mp.build_subscribe(21, [(mine, 1), ("devices/+/call", 1), ("#", 0)]))
    assert raw.read_packet() == mp.Packet(mp.SUBACK, 0, b"\x00\x15\x80\x80\x80")
    assert gate.stats.refused_subscribes == refused + 1
    service.publish(mine, "not subscribed")
    with pytest.raises(TimeoutError):
        raw.read_packet(0.5)  # the allowed filter of that SUBSCRIBE was not subscribed
    raw.send(mp.build_subscribe(22, [(mine, 1)]))
    assert raw.read_packet() == mp.Packet(mp.SUBACK, 0, b"\x00\x16\x01")
    service.publish(mine, "now")
    packet = raw.read_packet()
    assert mp.parse_publish(packet.flags, packet.body).payload == b"now"


def test_service_may_subscribe_everything(clients):
    service = clients.service()
    assert service.subscribe("#") == [1]
    assert service.subscribe("devices/+/status") == [1]


def test_second_connect_and_malformed_packets_close(clients, make_identity):
    ident = make_identity()
    raw = clients.raw(ident)
    assert raw.connect(ident.cn) == mp.CONNACK_ACCEPTED
    raw.send(mp.build_connect(ident.cn))
    assert raw.closed_within(WAIT)
    raw = clients.raw(ident)
    assert raw.connect(ident.cn) == mp.CONNACK_ACCEPTED
    raw.send(b"\x82\x03\x00\x01\x00")  # SUBSCRIBE cut short
    assert raw.closed_within(WAIT)


def test_keepalive_is_enforced_and_the_will_published(clients, make_identity):
    # amqtt 0.12 never times out a silent client; the gate does (1.5 x keepalive).
    service = clients.service()
    ident = make_identity()
    status = f"devices/{ident.cn}/status"
    service.subscribe(status)
    raw = clients.raw(ident)
    start = time.monotonic()
    assert raw.connect(ident.cn, keepalive=1, will_topic=status, will_message=b"offline",
                       will_qos=1, will_retain=True) == mp.CONNACK_ACCEPTED
    # closed once 1.5 x keepalive has passed in silence, not before (a loaded machine
    # may take longer: 10 s)
    assert raw.closed_within(10.0)
    assert 1.3 < time.monotonic() - start
    assert service.expect(status).payload == b"offline"


def test_reconnect_takes_over_and_the_stale_will_comes_first(clients, make_identity):
    gate = clients.broker.embedded.gate
    service = clients.service()
    ident = make_identity()
    status = f"devices/{ident.cn}/status"
    service.subscribe(status)
    will = {"will_topic": status, "will_message": b"offline", "will_qos": 1, "will_retain": True}
    first = clients.raw(ident)
    assert first.connect(ident.cn, **will) == mp.CONNACK_ACCEPTED
    takeovers = gate.stats.takeovers
    second = clients.raw(ident)
    assert second.connect(ident.cn, **will) == mp.CONNACK_ACCEPTED
    assert first.closed_within(WAIT)
    assert gate.stats.takeovers == takeovers + 1
    second.send(mp.build_publish(status, b"online", qos=1, packet_id=1, retain=True))
    assert second.read_packet().type == mp.PUBACK
    assert service.expect(status).payload == b"offline"  # the old connection's will ...
    assert service.expect(status).payload == b"online"  # ... then the new session
    assert wait_until(lambda: amqtt_session(clients.broker, ident.cn) is not None)
    assert clients.broker.embedded.amqtt.retained_messages[status].data == b"online"


def test_retained_messages_of_others_are_withheld(clients, make_identity):
    # Stock amqtt 0.12 sends a connecting client the retained messages matching anybody's
    # subscriptions. Keel's broker (broker.KeelBroker) sends a clean session none on
    # connect, only those of its own subscriptions as it subscribes; the gate would still
    # pass on only what the client subscribed to (its filter: test_broker_scale.py).
    gate = clients.broker.embedded.gate
    service = clients.service()
    service.subscribe("devices/+/status")
    b = clients.device()
    b.publish(f"devices/{b.ident.cn}/status", "online", retain=True)
    service.expect(f"devices/{b.ident.cn}/status")
    withheld = gate.stats.withheld_deliveries
    ident = make_identity()
    raw = clients.raw(ident)
    assert raw.connect(ident.cn) == mp.CONNACK_ACCEPTED
    with pytest.raises(TimeoutError):
        raw.read_packet(QUIET)
    assert gate.stats.withheld_deliveries == withheld  # nothing leaked to withhold


def test_connections_are_counted(clients, make_identity):
    stats = clients.broker.embedded.gate.stats
    assert wait_until(lambda: stats.active == 0)  # the earlier tests' clients are gone
    before = dataclasses.replace(stats)
    ident = make_identity()
    raw = clients.raw(ident)
    assert raw.connect(ident.cn) == mp.CONNACK_ACCEPTED
    assert wait_until(lambda: stats.active == before.active + 1)
    assert stats.connections == before.connections + 1
    assert stats.relayed == before.relayed + 1
    raw.send(mp.DISCONNECT_BYTES)
    assert raw.closed_within(WAIT)
    assert wait_until(lambda: stats.active == before.active)
