"""Device isolation, over both brokers Keel Cloud supports: the embedded one (amqtt
behind the gate) and Mosquitto with the configuration keel_cloud.mosquitto writes.
Isolation is judged by what is delivered, never by the SUBACK (Mosquitto 2.0.11 grants a
forbidden subscription and then delivers nothing to it)."""

import ssl

import secrets

import pytest

from keel_cloud import mqtt_packets as mp
from keel_cloud import pki
from keel_cloud.mosquitto import acl_text, split_server_pem, write_config

WAIT = 5.0
QUIET = 1.0


# --- the configuration itself -------------------------------------------------------

def test_config_file(cloud, tmp_path):
    conf = write_config(cloud, tmp_path / "mq", port=18999, listen="127.0.0.1")
    text = conf.read_text()
    for line in ("listener 18999 127.0.0.1", "require_certificate true",
                 "use_identity_as_username true", "use_username_as_clientid true",
                 "allow_anonymous false", "tls_version tlsv1.2", "persistence false",
                 "max_queued_messages 200000",
                 f"acl_file {tmp_path / 'mq' / 'acl'}"):
        assert line in text.splitlines(), line
    assert "\nuser " not in text
    assert "user mosquitto" in write_config(cloud, tmp_path / "u", user="mosquitto").read_text()
    key = tmp_path / "mq" / "server.key"
    assert key.stat().st_mode & 0o077 == 0
    # The split files are the broker's certificate and key from server.pem.
    chain, key_pem = split_server_pem((cloud.path / pki.SERVER_PEM).read_bytes())
    assert (tmp_path / "mq" / "server.crt").read_bytes() == chain
    assert key.read_bytes() == key_pem
    assert pki.common_name(chain) == "localhost"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "mq" / "server.crt", key)  # they belong together


def test_acl_file():
    lines = acl_text().splitlines()
    assert "pattern readwrite devices/%u/#" in lines
    user = lines.index(f"user {pki.SERVICE_CN}")
    assert lines[user + 1] == "topic readwrite #"
    # The pattern applies to everyone; nothing else grants a device anything.
    assert not [line for line in lines[:user] if line.startswith("topic")]


def test_split_server_pem_needs_both(cloud):
    with pytest.raises(ValueError):
        split_server_pem((cloud.path / pki.CA_CERT).read_bytes())


# --- isolation, on both brokers -------------------------------------------------------

def test_a_cannot_receive_b(clients):
    service = clients.service()
    b = clients.device()
    a = clients.device()
    b.subscribe(f"devices/{b.ident.cn}/#")
    b.publish(f"devices/{b.ident.cn}/status", "online", retain=True)
    b.expect(f"devices/{b.ident.cn}/status")

    a.subscribe(f"devices/{a.ident.cn}/#")
    for stolen in (f"devices/{b.ident.cn}/#", "#", "devices/#", "devices/+/call", "+/+/+"):
        a.subscribe(stolen)  # granted or not: what counts is what arrives

    for topic in ("call", "get", "inbox/news"):
        service.publish(f"devices/{b.ident.cn}/{topic}", "for b only")
    b.expect(f"devices/{b.ident.cn}/call")
    b.expect(f"devices/{b.ident.cn}/inbox/news")
    service.publish(f"devices/{a.ident.cn}/call", "for a")

    got = a.received(QUIET)
    assert [m.topic for m in got] == [f"devices/{a.ident.cn}/call"]  # not b's, not retained


def test_retained_messages_stay_with_their_device(clients):
    service = clients.service()
    service.subscribe("devices/#")  # the service's subscriptions must not leak to devices
    b = clients.device()
    b.publish(f"devices/{b.ident.cn}/status", "online", retain=True)
    b.publish(f"devices/{b.ident.cn}/describe", "{}", retain=True)
    service.expect(f"devices/{b.ident.cn}/describe")
    a = clients.device()
    a.subscribe(f"devices/{a.ident.cn}/#")
    a.subscribe(f"devices/{b.ident.cn}/status")
    a.subscribe("#")
    assert a.received(QUIET) == []


