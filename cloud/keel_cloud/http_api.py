"""The HTTP JSON API under /api/, with bearer-token auth; the keel CLI uses it.

  GET  /api/devices                          every device
  GET  /api/devices/NAME                     one device, with its modules
  GET  /api/devices/NAME/variables/VAR       {"value": …}
  POST /api/devices/NAME/functions/FN        {"arg": "…"} -> {"result": …}
  POST /api/events                           {"name": …, "data": …} to every device
  GET  /api/events?after=SEQ&device=NAME&wait=S   events devices published (long poll)
  POST /api/devices/NAME/flash               {"image": base64, "module": {function, index,
                                             version, platform}} -> {"transfer": ID}
  GET  /api/transfers/ID                     {"state": "sending"|"pending"|"failed", "size",
                                             "acknowledged", "error", …}
  GET  /api/fleets                           every fleet, with its current release
  GET  /api/fleets/NAME                      one fleet: its releases, and its members with
                                             their versions and update state
  POST /api/fleets/NAME/releases             {"image": base64, "allow_prerelease": bool}:
                                             a new app release -> the release
  GET  /api/releases                         the system release catalog, newest first
  POST /api/rollout                          look again at fleets and releases the CLI
                                             changed in the registry -> {"changed": N}
  GET  /api/stream?device=NAME               server-sent events: devices, device, events
                                             (the console's live updates)

Authorisation: `Authorization: Bearer TOKEN` (the CLI), or the console's session cookie
with, on a POST, its X-CSRF-Token (keel_cloud.console). Every other path is the console.
"""

import base64
import binascii
import hashlib
import hmac
import itertools
import json
import logging
import math
import re
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

from keel_cloud import module_format as mf
from keel_cloud import protocol
from keel_cloud import signatures
from keel_cloud.config import CloudError
from keel_cloud.console import Console, csrf_token, session_cookie, session_valid
from keel_cloud.fleet_releases import AppImage
from keel_cloud.fleet_releases import member_state
from keel_cloud.healer import installed_app
from keel_cloud.ota_sender import OtaError
from keel_cloud.registry import RegistryError
from keel_cloud.fleet_service import DeviceError, FleetService

log = logging.getLogger("keel.cloud.http")
MAX_BODY = 16 * 1024
MAX_WAIT = 25.0  # s; a longer wait is cut to this, NaN, infinite or negative is refused
MAX_SEGMENT = 256  # characters of one path segment (a name, an id)
MAX_ARG = 1024  # bytes of a function's argument and of a cloud event's data (UTF-8)
MAX_EVENT_NAME = 64
MAX_SEQ = 2**63 - 1  # event sequence numbers are 64-bit in the registry
SOCKET_TIMEOUT = 60.0  # s a client may stall while sending a request
# Connections served at once, a thread each (long polls and `keel subscribe` hold one):
# more are answered 503 at once and closed, so that a client opening connections
# without end costs the service threads up to this and no more.
MAX_CONNECTIONS = 128
_INTEGER = re.compile(r"^-?[0-9]{1,19}$")
MAX_IMAGE = 4 * 1024 * 1024  # the largest module image the flash endpoint takes
MODULE_KEYS = ("function", "index", "version", "platform")
KEEP_TRANSFERS = 100  # finished transfers remembered for GET /api/transfers/ID


def device_summary(device: dict) -> dict:
    # describe_error: why the stored describe is treated as unknown (None when it is not)
    return {k: device.get(k) for k in ("name", "id", "platform", "online", "mode", "system_version",
                                       "fleet", "describe_error")}


