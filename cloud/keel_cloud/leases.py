"""Several fleet service instances on one broker and one registry (`keel cloud serve
--instance NAME`): who sends an update to a device.

Device traffic is split between the instances by the broker (shared subscriptions), so
the messages of one device's update can reach any of them. An update is therefore owned:
the instance that sends it holds the device's lease in the registry (table `leases`) for
as long as the transfer runs, renews it with its heartbeat every BEAT_S seconds, and
releases it at the end. Another instance does not send to a leased device. An instance
that dies stops renewing: its leases expire after TTL_S, and the first instance to sweep
them (every SWEEP_S) takes the device over: its healer looks at the device's last
describe in the registry and sends again what it needs; the device answers the same
offer with the chunks it has (docs/protocol.md), so the transfer resumes. Worst case, a
dead owner's transfer resumes TTL_S + SWEEP_S seconds after its last heartbeat (12 s).

Clocks: an expiry is the owner's clock plus TTL_S, compared with the sweeper's clock:
instances on several machines need their clocks in step (NTP), well within TTL_S."""

import logging
import os
import socket
import threading
import time

from keel_cloud.ota_sender import LeaseElsewhere

log = logging.getLogger("keel.cloud.leases")

TTL_S = 9.0
BEAT_S = 3.0
SWEEP_S = 3.0


class Leases:
    """One instance's leases. on_released(device_id) runs when it gives up one or loses
    it; on_orphan(device_id) when the sweep found an expired lease of a dead instance;
    on_dead(name, started) when it claimed an instance that stopped beating."""

    def __init__(self, registry, name: str, http: str | None = None, on_released=None,
                 on_orphan=None, on_dead=None, ttl: float = TTL_S, beat: float = BEAT_S,
                 sweep: float = SWEEP_S):
        self.registry = registry
        self.name = name
        self.ttl, self.beat_s, self.sweep_s = ttl, beat, sweep
        self.on_released = on_released or (lambda device_id: None)
        self.on_orphan = on_orphan or (lambda device_id: None)
        self.on_dead = on_dead  # (name, started): an instance that stopped beating, claimed
        self.info = {"name": name, "host": socket.gethostname(), "pid": os.getpid(), "http": http,
                     "started": time.time()}
        self._held: set[str] = set()
        self._lost: set[str] = set()  # leases lost while held (lost())
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> None:
        # Leases left under this name by a previous life (a crash, then a restart before
        # they expired): this process knows nothing of them, and its beat would keep them
        # for ever; they expire now, and the next sweep takes them over.
        self.registry.forget_instance(self.name)
        self.registry.beat(self.info, self.ttl)
        self._thread = threading.Thread(target=self._run, name="keel-leases", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """A clean stop: the instance's leases go at once (the others take its work)."""
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        try:
            self.registry.forget_instance(self.name)
        except Exception as e:  # noqa: BLE001 - they expire anyway
            log.warning("cannot release this instance's leases (%s): they expire in %g s", e, self.ttl)

    def take(self, device_id: str, work: str) -> None:
        """Raises LeaseElsewhere when another live instance holds it."""
        owner = self.registry.take_lease(device_id, self.name, self.ttl, work)
        if owner != self.name:
            raise LeaseElsewhere(owner)
        with self._lock:
            self._held.add(device_id)
            self._lost.discard(device_id)

    def release(self, device_id: str) -> None:
        with self._lock:
            if device_id not in self._held:
                return
            self._held.discard(device_id)
        try:
            self.registry.release_lease(device_id, self.name)
        except Exception as e:  # noqa: BLE001 - it expires anyway
            log.warning("cannot release the lease of %s (%s): it expires in %g s", device_id, e, self.ttl)
        self.on_released(device_id)

    def held(self) -> set[str]:
        with self._lock:
            return set(self._held)

    def owner(self, device_id: str) -> str | None:
        """Another live instance that holds the device's lease, or None."""
        lease = self.registry.lease(device_id)
        if lease and lease["owner"] != self.name and lease["expires"] >= time.time():
            return lease["owner"]
        return None

    def lost(self, device_id: str) -> bool:
        """Whether this instance lost the device's lease while it sent (its beat failed
        for longer than the lease lasts, or another instance took it): it must stop."""
        with self._lock:
            return device_id in self._lost

    def _lose(self, devices) -> None:
        with self._lock:
            devices = set(devices) & self._held
            self._held -= devices
            self._lost |= devices
        for device_id in devices:
            log.warning("this instance lost its lease of %s: it stops sending to it", device_id)
            self.on_released(device_id)

    def _run(self) -> None:
        next_sweep = time.monotonic()
        renewed = time.monotonic()
        while not self._stop.wait(min(self.beat_s, self.sweep_s)):
            try:
                held = self.held()
                owned = self.registry.beat(self.info, self.ttl)
                renewed = time.monotonic()
                self._lose(held - owned)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.sweep_s
                    for device_id, owner in self.registry.expired_leases():
                        log.warning("instance %s stopped renewing its lease of %s: taking it over",
                                    owner, device_id)
                        self.on_orphan(device_id)
                    if self.on_dead is not None:
                        for name, started in self.registry.claim_dead_instances(self.name, self.ttl):
                            log.warning("instance %s stopped beating: taking up what the broker "
                                        "kept for it", name)
                            self.on_dead(name, started)
            except Exception as e:  # noqa: BLE001 - the database: next beat
                log.warning("cannot renew this instance's leases: %s", e)
                if time.monotonic() - renewed > self.ttl:  # they have expired: others may take them
                    self._lose(self.held())
