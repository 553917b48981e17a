"""A link shaper: a byte-transparent TCP proxy that makes a loopback connection behave
like a slow, distant, unreliable link, repeatably for a seed.

    shaper = LinkShaper(0, "127.0.0.1", broker_port, "cellular", seed=1)
    shaper.start()            # an asyncio loop in a background thread
    ... clients connect to 127.0.0.1:shaper.port ...
    shaper.stats()            # bytes forwarded per direction, drops, stalls
    shaper.stop()

It does not look into the bytes (TLS passes through untouched). Both directions are
shaped alike:

- rate: each direction is serialised at `rate` bytes/s (the link's bandwidth);
- latency: every byte is delivered rtt/2 after it was serialised (one-way delay);
- drops: the connection is closed on both sides (a TCP reset to each peer, what is in
  flight is lost) at byte offsets of the link, either every `drop_every` bytes or at
  random gaps (`drop_mean` bytes on average, at least `drop_min`);
- stalls: forwarding pauses in both directions for `stall_seconds` at byte offsets
  chosen the same way (`stall_every` or `stall_mean`).

Offsets count the bytes taken in from both directions since the profile was set (the
"link bytes"), across connections: a client that reconnects after a drop continues
on the same schedule. Drop and stall points are drawn from random.Random(seed) (one
stream for drops, one for stalls) and the bytes are split exactly at the points, so a
seed gives the same drop and stall offsets whatever sizes the peers read and write in;
only the timing of the traffic itself varies from run to run.

Profiles are data (PROFILES, or a Profile / dict given directly); set_profile()
switches while running, e.g. to let a device connect over a clean link and turn the
faults on for the part under test."""

import asyncio
import dataclasses
import random
import threading
import time
from dataclasses import dataclass

__all__ = ["Profile", "PROFILES", "LinkShaper", "profile"]

KB = 1024


@dataclass(frozen=True)
class Profile:
    name: str = "custom"
    rate: float | None = None  # bytes/s in each direction; None: not limited
    rtt: float = 0.0  # seconds; each direction adds rtt/2
    drop_every: int | None = None  # close the connection every N link bytes
    drop_mean: int | None = None  # ... or at random gaps of this mean (exponential)
    drop_min: int = 0  # the smallest random gap, in link bytes
    max_drops: int | None = None  # at most this many drops (None: no limit)
    stall_every: int | None = None  # pause forwarding every N link bytes
    stall_mean: int | None = None  # ... or at random gaps of this mean
    stall_min: int = 0
    stall_seconds: float = 0.0
    max_stalls: int | None = None
    chunk: int = 1460  # the largest piece forwarded at once (pacing granularity)

    def but(self, **changes) -> "Profile":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


PROFILES: dict[str, Profile] = {
    "clean": Profile("clean"),
    "wifi": Profile("wifi", rate=500 * KB, rtt=0.010),
    "cellular": Profile("cellular", rate=16 * KB, rtt=0.300),
    "flaky": Profile("flaky", rate=16 * KB, rtt=0.300, drop_every=64 * KB),
    # Random drops, a stall or two, throttled: a link that misbehaves at unpredictable
    # points. The smallest gap between drops leaves room for a TLS + MQTT reconnection.
    "chaos": Profile("chaos", rate=64 * KB, rtt=0.040, drop_mean=32 * KB, drop_min=12 * KB,
                     max_drops=3, stall_mean=24 * KB, stall_min=8 * KB, stall_seconds=2.0,
                     max_stalls=2),
}


def profile(value) -> Profile:
    """A Profile from a name in PROFILES, a dict of fields, or a Profile."""
    if isinstance(value, Profile):
        return value
    if isinstance(value, str):
        try:
            return PROFILES[value]
        except KeyError:
            raise ValueError(f"no link profile '{value}' (known: {', '.join(PROFILES)})") from None
    if isinstance(value, dict):
        return Profile(**value)
    raise TypeError(f"not a link profile: {value!r}")


