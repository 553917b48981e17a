# Over-the-air updates (docs/protocol.md, "Updates"): receives one module image
# over the cloud session into the staging partition, verifies it, and leaves
# /keel/ota/pending.json for the bootloader, which copies it into the module's slot.
# The receiver does without the module format: the checks that need it (ota_check.py)
# are loaded once every chunk is in and the SHA-256 matches, and dropped again. Where
# they do not fit beside the session and the app, the device resets and makes them at
# the start of the next boot, on a fresh heap (check_received(); docs/protocol.md,
# "Updates": "checked").
#
# Steady state (a chunk) allocates nothing: the chunk's bytes are written straight
# from the session's receive buffer through a memoryview made once, its bit is
# written in place into the bitmap file, which stays open during the transfer, and an
# acknowledgement is written into a text made once (_ack).
# Loaded by the session on the first OTA message only.
import gc
import json
import time
import binascii
from micropython import const
import uctypes
import flashfs
import events
import led
import handover
from keel_files import (BITMAP_FILE, CHECKED_FILE, OTA_DIR, PENDING_FILE, RECEIVED_FILE, REFUSED_FILE,
                        TRANSFER_FILE, TRIAL_FILE)
# Module functions by name, as the offer names them (handover's numbers: the format's)
_FUNCTIONS = ((handover.BOOTLOADER, "bootloader"), (handover.SYSTEM_PART, "system-part"),
              (handover.USER_PART, "user-part"))
STAGING = "staging"
# How far ahead of `next` the cloud may send: what the receiver takes (its bitmap's
# byte). The cloud keeps less than that in flight (3 KB: what a dropped connection
# loses), so acks go every ACK_EVERY chunks, said in each ack, to keep it moving.
WINDOW = const(8)
ACK_EVERY = const(2)
_HEAD = const(12)  # tag (8) + chunk number (4)
_IDLE_MS = const(2000)
_RESET_DELAY_MS = const(500)
_MAX_CHUNK = const(1024)  # the session's buffer takes 1024 bytes and the topic
_MIN_CHUNK = const(64)

# The acknowledgement's text (_ack): where `next` and the bitmap go in it
_ACK_HEAD = b'{"state": "receiving", "next": '
_NEXT_AT = const(31)  # len(_ACK_HEAD)
_BITS_AT = const(54)  # _NEXT_AT + 10 + len(', "bitmap": "')
_HEX = b"0123456789abcdef"

# states
_IDLE = const(0)
_RECEIVING = const(1)
_VERIFY = const(2)  # every chunk stored: verify on the next pass
_PENDING = const(3)  # verified: reset soon


