"""No way around the gate: `keel cloud serve` with the embedded broker listens on the
gate's address and the HTTP API's, and on nothing else, and none of its listening sockets
(TCP or Unix) lets an MQTT client without a certificate in."""

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from keel_cloud import mqtt_packets as mp
from keel_cloud import pki
from keel_cloud.config import CloudDir

BIN = Path(sys.executable).parent
WAIT = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["127.0.0.1", "0.0.0.0"])
def serve(request, tmp_path):
    """A running `keel cloud serve` (embedded broker), its gate on loopback or on every
    address (the fleet service then reaches it on loopback): (process, cloud directory)."""
    data = tmp_path / "cloud"
    mqtt, http = f"{request.param}:{free_port()}", f"127.0.0.1:{free_port()}"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(["keel", "cloud", "serve", "--data", str(data), "--mqtt", mqtt,
                             "--http", http, "--broker", "embedded"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert "Keel Cloud:" in line, line + proc.stdout.read()
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield proc, CloudDir(data)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def listening(pid: int) -> list:
    """Every listening socket of the process: (family, address)."""
    found = []
    for conn in psutil.Process(pid).net_connections(kind="all"):
        if conn.family == socket.AF_UNIX:
            # A Unix stream socket that listens has no peer; psutil reports it with
            # status NONE on Linux, so every bound Unix socket counts here.
            if conn.laddr:
                found.append((socket.AF_UNIX, conn.laddr))
        elif conn.status == psutil.CONN_LISTEN:
            found.append((conn.family, (conn.laddr.ip, conn.laddr.port)))
    return found


def connect(family, address) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    if family == socket.AF_UNIX and address.startswith("@"):
        address = "\0" + address[1:]  # an abstract name
    elif family == socket.AF_INET6:
        address = (address[0] if address[0] != "::" else "::1", address[1])
    elif family == socket.AF_INET and address[0] == "0.0.0.0":
        address = ("127.0.0.1", address[1])
    sock.connect(address)
    return sock


def read_until_closed(sock) -> bytes:
    """What the peer sends until it closes (or goes quiet for WAIT seconds)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
        pass
    return data


def accepted(answer: bytes) -> bool:
    """Whether the answer starts with a CONNACK that accepts the connection."""
    try:
        packet, _ = mp.split_packet(answer)
    except mp.PacketError:
        return False
    return (packet is not None and packet.type == mp.CONNACK
            and mp.parse_connack(packet.body)[1] == mp.CONNACK_ACCEPTED)


def plain_mqtt(family, address) -> bytes:
    """A CONNECT in plain TCP, then the end of what the client sends."""
    with connect(family, address) as sock:
        sock.sendall(mp.build_connect("intruder", keepalive=30))
        sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock)


def tls_mqtt_without_certificate(family, address, ca_file) -> bytes:
    """A CONNECT over TLS that trusts the cloud's CA but presents no certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca_file))
    context.check_hostname = False
    with connect(family, address) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(mp.build_connect("intruder", keepalive=30))
                return read_until_closed(sock)
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError):
            return b""


def test_only_the_gate_and_the_api_listen_and_neither_takes_a_client_without_a_certificate(serve):
    proc, cloud = serve
    config = cloud.config()
    sockets = listening(proc.pid)
    tcp = {address for family, address in sockets if family != socket.AF_UNIX}
    expected = set()
    for text in (config.mqtt, config.http):
        host, _, port = text.rpartition(":")
        expected.add((host, int(port)))
    assert tcp == expected, f"listening on {sorted(tcp)}, expected only {sorted(expected)}"
    assert sockets, "found no listening socket at all"
    for family, address in sockets:
        assert not accepted(plain_mqtt(family, address)), f"{address} took a plain MQTT client"
        answer = tls_mqtt_without_certificate(family, address, cloud.path / pki.CA_CERT)
        assert not accepted(answer), f"{address} took a TLS client without a certificate"
