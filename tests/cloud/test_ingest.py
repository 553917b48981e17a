"""The fleet service's ingest (keel_cloud.ingest): batches, a database that fails and comes
back, back-pressure, and the stream of recent events subscribers are answered from."""

import sqlite3
import threading
import time

from keel_cloud.ingest import EventStream, Ingest
from keel_cloud.registry import Write


class FakeRegistry:
    """Records the batches; fails while `failing` is set."""

    def __init__(self):
        self.batches = []
        self.failing = 0
        self.gate = threading.Event()
        self.gate.set()

    def write_batch(self, writes):
        self.gate.wait(10)
        if self.failing:
            self.failing -= 1
            raise sqlite3.OperationalError("database is locked")
        self.batches.append(list(writes))
        return [True] * len(writes)


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_what_arrives_during_a_commit_is_the_next_batch_in_order():
    registry = FakeRegistry()
    committed = []
    ingest = Ingest(registry, lambda writes, results: committed.extend(writes))
    try:
        registry.gate.clear()  # the first commit is slow
        ingest.put(Write("seen", "a", None, 0))
        wait_until(lambda: ingest.backlog() == 0)  # taken: the writer is in its commit
        for i in range(500):
            ingest.put(Write("seen", "b", i, 0))
        registry.gate.set()
        assert ingest.flush()
        assert [len(b) for b in registry.batches] == [1, 500]
        assert [w.value for w in committed[1:]] == list(range(500))
    finally:
        ingest.stop()


def test_a_failing_database_is_retried_with_the_same_batch():
    registry = FakeRegistry()
    registry.failing = 3
    committed = []
    ingest = Ingest(registry, lambda writes, results: committed.extend(writes))
    try:
        for i in range(10):
            ingest.put(Write("event", "a", ("n", str(i)), 0))
        assert ingest.flush()
        assert ingest.retries == 3
        assert [w.value[1] for w in committed] == [str(i) for i in range(10)]
    finally:
        ingest.stop()


def test_a_full_queue_makes_the_sender_wait_not_drop():
    registry = FakeRegistry()
    registry.gate.clear()
    ingest = Ingest(registry, lambda writes, results: None, queue_max=5)
    try:
        ingest.put(Write("seen", "a", 0, 0))
        wait_until(lambda: ingest.backlog() == 0)
        done = threading.Event()

        def flood():
            for i in range(20):
                ingest.put(Write("seen", "a", i, 0))
            done.set()

        threading.Thread(target=flood, daemon=True).start()
        assert not done.wait(0.3)  # waits while the database is stuck
        registry.gate.set()
        assert done.wait(10)
        assert ingest.flush()
        assert sum(len(b) for b in registry.batches) == 21
    finally:
        ingest.stop()


def event(seq, device="d1"):
    return {"seq": seq, "device": device, "id": device, "name": "n", "data": str(seq), "ts": 0}


def test_the_stream_answers_what_it_holds_and_sends_older_asks_to_the_registry():
    stream = EventStream(floor=10, keep=5)
    assert stream.read(10, None) == [] and stream.read(9, None) is None
    stream.add([event(s, "d1" if s % 2 else "d2") for s in range(11, 19)])
    assert stream.floor == 13  # 14..18 kept
    assert stream.read(12, None) is None
    assert [e["seq"] for e in stream.read(13, None)] == [14, 15, 16, 17, 18]
    assert [e["seq"] for e in stream.read(15, "d1")] == [17]
    assert [e["seq"] for e in stream.read(14, None, limit=2)] == [15, 16]
    stream.add([event(16)])  # a number already streamed is not added again
    assert stream.last() == 18 and len(stream.read(13, None)) == 5


def test_a_waiting_subscriber_is_woken_by_the_commit():
    stream = EventStream(floor=0)
    woke = []

    def waiter():
        stream.wait(0, 5)
        woke.append(time.monotonic())

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.1)
    at = time.monotonic()
    stream.add([event(1)])
    thread.join(5)
    assert woke and woke[0] - at < 2  # woken by the add, not by the 5 s timeout


def test_a_message_is_acknowledged_only_after_its_commit():
    registry = FakeRegistry()
    registry.gate.clear()
    acked, committed = [], []
    ingest = Ingest(registry, lambda writes, results: committed.extend(writes))
    try:
        for i in range(3):
            ingest.put(Write("seen", "a", i, 0), lambda i=i: acked.append((i, len(committed))))
        wait_until(lambda: ingest.backlog() <= 2)  # the writer holds the first batch
        time.sleep(0.1)
        assert acked == []  # in the commit: not yet
        registry.gate.set()
        assert ingest.flush()
        assert [i for i, _ in acked] == [0, 1, 2]
        assert all(n >= i + 1 for i, n in acked)  # each after its write was acted on
    finally:
        ingest.stop()


def test_stopped_before_its_commit_a_message_is_not_acknowledged():
    registry = FakeRegistry()
    registry.failing = 10**6  # the database never answers
    acked = []
    ingest = Ingest(registry, lambda writes, results: None)
    ingest.put(Write("seen", "a", 0, 0), lambda: acked.append(0))
    ingest.stop(timeout=0.5)
    assert acked == []  # the broker sends it again to the session's next holder