class _Schedule:
    """Link-byte offsets at which something happens: fixed gaps or random ones."""

    def __init__(self, rng: random.Random, every, mean, minimum, limit):
        self.rng, self.every, self.mean, self.minimum, self.limit = rng, every, mean, minimum, limit
        self.done = 0
        self.next = None
        self._draw(0)

    def _draw(self, at: int) -> None:
        if self.limit is not None and self.done >= self.limit:
            self.next = None
        elif self.every:
            self.next = at + self.every
        elif self.mean:
            gap = max(self.minimum, int(self.rng.expovariate(1.0 / self.mean)))
            self.next = at + max(1, gap)
        else:
            self.next = None

    def fire(self) -> int:
        at = self.next
        self.done += 1
        self._draw(at)
        return at


class _Direction:
    """One direction's pacing: when its serialiser is free again."""

    def __init__(self, name: str):
        self.name = name
        self.free_at = 0.0


class _Connection:
    def __init__(self, number: int):
        self.number = number
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task] = []
        self.closed = False
        self.taken = {"up": 0, "down": 0}  # read from a peer, including what a drop cut off
        self.delivered = {"up": 0, "down": 0}

    def abort(self) -> None:
        """Close both sides at once: a reset to each peer, nothing in flight delivered."""
        if self.closed:
            return
        self.closed = True
        for writer in self.writers:
            try:
                writer.transport.abort()
            except Exception:  # noqa: BLE001 - already gone
                pass
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class LinkShaper:
    """A shaping TCP proxy from 127.0.0.1:listen_port (0: any free port, see .port) to
    upstream_host:upstream_port, with its asyncio loop in a background thread."""

    def __init__(self, listen_port: int, upstream_host: str, upstream_port: int,
                 profile="clean", seed: int = 0, listen_host: str = "127.0.0.1"):
        self.listen_host = listen_host
        self.port = listen_port
        self.upstream = (upstream_host, upstream_port)
        self.seed = seed
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server = None
        self._connections: set[_Connection] = set()
        self._count = 0
        self.bytes_up = 0  # client -> upstream, delivered
        self.bytes_down = 0  # upstream -> client, delivered
        self.connections = 0
        self.drops: list[dict] = []
        self.stalls: list[dict] = []
        self.lost = {"up": 0, "down": 0}  # read from a peer, never delivered (drops)
        self.set_profile(profile)

    # Profile and statistics (any thread)

    def set_profile(self, value, seed: int | None = None) -> None:
        """Switch to a profile; its drop and stall schedules start from here, at link
        byte 0, drawn afresh from the seed (this one or the shaper's)."""
        p = profile(value)
        seed = self.seed if seed is None else seed
        with self._lock:
            self.profile = p
            self.link_bytes = 0
            self._drop_at = _Schedule(random.Random(f"{seed}:drop"), p.drop_every, p.drop_mean,
                                      p.drop_min, p.max_drops)
            self._stall_at = _Schedule(random.Random(f"{seed}:stall"), p.stall_every, p.stall_mean,
                                       p.stall_min, p.max_stalls)
            self._dirs = {"up": _Direction("up"), "down": _Direction("down")}

    def stats(self) -> dict:
        with self._lock:
            return {
                "profile": self.profile.name,
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
                "link_bytes": self.link_bytes,
                "connections": self.connections,
                "drops": len(self.drops),
                "drop_offsets": [d["offset"] for d in self.drops],
                "stalls": len(self.stalls),
                "stall_offsets": [s["offset"] for s in self.stalls],
                "lost_up": self.lost["up"],
                "lost_down": self.lost["down"],
            }

    def drop_now(self) -> int:
        """Drop every open connection at once (a test's own fault); how many."""
        async def drop():
            conns = list(self._connections)
            for conn in conns:
                self._record_drop(conn, "manual")
            return len(conns)
        return asyncio.run_coroutine_threadsafe(drop(), self._loop).result(5)

    # Thread control

    def start(self, timeout: float = 10.0) -> "LinkShaper":
        ready = threading.Event()
        failure: list[BaseException] = []

        def run():
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._accept, self.listen_host, self.port))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:  # noqa: BLE001 - handed to start()
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"linkshaper-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("the link shaper did not start")
        if failure:
            raise failure[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def shutdown():
            self._server.close()
            for conn in list(self._connections):
                conn.abort()
            tasks = [t for c in self._connections for t in c.tasks]
            if tasks:
                await asyncio.wait(tasks, timeout=2)
            loop.stop()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop)
        except RuntimeError:
            pass  # the loop already ended
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # The proxy (the loop's thread)

    async def _accept(self, reader, writer):
        with self._lock:
            self._count += 1
            self.connections += 1
        conn = _Connection(self._count)
        conn.writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 10)
        except (OSError, asyncio.TimeoutError):
            writer.transport.abort()
            return
        conn.writers.append(up_writer)
        self._connections.add(conn)
        conn.tasks = [
            asyncio.ensure_future(self._pump(conn, reader, up_writer, "up")),
            asyncio.ensure_future(self._pump(conn, up_reader, writer, "down")),
        ]
        try:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            conn.abort()
            self._connections.discard(conn)

    def _record_drop(self, conn: _Connection, why: str, offset: int | None = None) -> None:
        with self._lock:
            self.drops.append({"offset": self.link_bytes if offset is None else offset,
                               "time": time.monotonic(), "connection": conn.number, "why": why})
        conn.abort()

    async def _pump(self, conn: _Connection, reader, writer, name: str):
        """Read from one side, pace, delay, and write to the other; a delivery task
        writes each piece when it is due, so latency does not lower the rate."""
        queue: asyncio.Queue = asyncio.Queue()
        deliver = asyncio.ensure_future(self._deliver(conn, queue, writer, name))
        conn.tasks.append(deliver)
        loop = asyncio.get_running_loop()
        try:
            while not conn.closed:
                data = await reader.read(65536)
                if not data:
                    await queue.put((loop.time(), None))  # EOF after what is in flight
                    await deliver
                    return
                conn.taken[name] += len(data)
                view = memoryview(data)
                while view and not conn.closed:
                    piece, drop, stall = self._take(view)
                    view = view[len(piece):]
                    p = self.profile
                    direction = self._dirs[name]
                    now = loop.time()
                    start = max(now, direction.free_at)
                    if p.rate:
                        direction.free_at = start + len(piece) / p.rate
                    else:
                        direction.free_at = start
                    if piece:
                        await queue.put((direction.free_at + p.rtt / 2, bytes(piece)))
                    if stall:
                        until = max(loop.time(), direction.free_at) + p.stall_seconds
                        for d in self._dirs.values():
                            d.free_at = max(d.free_at, until)
                    if direction.free_at > loop.time() + 0.002:
                        await asyncio.sleep(direction.free_at - loop.time())  # serialising
                    if drop is not None:
                        await asyncio.sleep(max(0.0, direction.free_at + p.rtt / 2 - loop.time()))
                        self._record_drop(conn, "schedule", drop)
                        return
        except (ConnectionError, OSError):
            pass
        finally:
            if conn.closed:
                deliver.cancel()
                with self._lock:
                    self.lost[name] += conn.taken[name] - conn.delivered[name]
                    conn.taken[name] = conn.delivered[name]

    def _take(self, view: memoryview):
        """The next piece of view to forward, cut at the next drop or stall point;
        (piece, the drop offset if the link drops after it, whether a stall follows)."""
        with self._lock:
            p = self.profile
            n = min(len(view), p.chunk)
            points = [s.next for s in (self._drop_at, self._stall_at) if s.next is not None]
            if points:
                n = min(n, max(0, min(points) - self.link_bytes))
            self.link_bytes += n
            drop = stall = None
            if self._stall_at.next is not None and self.link_bytes >= self._stall_at.next:
                at = self._stall_at.fire()
                self.stalls.append({"offset": at, "time": time.monotonic(), "seconds": p.stall_seconds})
                stall = True
            if self._drop_at.next is not None and self.link_bytes >= self._drop_at.next:
                drop = self._drop_at.fire()
            return view[:n], drop, stall

    async def _deliver(self, conn: _Connection, queue: asyncio.Queue, writer, name: str):
        loop = asyncio.get_running_loop()
        try:
            while True:
                due, data = await queue.get()
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if conn.closed:
                    return
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                with self._lock:
                    conn.delivered[name] += len(data)
                    if name == "up":
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            conn.abort()
