"""Leases (keel_cloud.leases) on a real registry: one owner per device, taken over once
its owner stops renewing, given up at a clean stop, and lost (so the sender stops) when
another instance took it."""

import time

import pytest

from keel_cloud.leases import Leases
from keel_cloud.ota_sender import LeaseElsewhere
from keel_cloud.registry import Registry


@pytest.fixture
def registry(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    yield reg
    reg.close()


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def two_instances(registry, ttl):
    """Instances a and b, started, beating and sweeping every 0.1 s; b's sweep finds what
    goes in the list."""
    orphans = []
    a = Leases(registry, "a", ttl=ttl, beat=0.1, sweep=0.1)
    b = Leases(registry, "b", ttl=ttl, beat=0.1, sweep=0.1, on_orphan=orphans.append)
    a.start()
    b.start()
    return a, b, orphans


def test_one_owner_at_a_time_and_a_dead_owners_lease_is_taken_over(registry):
    a, b, orphans = two_instances(registry, ttl=0.6)
    try:
        a.take("dev1", "system-part 1 1.1.0")
        a.take("dev1", "again")  # its own: fine
        with pytest.raises(LeaseElsewhere, match="instance a"):
            b.take("dev1", "system-part 1 1.1.0")
        time.sleep(1.0)  # a beats: its lease outlives the ttl
        assert b.owner("dev1") == "a" and not orphans
        a._stop.set()  # a dies (no clean stop): it stops renewing
        a._thread.join(2)
        wait_until(lambda: orphans == ["dev1"])  # swept by b, once
        b.take("dev1", "taken over")
        assert registry.lease("dev1")["owner"] == "b"
    finally:
        b.stop()


def test_a_clean_stop_gives_the_leases_up_for_the_next_sweep(registry):
    a, b, orphans = two_instances(registry, ttl=30)
    try:
        a.take("dev1", "x")
        a.stop()
        wait_until(lambda: orphans == ["dev1"])  # at once, not after 30 s
        assert [i["name"] for i in registry.instances()] == ["b"]
    finally:
        b.stop()


def test_a_lease_taken_by_another_is_lost_and_the_owner_stops(registry):
    released = []
    a = Leases(registry, "a", ttl=30, beat=0.1, sweep=60, on_released=released.append)
    a.start()
    try:
        a.take("dev1", "x")
        assert not a.lost("dev1")
        # (as after a's registry was unreachable longer than the ttl and b swept it)
        registry.release_lease("dev1", "a")
        registry.take_lease("dev1", "b", 30, "taken over")
        wait_until(lambda: a.lost("dev1"))
        assert released == ["dev1"] and "dev1" not in a.held()
        a.release("dev1")  # nothing of a's to release: b's stays
        assert registry.lease("dev1")["owner"] == "b"
    finally:
        a.stop()


def test_a_restarted_instance_hands_its_old_leases_to_the_sweep(registry):
    orphans = []
    registry.take_lease("dev1", "a", 30, "x")  # a's, from before it crashed
    a = Leases(registry, "a", ttl=30, beat=0.1, sweep=0.1, on_orphan=orphans.append)
    a.start()
    try:
        wait_until(lambda: orphans == ["dev1"])  # not renewed for ever: looked at again
        assert registry.lease("dev1") is None
    finally:
        a.stop()


def test_an_instance_that_stopped_beating_is_claimed_by_one_instance(registry):
    registry.beat({"name": "dead", "started": 1.0}, 9)
    registry.query("UPDATE instances SET beat = ?", (time.time() - 60,))  # silent for a minute
    claims = {"a": [], "b": []}
    survivors = [Leases(registry, n, ttl=9, beat=0.05, sweep=0.05,
                        on_dead=lambda name, started, n=n: claims[n].append((name, started)))
                 for n in ("a", "b")]
    for leases in survivors:
        leases.start()
    try:
        wait_until(lambda: claims["a"] or claims["b"])
        time.sleep(0.3)  # several sweeps of both
        assert claims["a"] + claims["b"] == [("dead", 1.0)]  # once, by one of them
        assert registry.hold_instance("dead", 1.0)
        registry.forget_instance("dead", 1.0)
        assert [i["name"] for i in registry.instances()] == ["a", "b"]
    finally:
        for leases in survivors:
            leases.stop()


def test_a_dead_instance_that_started_again_is_not_forgotten(registry):
    registry.beat({"name": "c", "started": 1.0}, 9)
    registry.beat({"name": "c", "started": 2.0}, 9)  # its next life
    assert not registry.hold_instance("c", 1.0)
    registry.forget_instance("c", 1.0)  # the old life's adoption ends: the new one stays
    assert [i["started"] for i in registry.instances()] == [2.0]
