"""Keel Console: the fleet in a web page, served by the HTTP API's server at `/`.

Signing in takes the cloud's API token once and gives the browser a session cookie
(HttpOnly, SameSite=Strict): the token itself never goes into a URL, a cookie or a log.
The session is stateless, so any instance of several sharing the token accepts it: the
cookie is `EXPIRY.NONCE.MAC`, MAC = HMAC-SHA256(token, "session.EXPIRY.NONCE"), and its
cross-site request token is HMAC-SHA256(token, "csrf." + cookie), which the page carries
in a meta tag and sends in `X-CSRF-Token` with every POST (a form sends it as a field).
A new token (CLOUD_DIR/token) ends every session.

The page itself (console/index.html, console.js, console.css) is static, with no build
step and no third-party code: the API answers it, and `GET /api/stream` (server-sent
events) pushes device changes and events as they come."""

import hashlib
import hmac
import json
import secrets
import time
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs

COOKIE = "keel_session"
SESSION_S = 12 * 3600
STATIC = Path(__file__).parent / "console"
ASSETS = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
PUBLIC = {"console.css", "favicon.svg"}  # what the sign-in page needs (no fleet data)
MAX_FORM = 4096
STREAM_TICK_S = 2.0  # how often the stream looks for changed devices (and says it is alive)
HEADERS = {
    # Only this origin's files; no inline script; never framed (clickjacking).
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # (not no-referrer: then a browser's own form posts carry `Origin: null`)
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _mac(token: str, text: str) -> str:
    return hmac.new(token.encode(), text.encode(), hashlib.sha256).hexdigest()


def new_session(token: str, now: float | None = None) -> str:
    expiry = int((now or time.time()) + SESSION_S)
    nonce = secrets.token_hex(16)
    return f"{expiry}.{nonce}.{_mac(token, f'session.{expiry}.{nonce}')}"


def session_valid(token: str, cookie: str | None, now: float | None = None) -> bool:
    if not cookie or len(cookie) > 200:
        return False
    parts = cookie.split(".")
    if len(parts) != 3 or not parts[0].isdigit():
        return False
    expiry, nonce, mac = parts
    return hmac.compare_digest(mac, _mac(token, f"session.{expiry}.{nonce}")) \
        and int(expiry) > (now or time.time())


def csrf_token(token: str, cookie: str) -> str:
    return _mac(token, f"csrf.{cookie}")


def session_cookie(headers) -> str | None:
    """The session cookie's value from a request's Cookie headers (None if absent)."""
    for header in headers.get_all("Cookie") or []:
        for part in header.split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                return value
    return None


class Console:
    """The console's pages for one ApiServer; its handler calls page() for every path
    outside /api/, and stream() for GET /api/stream."""

    def __init__(self, server):
        self.server = server

    # Pages

    def page(self, handler, method: str, parts: list[str]) -> None:
        if method != "GET":
            handler.close_connection = True  # a body may be left unread: no next request after it
        token = self.server.token
        cookie = session_cookie(handler.headers)
        signed_in = session_valid(token, cookie)
        path = "/".join(parts)
        if path == "login":
            if method == "POST":
                return self._sign_in(handler)
            if signed_in:
                return self._redirect(handler, "/")
            return self._login_page(handler, None)
        if path == "logout" and method == "POST":
            form = self._form(handler)
            if signed_in and hmac.compare_digest(form.get("csrf", ""), csrf_token(token, cookie)):
                return self._redirect(handler, "/login", clear=True)
            return self._plain(handler, HTTPStatus.FORBIDDEN, "sign out from the console's own page")
        if method != "GET":
            return self._plain(handler, HTTPStatus.METHOD_NOT_ALLOWED, "GET only")
        if path in ASSETS and (path in PUBLIC or signed_in):
            return self._file(handler, path, ASSETS[path])
        if not signed_in:
            return self._redirect(handler, "/login")
        if path in ("", "index.html"):
            html = (STATIC / "index.html").read_text()
            html = html.replace("{{csrf}}", csrf_token(token, cookie))
            return self._send(handler, HTTPStatus.OK, html.encode(), "text/html; charset=utf-8")
        return self._plain(handler, HTTPStatus.NOT_FOUND, "not found")

    def _sign_in(self, handler) -> None:
        # A sign-in form posted from another site (login CSRF) carries its Origin (or
        # "null", from a sandboxed frame); the console's own carries this one.
        origin = handler.headers.get("Origin")
        host = handler.headers.get("Host", "")
        if origin is not None and origin.split("://", 1)[-1] != host:
            return self._plain(handler, HTTPStatus.FORBIDDEN, "sign in from the console's own page")
        form = self._form(handler)
        given = form.get("token", "").strip()
        if not hmac.compare_digest(given.encode("utf-8", "replace"), self.server.token.encode()):
            time.sleep(0.5)  # a guess costs time
            return self._login_page(handler, "That is not this cloud's token.", HTTPStatus.UNAUTHORIZED)
        cookie = new_session(self.server.token)
        self._redirect(handler, "/", cookie=cookie)

    def _form(self, handler) -> dict:
        text = (handler.headers.get("Content-Length") or "0").strip()
        length = int(text) if text.isdigit() and len(text) < 8 else MAX_FORM + 1
        if length > MAX_FORM:
            return {}
        raw = handler.rfile.read(length).decode("utf-8", "replace")
        return {k: v[0] for k, v in parse_qs(raw, max_num_fields=5).items()}

    def _login_page(self, handler, error: str | None, status=HTTPStatus.OK) -> None:
        html = (STATIC / "login.html").read_text()
        html = html.replace("{{error}}", f'<p class="error" role="alert">{error}</p>' if error else "")
        self._send(handler, status, html.encode(), "text/html; charset=utf-8")

    def _file(self, handler, name: str, kind: str) -> None:
        self._send(handler, HTTPStatus.OK, (STATIC / name).read_bytes(), kind)

    def _plain(self, handler, status, text: str) -> None:
        self._send(handler, status, text.encode(), "text/plain; charset=utf-8")

    def _redirect(self, handler, where: str, cookie: str | None = None, clear: bool = False) -> None:
        extra = []
        if cookie:
            extra.append(("Set-Cookie", f"{COOKIE}={cookie}; HttpOnly; SameSite=Strict; Path=/; "
                                        f"Max-Age={SESSION_S}"))
        if clear:
            extra.append(("Set-Cookie", f"{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"))
        self._send(handler, HTTPStatus.SEE_OTHER, b"", "text/plain", [("Location", where)] + extra)

    def _send(self, handler, status, body: bytes, kind: str, extra=()) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", kind)
            handler.send_header("Content-Length", str(len(body)))
            for name, value in HEADERS.items():
                handler.send_header(name, value)
            for name, value in extra:
                handler.send_header(name, value)
            if handler.close_connection:
                handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(body)
        except (ConnectionError, TimeoutError):
            handler.close_connection = True

    # The live stream

    def stream(self, handler, device_name: str | None) -> None:
        """Server-sent events until the client leaves: `events` (a list of new events),
        `devices` (the device list, when it changed) and, with device=NAME, `device` (its
        detail: modules, the healer's progress) when it changed."""
        server, service = self.server, self.server.service
        handler.close_connection = True
        handler.send_response(HTTPStatus.OK)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-store")
        handler.send_header("X-Accel-Buffering", "no")  # a proxy in front must not hold it
        handler.end_headers()
        after = service.last_event_seq()
        last_devices = last_device = None
        try:
            handler.wfile.write(b"retry: 2000\n\n")
            while not server.stopping:
                devices = json.dumps(server.devices_summary(), sort_keys=True)
                if devices != last_devices:
                    last_devices = devices
                    self._event(handler, "devices", devices)
                if device_name:
                    detail = json.dumps(server.device_view(device_name), sort_keys=True)
                    if detail != last_device:
                        last_device = detail
                        self._event(handler, "device", detail)
                events = service.wait_events(after, None, STREAM_TICK_S)
                if events:
                    after = events[-1]["seq"]
                    self._event(handler, "events", json.dumps(events))
                else:
                    handler.wfile.write(b": alive\n\n")
                    handler.wfile.flush()
        except (ConnectionError, TimeoutError, OSError):
            pass

    @staticmethod
    def _event(handler, kind: str, data: str) -> None:
        handler.wfile.write(f"event: {kind}\ndata: {data}\n\n".encode())
        handler.wfile.flush()
