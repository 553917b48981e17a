"""MQTT 3.1.1 packets, as much as the broker gate needs: framing (fixed header and the
remaining-length varint), parsing CONNECT, PUBLISH, SUBSCRIBE and UNSUBSCRIBE, and
building the few packets the gate answers itself (CONNACK, PUBACK, PUBREC, PUBCOMP,
SUBACK). A few builders for client packets (CONNECT, PUBLISH, SUBSCRIBE) serve tests.

Everything here is a pure function over bytes, except `read_packet`, which reads one
packet from an asyncio stream. Malformed input raises `PacketError`.
"""

import asyncio
import struct
from dataclasses import dataclass

# Packet types (the high nibble of the first byte).
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

NAMES = {
    CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK",
    PUBREC: "PUBREC", PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE", UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ", PINGRESP: "PINGRESP", DISCONNECT: "DISCONNECT",
}

# CONNACK return codes (MQTT 3.1.1, 3.2.2.3).
CONNACK_ACCEPTED = 0
CONNACK_BAD_PROTOCOL = 1
CONNACK_ID_REJECTED = 2
CONNACK_UNAVAILABLE = 3
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5

SUBACK_FAILURE = 0x80

MAX_REMAINING_LENGTH = 268_435_455  # four varint bytes

# The fixed-header flags a packet type must carry (3.1.1, 2.2.2); PUBLISH is variable.
_REQUIRED_FLAGS = {
    CONNECT: 0, CONNACK: 0, PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0,
    SUBSCRIBE: 2, SUBACK: 0, UNSUBSCRIBE: 2, UNSUBACK: 0, PINGREQ: 0, PINGRESP: 0,
    DISCONNECT: 0,
}


class PacketError(ValueError):
    """The bytes are not a well-formed MQTT 3.1.1 packet."""


@dataclass(frozen=True)
class Packet:
    type: int
    flags: int
    body: bytes

    @property
    def name(self) -> str:
        return NAMES.get(self.type, f"type {self.type}")

    def encode(self) -> bytes:
        return encode_packet(self.type, self.flags, self.body)


@dataclass(frozen=True)
class Connect:
    protocol_name: str
    protocol_level: int
    clean_session: bool
    keepalive: int
    client_id: str
    will_topic: str | None = None
    will_message: bytes | None = None
    will_qos: int = 0
    will_retain: bool = False
    username: str | None = None
    password: bytes | None = None

    @property
    def has_will(self) -> bool:
        return self.will_topic is not None


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None


@dataclass(frozen=True)
class Subscribe:
    packet_id: int
    filters: list[tuple[str, int]]  # (topic filter, requested QoS)


@dataclass(frozen=True)
class Unsubscribe:
    packet_id: int
    filters: list[str]


# --- framing --------------------------------------------------------------------------

