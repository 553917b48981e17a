"""The cloud side of over-the-air updates (docs/protocol.md, "Updates (over the air)").

OtaSender.send() runs in the caller's thread (an HTTP job, a test) and drives one
transfer to one device: the offer (QoS 1), then chunks (QoS 0) within the window the
device's acknowledgements allow, at most a path-dependent number of bytes of them
unacknowledged at a time, again only what they say is missing, a new offer after 10 s
of silence, until the device says `pending` (success) or `refused`/`failed`.

What a dropped connection costs is what was in flight on it: every chunk between the
cloud and the device is lost with it and has to go again. The device's window (8 KB)
is what it can take, not what should be on the way: on a throttled link whatever is
sent beyond the link's bandwidth x delay only waits in a queue (a proxy's, the
broker's, a socket's) to be lost at the next drop, and adds nothing to the speed. So
the sender measures the path as BBR does (PathEstimate: the delivery rate, the most
chunk bytes acknowledged per second over recent acknowledgements, and the minimum
round trip, chunk sent -> its acknowledgement) and keeps about rate x min RTT in
flight, plus the chunk that waits on the device for its partner (it acknowledges every
2); it starts at 3 chunks and grows by half and a chunk per round trip while the
delivery rate keeps rising. The estimate outlives a dropped connection; drops the
transfer has seen bound it further (DROP_BUDGET). The device's `ota/status` messages arrive on paho's thread through
on_status(), which only hands them over through a queue."""

import hashlib
import json
import logging
import queue
import struct
import threading
import time
from collections import deque

from keel_cloud import signatures

log = logging.getLogger("keel.cloud.ota")

CHUNK_SIZE = 1024
SILENCE = 10.0  # seconds without a status before the offer goes again
RESEND_GUARD = 1.0  # a chunk sent less than this ago is not sent again (an older ack)
# Chunks travel on one TCP connection: a chunk sent on the device's current connection
# and not yet acknowledged is late, not lost (a stall), unless the device shows a gap
# below a later chunk, or it has been this long.
RESEND_AFTER = 15.0
RECONNECT_GRACE = 1.5  # after a reconnect, how long to wait for the device's status
MAX_UNANSWERED_OFFERS = 4  # offers in a row without any answer: the device is gone
# The in-flight limit (PathEstimate): chunks sent and not yet acknowledged, at most.
INITIAL_CHUNKS = 3  # before the first measurement (a drop costs at most this much)
STARTUP_GAIN = 1.5  # x rate x min RTT while the delivery rate keeps rising (+50 % and a chunk per round)
GAIN = 1.0  # x rate x min RTT once it stopped rising; plus ack_every - 1 chunks
FULL_GROWTH = 1.25  # the delivery rate "keeps rising" while it grows this much per round ...
FULL_ROUNDS = 3  # ... within this many rounds
RATE_ROUNDS = 10  # the delivery rate: the highest sample over this many min RTTs ...
RATE_WINDOW_MIN = 1.0  # ... and at least this many seconds
# After drops: what is in flight is what a drop costs, so at most this fraction of the
# chunk bytes that go between two drops (bytes sent / (drops + 1)).
DROP_BUDGET = 0.04
DEVICE_ACK_EVERY = 4  # for a device whose acknowledgements do not say (`ack`)
DEFAULT_TIMEOUT = 600.0
TRIAL_S = 300  # seconds a new system part has to reach the cloud before the device rolls it back


class OtaError(Exception):
    """A transfer the device refused or failed, or that did not finish in time."""


class LeaseElsewhere(OtaError):
    """Another fleet service instance is sending the device an update (keel_cloud.leases)."""

    def __init__(self, owner: str):
        super().__init__(f"instance {owner} is sending it an update")
        self.owner = owner


def transfer_name(image: bytes) -> str:
    """The transfer's name: the SHA-256 of the image's bytes (64 hex digits)."""
    return hashlib.sha256(image).hexdigest()


def _reason(status: dict) -> str:
    reason = str(status.get("reason") or "unknown")
    missing = status.get("missing")
    if missing:
        deps = ", ".join(
            f"{m.get('function')} {m.get('index')} >= {m.get('version')}" if isinstance(m, dict) else str(m)
            for m in missing
        )
        reason += f" (missing {deps})"
    return reason