def device_detail(device: dict, heal: dict | None = None, rollbacks: list | None = None,
                  dropped: dict | None = None) -> dict:
    out = device_summary(device)
    describe = device["describe"]
    out.update(
        # Messages from the device the protocol does not allow, dropped: {"count",
        # "reason" (the last one's), "ts"} (docs/protocol.md, Limits).
        dropped=dropped or {"count": 0, "reason": None, "ts": None},
        last_seen=device["last_seen"],
        safe_mode_reason=describe.get("safe_mode_reason"),
        missing=describe.get("missing", []),
        reset_reason=describe.get("reset_reason"),
        vm=describe.get("vm"),
        app=describe.get("app"),
        functions=describe.get("functions", []),
        variables=describe.get("variables", []),
        modules=describe.get("modules", []),
        # The safe mode healer: {"state": idle|healing|blocked|healed|failed, "reason",
        # "sending": {"module", "size", "acknowledged"}, "plan": [labels], "failures"}
        heal=heal or {"state": "idle"},
        # The last rollback, as the device's describe says now (or None); and every system
        # part its bootloader ever rolled back, as recorded: {function, index, version,
        # sha256, restored, reason, ts}. The healer never sends those to it again.
        rollback=describe.get("rollback"),
        # The keys the board trusts ({"mode": development|enforced, "keys": [fingerprints]}),
        # and the last module it refused ({function, index, version, sha256, reason, via}).
        trust=describe.get("trust"),
        refused=describe.get("refused"),
        # The device's network link ({kind, state, ssid, rssi, ip, connects, error}: the
        # system's connection manager on a WiFi board; kind null: a board without one)
        network=describe.get("network"),
        rollbacks=rollbacks or [],
    )
    return out


def fleet_summary(fleet: dict, release: dict | None, signing_keys: list[bytes] = ()) -> dict:
    """signed_by: the fingerprints of the keys the fleet requires its modules to be signed
    by ([]: it takes unsigned modules)."""
    return {"name": fleet["name"], "platform": fleet["platform"], "members": fleet["members"],
            "release": _release_summary(release),
            "signed_by": [signatures.fingerprint(k) for k in signing_keys]}


def _release_summary(release: dict | None) -> dict | None:
    if release is None:
        return None
    return {k: release[k] for k in ("number", "version", "sha256", "dependencies",
                                    "allow_prerelease", "released")}