def test_a_cannot_publish_into_b(clients):
    service = clients.service()
    a = clients.device()
    b = clients.device()
    b.subscribe(f"devices/{b.ident.cn}/#")
    service.subscribe(f"devices/{b.ident.cn}/#")
    service.subscribe(f"devices/{a.ident.cn}/#")

    a.publish(f"devices/{b.ident.cn}/reply", '{"id": 1, "ok": true}', qos=1)
    a.publish(f"devices/{b.ident.cn}/status", "offline", qos=1, retain=True)
    a.publish(f"devices/{b.ident.cn}/events/x", "zero", qos=0)
    a.publish("devices/elsewhere", "x", qos=1)
    a.publish(f"devices/{a.ident.cn}/events/mine", "ok", qos=1)  # the control

    assert service.expect(f"devices/{a.ident.cn}/events/mine").payload == b"ok"
    assert b.received(QUIET) == []
    assert [m.topic for m in service.received(0)] == []
    # Nothing was retained for b's status either (subscribing again re-sends retained).
    service.subscribe(f"devices/{b.ident.cn}/status")
    assert service.received(0.3) == []


def test_no_client_certificate_is_refused(clients):
    refused_connack(clients, None)


def test_foreign_ca_is_refused(clients, make_identity):
    a = clients.device()
    a.subscribe(f"devices/{a.ident.cn}/#")
    evil = make_identity(a.ident.cn, ca=pki.CertificateAuthority.create("Evil CA"))
    refused_connack(clients, evil, client_id=a.ident.cn)
    still_connected(clients, a)


def refused_connack(clients, ident, client_id=None):
    """The TLS handshake fails, or the connection ends before any CONNACK."""
    try:
        raw = clients.raw(ident)
    except (ssl.SSLError, ConnectionError):
        return
    try:
        raw.send(mp.build_connect(client_id or secrets.token_hex(12)))
    except (ssl.SSLError, ConnectionError):
        return
    assert raw.read_packet(WAIT) is None


def test_spoofed_client_id(clients, make_identity):
    a = clients.device()
    a.subscribe(f"devices/{a.ident.cn}/#")
    x = make_identity()
    spoofer = clients.raw(x)
    code = spoofer.connect(a.ident.cn, will_topic=f"devices/{a.ident.cn}/status",
                           will_message=b"offline", will_qos=1, will_retain=True)
    if clients.broker.kind == "embedded":
        assert code == mp.CONNACK_NOT_AUTHORIZED
        assert spoofer.closed_within(WAIT)
    else:
        # Mosquitto takes the CN as the client id: the spoofer is X, not A. As X it may
        # not even leave a will on A's topics (the ACL denies it; nothing arrives below).
        assert code == mp.CONNACK_ACCEPTED
        spoofer.send(mp.build_subscribe(1, [(f"devices/{x.cn}/#", 1)]))
        assert spoofer.read_packet().type == mp.SUBACK
        service = clients.service()
        service.publish(f"devices/{x.cn}/call", "to x")
        packet = spoofer.read_packet()
        assert mp.parse_publish(packet.flags, packet.body).topic == f"devices/{x.cn}/call"
        spoofer.kill()
    still_connected(clients, a)
    assert not [m for m in a.received(0) if m.topic.endswith("/status")]


def still_connected(clients, device):
    """The device kept its session: no disconnect, and a message sent now arrives."""
    service = clients.service()
    service.publish(f"devices/{device.ident.cn}/call", "still there?")
    assert device.expect(f"devices/{device.ident.cn}/call").payload == b"still there?"
    assert not device.disconnected.is_set()


def test_service_is_unrestricted(clients):
    service = clients.service()
    a = clients.device()
    b = clients.device()
    for d in (a, b):
        d.subscribe(f"devices/{d.ident.cn}/call")
    assert service.subscribe("devices/#") == [1]
    for d in (a, b):
        service.publish(f"devices/{d.ident.cn}/call", f"hello {d.ident.cn}")
        assert d.expect(f"devices/{d.ident.cn}/call").payload == f"hello {d.ident.cn}".encode()
    for d in (a, b):
        d.publish(f"devices/{d.ident.cn}/events/temp", "21")
        assert service.expect(f"devices/{d.ident.cn}/events/temp").payload == b"21"


def test_last_will_reaches_the_service(clients, make_identity):
    service = clients.service()
    device = make_identity()
    status = f"devices/{device.cn}/status"
    service.subscribe(status)
    raw = clients.raw(device)
    assert raw.connect(device.cn, keepalive=30, will_topic=status, will_message=b"offline",
                       will_qos=1, will_retain=True) == mp.CONNACK_ACCEPTED
    raw.send(mp.build_publish(status, b"online", qos=1, packet_id=1, retain=True))
    assert raw.read_packet().type == mp.PUBACK
    assert service.expect(status).payload == b"online"
    raw.kill()
    assert service.expect(status).payload == b"offline"
    # ... and it stays retained for whoever looks later, the device itself included.
    again = clients.paho(device)
    again.subscribe(status)
    msg = again.expect(status)
    assert (msg.payload, msg.retain) == (b"offline", True)