class Receiver:
    def __init__(self, publish, platform, slots, rx=None, part=None, on_refused=None, ack=None):
        """publish(text) sends ota/status; ack(text) sends a `receiving` acknowledgement
        (publish unless given); platform: the board's ("esp32"); slots: the bootloader's
        Slot objects;
        rx: the buffer messages arrive in (chunks in it are written without a copy);
        on_refused(record): a module was refused (the status and describe say so)."""
        self.publish = publish
        self.ack = ack or publish
        self.on_refused = on_refused
        self.platform = platform
        self.slots = slots
        self.part = part if part is not None else handover.port().Partition.find(STAGING)
        self.block = self.part.ioctl(5, 0)
        self.size_max = self.part.ioctl(4, 0) * self.block
        self.state = _IDLE
        self.offer = None
        self.tag = bytearray(8)
        self.chunk_size = 0
        self.count = 0
        self.size = 0
        self.stored = 0
        self.next = 0
        self.bits = None
        self.fresh = 0  # new chunks since the last acknowledgement
        self.dups = 0  # chunks that came again after they were stored (said when verifying)
        self.last_chunk = 0
        self.acked_idle = True
        self.reset_at = 0
        self.led_before = None
        self._file = None
        self._one = bytearray(1)
        self._ack_text = bytearray(_ACK_HEAD + b" " * 10 + b', "bitmap": "00", "window": %d, "ack": %d}'
                                   % (WINDOW, ACK_EVERY))
        self._rx = None
        self._rx_at = 0
        self._view = None  # rx[_view_at : _view_at + chunk_size], made once
        self._view_at = -1
        if rx is not None:
            self._rx = rx
            self._rx_at = uctypes.addressof(rx)

    # Status messages

    def _status(self, state, **keys):
        keys["state"] = state
        self.publish(json.dumps(keys))

    def _ack(self):
        # The acknowledgement is written into one text made once (_ack_text): `next`
        # right-aligned in a field of 10 characters after spaces (JSON allows them), the
        # bitmap as two hex digits (WINDOW is 8: one byte). The session writes it into a
        # packet of its own made once (cloud_session.ota_ack): nothing is allocated.
        self.fresh = 0
        bits = 0
        n = self.next
        for i in range(WINDOW):
            if n + i < self.count and self._has(n + i):
                bits |= 1 << i
        text = self._ack_text
        i = _NEXT_AT + 10
        while True:
            i -= 1
            text[i] = 48 + n % 10
            n //= 10
            if not n:
                break
        while i > _NEXT_AT:
            i -= 1
            text[i] = 32  # " "
        text[_BITS_AT] = _HEX[bits >> 4]
        text[_BITS_AT + 1] = _HEX[bits & 15]
        self.ack(text)

    def _has(self, n):
        return self.bits[n >> 3] & (1 << (n & 7))

    # Offers

    def offer_message(self, payload):
        try:
            offer = json.loads(payload)
            sha = str(offer["sha256"]).lower()
            binascii.unhexlify(sha)
            size = int(offer["size"])
            chunk_size = int(offer.get("chunk_size", 1024))
            index = int(offer.get("index", 0))
            function = offer["function"]
            platform = offer["platform"]
        except (ValueError, TypeError, KeyError, AttributeError):
            print("keel: ota: ignored a malformed offer")
            return
        if len(sha) != 64:
            print("keel: ota: ignored a malformed offer")
            return
        for number, name in _FUNCTIONS:
            if function == name:
                function = number
        if platform != self.platform:
            self._status("refused", reason="platform")
            return
        slot = None
        for s in self.slots:
            if s.function == function and s.index == index and s.part is not None:
                slot = s
        if slot is None:
            self._status("refused", reason="function")
            return
        if size <= 0 or size > slot.size or size > self.size_max:
            self._status("refused", reason="too-big")
            return
        if not _MIN_CHUNK <= chunk_size <= _MAX_CHUNK:
            self._status("refused", reason="chunk_size")
            return
        signature = offer.get("signature")
        doc = {
            "sha256": sha,
            "function": function,
            "index": index,
            "version": offer.get("version"),
            "platform": platform,
            "size": size,
            "chunk_size": chunk_size,
            "slot": slot.label,
            "trial_s": int(offer.get("trial_s", 0)),
        }
        if isinstance(signature, dict):
            doc["signature"] = {k: str(signature.get(k)).lower() for k in ("key", "digest", "sig")}
        if self.offer is not None and self.offer["sha256"] == sha:
            if self.state == _PENDING:
                self._status("pending")
            elif self.state == _RECEIVING:
                self._ack()
            return  # (verifying: the answer follows on the next pass)
        if self.state == _PENDING:
            self._status("refused", reason="busy")  # resetting to install another
            return
        if flashfs.exists(TRIAL_FILE):
            # The staging partition holds the backup of a system part on trial.
            self._status("refused", reason="trial")
            return
        why = signature_refusal(signature)
        if why:  # before a single chunk is taken (docs/signing.md)
            print("keel: ota: refusing %s %s: %s" % (slot.label, offer.get("version"), why))
            self._refused({"function": offer["function"], "index": index,
                           "version": offer.get("version"), "sha256": sha, "reason": why})
            self._status("refused", reason=why)
            return
        if self._resume(doc):
            return
        self._start(doc)

    def _setup(self, doc):
        self.offer = doc
        self.size = doc["size"]
        self.chunk_size = doc["chunk_size"]
        self.count = (self.size + self.chunk_size - 1) // self.chunk_size
        self.tag[:] = binascii.unhexlify(doc["sha256"][:16])
        self._view = None
        self._view_at = -1

    def _open_bitmap(self):
        self._close()
        self._file = open(BITMAP_FILE, "r+b")

    def _close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def _resume(self, doc):
        saved = flashfs.read_json(TRANSFER_FILE)
        if not isinstance(saved, dict) or saved != doc:
            return False
        nbytes = (saved["size"] + saved["chunk_size"] - 1) // saved["chunk_size"]
        nbytes = (nbytes + 7) // 8
        try:
            with open(BITMAP_FILE, "rb") as f:
                bits = bytearray(f.read())
        except OSError:
            return False
        if len(bits) != nbytes:
            return False
        self._setup(doc)
        self.bits = bits
        self.stored = 0
        for n in range(self.count):
            if self._has(n):
                self.stored += 1
        self.next = 0
        self._advance()
        self._open_bitmap()
        self._began()
        print("keel: ota: resuming %s at chunk %d of %d" % (doc["sha256"][:16], self.next, self.count))
        if self.stored == self.count:
            self.state = _VERIFY
        else:
            self.state = _RECEIVING
            self._ack()
        return True

    def _start(self, doc):
        self._close()
        self._drop_files()
        self._setup(doc)
        part = self.part
        for b in range((self.size + self.block - 1) // self.block):
            part.ioctl(6, b)
        self.bits = bytearray((self.count + 7) // 8)
        flashfs.makedirs(OTA_DIR)
        with open(BITMAP_FILE, "wb") as f:
            f.write(self.bits)
        flashfs.write_json(TRANSFER_FILE, doc)  # last: a transfer with its bitmap
        self.stored = 0
        self.next = 0
        self._open_bitmap()
        self._began()
        print("keel: ota: receiving %s (%d bytes, %d chunks)" % (doc["sha256"][:16], self.size, self.count))
        self.state = _RECEIVING
        self._ack()

    def _began(self):
        self.fresh = 0
        self.dups = 0
        self.last_chunk = time.ticks_ms()
        self.acked_idle = True
        if self.led_before is None:
            self.led_before = led.state()
        led.set_state("updating")
        events.emit(events.UPDATE_STARTING, self.offer["sha256"])

    # Chunks (no allocation here but for an acknowledgement)

    def chunk_message(self, payload):
        if self.state != _RECEIVING:
            return
        length = len(payload)
        if length <= _HEAD:
            return
        tag = self.tag
        for i in range(8):
            if payload[i] != tag[i]:
                return  # another transfer's chunk
        n = (payload[8] << 24) | (payload[9] << 16) | (payload[10] << 8) | payload[11]
        if n >= self.count:
            return
        cs = self.chunk_size
        want = cs if n < self.count - 1 else self.size - n * cs
        if length - _HEAD != want:
            return
        self.last_chunk = time.ticks_ms()
        self.acked_idle = False
        if self._has(n):
            self.dups += 1
            return  # sent again before our acknowledgement got there
        # The staging area was erased when the transfer started: write in place.
        start = n * cs
        self.part.writeblocks(start // self.block, self._data(payload, want), start % self.block)
        i = n >> 3
        bits = self.bits
        bits[i] |= 1 << (n & 7)
        one = self._one
        one[0] = bits[i]
        f = self._file
        f.seek(i)
        f.write(one)
        f.flush()
        self.stored += 1
        self.fresh += 1
        if n == self.next:
            self._advance()
        if self.stored == self.count:
            self._ack()
            self.state = _VERIFY  # the next pass verifies
        elif self.fresh >= ACK_EVERY:
            self._ack()

    def _data(self, payload, want):
        """payload[12:] without making a memoryview per chunk when it lies in rx."""
        rx = self._rx
        if rx is not None and want == self.chunk_size:
            at = uctypes.addressof(payload) - self._rx_at + _HEAD
            if 0 <= at and at + want <= len(rx):
                if at != self._view_at:
                    self._view = memoryview(rx)[at : at + want]
                    self._view_at = at
                return self._view
        return memoryview(payload)[_HEAD : _HEAD + want]

    def _advance(self):
        n = self.next
        count = self.count
        while n < count and self._has(n):
            n += 1
        self.next = n

    # The system loop's step

    def service(self):
        state = self.state
        if state == _RECEIVING:
            if not self.acked_idle and time.ticks_diff(time.ticks_ms(), self.last_chunk) >= _IDLE_MS:
                self.acked_idle = True
                self._ack()
        elif state == _VERIFY:
            self._verify()
        elif state == _PENDING:
            if time.ticks_diff(time.ticks_ms(), self.reset_at) >= 0:
                print("keel: ota: resetting to install the update")
                handover.reset("update")

    def _verify(self, at_boot=False):
        import hashlib

        staged = handover.Slot(self.part, STAGING, 0, 0)
        staged.size = self.size  # (reads stop at the image's end, not the partition's)
        read = staged.read
        self._close()
        self._status("verifying", duplicates=self.dups)
        if self.dups:
            print("keel: ota: %d chunks came more than once" % self.dups)
        gc.collect()
        buf = bytearray(512)
        h = hashlib.sha256()
        offset = 0
        while offset < self.size:
            got = read(offset, buf)
            h.update(buf if got == len(buf) else memoryview(buf)[:got])
            offset += got
        doc = self.offer
        if binascii.hexlify(h.digest()).decode() != doc["sha256"]:
            return self._failed("sha256")
        checked = self._check(read, buf)
        if checked is False:
            return  # (failed: said and dropped)
        if checked is None:
            if at_boot:  # (a fresh heap, and still no room)
                return self._failed("no-memory")
            # The rest at the next boot's start, before the session and the app.
            flashfs.write_json(RECEIVED_FILE, {"sha256": doc["sha256"]})
            print("keel: ota: %s received; its checks at the next boot" % doc["slot"])
            self._status("pending", checked="sha256")
        else:
            flashfs.write_json(PENDING_FILE, {
                "slot": doc["slot"], "size": self.size, "sha256": doc["sha256"],
                "trial_s": doc.get("trial_s", 0)})
            print("keel: ota: %s verified; pending install" % doc["slot"])
            self._status("pending")
        events.emit(events.UPDATE_DONE, {"ok": True, "sha256": doc["sha256"]})
        self.state = _PENDING
        self.reset_at = time.ticks_add(time.ticks_ms(), _RESET_DELAY_MS)

    def _check(self, read, buf):
        """The image's header, payload, signature and dependencies (ota_check.py): True
        when they pass, False when the transfer failed on them, None when the checks do
        not fit in the heap."""
        try:
            import ota_check

            passed = ota_check.verify(self, read, buf)
        except MemoryError:
            passed = None
        import sys

        for name in ("ota_check", "module_format", "module_check", "romfs"):
            sys.modules.pop(name, None)
        gc.collect()
        if passed is None:
            print("keel: ota: not enough memory to check the image here (%d bytes free)"
                  % gc.mem_free())
        return passed

    def _refused(self, record):
        version = record.get("version")
        record["version"] = str(version)[:32] if version is not None else None
        record["via"] = "ota"
        flashfs.makedirs(OTA_DIR)
        flashfs.write_json(REFUSED_FILE, record)
        if self.on_refused is not None:
            self.on_refused(record)

    def _failed(self, reason, **keys):
        print("keel: ota: update failed (%s)" % reason)
        self._status("failed", reason=reason, **keys)
        sha = self.offer["sha256"] if self.offer else None
        self.drop()
        events.emit(events.UPDATE_DONE, {"ok": False, "reason": reason, "sha256": sha})

    def drop(self):
        """Forget the transfer (the staged bytes stay until the next one erases them)."""
        self._close()
        self._drop_files()
        self.state = _IDLE
        self.offer = None
        self.bits = None
        if self.led_before is not None:
            led.set_state(self.led_before)
            self.led_before = None

    def _drop_files(self):
        for path in (TRANSFER_FILE, BITMAP_FILE, PENDING_FILE, RECEIVED_FILE):
            flashfs.remove_tree(path)


def signature_refusal(signature):
    """Why this board refuses an offer whose `signature` field is this (None for an
    unsigned module), or None: a board that trusts keys checks the signature over the
    offered digest before it takes any chunk (docs/signing.md). The verifier is loaded
    only on such a board, and dropped again."""
    import sys
    import hashlib
    import trust  # from the bootloader's code

    keys = trust.board_keys()
    why = None
    if keys is None:
        why = trust.UNTRUSTED
    elif keys:
        block = digest = None
        if isinstance(signature, dict):
            try:
                block = (binascii.unhexlify(signature["key"]), binascii.unhexlify(signature["sig"]))
                digest = binascii.unhexlify(signature["digest"])
            except (KeyError, TypeError, ValueError):
                block = None
        if block is None or len(block[0]) != 32 or len(digest) != 32:
            why = trust.UNSIGNED
        else:
            import ed25519

            why = trust.refusal(block, digest, keys, ed25519.verify, hashlib.sha256)
    for name in ("trust", "ed25519"):
        sys.modules.pop(name, None)
    return why


# The session's hooks (cloud_session.py)

_receiver = [None]


def receiver(session):
    r = _receiver[0]
    if r is None:
        import hal
        import keel_system
        import runtime

        platform = hal.board()["platform"]

        def refused(record):  # said in the status file and the describe at once
            session.status["refused"] = record
            handover.write_status(session.status)
            session.changed()

        r = Receiver(session.ota_status, platform, keel_system.SLOTS, session._rx,
                     on_refused=refused, ack=session.ota_ack)
        _receiver[0] = r
        runtime.add_service(r.service)
    return r


def message(session, kind, payload):
    r = _receiver[0] or receiver(session)
    if kind == b"ota/chunk":
        r.chunk_message(payload)
    else:
        r.offer_message(payload)


def reconnected():
    """The session is up again: say where the transfer stands, so the cloud resends
    only what the old connection lost, without waiting to offer again."""
    r = _receiver[0]
    if r is not None and r.state == _RECEIVING:
        r._ack()


def check_received():
    """At the start of a boot (keel_system), before the session and the app: the checks
    of an update received at the last boot that did not fit then. If it passes, it is
    pending and the device resets to install it; if not, why is kept for the cloud
    (CHECKED_FILE, sent once connected) and the update dropped."""
    import hal
    import keel_system

    flashfs.remove_tree(RECEIVED_FILE)
    said = []
    r = Receiver(said.append, hal.board()["platform"], keel_system.SLOTS)
    doc = flashfs.read_json(TRANSFER_FILE)
    if not isinstance(doc, dict):
        return
    r._setup(doc)
    print("keel: ota: checking the update received at the last boot")
    r._verify(at_boot=True)
    if r.state == _PENDING:
        handover.reset("update")
    if said:
        flashfs.write_atomic(CHECKED_FILE, said[-1])