def fleet_member(device: dict, heal: dict, release: dict | None, rollbacks: list) -> dict:
    """A member with its versions and where it stands (fleets.member_state)."""
    app = installed_app(device["describe"] or {})
    out = device_summary(device)
    out["app_version"] = app.get("version") if app else None
    out.update(member_state(device, heal, release))
    out["rollbacks"] = rollbacks
    return out


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    server: "ApiServer"
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT

    def log_message(self, fmt, *args):  # route to logging, not stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: HTTPStatus, body) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (ConnectionError, TimeoutError):  # the client left before its answer
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line or header, an unsupported
        method) as JSON, like every other answer."""
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.BAD_REQUEST
        # Its 5xx are the client's doing too: an unknown method, an HTTP version.
        status = {HTTPStatus.NOT_IMPLEMENTED: HTTPStatus.METHOD_NOT_ALLOWED,
                  HTTPStatus.HTTP_VERSION_NOT_SUPPORTED: HTTPStatus.BAD_REQUEST}.get(status, status)
        if self.request_version == "HTTP/0.9":  # an unreadable request line: answer in 1.1
            self.request_version = "HTTP/1.1"
        self.close_connection = True
        self._send(status, {"error": message or status.phrase})

    def _authorised(self, method: str) -> bool:
        """The bearer token, or the console's session (and, to change anything, its
        cross-site request token: a page of another site cannot read it)."""
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if header:
            return scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode("utf-8", "replace"), self.server.token.encode())
        cookie = session_cookie(self.headers)
        if not session_valid(self.server.token, cookie):
            return False
        return method == "GET" or hmac.compare_digest(
            self.headers.get("X-CSRF-Token", "").encode("utf-8", "replace"),
            csrf_token(self.server.token, cookie).encode())

    def _body(self, limit: int = MAX_BODY) -> dict:
        # Until the body is read the connection cannot serve another request.
        keep = self.close_connection
        self.close_connection = True
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
        text = (self.headers.get("Content-Length") or "0").strip()
        if not text.isascii() or not text.isdigit() or len(text) > 12:
            raise ApiError(HTTPStatus.BAD_REQUEST, "Content-Length must be a number of bytes")
        length = int(text)
        if length > limit:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"request body too large (at most {limit} bytes)")
        try:
            raw = self.rfile.read(length) if length else b"{}"
        except (ConnectionError, TimeoutError):
            raise _ClientGone from None
        if len(raw) != length and length:
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body is shorter than its Content-Length")
        self.close_connection = keep
        try:
            body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        return body

    def _handle(self, method: str) -> None:
        try:
            url = urlparse(self.path)
            parts = [unquote(p, errors="strict") for p in url.path.strip("/").split("/")]
            query = parse_qs(url.query, keep_blank_values=True, errors="strict",
                             max_num_fields=20)
        except ValueError:
            if method == "POST":
                self.close_connection = True
            return self._send(HTTPStatus.BAD_REQUEST, {"error": "malformed URL"})
        if not parts or parts[0] != "api":
            try:
                return self.server.console.page(self, method, parts)
            except (ConnectionError, TimeoutError):
                self.close_connection = True
                return
        if not self._authorised(method):
            if method == "POST":
                self.close_connection = True
            return self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong API token"})
        try:
            for part in parts:
                if len(part) > MAX_SEGMENT or not part.isprintable():
                    raise ApiError(HTTPStatus.BAD_REQUEST,
                                   "a path segment must be printable, at most "
                                   f"{MAX_SEGMENT} characters")
            if method != "POST" and (self.headers.get("Content-Length") or "0").strip() != "0":
                self.close_connection = True  # a body nobody reads: no next request after it
            if method == "GET" and parts[1:] == ["stream"]:
                device = _query_value(query, "device", None)
                return self.server.console.stream(self, device)
            upload = method == "POST" and (parts[-1:] == ["flash"] or parts[1:2] + parts[3:] == ["fleets", "releases"])
            body = self._body(MAX_IMAGE * 4 // 3 + 4096 if upload else MAX_BODY) if method == "POST" else {}
            result = self.server.route(method, parts[1:], query, body)
            self._send(HTTPStatus.OK, result)
        except ApiError as e:
            self._send(e.status, {"error": str(e)})
        except DeviceError as e:
            self._send(HTTPStatus.GATEWAY_TIMEOUT if "did not answer" in str(e) else HTTPStatus.BAD_GATEWAY,
                       {"error": str(e)})
        except RegistryError as e:
            log.error("registry: %s", e)
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(e)})
        except _ClientGone:
            self.close_connection = True  # it went away, or stalled, while sending its body
        except Exception as e:  # noqa: BLE001 - answered, and logged with its traceback
            log.exception("%s %s failed", method, self.path[:200])
            self.close_connection = True
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR,
                       {"error": f"internal error: {type(e).__name__}: {e}"[:500]})

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def _not_allowed(self):
        self.close_connection = True
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{self.command} is not supported: "
                                                            "use GET or POST"})

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed


class _ClientGone(Exception):
    """The client stopped sending (closed, reset, or stalled past SOCKET_TIMEOUT)."""


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _query_value(query: dict, key: str, default: str | None) -> str | None:
    values = query.get(key)
    if not values:
        return default
    if len(values) > 1:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{key} given more than once")
    return values[0]


def _integer(text: str, key: str, low: int, high: int) -> int:
    text = text.strip()
    if not _INTEGER.match(text):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{key} must be an integer, not '{text[:40]}'")
    value = int(text)
    if not low <= value <= high:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{key} must be from {low} to {high}")
    return value


def _wait(text: str) -> float:
    """The long poll's wait: a finite number of seconds >= 0; above MAX_WAIT it is cut."""
    try:
        value = float(text)
    except ValueError:
        raise ApiError(HTTPStatus.BAD_REQUEST,
                       f"wait must be a number of seconds, not '{text[:40]}'") from None
    if not math.isfinite(value) or value < 0:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"wait must be a finite number of seconds >= 0 "
                       f"(at most {MAX_WAIT:g} are waited)")
    return min(value, MAX_WAIT)


def _short_text(value, key: str, limit: int, *, nullable: bool = False) -> str | None:
    """A string of at most limit bytes (UTF-8) without NUL."""
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{key} must be a string")
    if len(value.encode("utf-8", "surrogatepass")) > limit or "\x00" in value:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{key} must be at most {limit} bytes, without NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{key} must be valid Unicode text") from None
    return value


