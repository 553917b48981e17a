# A small MQTT 3.1.1 client for the cloud session: the packet codec and the protocol
# state (packet ids, QoS 1 in flight, duplicate filter, keepalive), over any stream
# whose readinto()/write() return None when they would block (a non-blocking TLS
# socket). It never blocks and never opens sockets: cloud_session.py does that.
# Incoming packets are read straight into one preallocated buffer.
import time
from micropython import const

CONNECT = const(0x10)
CONNACK = const(0x20)
PUBLISH = const(0x30)
PUBACK = const(0x40)
SUBSCRIBE = const(0x82)
SUBACK = const(0x90)
PINGREQ = const(0xC0)
PINGRESP = const(0xD0)
_DUP = const(0x08)
_RETAIN = const(0x01)
_QOS1 = const(0x02)

MAX_INFLIGHT = const(8)
RESEND_MS = const(10000)
PING_WAIT_MS = const(15000)
_SEEN = const(16)  # incoming packet ids remembered against duplicate deliveries
_MAX_PACKETS = const(4)  # packets handled per service() call, to bound the work
_CHECK_MS = const(1000)
_PING = b"\xc0\x00"


class MQTTError(Exception):
    pass


def _bytes(piece):
    return piece.encode() if isinstance(piece, str) else piece


def _packet(first, length, apart=0):
    """A bytearray for one packet with its fixed header written (less `apart` bytes at
    its end, sent from elsewhere); returns it and the offset where the variable part
    starts."""
    size = 2 if length < 128 else 3 if length < 16384 else 4
    buf = bytearray(size + length - apart)
    buf[0] = first
    i = 1
    while True:
        digit = length & 0x7F
        length >>= 7
        buf[i] = digit | 0x80 if length else digit
        i += 1
        if not length:
            return buf, i


def _put(buf, i, data):
    n = len(data)
    buf[i] = n >> 8
    buf[i + 1] = n & 0xFF
    buf[i + 2 : i + 2 + n] = data
    return i + 2 + n


def encode_connect(client_id, keepalive_s, will_topic=None, will_message=b"", will_retain=True):
    """CONNECT with a clean session; the will, if any, goes out at QoS 1."""
    client_id = _bytes(client_id)
    flags = 0x02
    length = 10 + 2 + len(client_id)
    if will_topic is not None:
        will_topic, will_message = _bytes(will_topic), _bytes(will_message)
        flags |= 0x04 | 0x08 | (0x20 if will_retain else 0)
        length += 4 + len(will_topic) + len(will_message)
    buf, i = _packet(CONNECT, length)
    i = _put(buf, i, b"MQTT")
    buf[i] = 4  # protocol level: 3.1.1
    buf[i + 1] = flags
    buf[i + 2] = keepalive_s >> 8
    buf[i + 3] = keepalive_s & 0xFF
    i = _put(buf, i + 4, client_id)
    if will_topic is not None:
        i = _put(buf, i, will_topic)
        _put(buf, i, will_message)
    return buf


def encode_publish(topic, payload, pid, retain=False):
    """PUBLISH at QoS 1 (pid > 0) or 0. topic is bytes, str, or a tuple of pieces.
    payload is bytes or str; or a tuple of bytes pieces, which are not copied: the
    packet is then a list, its header first and the pieces after it (no one block of
    the whole size is needed, which a fragmented heap may not have)."""
    if not isinstance(topic, tuple):
        topic = (topic,)
    topic = [_bytes(p) for p in topic]
    pieces = payload if isinstance(payload, tuple) else None
    payload = b"" if pieces else _bytes(payload)
    size = len(payload)
    for p in pieces or ():
        size += len(p)
    tlen = 0
    for p in topic:
        tlen += len(p)
    first = PUBLISH | (_QOS1 if pid else 0) | (_RETAIN if retain else 0)
    buf, i = _packet(first, 2 + tlen + (2 if pid else 0) + size, size - len(payload))
    buf[i] = tlen >> 8
    buf[i + 1] = tlen & 0xFF
    i += 2
    for p in topic:
        buf[i : i + len(p)] = p
        i += len(p)
    if pid:
        buf[i] = pid >> 8
        buf[i + 1] = pid & 0xFF
        i += 2
    buf[i:] = payload
    return [buf] + list(pieces) if pieces else buf


def _head(packet):
    """A packet's first bytes (a list packet's header piece)."""
    return packet[0] if isinstance(packet, list) else packet


def encode_subscribe(pid, topics):
    """SUBSCRIBE to each topic at QoS 1."""
    topics = [_bytes(t) for t in topics]
    length = 2
    for t in topics:
        length += 3 + len(t)
    buf, i = _packet(SUBSCRIBE, length)
    buf[i] = pid >> 8
    buf[i + 1] = pid & 0xFF
    i += 2
    for t in topics:
        i = _put(buf, i, t)
        buf[i] = 1
        i += 1
    return buf


