"""How the fleet service takes in what devices send, without stalling its MQTT loop.

Ingest: paho's thread checks a message and queues its registry write; one writer thread
commits whatever is queued as one transaction (Registry.write_batch), so a batch is what
arrived while the last one was written: one message alone at low load, hundreds when
thousands of devices reconnect, and never waits more than one commit before it is
written. Only after its commit does the service act on a batch (the healer sees the
describe, subscribers see the event), so whatever it acts on is in the registry for every
other process and instance. A database that fails (PostgreSQL restarting) is retried
with the same batch until it answers; the queue is bounded, and when it is full paho's
thread waits, so the broker holds the messages (it queues them for the service's
session) instead of this process growing without end. A message is acknowledged to the
broker only once its write is committed (put(write, done): done() runs after the commit),
so what a service killed mid-batch had taken is sent again by the broker to whoever
takes up its session (keel_cloud.adopt).

EventStream: the events committed lately, in memory, for `GET /api/events` and `keel
subscribe`: a subscriber is answered from here when the events it asks for are still in
it, and woken as a batch commits, with no query. With several service instances each
instance's stream is fed from the registry instead (EventStream.follow), because events
arrive at every instance: their numbers are taken under a lock held to the commit
(Registry.write_batch), so reading `seq > last` misses none and repeats none."""

import logging
import queue
import sqlite3
import threading
import time
from collections import deque

from keel_cloud.registry import RegistryError, Write

log = logging.getLogger("keel.cloud.ingest")

BATCH_MAX = 2000  # writes per transaction, at most
QUEUE_MAX = 50_000  # writes waiting; beyond, paho's thread waits (the broker queues)
RETRY_FIRST_S = 0.1  # a failing database: first retry, doubling to ...
RETRY_MAX_S = 5.0
STREAM_KEEP = 20_000  # events kept in memory for subscribers
READ_LIMIT = 1000  # events in one answer
FOLLOW_S = 0.05  # with several instances: how often the registry is read for new events