class _Transfer:
    def __init__(self):
        self.statuses: queue.Queue[dict] = queue.Queue()


class _Sent:
    """A chunk on its way: when it went, and the delivery state then (for a rate sample)."""

    __slots__ = ("at", "size", "delivered", "delivered_at", "first_at", "again")

    def __init__(self, at, size, delivered, delivered_at, first_at, again):
        self.at, self.size, self.again = at, size, again
        self.delivered, self.delivered_at, self.first_at = delivered, delivered_at, first_at


class PathEstimate:
    """The path to one device, measured as BBR does, and the in-flight limit from it.

    sent(n, size, now, again) for every chunk published; acked(chunks, now) with the
    chunks an acknowledgement shows stored for the first time; reconnected(now) when
    the device's connection changed (what was on its way is lost; the estimate stays).

    - Delivery rate: per acknowledgement, the chunk bytes acknowledged since the newest
      chunk it covers was sent, over the time that took (the longer of its send and
      acknowledgement intervals, as BBR: a burst of acknowledgements does not inflate
      it); the estimate is the highest sample over the last RATE_ROUNDS min RTTs (at
      least RATE_WINDOW_MIN s), the last one kept when there is none (after a drop).
    - Min RTT: chunk published -> the acknowledgement that first shows it stored, for
      chunks sent once (Karn); the lowest on the device's current connection (not over
      a time window: the limit keeps a chunk or two queued, so a windowed minimum would
      creep up with them); after a reconnection the first sample replaces it (a new
      connection may take another route), which is clean: nothing is queued then.
      It includes the device's own delay (its loop, flash writes) and the broker's.
    - Limit: rate x min RTT x gain (the bandwidth x delay product: more only waits in
      queues and is lost at a drop) plus ack_every - 1 chunks (the min RTT is that of
      the last chunk of an acknowledgement; the others wait on the device for it), at
      most DROP_BUDGET x the chunk bytes sent / (drops + 1) once there were drops (a
      drop costs about what is in flight). Startup: gain
      STARTUP_GAIN until the rate stopped rising FULL_GROWTH per round for FULL_ROUNDS
      rounds, then GAIN. INITIAL_CHUNKS before any sample. The caller bounds it by the
      device's window and its acknowledgement interval."""

    def __init__(self, chunk_size: int = CHUNK_SIZE):
        self.chunk_size = chunk_size
        self.rate = 0.0  # bytes/s (chunk payload acknowledged)
        self.min_rtt = None  # seconds
        self.startup = True
        self.updated = None  # when the last sample came
        self._rates: deque[tuple[float, float]] = deque()  # (when, rate) samples
        self._rtt_fresh = False  # the next RTT sample replaces min_rtt (a new connection)
        self._sent: dict[int, _Sent] = {}
        self.delivered = 0  # chunk bytes acknowledged
        self.bytes_sent = 0  # chunk bytes sent (again or not)
        self.drops = 0  # connections that ended during the transfer
        self._delivered_at = None  # when the last ones were
        self._first_at = None  # when the newest chunk acknowledged then was sent
        # rounds (a round ends when a chunk sent after it began is acknowledged)
        self._round_end = 0
        self._full_rate = 0.0
        self._full_count = 0
        self._grown = INITIAL_CHUNKS * chunk_size  # startup: grows with what is acknowledged

    def sent(self, n: int, size: int, now: float, again: bool = False) -> None:
        if self._delivered_at is None:
            self._delivered_at = self._first_at = now  # nothing acknowledged yet: from here
        self._sent[n] = _Sent(now, size, self.delivered, self._delivered_at, self._first_at, again)
        self.bytes_sent += size

    def reconnected(self, now: float) -> None:
        """What was on its way is lost; rates are measured again from now on."""
        if self._sent:
            self.drops += 1  # (a reconnection with nothing on its way cost nothing)
        self._sent.clear()
        self._delivered_at = self._first_at = None
        self._rtt_fresh = self.min_rtt is not None

    def acked(self, chunks, now: float) -> None:
        before = self.delivered
        newest = None
        rtt = None
        for n in chunks:
            record = self._sent.pop(n, None)
            if record is None:
                continue  # stored before this transfer or this connection
            self.delivered += record.size
            if newest is None or record.at > newest.at:
                newest = record
            if not record.again:
                sample = now - record.at
                rtt = sample if rtt is None else min(rtt, sample)
        if newest is None:
            return
        if self.startup:  # slow start: + (gain - 1) x what was acknowledged, per round x gain
            self._grown += (STARTUP_GAIN - 1) * (self.delivered - before)
        self._delivered_at = now
        self._first_at = newest.at
        self.updated = now
        if rtt is not None:
            if self.min_rtt is None or self._rtt_fresh or rtt < self.min_rtt:
                self.min_rtt = rtt
            self._rtt_fresh = False
        interval = max(now - newest.delivered_at, newest.at - newest.first_at)
        if interval > 0:
            self._rates.append((now, (self.delivered - newest.delivered) / interval))
        self._expire(now)
        if self._rates:
            self.rate = max(r for _, r in self._rates)
        if self.startup and newest.delivered >= self._round_end:
            self._round_end = self.delivered  # a round: everything sent before it is in
            if self.rate >= self._full_rate * FULL_GROWTH:
                self._full_rate, self._full_count = self.rate, 0
            else:
                self._full_count += 1
                if self._full_count >= FULL_ROUNDS:
                    self.startup = False

    def _expire(self, now: float) -> None:
        window = max(RATE_ROUNDS * (self.min_rtt or 0.0), RATE_WINDOW_MIN)
        rates = self._rates
        while len(rates) > 1 and now - rates[0][0] > window:
            rates.popleft()

    def limit(self, ack_every: int) -> float:
        """Bytes to keep in flight (before the device's window and floor)."""
        if not self.rate or self.min_rtt is None:
            limit = INITIAL_CHUNKS * self.chunk_size
        else:
            gain = STARTUP_GAIN if self.startup else GAIN
            limit = gain * self.rate * self.min_rtt + (ack_every - 1) * self.chunk_size
            if self.startup:  # growing whatever the RTT samples' spread (the device's loop)
                limit = max(limit, self._grown)
        if self.drops:
            limit = min(limit, DROP_BUDGET * self.bytes_sent / (self.drops + 1))
        return limit

    def summary(self, ack_every: int = 2) -> dict:
        return {"rate": round(self.rate), "min_rtt": None if self.min_rtt is None else round(self.min_rtt, 4),
                "limit": round(self.limit(ack_every)), "startup": self.startup, "drops": self.drops}