def encode_remaining_length(n: int) -> bytes:
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise PacketError(f"remaining length {n} out of range")
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def decode_remaining_length(data: bytes, offset: int = 1) -> tuple[int, int] | None:
    """(value, offset after the varint) from data[offset:], or None if more bytes are
    needed. More than four bytes is a PacketError."""
    value = 0
    for i in range(4):
        if offset + i >= len(data):
            return None
        byte = data[offset + i]
        value += (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, offset + i + 1
    raise PacketError("remaining length longer than four bytes")


def encode_packet(packet_type: int, flags: int, body: bytes) -> bytes:
    return bytes([(packet_type << 4) | (flags & 0x0F)]) + encode_remaining_length(len(body)) + body


def _check_header(first: int) -> tuple[int, int]:
    packet_type, flags = first >> 4, first & 0x0F
    if packet_type == 0 or packet_type == 15:
        raise PacketError(f"reserved packet type {packet_type}")
    required = _REQUIRED_FLAGS.get(packet_type)
    if required is not None and flags != required:
        raise PacketError(f"{NAMES[packet_type]} with invalid header flags {flags:#x}")
    if packet_type == PUBLISH and (flags >> 1) & 3 == 3:
        raise PacketError("PUBLISH with QoS 3")
    return packet_type, flags


def split_packet(data: bytes, max_size: int = MAX_REMAINING_LENGTH) -> tuple[Packet | None, int]:
    """The first packet in data and the number of bytes it took, or (None, 0) if data
    holds only part of one."""
    if not data:
        return None, 0
    packet_type, flags = _check_header(data[0])
    decoded = decode_remaining_length(data, 1)
    if decoded is None:
        return None, 0
    length, start = decoded
    if length > max_size:
        raise PacketError(f"packet of {length} bytes is over the limit of {max_size}")
    if len(data) < start + length:
        return None, 0
    return Packet(packet_type, flags, bytes(data[start:start + length])), start + length


async def read_packet(reader: asyncio.StreamReader,
                      max_size: int = MAX_REMAINING_LENGTH) -> Packet | None:
    """One packet from the stream; None on a clean end of stream between packets.
    A stream ending inside a packet, or a malformed header, is a PacketError."""
    first = await reader.read(1)
    if not first:
        return None
    try:
        packet_type, flags = _check_header(first[0])
        value = 0
        for i in range(4):
            byte = (await reader.readexactly(1))[0]
            value += (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                break
        else:
            raise PacketError("remaining length longer than four bytes")
        if value > max_size:
            raise PacketError(f"packet of {value} bytes is over the limit of {max_size}")
        body = await reader.readexactly(value) if value else b""
    except asyncio.IncompleteReadError as exc:
        raise PacketError("stream ended inside a packet") from exc
    return Packet(packet_type, flags, body)


# --- field helpers --------------------------------------------------------------------

class _Cursor:
    def __init__(self, data: bytes, what: str):
        self.data = data
        self.pos = 0
        self.what = what

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if self.left() < n:
            raise PacketError(f"{self.what} is truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PacketError(f"{self.what} holds a string that is not UTF-8") from exc
        if "\x00" in text:
            raise PacketError(f"{self.what} holds a string with U+0000")
        return text

    def rest(self) -> bytes:
        return self.take(self.left())


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _binary(raw)


def _binary(raw: bytes) -> bytes:
    if len(raw) > 0xFFFF:
        raise PacketError("string longer than 65535 bytes")
    return struct.pack(">H", len(raw)) + raw


def _packet_id(cur: _Cursor, what: str) -> int:
    pid = cur.u16()
    if pid == 0:
        raise PacketError(f"{what} with packet id 0")
    return pid


# --- parsing --------------------------------------------------------------------------

def parse_connect(body: bytes) -> Connect:
    cur = _Cursor(body, "CONNECT")
    protocol_name = cur.string()
    level = cur.u8()
    flags = cur.u8()
    keepalive = cur.u16()
    if flags & 0x01:
        raise PacketError("CONNECT with the reserved flag set")
    will = bool(flags & 0x04)
    will_qos = (flags >> 3) & 3
    will_retain = bool(flags & 0x20)
    has_password = bool(flags & 0x40)
    has_username = bool(flags & 0x80)
    if will_qos == 3:
        raise PacketError("CONNECT with will QoS 3")
    if not will and (will_qos or will_retain):
        raise PacketError("CONNECT with will QoS or retain but no will")
    if has_password and not has_username:
        raise PacketError("CONNECT with a password but no user name")
    client_id = cur.string()
    will_topic = will_message = username = password = None
    if will:
        will_topic = cur.string()
        will_message = cur.binary()
    if has_username:
        username = cur.string()
    if has_password:
        password = cur.binary()
    if cur.left():
        raise PacketError("CONNECT with trailing bytes")
    return Connect(
        protocol_name=protocol_name, protocol_level=level, clean_session=bool(flags & 0x02),
        keepalive=keepalive, client_id=client_id, will_topic=will_topic,
        will_message=will_message, will_qos=will_qos, will_retain=will_retain,
        username=username, password=password,
    )


def parse_publish(flags: int, body: bytes) -> Publish:
    qos = (flags >> 1) & 3
    if qos == 3:
        raise PacketError("PUBLISH with QoS 3")
    cur = _Cursor(body, "PUBLISH")
    topic = cur.string()
    packet_id = _packet_id(cur, "PUBLISH") if qos else None
    return Publish(topic=topic, payload=cur.rest(), qos=qos, retain=bool(flags & 1),
                   dup=bool(flags & 8), packet_id=packet_id)


def parse_subscribe(body: bytes) -> Subscribe:
    cur = _Cursor(body, "SUBSCRIBE")
    packet_id = _packet_id(cur, "SUBSCRIBE")
    filters = []
    while cur.left():
        topic_filter = cur.string()
        options = cur.u8()
        if options & 0xFC or options == 3:
            raise PacketError(f"SUBSCRIBE with invalid requested QoS byte {options:#x}")
        filters.append((topic_filter, options))
    if not filters:
        raise PacketError("SUBSCRIBE without a topic filter")
    return Subscribe(packet_id, filters)


def parse_unsubscribe(body: bytes) -> Unsubscribe:
    cur = _Cursor(body, "UNSUBSCRIBE")
    packet_id = _packet_id(cur, "UNSUBSCRIBE")
    filters = []
    while cur.left():
        filters.append(cur.string())
    if not filters:
        raise PacketError("UNSUBSCRIBE without a topic filter")
    return Unsubscribe(packet_id, filters)


def parse_packet_id(body: bytes, what: str = "packet") -> int:
    """The packet id of PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK."""
    if len(body) != 2:
        raise PacketError(f"{what} of {len(body)} bytes, expected 2")
    return struct.unpack(">H", body)[0]


def parse_connack(body: bytes) -> tuple[bool, int]:
    """(session present, return code)."""
    if len(body) != 2 or body[0] & 0xFE:
        raise PacketError("malformed CONNACK")
    return bool(body[0] & 1), body[1]


def parse_suback(body: bytes) -> tuple[int, list[int]]:
    cur = _Cursor(body, "SUBACK")
    packet_id = cur.u16()
    codes = list(cur.rest())
    if not codes:
        raise PacketError("SUBACK without return codes")
    return packet_id, codes


# --- building -------------------------------------------------------------------------

def build_connack(return_code: int, session_present: bool = False) -> bytes:
    return encode_packet(CONNACK, 0, bytes([1 if session_present else 0, return_code]))


def _ack(packet_type: int, packet_id: int, flags: int = 0) -> bytes:
    return encode_packet(packet_type, flags, struct.pack(">H", packet_id))


def build_puback(packet_id: int) -> bytes:
    return _ack(PUBACK, packet_id)


def build_pubrec(packet_id: int) -> bytes:
    return _ack(PUBREC, packet_id)


def build_pubrel(packet_id: int) -> bytes:
    return _ack(PUBREL, packet_id, flags=2)


def build_pubcomp(packet_id: int) -> bytes:
    return _ack(PUBCOMP, packet_id)


def build_suback(packet_id: int, return_codes: list[int]) -> bytes:
    return encode_packet(SUBACK, 0, struct.pack(">H", packet_id) + bytes(return_codes))


def build_connect(client_id: str, keepalive: int = 30, clean_session: bool = True,
                  will_topic: str | None = None, will_message: bytes = b"",
                  will_qos: int = 0, will_retain: bool = False,
                  username: str | None = None, password: bytes | None = None) -> bytes:
    flags = 0x02 if clean_session else 0
    payload = _string(client_id)
    if will_topic is not None:
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
        payload += _string(will_topic) + _binary(will_message)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
    if password is not None:
        flags |= 0x40
        payload += _binary(password)
    header = _string("MQTT") + bytes([4, flags]) + struct.pack(">H", keepalive)
    return encode_packet(CONNECT, 0, header + payload)


def build_publish(topic: str, payload: bytes = b"", qos: int = 0, packet_id: int | None = None,
                  retain: bool = False, dup: bool = False) -> bytes:
    flags = (qos << 1) | (1 if retain else 0) | (8 if dup else 0)
    body = _string(topic)
    if qos:
        if not packet_id:
            raise PacketError("PUBLISH with QoS > 0 needs a packet id")
        body += struct.pack(">H", packet_id)
    return encode_packet(PUBLISH, flags, body + payload)


def build_subscribe(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    body = struct.pack(">H", packet_id)
    for topic_filter, qos in filters:
        body += _string(topic_filter) + bytes([qos])
    return encode_packet(SUBSCRIBE, 2, body)


def build_unsubscribe(packet_id: int, filters: list[str]) -> bytes:
    body = struct.pack(">H", packet_id) + b"".join(_string(f) for f in filters)
    return encode_packet(UNSUBSCRIBE, 2, body)


PINGREQ_BYTES = bytes([PINGREQ << 4, 0])
PINGRESP_BYTES = bytes([PINGRESP << 4, 0])
DISCONNECT_BYTES = bytes([DISCONNECT << 4, 0])


# --- topics ---------------------------------------------------------------------------

def valid_topic_name(topic: str) -> bool:
    """A topic a PUBLISH may carry: not empty, no wildcards."""
    return bool(topic) and "+" not in topic and "#" not in topic


def valid_topic_filter(topic_filter: str) -> bool:
    """A syntactically valid SUBSCRIBE filter ('+' a whole level, '#' a whole last level)."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "+" in level and level != "+":
            return False
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether a PUBLISH on topic matches a subscription's filter (3.1.1, 4.7)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels = topic.split("/")
    for i, level in enumerate(topic_filter.split("/")):
        if level == "#":
            return True  # 'a/#' matches 'a' too
        if i >= len(levels) or (level != "+" and level != levels[i]):
            return False
    return len(topic_filter.split("/")) == len(levels)
