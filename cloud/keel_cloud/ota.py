"""The cloud side of over-the-air updates (docs/protocol.md, "Updates (over the air)").

OtaSender.send() runs in the caller's thread (an HTTP job, a test) and drives one
transfer to one device: the offer (QoS 1), then chunks (QoS 0) within the window the
device's acknowledgements allow, at most `in_flight` bytes of them unacknowledged at a
time, again only what they say is missing, a new offer after 10 s of silence, until the
device says `pending` (success) or `refused`/`failed`.

What a dropped connection costs is what was in flight on it: every chunk between the
cloud and the device is lost with it and has to go again. The device's window (8 KB)
is what it can take, not what should be on the way: on a throttled link whatever is
sent beyond the link's bandwidth x delay only waits in a queue (a proxy's, the
broker's, a socket's) to be lost at the next drop. So the sender keeps less in flight,
IN_FLIGHT bytes, which costs some speed on a fast link and bounds the loss per drop.
The device's `ota/status` messages arrive on paho's thread through on_status(), which
only hands them over through a queue."""

import hashlib
import json
import logging
import queue
import struct
import threading
import time

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
# Chunk bytes sent and not yet acknowledged, at most (at least the chunks the device
# acknowledges at a time, or it would wait for its 2 s idle acknowledgement). About the
# bandwidth x delay of a 64 KB/s link 40 ms away: a drop costs at most this much.
IN_FLIGHT = 3 * 1024
DEVICE_ACK_EVERY = 4  # for a device whose acknowledgements do not say (`ack`)
DEFAULT_TIMEOUT = 600.0
TRIAL_S = 300  # seconds a new system part has to reach the cloud before the device rolls it back


class OtaError(Exception):
    """A transfer the device refused or failed, or that did not finish in time."""


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


class OtaSender:
    """publish(topic, payload, qos) is the fleet service's MQTT client's publish."""

    def __init__(self, publish, silence: float = SILENCE, trial_s: int = TRIAL_S,
                 in_flight: int = IN_FLIGHT):
        self._publish = publish
        self.silence = silence
        self.in_flight = in_flight
        self.trial_s = trial_s
        self._lock = threading.Lock()
        self._transfers: dict[str, _Transfer] = {}

    # From paho's thread

    def on_status(self, device_id: str, status: dict) -> None:
        with self._lock:
            transfer = self._transfers.get(device_id)
        if transfer is None:
            if status.get("state") == "installed":
                log.info("device %s installed version %s", device_id, status.get("version"))
            return
        transfer.statuses.put(status)

    def on_online(self, device_id: str) -> None:
        """The device (re)connected: what was in flight on its old connection is lost."""
        with self._lock:
            transfer = self._transfers.get(device_id)
        if transfer is not None:
            transfer.statuses.put({"state": "_online"})

    def busy(self, device_id: str) -> bool:
        with self._lock:
            return device_id in self._transfers

    # The transfer

    def send(self, device_id: str, image: bytes, module: dict, progress_cb=None,
             timeout: float = DEFAULT_TIMEOUT, chunk_size: int = CHUNK_SIZE) -> dict:
        """Send image to the device; module: {function, index, version, platform}.
        Returns {"state": "pending", "sha256", "size", "bytes_sent", "offers",
        "resent", "duplicates"}; raises OtaError on refused, failed, silence or timeout.
        resent: chunks sent again, by why ("dropped": sent on a connection that ended,
        "gap": missing below a later one, "late": unacknowledged for RESEND_AFTER);
        duplicates: chunks the device got more than once, as it reported (None: it
        did not say), i.e. chunks that were sent again needlessly."""
        if not image:
            raise OtaError("the image is empty")
        transfer = _Transfer()
        with self._lock:
            if device_id in self._transfers:
                raise OtaError("another update to this device is in progress")
            self._transfers[device_id] = transfer
        try:
            return self._run(device_id, image, module, transfer, progress_cb, timeout, chunk_size)
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
            if state == "_online":
                # The device tells where it got to once it has subscribed again (or
                # has lost the transfer in a reset: then it needs the offer).
                epoch = time.monotonic()
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
                log.info("%s: %d chunks, %d sent again (%s), %s the device got twice; %d offers",
                         device_id, count, sum(resent.values()),
                         ", ".join(f"{k} {v}" for k, v in resent.items()),
                         "?" if duplicates is None else duplicates, offers)
                return {"state": "pending", "sha256": sha, "size": size,
                        "bytes_sent": bytes_sent, "offers": offers, "resent": resent,
                        "duplicates": duplicates}
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
            highest = max(stored, default=-1)
            log.debug("%s: ack next %d bitmap %s", device_id, nxt, bitmap.hex())
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
            room = max(self.in_flight // chunk_size, ack_every, 1) - flying
            for n, why in todo[:max(0, room)]:
                data = image[n * chunk_size:(n + 1) * chunk_size]
                self._publish(prefix + "chunk", tag + struct.pack(">I", n) + data, 0)
                if why:
                    resent[why] += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s: chunk %d sent%s on connection %d", device_id, n,
                              f" again ({why}, first at {sent_at[n]:.3f})" if why else "", connection)
                sent_at[n] = now
                bytes_sent += len(data)