class Ingest:
    """put(Write, done) from paho's thread; on_committed(writes, results) runs on the
    writer thread after each commit (results: Registry.write_batch's), then each write's
    done() (the message's acknowledgement to the broker)."""

    def __init__(self, registry, on_committed, batch_max: int = BATCH_MAX,
                 queue_max: int = QUEUE_MAX):
        self.registry = registry
        self.on_committed = on_committed
        self.batch_max = batch_max
        self.batches = 0
        self.written = 0
        self.retries = 0
        self._queue: queue.Queue[tuple] = queue.Queue(maxsize=queue_max)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keel-ingest", daemon=True)
        self._thread.start()

    def put(self, write: Write, done=None) -> None:
        self._queue.put((write, done))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every write queued so far is committed and acted on."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to timeout), then stop."""
        self.flush(timeout)
        self._stop.set()
        self._thread.join(timeout)

    def backlog(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                items = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(items) < self.batch_max:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            batch = [write for write, _ in items]
            try:
                results = self._write(batch)
                if results is not None:
                    self.batches += 1
                    self.written += len(batch)
                    try:
                        self.on_committed(batch, results)
                    except Exception:  # noqa: BLE001 - the writer must outlive any one batch
                        log.exception("acting on a batch of %d device messages failed", len(batch))
                    # Only now does the broker forget them (not when stopped before the
                    # commit: it sends them again to the session's next holder).
                    for _, done in items:
                        if done is not None:
                            try:
                                done()
                            except Exception:  # noqa: BLE001 - a lost connection: sent again
                                log.debug("acknowledging a device message failed", exc_info=True)
            finally:
                for _ in items:
                    self._queue.task_done()

    def _write(self, batch: list[Write]) -> list | None:
        """The batch's results once committed; retried while the database fails (None
        only when stopping meanwhile)."""
        wait = RETRY_FIRST_S
        while True:
            try:
                return self.registry.write_batch(batch)
            except RegistryError as e:  # the database: it may come back
                self.retries += 1
                log.warning("the registry failed (%s): %d device messages wait; again in %.1f s",
                            e, len(batch) + self._queue.qsize(), wait)
            except Exception as e:  # noqa: BLE001 - a database error of the driver's, or a bug
                if not self._transient(e):
                    log.exception("a batch of %d device messages cannot be written: "
                                  "writing them one by one", len(batch))
                    return self._one_by_one(batch)
                self.retries += 1
                log.warning("the registry failed (%s); again in %.1f s", e, wait)
            if self._stop.wait(wait):
                return None
            wait = min(wait * 2, RETRY_MAX_S)

    def _transient(self, error: Exception) -> bool:
        check = getattr(self.registry, "is_transient", None)  # (a test's stand-in may lack it)
        return check(error) if check else isinstance(error, sqlite3.OperationalError)

    def _one_by_one(self, batch: list[Write]) -> list:
        """Each write alone: the one that cannot be written is dropped (and logged), not
        the batch."""
        results = []
        for write in batch:
            try:
                results += self.registry.write_batch([write])
            except Exception:  # noqa: BLE001
                log.exception("device %s: a %s message could not be written; dropped",
                              write.device_id, write.kind)
                results.append(None)
        return results


class EventStream:
    """The last events committed, by sequence number: events above `floor` are all here
    (older ones only in the registry)."""

    def __init__(self, floor: int, keep: int = STREAM_KEEP):
        self.floor = floor
        self._events: deque[dict] = deque()
        self._keep = keep
        self._changed = threading.Condition()
        self._follower = None
        self._stop = threading.Event()

    def add(self, events: list[dict]) -> None:
        if not events:
            return
        with self._changed:
            for event in events:
                if event["seq"] > self.last():
                    self._events.append(event)
            while len(self._events) > self._keep:
                self.floor = self._events.popleft()["seq"]
            self._changed.notify_all()

    def last(self) -> int:
        return self._events[-1]["seq"] if self._events else self.floor

    def read(self, after: int, device_id: str | None, limit: int = READ_LIMIT) -> list[dict] | None:
        """Events after `after` (of one device), oldest first; None when some of them
        are no longer here (the caller reads the registry)."""
        with self._changed:
            if after < self.floor:
                return None
            out = []
            # Newest last: skip from the end back to `after` (a subscriber is usually near it).
            start = len(self._events)
            while start > 0 and self._events[start - 1]["seq"] > after:
                start -= 1
            for i in range(start, len(self._events)):
                event = self._events[i]
                if device_id is None or event["id"] == device_id:
                    out.append(event)
                    if len(out) >= limit:
                        break
            return out

    def wait(self, after: int, timeout: float) -> None:
        """Until an event after `after` is here, or timeout."""
        with self._changed:
            if self.last() <= after:
                self._changed.wait(timeout)

    def follow(self, registry, interval: float = FOLLOW_S) -> None:
        """Feed the stream from the registry (several instances write events): a thread
        reads what was committed after the last event every interval, or at once when
        poke() says this instance committed some."""
        self._poke = threading.Event()

        def run():
            while not self._stop.is_set():
                self._poke.wait(interval)
                self._poke.clear()
                try:
                    while True:
                        found = registry.events(self.last(), None, READ_LIMIT)
                        self.add(found)
                        if len(found) < READ_LIMIT:
                            break
                except Exception as e:  # noqa: BLE001 - a database hiccup: next time
                    log.warning("cannot read new events from the registry: %s", e)
                    self._stop.wait(1.0)

        self._follower = threading.Thread(target=run, name="keel-events", daemon=True)
        self._follower.start()

    @property
    def following(self) -> bool:
        return self._follower is not None

    def poke(self) -> None:
        if self._follower is not None:
            self._poke.set()

    def stop(self) -> None:
        self._stop.set()
        if self._follower is not None:
            self._poke.set()
