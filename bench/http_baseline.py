"""The baseline of figure 4: a module image fetched the way simple MicroPython OTA
libraries do it, with one plain HTTP GET, through the same link shaper as Keel's OTA.

- The server (host): `ImageServer`, http.server in a thread, serves one image at
  /image.bin (HTTP/1.0, Content-Length, 1024-byte writes) and counts what it wrote,
  per request and in all.
- The client (device): `CLIENT`, a small MicroPython script of its own (not Keel's OTA
  code), run on the MicroPython VM with the virtual board's heap. It GETs the image,
  writes the body 4 KB block by block (erase, then write: what esp32.Partition-based
  OTA libraries do) into a file-backed staging partition laid out as the virtual
  board's, and after a dropped connection (a reset, an error, or the stream ending
  before Content-Length) starts over from byte 0 with a new GET, up to a number of
  attempts (the cap). It prints one line per attempt and a last line with the bytes it
  received in all, the attempts, and the time from the first connect to the last byte
  written (its own clock, ticks_ms).

    with ImageServer(image_bytes) as server, LinkShaper(0, "127.0.0.1", server.port, "cellular") as shaper:
        result = fetch(work, shaper.port, len(image_bytes), max_attempts=8)

`fetch` returns {"done", "attempts", "received", "seconds", "sha_ok"}: `received`
counts body bytes that reached the device over every attempt (what a restart costs:
the bytes a dropped attempt got are thrown away), `sha_ok` that the staged bytes are the
image's."""

from __future__ import annotations

import hashlib
import http.server
import re
import subprocess
import threading
from pathlib import Path

from bench.common import board_heap, micropython

STAGING_SIZE = 512 * 1024  # the virtual board's staging partition (boards/virtual/board.json)
BLOCK = 4096

CLIENT = r'''
# A plain HTTP GET OTA client, as simple MicroPython OTA libraries have it: one GET
# for the whole image, written to the staging partition block by block; after a drop,
# start over from byte 0.
#   micropython client.py HOST PORT PATH STAGING_FILE MAX_ATTEMPTS
import sys
import socket
import time

host, port, path, staging, max_attempts = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
BLOCK = 4096
ERASED = b"\xff" * 256
block = bytearray(BLOCK)
buf = bytearray(1024)


class Staging:
    # a file-backed partition, shaped like esp32.Partition's writeblocks
    def __init__(self, name):
        self.f = open(name, "r+b")

    def writeblocks(self, n, data):
        f = self.f
        f.seek(n * BLOCK)
        for _ in range(BLOCK // len(ERASED)):
            f.write(ERASED)  # erase
        f.seek(n * BLOCK)
        f.write(data)
        f.flush()


def attempt(part):
    """One GET: (body bytes received, whether the image is complete)."""
    got = 0
    s = socket.socket()
    try:
        s.settimeout(30)
        s.connect(socket.getaddrinfo(host, port)[0][-1])
        s.write(b"GET " + path.encode() + b" HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n")
        line = s.readline()
        if not line or line.split()[1] != b"200":
            return 0, False
        length = -1
        while True:
            line = s.readline()
            if not line:
                return 0, False
            if line in (b"\r\n", b"\n"):
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        fill = 0
        n = 0
        while got < length:
            k = s.readinto(buf)
            if not k:
                break  # the connection ended early
            got += k
            view = memoryview(buf)[:k]
            while view:
                take = min(len(view), BLOCK - fill)
                block[fill:fill + take] = view[:take]
                fill += take
                view = view[take:]
                if fill == BLOCK:
                    part.writeblocks(n, block)
                    n += 1
                    fill = 0
        if got == length and fill:
            part.writeblocks(n, memoryview(block)[:fill])
        return got, got == length and length >= 0
    except OSError as e:
        return got, False
    finally:
        s.close()


part = Staging(staging)
t0 = time.ticks_ms()
total = 0
for i in range(1, max_attempts + 1):
    got, ok = attempt(part)
    total += got
    print("ATTEMPT", i, got, "ok" if ok else "dropped")
    if ok:
        break
print("RESULT", "done" if ok else "gave-up", i, total, time.ticks_diff(time.ticks_ms(), t0))
'''


class ImageServer:
    """http.server in a thread serving `image` at /image.bin; counts body bytes written."""

    def __init__(self, image: bytes, host: str = "127.0.0.1"):
        self.image = image
        self.sent = 0  # body bytes written to the socket, all requests
        self.requests = 0
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path != "/image.bin":
                    self.send_error(404)
                    return
                with server._lock:
                    server.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(server.image)))
                self.end_headers()
                view = memoryview(server.image)
                try:
                    for i in range(0, len(view), 1024):
                        self.wfile.write(view[i:i + 1024])
                        with server._lock:
                            server.sent += len(view[i:i + 1024])
                except (ConnectionError, OSError):
                    pass  # the link dropped the connection

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "ImageServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def fetch(work: Path, port: int, image: bytes, max_attempts: int, timeout: float = 600.0,
          host: str = "127.0.0.1") -> dict:
    """Run the client on the MicroPython VM (the board's heap) against host:port (the
    shaper in front of an ImageServer) and return what it did."""
    work.mkdir(parents=True, exist_ok=True)
    script = work / "http_get_client.py"
    script.write_text(CLIENT)
    staging = work / "staging.bin"
    staging.write_bytes(b"\xff" * STAGING_SIZE)
    cmd = [micropython(), "-X", f"heapsize={board_heap()}", str(script), host, str(port), "/image.bin",
           str(staging), str(max_attempts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    m = re.search(r"^RESULT (\S+) (\d+) (\d+) (\d+)$", proc.stdout, re.M)
    if proc.returncode or not m:
        raise RuntimeError(f"the HTTP GET client failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    done = m.group(1) == "done"
    staged = staging.read_bytes()[:len(image)]
    return {"done": done, "attempts": int(m.group(2)), "received": int(m.group(3)),
            "seconds": int(m.group(4)) / 1000, "sha_ok": done and hashlib.sha256(staged).digest() ==
            hashlib.sha256(image).digest(),
            "per_attempt": [int(x) for x in re.findall(r"^ATTEMPT \d+ (\d+)", proc.stdout, re.M)]}