class OtaSender:
    """publish(topic, payload, qos) is the fleet service's MQTT client's publish.
    in_flight: None, the limit adapts to the path (PathEstimate); or a fixed number of
    bytes (a comparison, a test). leases: with several service instances, a
    keel_cloud.leases.Leases: a transfer holds the device's lease while it runs."""

    def __init__(self, publish, silence: float = SILENCE, trial_s: int = TRIAL_S,
                 in_flight: int | None = None, leases=None):
        self._publish = publish
        self.leases = leases
        self.silence = silence
        self.in_flight = in_flight
        self.trial_s = trial_s
        self._lock = threading.Lock()
        self._transfers: dict[str, _Transfer] = {}
        self._stopping = False

    # From paho's thread

    def on_status(self, device_id: str, status: dict) -> bool:
        """False when the status is for no transfer of this sender's (with several
        service instances, another one's)."""
        with self._lock:
            transfer = self._transfers.get(device_id)
        if transfer is None:
            if status.get("state") == "installed":
                log.info("device %s installed version %s", device_id, status.get("version"))
                return True
            return False
        transfer.statuses.put(status)
        return True

    def stop(self) -> None:
        """The service stops: every transfer running ends now (OtaError), so no worker
        holds the process open waiting on a device."""
        with self._lock:
            self._stopping = True
            transfers = list(self._transfers.values())
        for transfer in transfers:
            transfer.statuses.put({"state": "_stopping"})

    def on_online(self, device_id: str) -> None:
        """The device (re)connected: what was in flight on its old connection is lost."""
        with self._lock:
            transfer = self._transfers.get(device_id)
        if transfer is not None:
            transfer.statuses.put({"state": "_online"})

    def busy(self, device_id: str) -> bool:
        """A transfer to the device runs, here or (with leases) in another instance."""
        with self._lock:
            if device_id in self._transfers:
                return True
        return bool(self.leases and self.leases.owner(device_id))

    # The transfer

    def send(self, device_id: str, image: bytes, module: dict, progress_cb=None,
             timeout: float = DEFAULT_TIMEOUT, chunk_size: int = CHUNK_SIZE,
             keep_lease: bool = False) -> dict:
        """Send image to the device; module: {function, index, version, platform}.
        Returns {"state": "pending", "sha256", "size", "bytes_sent", "offers",
        "resent", "duplicates", "path"}; raises OtaError on refused, failed, silence or timeout.
        resent: chunks sent again, by why ("dropped": sent on a connection that ended,
        "gap": missing below a later one, "late": unacknowledged for RESEND_AFTER);
        duplicates: chunks the device got more than once, as it reported (None: it
        did not say), i.e. chunks that were sent again needlessly; path: the estimate
        at the end (PathEstimate.summary(): rate, min_rtt, limit, startup). With
        leases, the device's lease is held while it runs (LeaseElsewhere when another
        instance holds it), and after a success too with keep_lease (the healer holds
        it until the device shows the module installed)."""
        if not image:
            raise OtaError("the image is empty")
        transfer = _Transfer()
        with self._lock:
            if self._stopping:
                raise OtaError("the service is stopping")
            if device_id in self._transfers:
                raise OtaError("another update to this device is in progress")
            self._transfers[device_id] = transfer
        try:
            if self.leases:  # LeaseElsewhere when another instance sends it one
                self.leases.take(device_id, "%s %s %s" % (module.get("function"), module.get("index"),
                                                          module.get("version")))
            done = False
            try:
                result = self._run(device_id, image, module, transfer, progress_cb, timeout, chunk_size)
                done = True
                return result
            finally:
                if self.leases and not (done and keep_lease):
                    self.leases.release(device_id)
        finally:
            with self._lock:
                self._transfers.pop(device_id, None)

    def _run(self, device_id, image, module, transfer, progress_cb, timeout, chunk_size):
        sha = transfer_name(image)
        tag = bytes.fromhex(sha)[:8]
        size = len(image)
        count = (size + chunk_size - 1) // chunk_size
        prefix = f"devices/{device_id}/ota/"
        offer = json.dumps({
            "sha256": sha, "function": module.get("function"), "index": module.get("index"),
            "version": module.get("version"), "platform": module.get("platform"),
            "size": size, "chunk_size": chunk_size,
            # only a new system part goes on trial (and is rolled back if it fails it)
            **({"trial_s": self.trial_s} if module.get("function") == "system-part" else {}),
            # a signed module's signature: a board that trusts keys checks it first
            **signatures.offer_fields(image),
        })
        deadline = time.monotonic() + timeout
        epoch = time.monotonic()  # when the device's current connection began
        sent_at: dict[int, float] = {}
        resent = {"dropped": 0, "gap": 0, "late": 0}
        duplicates = None
        connection = 0  # the device's connections seen during the transfer (log lines)
        bytes_sent = 0
        offers = 0
        unanswered = 0
        acknowledged = -1
        path = PathEstimate(chunk_size)
        have: set[int] = set()  # chunks the last acknowledgement showed stored
        ack_every = DEVICE_ACK_EVERY

        def chunk_len(n: int) -> int:
            return min(chunk_size, size - n * chunk_size)

        def send_offer():
            nonlocal offers
            offers += 1
            self._publish(prefix + "offer", offer, 1)

        def report(done: int):
            nonlocal acknowledged
            if progress_cb and done != acknowledged:
                acknowledged = done
                progress_cb(done)

        send_offer()
        offer_at = None  # after a reconnect: offer again unless the device speaks first
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise OtaError(f"the update did not finish within {timeout:g} s")
            if self.leases and self.leases.lost(device_id):
                raise OtaError("this instance lost the device's lease (its registry did not answer "
                               "for longer than a lease lasts): another instance takes the update over")
            wait = min(self.silence, deadline - now)
            if offer_at is not None:
                wait = max(0.0, min(wait, offer_at - now))
            try:
                status = transfer.statuses.get(timeout=wait)
            except queue.Empty:
                if offer_at is not None and time.monotonic() >= offer_at:
                    offer_at = None
                    send_offer()
                    continue
                if time.monotonic() >= deadline:
                    continue
                unanswered += 1
                if unanswered >= MAX_UNANSWERED_OFFERS:
                    raise OtaError(f"the device stopped answering ({unanswered} offers unanswered)")
                log.info("no status from %s for %g s: offering again", device_id, self.silence)
                send_offer()
                continue
            state = status.get("state")
            if state == "_stopping":
                raise OtaError("the service is stopping")
            if state == "_online":
                # The device tells where it got to once it has subscribed again (or
                # has lost the transfer in a reset: then it needs the offer).
                epoch = time.monotonic()
                path.reconnected(epoch)
                connection += 1
                log.debug("%s: connection %d", device_id, connection)
                offer_at = epoch + RECONNECT_GRACE
                continue
            offer_at = None
            unanswered = 0
            if state == "refused":
                raise OtaError(f"the device refused the update: {_reason(status)}")
            if state == "failed":
                raise OtaError(f"the update failed on the device: {_reason(status)}")
            if state == "pending":
                report(size)
                log.info("%s: %d chunks, %d sent again (%s), %s the device got twice; %d offers; "
                         "path %.1f KB/s, min RTT %s ms, limit %.1f KB", device_id, count,
                         sum(resent.values()), ", ".join(f"{k} {v}" for k, v in resent.items()),
                         "?" if duplicates is None else duplicates, offers, path.rate / 1024,
                         "?" if path.min_rtt is None else f"{1000 * path.min_rtt:.0f}",
                         path.limit(ack_every) / 1024)
                return {"state": "pending", "sha256": sha, "size": size,
                        "bytes_sent": bytes_sent, "offers": offers, "resent": resent,
                        "duplicates": duplicates, "path": path.summary(ack_every)}
            if state == "verifying":
                report(size)
                if isinstance(status.get("duplicates"), int):
                    duplicates = status["duplicates"]
                continue
            if state != "receiving":
                log.debug("status %r from %s ignored", state, device_id)
                continue
            try:
                nxt = max(0, min(int(status.get("next", 0)), count))
                window = max(1, int(status.get("window") or 1))
                ack_every = max(1, int(status.get("ack") or DEVICE_ACK_EVERY))
                bitmap = bytes.fromhex(status.get("bitmap") or "")
            except (TypeError, ValueError):
                log.warning("bad receiving status from %s: %r", device_id, status)
                continue
            stored = set(range(nxt))
            for i in range(min(window, len(bitmap) * 8)):
                if bitmap[i // 8] >> (i % 8) & 1 and nxt + i < count:
                    stored.add(nxt + i)
            report(sum(chunk_len(n) for n in stored))
            now = time.monotonic()
            path.acked(stored - have, now)
            have = stored
            highest = max(stored, default=-1)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: ack next %d bitmap %s; path %.1f KB/s, min RTT %s, limit %.1f KB%s",
                          device_id, nxt, bitmap.hex(), path.rate / 1024, path.min_rtt,
                          path.limit(ack_every) / 1024, " (startup)" if path.startup else "")
            # Within the window: what is on its way, and what to send (new or lost).
            flying = 0
            todo = []
            for n in range(nxt, min(nxt + window, count)):
                if n in stored:
                    continue
                at = sent_at.get(n)
                why = None
                if at is not None:
                    if at < epoch:
                        why = "dropped"
                    elif n < highest and now - at >= RESEND_GUARD:
                        why = "gap"
                    elif now - at >= RESEND_AFTER:
                        why = "late"
                    else:
                        flying += 1  # still on its way (a stall), not lost
                        continue
                todo.append((n, why))
            if self.in_flight is None:
                limit = round(path.limit(ack_every) / chunk_size)  # chunks
            else:
                limit = self.in_flight // chunk_size
            # never fewer than the device acknowledges at a time (it would wait for its
            # idle acknowledgement), never more than its window (the loop's bound)
            room = max(limit, ack_every, 1) - flying
            for n, why in todo[:max(0, room)]:
                data = image[n * chunk_size:(n + 1) * chunk_size]
                self._publish(prefix + "chunk", tag + struct.pack(">I", n) + data, 0)
                if why:
                    resent[why] += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s: chunk %d sent%s on connection %d", device_id, n,
                              f" again ({why}, first at {sent_at[n]:.3f})" if why else "", connection)
                sent_at[n] = now
                path.sent(n, len(data), now, again=why is not None)
                bytes_sent += len(data)