def _name(value: str, what: str) -> str:
    """The name of a function, variable or event: 1 to 64 characters, usable in a topic
    (no wildcards, no NUL) and in the request the device reads."""
    if not 0 < len(value) <= MAX_EVENT_NAME or any(c in value for c in "+#\x00"):
        raise ApiError(HTTPStatus.BAD_REQUEST,
                       f"{what} must be 1 to {MAX_EVENT_NAME} characters, without + # or NUL")
    _short_text(value, what, 4 * MAX_EVENT_NAME)
    return value


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    max_connections = MAX_CONNECTIONS

    def __init__(self, address: tuple[str, int], service: FleetService, token: str):
        super().__init__(address, _Handler)
        self._serving = 0
        self._serving_lock = threading.Lock()
        self._refused_at = 0.0
        self.service = service
        self.registry = service.registry
        self.token = token
        self._transfer_ids = itertools.count(1)
        self._transfers: dict[str, dict] = {}
        self._transfers_lock = threading.Lock()
        self.console = Console(self)
        self.stopping = False

    def shutdown(self) -> None:
        self.stopping = True  # the console's streams end within their tick
        super().shutdown()

    def devices_summary(self) -> list[dict]:
        """The device list as GET /api/devices gives it, with last_seen and app version."""
        out = []
        for device in self.registry.devices():
            row = device_summary(device)
            app = installed_app(device["describe"] or {})
            row.update(last_seen=device["last_seen"], app_version=app.get("version") if app else None,
                       safe_mode_reason=(device["describe"] or {}).get("safe_mode_reason"))
            out.append(row)
        return out

    def device_view(self, name: str) -> dict | None:
        """GET /api/devices/NAME's answer, or None for no such device."""
        device = self.registry.device(name)
        if device is None:
            return None
        return device_detail(device, self.service.heal_status(device["id"]),
                             self.registry.rollbacks(device["id"]), self.registry.drops(device["id"]))

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="keel-http", daemon=True)
        thread.start()
        return thread

    def process_request(self, request, client_address) -> None:
        with self._serving_lock:
            full = self._serving >= self.max_connections
            if not full:
                self._serving += 1
        if not full:
            try:
                super().process_request(request, client_address)  # (its thread releases it)
            except BaseException:
                self._done()
                raise
            return
        now = time.monotonic()
        if now - self._refused_at >= 10:  # (said once in a while, not once a connection)
            self._refused_at = now
            log.warning("HTTP: %d connections open; refusing more (503)", self.max_connections)
        body = json.dumps({"error": f"the service has {self.max_connections} connections open; "
                                    "try again shortly"}).encode()
        try:
            request.settimeout(1.0)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(body), body))
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done()

    def _done(self) -> None:
        with self._serving_lock:
            self._serving -= 1

    def handle_error(self, request, client_address) -> None:
        # socketserver prints these to stderr; a request the handler could not finish
        # (the client reset the connection, say) is the client's business: logged only.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def _device(self, name: str) -> dict:
        device = self.registry.device(name)
        if device is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no device '{name}'")
        return device

    def _online(self, name: str) -> dict:
        device = self._device(name)
        if not device["online"]:
            raise ApiError(HTTPStatus.CONFLICT, f"device '{name}' is offline")
        return device

    def route(self, method: str, parts: list[str], query: dict, body: dict):
        match method, parts:
            case "GET", ["devices"]:
                return self.devices_summary()
            case "GET", ["devices", name]:
                view = self.device_view(name)
                if view is None:
                    raise ApiError(HTTPStatus.NOT_FOUND, f"no device '{name}'")
                return view
            case "GET", ["devices", name, "variables", var]:
                var = _name(var, "a variable's name")
                device = self._online(name)
                return {"value": self.service.request(device["id"], "get", var)}
            case "POST", ["devices", name, "functions", fn]:
                fn = _name(fn, "a function's name")
                arg = _short_text(body.get("arg", ""), "arg", MAX_ARG)
                device = self._online(name)
                return {"result": self.service.request(device["id"], "call", fn, arg)}
            case "POST", ["events"]:
                name = body.get("name")
                if not isinstance(name, str):
                    raise ApiError(HTTPStatus.BAD_REQUEST, "an event needs a name of 1 to 64 characters")
                name = _name(name, "an event's name")
                data = _short_text(body.get("data"), "data", MAX_ARG, nullable=True)
                # Devices offline now would never get it (their sessions are clean ones).
                targets = [d["id"] for d in self.registry.devices() if d["online"]]
                return {"sent_to": self.service.send_event(name, data, targets)}
            case "GET", ["events"]:
                after = _integer(_query_value(query, "after", "0"), "after", -MAX_SEQ, MAX_SEQ)
                wait = _wait(_query_value(query, "wait", "0"))
                device_id = None
                device_name = _query_value(query, "device", None)
                if device_name:
                    device_id = self._device(device_name)["id"]
                if after < 0:  # "from now on"
                    return {"events": [], "last": self.service.last_event_seq()}
                events = self.service.wait_events(after, device_id, wait)
                return {"events": events, "last": events[-1]["seq"] if events else after}
            case "POST", ["devices", name, "flash"]:
                return self._start_flash(self._online(name), body)
            case "GET", ["fleets"]:
                fleets = self.service.fleets
                return [fleet_summary(f, fleets.current(f["name"]), fleets.signing_keys(f["name"]))
                        for f in self.registry.fleets()]
            case "GET", ["fleets", name]:
                return self._fleet(name)
            case "POST", ["rollout"]:
                return {"changed": self.service.rollout()}
            case "GET", ["releases"]:
                platform = _query_value(query, "platform", None)
                catalog = self.service.healer.catalog
                return catalog.releases(platform) if catalog is not None else []
            case "POST", ["fleets", name, "releases"]:
                return self._release_app(name, body)
            case "GET", ["transfers", transfer_id]:
                with self._transfers_lock:
                    transfer = self._transfers.get(transfer_id)
                    if transfer is None:
                        raise ApiError(HTTPStatus.NOT_FOUND, f"no transfer '{transfer_id}'")
                    return dict(transfer)
        raise ApiError(HTTPStatus.NOT_FOUND, "no such API endpoint")

    def _fleet(self, name: str) -> dict:
        fleet = self.registry.fleet(name)
        if fleet is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no fleet '{name}'")
        history = self.service.fleets.history(name)
        release = history[0] if history else None
        leases = self.service.lease_owners()
        members = [fleet_member(d, self.service.heal_status(d["id"], leases), release,
                                self.registry.rollbacks(d["id"]))
                   for d in self.registry.fleet_devices(name)]
        return fleet_summary(fleet, release, self.service.fleets.signing_keys(name)) | {
            "releases": [_release_summary(r) for r in history], "devices": members}

    def _release_app(self, fleet_name: str, body: dict) -> dict:
        """A new app release to the fleet (what keel release app does)."""
        fleets = self.service.fleets
        if self.registry.fleet(fleet_name) is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no fleet '{fleet_name}'")
        image = _image_of(body)
        info = _intact(image)
        if info.function != mf.FUNCTION_USER_PART:
            raise ApiError(HTTPStatus.BAD_REQUEST, "this is not an app (a user part): release system "
                           "parts with keel release system DIR")
        allow = body.get("allow_prerelease", False)
        if not isinstance(allow, bool):
            raise ApiError(HTTPStatus.BAD_REQUEST, "allow_prerelease must be true or false")
        app = AppImage(version=mf.decode_version(info.version), index=info.index,
                       platform=mf.platform_name(info.platform),
                       dependencies=[mf.dependency_dict(d) for d in info.dependencies], data=image)
        if self.service.healer.catalog is None:
            raise ApiError(HTTPStatus.CONFLICT, "this service has no release catalog")
        try:
            release = fleets.release(fleet_name, app, allow, self.service.healer.catalog)
        except CloudError as e:
            raise ApiError(HTTPStatus.CONFLICT, f"not released to fleet {fleet_name}: {e}") from None
        self.service.rollout()
        return release

    # Updates over the air

    def _start_flash(self, device: dict, body: dict) -> dict:
        image = _image_of(body)
        info = _intact(image)
        module = body.get("module")
        if module is None:  # (the console) what the image's header says
            said = signatures.header(image).to_dict()
            module = {k: said[k] for k in MODULE_KEYS}
        if not isinstance(module, dict) or any(k not in module for k in MODULE_KEYS):
            raise ApiError(HTTPStatus.BAD_REQUEST, "module must give function, index, version and platform")
        module = {k: module[k] for k in MODULE_KEYS}
        index = module["index"]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= protocol.MAX_INDEX \
                or not all(isinstance(module[k], str) and 0 < len(module[k]) <= protocol.MAX_TEXT
                           for k in ("function", "version", "platform")):
            raise ApiError(HTTPStatus.BAD_REQUEST, "module: function, version and platform must be "
                           f"strings of 1 to {protocol.MAX_TEXT} characters, index an integer from 0 "
                           f"to {protocol.MAX_INDEX}")
        try:
            info = signatures.header(image)
        except ValueError as e:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"not a Keel module image: {e}") from None
        said = info.to_dict()
        if any(module[k] != said[k] for k in MODULE_KEYS):
            raise ApiError(HTTPStatus.BAD_REQUEST, "module does not match the image's header "
                           f"({said['function']} {said['index']} {said['version']} {said['platform']})")
        if device["platform"] and module["platform"] != device["platform"]:
            raise ApiError(HTTPStatus.CONFLICT, f"the image is for {module['platform']}, "
                           f"device '{device['name']}' is {device['platform']}: nothing sent")
        refused = signatures.send_refusal(image, self.service.fleets.device_signing_keys(device["id"]),
                                          device["describe"])
        if refused:
            raise ApiError(HTTPStatus.CONFLICT, f"not sent to '{device['name']}': {refused}")
        if self.service.ota.busy(device["id"]):
            raise ApiError(HTTPStatus.CONFLICT, f"an update to '{device['name']}' is in progress")
        transfer_id = str(next(self._transfer_ids))
        record = {"id": transfer_id, "device": device["name"], "state": "sending",
                  "sha256": hashlib.sha256(image).hexdigest(), "size": len(image),
                  "acknowledged": 0, "bytes_sent": 0, "error": None, "started": time.time(),
                  "module": module}
        with self._transfers_lock:
            self._transfers[transfer_id] = record
            finished = [k for k, v in self._transfers.items() if v["state"] != "sending"]
            for k in finished[:-KEEP_TRANSFERS]:
                del self._transfers[k]

        def progress(done: int):
            with self._transfers_lock:
                record["acknowledged"] = done

        def run():
            try:
                result = self.service.ota.send(device["id"], image, module, progress)
                update = {"state": "pending", "acknowledged": len(image), "bytes_sent": result["bytes_sent"]}
            except OtaError as e:
                update = {"state": "failed", "error": str(e)}
            except Exception as e:  # noqa: BLE001 - reported to the client, and logged
                log.exception("update of %s failed", device["name"])
                update = {"state": "failed", "error": f"internal error: {e}"}
            with self._transfers_lock:
                record.update(update, finished=time.time())

        threading.Thread(target=run, name=f"keel-ota-{transfer_id}", daemon=True).start()
        return {"transfer": transfer_id, "size": len(image), "sha256": record["sha256"]}


