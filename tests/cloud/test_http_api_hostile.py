"""The HTTP API with malformed input: every malformed parameter, header or body gets a
4xx with a JSON {"error": message} (never a dropped connection or a traceback), waits are
bounded, and the server keeps answering. An unexpected error is a 500 with a message, and
logged."""

import http.client
import json
import logging
import socket
import time
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel_cloud import http_api
from keel_cloud.config import CloudDir
from keel_cloud.serve import Cloud

from conftest import free_port
from test_hostile_devices import TEMPERATURE, FakeDevice, new_device_id, wait_until

WAIT = 10.0


class Api:
    def __init__(self, cloud: Cloud):
        self.host, port = cloud.config.http.rsplit(":", 1)
        self.port = int(port)
        self.token = cloud.dir.token()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                auth: bool = True) -> tuple[int, dict]:
        """(status, the JSON body); fails if the answer is not JSON."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=WAIT)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            sent = {"Authorization": f"Bearer {self.token}"} if auth else {}
            sent.update(headers or {})
            if body is not None and "Content-Length" not in sent and "Transfer-Encoding" not in sent:
                sent["Content-Length"] = str(len(body))
            for key, value in sent.items():
                conn.putheader(key, value)
            conn.endheaders(body)
            response = conn.getresponse()
            return response.status, _json(response.read())
        finally:
            conn.close()

    def raw(self, data: bytes, half_close: bool = False) -> tuple[int, dict]:
        """Bytes as sent by a broken client; the answer parsed."""
        with socket.create_connection((self.host, self.port), timeout=WAIT) as sock:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            response = http.client.HTTPResponse(sock)
            response.begin()
            return response.status, _json(response.read())


def _json(data: bytes) -> dict:
    body = json.loads(data)
    assert isinstance(body, (dict, list)), body
    return body


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    cloud_dir = CloudDir(tmp_path_factory.mktemp("http") / "cloud")
    cloud_dir.init(mqtt=f"127.0.0.1:{free_port()}", http=f"127.0.0.1:{free_port()}")
    cloud = Cloud(cloud_dir)
    cloud.start()
    device = None
    try:
        device_id = new_device_id()
        cloud.registry.add_device(device_id, "good", "virtual")
        host, port = cloud.config.mqtt.rsplit(":", 1)
        device = FakeDevice(cloud_dir, host, int(port), device_id)
        wait_until(lambda: cloud.registry.device("good")["online"], "the device online")
        made = Api(cloud)
        made.cloud = cloud
        yield made
    finally:
        if device is not None:
            device.close()
        cloud.stop()


def refused(answer: tuple[int, dict], status: int | None = None) -> str:
    code, body = answer
    assert 400 <= code < 500, answer
    assert status is None or code == status, answer
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], answer
    return body["error"]


def still_answering(api: Api) -> None:
    code, devices = api.request("GET", "/api/devices")
    assert code == 200 and [d["name"] for d in devices] == ["good"]
    code, body = api.request("GET", "/api/devices/good/variables/temperature")
    assert (code, body) == (200, {"value": TEMPERATURE})


@pytest.mark.parametrize("query", [
    "wait=nan", "wait=NaN", "wait=inf", "wait=-inf", "wait=-1", "wait=abc", "wait=", "wait=1e999",
    "after=abc", "after=1.5", "after=" + "9" * 30, "after=" + "9" * 5000, "after=0x10",
    "after=1&after=2", "wait=1&wait=2", "device=nobody", "device=%ff",
    "&".join(f"k{i}=v" for i in range(50)),
])
def test_long_poll_parameters(api, query):
    error = refused(api.request("GET", f"/api/events?{query}"))
    if query.startswith("wait=n") or query.startswith("wait=N"):
        assert "finite" in error


def test_long_poll_waits_are_bounded(api):
    assert api.request("GET", "/api/events?after=0&wait=0.1")[0] == 200
    assert api.request("GET", "/api/events?after=-1&wait=0")[0] == 200
    with pytest.raises(ValueError):  # the service refuses an endless wait too
        api.cloud.service.wait_events(0, None, float("nan"))
    still_answering(api)


@pytest.mark.parametrize("headers, body, status", [
    ({"Content-Length": "abc"}, b"{}", 400),
    ({"Content-Length": "-1"}, b"{}", 400),
    ({"Content-Length": "1e3"}, b"{}", 400),
    ({"Content-Length": "\u00b2"}, b"{}", 400),  # a digit to str.isdigit, but not ASCII
    ({"Content-Length": "9" * 30}, b"{}", 400),
    ({"Content-Length": str(http_api.MAX_BODY + 1)}, b"{}", 413),
    ({"Transfer-Encoding": "chunked"}, b"2\r\n{}\r\n0\r\n\r\n", 411),
    ({}, b"not json", 400),
    ({}, b"\xff\xfe{}", 400),
    ({}, b"[1, 2]", 400),
    ({}, b'"a string"', 400),
    ({}, b"null", 400),
    ({}, b'{"name": NaN}', 400),
    ({}, b"[" * 8000 + b"]" * 8000, 400),
])
def test_malformed_bodies(api, headers, body, status):
    refused(api.request("POST", "/api/events", body, headers), status)
    still_answering(api)


@pytest.mark.parametrize("path, body", [
    ("/api/events", {}),
    ("/api/events", {"name": 5}),
    ("/api/events", {"name": ""}),
    ("/api/events", {"name": "n" * 65}),
    ("/api/events", {"name": "a/+/b"}),
    ("/api/events", {"name": "a#"}),
    ("/api/events", {"name": "a\x00b"}),
    ("/api/events", {"name": "ok", "data": 5}),
    ("/api/events", {"name": "ok", "data": ["x"]}),
    ("/api/events", {"name": "ok", "data": "d" * 1025}),
    ("/api/events", {"name": "ok", "data": "\ud800"}),
    ("/api/devices/good/functions/led", {"arg": 5}),
    ("/api/devices/good/functions/led", {"arg": None}),
    ("/api/devices/good/functions/led", {"arg": "a" * 1025}),
    ("/api/devices/good/functions/led", {"arg": "\udfff"}),
    ("/api/devices/good/functions/a+b", {"arg": "x"}),
    ("/api/devices/good/functions/" + "f" * 65, {"arg": "x"}),
    ("/api/devices/good/flash", {"image": 123, "module": {}}),
    ("/api/devices/good/flash", {"image": "not base64!", "module": {}}),
    ("/api/devices/good/flash", {"image": "", "module": {}}),
    ("/api/devices/good/flash", {"image": "AAAA", "module": []}),
    ("/api/devices/good/flash", {"image": "AAAA", "module": {"function": "user-part"}}),
    ("/api/devices/good/flash", {"image": "AAAA", "module": {"function": "user-part", "index": "1",
                                                             "version": "1.0.0", "platform": "virtual"}}),
    ("/api/devices/good/flash", {"image": "AAAA", "module": {"function": 1, "index": 1,
                                                             "version": "1.0.0", "platform": "virtual"}}),
])
def test_malformed_fields(api, path, body):
    refused(api.request("POST", path, json.dumps(body).encode()))
    still_answering(api)


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/api/devices/%00", 400),
    ("GET", "/api/devices/%ff%fe", 400),
    ("GET", "/api/devices/" + "n" * 300, 400),
    ("GET", "/api/devices/nobody", 404),
    ("GET", "/api/devices/good/variables/a%2Bb", 400),
    ("GET", "/api/devices/good/variables/" + "v" * 65, 400),
    ("GET", "/api/fleets/%00", 400),
    ("GET", "/api/transfers/%ff", 400),
    ("GET", "/api/nothing/here", 404),
    ("PUT", "/api/devices", 405),
    ("DELETE", "/api/devices/good", 405),
    ("PATCH", "/api/events", 405),
])
def test_malformed_paths_and_methods(api, method, path, status):
    refused(api.request(method, path, b"{}" if method != "GET" else None), status)
    still_answering(api)


def test_outside_the_api_is_the_console_which_wants_a_session(api):
    """Paths outside /api/ are the console's (keel_cloud.console): without a session each
    sends the browser to sign in; a malformed one or a hostile cookie changes nothing."""
    for path, headers in (("/elsewhere", {}), ("/%00", {}), ("/" + "n" * 300, {}),
                          ("/", {"Cookie": "keel_session=" + "9" * 10 + ".x.y"}),
                          ("/", {"Cookie": "keel_session=" + "a" * 5000})):
        conn = http.client.HTTPConnection(api.host, api.port, timeout=WAIT)
        try:
            conn.request("GET", path, headers=headers)
            answer = conn.getresponse()
            assert (answer.status, answer.getheader("Location")) == (303, "/login"), path
            answer.read()
        finally:
            conn.close()
    conn = http.client.HTTPConnection(api.host, api.port, timeout=WAIT)
    try:  # a sign-in form far over its limit: refused, no session
        conn.request("POST", "/login", body=b"token=" + b"x" * 100_000)
        answer = conn.getresponse()
        assert answer.status == 401 and answer.getheader("Set-Cookie") is None
    finally:
        conn.close()
    still_answering(api)


def test_malformed_requests_and_headers(api):
    refused(api.raw(b"GARBAGE\r\n\r\n"), 400)
    refused(api.raw(b"GET /api/devices HTTP/9.9\r\n\r\n"))
    refused(api.raw(b"GET /api/devices HTTP/1.1\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n"))
    refused(api.request("GET", "/api/devices", auth=False,
                        headers={"Authorization": "Bearer \u00ff\u00fe"}), 401)
    refused(api.request("GET", "/api/devices", auth=False), 401)
    # A body shorter than its Content-Length, then the client stops sending.
    token = api.token
    request = (f"POST /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
               f"Content-Length: 100\r\n\r\n{{}}").encode()
    refused(api.raw(request, half_close=True), 400)
    still_answering(api)


def test_an_unexpected_error_is_a_500_with_a_message_and_logged(api, monkeypatch, caplog):
    def broken():
        raise RuntimeError("the disk caught fire")

    monkeypatch.setattr(api.cloud.registry, "devices", broken)
    with caplog.at_level(logging.ERROR, logger="keel.cloud.http"):
        code, body = api.request("GET", "/api/devices")
    assert code == 500 and "the disk caught fire" in body["error"]
    assert any("the disk caught fire" in (r.exc_text or str(r.exc_info)) for r in caplog.records)
    monkeypatch.undo()
    still_answering(api)


QUERY_TEXT = st.text(st.characters(codec="ascii", exclude_characters="#"), max_size=60)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(query=QUERY_TEXT | st.lists(st.tuples(st.sampled_from(["after", "wait", "device", "x"]),
                                             st.text(max_size=12)), max_size=4).map(
    lambda pairs: "&".join(f"{k}={quote(v)}" for k, v in pairs)))
def test_fuzzed_long_poll_queries(api, query):
    # waits are cut to a tenth of a second here so that the fuzzing does not take minutes
    if "wait" in query:
        query = query.replace("wait", "w_ait")
    code, body = api.request("GET", f"/api/events?{quote(query, safe='=&%')}&wait=0")
    if code != 200:
        refused((code, body))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(["/api/events", "/api/devices/good/functions/led", "/api/rollout",
                             "/api/devices/good/flash"]),
       body=JSON | st.fixed_dictionaries({}, optional={"name": JSON, "data": JSON, "arg": JSON,
                                                        "image": JSON, "module": JSON}))
def test_fuzzed_bodies(api, path, body):
    code, answer = api.request("POST", path, json.dumps(body).encode())
    if code != 200:
        refused((code, answer))


def test_still_answering_after_all(api):
    still_answering(api)
    start = time.monotonic()
    refused(api.request("GET", "/api/events?wait=nan"), 400)
    assert time.monotonic() - start < WAIT  # answered, not left waiting


def test_connections_beyond_the_cap_get_503_and_the_service_answers_after(api):
    """A client that opens connections without end (each a thread while it stalls) gets
    503 beyond the cap, at once, and the service answers everyone again once they close."""
    server = api.cloud.api
    cap = server.max_connections
    server.max_connections = 4
    held = []
    try:
        for _ in range(4):
            sock = socket.create_connection((api.host, api.port), timeout=WAIT)
            sock.sendall(b"GET /api/devices HTTP/1.1\r\n")  # unfinished: its thread waits on it
            held.append(sock)
        wait_until(lambda: server._serving == 4, "four connections served")
        start = time.monotonic()
        code, body = api.request("GET", "/api/devices")
        assert code == 503 and "4 connections open" in body["error"], (code, body)
        assert time.monotonic() - start < WAIT
    finally:
        for sock in held:
            sock.close()
        server.max_connections = cap
    wait_until(lambda: server._serving == 0, "the stalled connections' threads gone")
    still_answering(api)