def _pid_at(buf, i):
    return (buf[i] << 8) | buf[i + 1]


class Client:
    """The protocol state of one connection.

    on_connect() runs when the broker accepts the CONNECT; on_message(topic, payload)
    gets memoryviews into the read buffer, valid only during the call. carried are
    unacknowledged packets of an earlier connection (see unacked()), sent again once
    connected. service(now) raises MQTTError or OSError when the connection is lost."""

    def __init__(self, stream, on_connect, on_message, keepalive_s=30, rx=None, carried=()):
        self.stream = stream
        self.on_connect = on_connect
        self.on_message = on_message
        self.keepalive_ms = keepalive_s * 1000
        self.connected = False
        self.refused_topics = 0  # SUBACK return codes 0x80
        self._rx = rx if rx is not None else bytearray(1536)
        self._mv = memoryview(self._rx)
        self._byte = bytearray(1)
        self._stage = 0  # 0: first byte, 1: remaining length, 2: body
        self._first = 0
        self._need = 0
        self._shift = 0
        self._got = 0
        self._out = []  # [packet, offset] waiting to be written, oldest first
        self._inflight = []  # [pid, packet, sent_ms or None, carry], oldest first
        self._pid = 0
        self._seen = [0] * _SEEN
        self._seen_at = 0
        now = time.ticks_ms()
        self._now = now  # the time of the last service() call
        self._last_sent = now
        self._ping_at = None
        self._ping = [_PING, 0]  # its queue entry, made once: a keepalive allocates nothing
        self._next_check = now
        for packet in carried:
            head = _head(packet)
            head[0] &= ~_DUP & 0xFF  # a new session: a first delivery again
            self._inflight.append([_pid_at(head, _topic_end(head)), packet, None, True])

    # Sending

    def connect(self, client_id, will_topic=None, will_message=b"", will_retain=True):
        keepalive = self.keepalive_ms // 1000
        self._send(encode_connect(client_id, keepalive, will_topic, will_message, will_retain))

    def room(self):
        """How many more QoS 1 messages the window takes now."""
        return MAX_INFLIGHT - len(self._inflight) if self.connected else 0

    def publish(self, topic, payload, retain=False, carry=False, force=False):
        """Send at QoS 1; returns the packet id, or 0 when not connected or the window
        is full (force: the session's own messages, which are never refused).
        carry: keep it for the next connection if this one ends before the PUBACK."""
        if not self.connected or (not force and len(self._inflight) >= MAX_INFLIGHT):
            return 0
        pid = self._next_pid()
        packet = encode_publish(topic, payload, pid, retain)
        self._inflight.append([pid, packet, self._now, carry])
        self._send(packet)
        return pid

    def send_again(self, entry, payload):
        """Queue entry ([a QoS 0 PUBLISH packet made once, 0]) with payload written over
        the end of its packet (the same length): a message sent often (an OTA
        acknowledgement) allocates nothing. If the last one has not left yet, it is
        overwritten in place and leaves once, with the newer payload; if it is partly
        written, a copy goes instead. Returns False when not connected."""
        if not self.connected:
            return False
        packet = entry[0]
        if not self._queue_once(entry):  # (its first bytes are on the wire)
            packet = bytearray(packet)
            self._out.append([packet, 0])
        n = len(payload)
        at = len(packet) - n
        for i in range(n):  # (byte by byte: a slice assignment makes a slice object)
            packet[at + i] = payload[i]
        return True

    def _queue_once(self, entry):
        # Queue an entry made once ([packet, offset], sent again and again) unless it
        # still waits; False when it waits with part of it written already.
        if not self._queued(entry[0]):
            entry[1] = 0
            self._out.append(entry)
            return True
        return not entry[1]

    def subscribe(self, topics):
        self._send(encode_subscribe(self._next_pid(), topics))

    def unacked(self):
        """The carried packets not yet acknowledged, oldest first."""
        return [e[1] for e in self._inflight if e[3]]

    def _next_pid(self):
        while True:
            self._pid = self._pid % 65535 + 1
            if self._find(self._pid) < 0:
                return self._pid

    def _find(self, pid):
        inflight = self._inflight
        for i in range(len(inflight)):
            if inflight[i][0] == pid:
                return i
        return -1

    def _send(self, packet):
        if isinstance(packet, list):
            for piece in packet:
                self._out.append([piece, 0])
        else:
            self._out.append([packet, 0])

    def _flush(self, now):
        out = self._out
        while out:
            entry = out[0]
            packet, off = entry
            n = self.stream.write(memoryview(packet)[off:] if off else packet)
            if not n:  # None: would block (or the TLS handshake is still going on)
                return
            self._last_sent = now
            off += n
            if off < len(packet):
                entry[1] = off
                return
            out.pop(0)

    # Receiving

    def service(self, now):
        self._now = now
        for _ in range(_MAX_PACKETS):
            if not self._read():
                break
            self._handle(self._first, self._need)
            self._stage = 0
        if time.ticks_diff(now, self._next_check) >= 0:
            self._next_check = time.ticks_add(now, _CHECK_MS)
            self._check(now)
        self._flush(now)

    def _read(self):
        """Read what has come of the current packet; True once it is complete."""
        stream = self.stream
        while self._stage < 2:
            n = stream.readinto(self._byte)
            if n is None:
                return False
            if n == 0:
                raise OSError("connection closed")
            b = self._byte[0]
            if self._stage == 0:
                self._first = b
                self._need = self._shift = self._got = 0
                self._stage = 1
                continue
            self._need |= (b & 0x7F) << self._shift
            self._shift += 7
            if not b & 0x80:
                self._stage = 2
            elif self._shift > 21:
                raise MQTTError("bad packet length")
        cap = len(self._rx)
        while self._got < self._need:
            # A packet bigger than the buffer keeps its start (topic, packet id);
            # the rest is read into the buffer's last 64 bytes and dropped.
            at = self._got if self._got < cap else cap - 64
            n = stream.readinto(self._mv[at:], min(self._need - self._got, cap - at))
            if n is None:
                return False
            if n == 0:
                raise OSError("connection closed")
            self._got += n
        return True

    def _handle(self, first, length):
        kind = first & 0xF0
        rx = self._rx
        if kind == PUBLISH:
            self._received(first, length)
        elif kind == PUBACK:
            i = self._find(_pid_at(rx, 0))
            if i >= 0:
                self._inflight.pop(i)
        elif kind == CONNACK:
            if rx[1] != 0:
                raise MQTTError("refused (CONNACK %d)" % rx[1])
            self.connected = True
            self.on_connect()
            for entry in self._inflight:
                if entry[2] is None:  # carried from the last connection
                    entry[2] = self._now
                    self._send(entry[1])
        elif kind == PINGRESP:
            self._ping_at = None
        elif kind == SUBACK:
            for i in range(2, min(length, len(rx))):
                if rx[i] & 0x80:
                    self.refused_topics += 1
                    print("mqtt: the broker refused a subscription")
        else:
            raise MQTTError("unexpected packet 0x%02x" % first)

    def _received(self, first, length):
        rx = self._rx
        end = 2 + ((rx[0] << 8) | rx[1])
        qos = (first >> 1) & 3
        if qos > 1:
            raise MQTTError("QoS 2 delivery")  # never subscribed at QoS 2
        start = end + 2 if qos else end
        # (an oversized packet keeps its head but not the buffer's last 64 bytes)
        if start > length or start > (len(rx) if length <= len(rx) else len(rx) - 64):
            raise MQTTError("bad PUBLISH")
        if qos:
            pid = _pid_at(rx, end)
            self._send(bytes((PUBACK, 2, pid >> 8, pid & 0xFF)))
            if first & _DUP and pid in self._seen:
                return  # delivered before, its PUBACK got lost
            self._seen[self._seen_at] = pid
            self._seen_at = (self._seen_at + 1) % _SEEN
        if length > len(rx):
            print("mqtt: dropped a %d-byte message (buffer %d)" % (length, len(rx)))
            return
        self.on_message(self._mv[2:end], self._mv[start:length])

    # Timers

    def _check(self, now):
        if not self.connected:
            return
        if self._ping_at is not None:
            if time.ticks_diff(now, self._ping_at) >= PING_WAIT_MS:
                raise MQTTError("no PINGRESP")
        elif self.keepalive_ms and time.ticks_diff(now, self._last_sent) >= self.keepalive_ms:
            self._ping_at = now
            self._queue_once(self._ping)
        for entry in self._inflight:
            sent = entry[2]
            if sent is not None and time.ticks_diff(now, sent) >= RESEND_MS:
                packet = entry[1]
                if not self._queued(packet):
                    _head(packet)[0] |= _DUP
                    entry[2] = now
                    self._send(packet)

    def _queued(self, packet):
        packet = _head(packet)
        for entry in self._out:
            if entry[0] is packet:
                return True
        return False


def _topic_end(packet):
    """Where a PUBLISH packet's packet id starts."""
    i = 1
    while packet[i] & 0x80:
        i += 1
    i += 1
    return i + 2 + ((packet[i] << 8) | packet[i + 1])