def _image_of(body: dict) -> bytes:
    encoded = body.get("image")
    if not isinstance(encoded, str):
        raise ApiError(HTTPStatus.BAD_REQUEST, "image must be the module image in base64")
    try:
        image = base64.b64decode(encoded, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ApiError(HTTPStatus.BAD_REQUEST, "image must be the module image in base64") from None
    if not image:
        raise ApiError(HTTPStatus.BAD_REQUEST, "no image")
    if len(image) > MAX_IMAGE:
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the image is over {MAX_IMAGE} bytes")
    return image


def _intact(image: bytes):
    """The image's header once its CRC32 and SHA-256 hold (the messages keel flash gives)."""
    try:
        info, crc_ok, sha_ok = mf.check_image(mf.bytes_reader(image), len(image), hashlib.sha256)
    except mf.FormatError as e:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"not a Keel module image: {e}") from None
    if len(image) > info.image_size:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{len(image) - info.image_size} bytes after the end "
                       "of the module (corrupt or not a module)")
    if not crc_ok:
        raise ApiError(HTTPStatus.BAD_REQUEST, "CRC32 mismatch: the image is corrupt")
    if not sha_ok:
        raise ApiError(HTTPStatus.BAD_REQUEST, "SHA-256 mismatch: the image is corrupt")
    return info
