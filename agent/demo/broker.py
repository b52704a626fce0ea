"""A small embedded MQTT 3.1.1 broker, so `edge-agent demo` runs on a machine with nothing but Python.

The demo prefers a real mosquitto (see `agent.demo.mosquitto`); this broker is the fallback when the binary
is not installed. It is NOT a production broker: no persistence, no authentication, no TLS, no flow control.

What it does implement (MQTT 3.1.1, protocol level 4 only):
- CONNECT/CONNACK (any client id; an empty one gets a generated id; username/password accepted and
  ignored; every session is clean, CONNACK never reports a stored session). A second connection with the
  same client id disconnects the first one, as the spec requires.
- PUBLISH at QoS 0, 1 (PUBACK) and 2 (PUBREC, then delivery on PUBREL and PUBCOMP; a re-sent PUBLISH with
  a pending packet id is not delivered twice).
- SUBSCRIBE/UNSUBSCRIBE with `+` and `#`; granted QoS is min(requested, 1).
- Retained messages (an empty retained payload clears the topic), last will (on any drop without
  DISCONNECT, including keepalive expiry after 1.5 x keepalive), PINGREQ.

Deliveries go out at min(publish QoS, granted QoS) with a per-subscriber packet id. QoS 1 deliveries are
fire-and-forget on the broker side: written once, never retried, and the subscriber's PUBACK is ignored.
Writes to subscribers are not awaited (no back-pressure): a stalled subscriber only grows its buffer.

A malformed packet, an unexpected packet or a connection dropped mid-packet closes that client only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from dataclasses import dataclass, field
from types import TracebackType

# Packet types (high nibble of the fixed header).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

CONNACK_ACCEPTED = 0
CONNACK_BAD_PROTOCOL = 1
MAX_GRANTED_QOS = 1
# A client that connects but never sends CONNECT must not hold a connection forever.
CONNECT_TIMEOUT_S = 10.0


class MalformedPacketError(Exception):
    """The client broke the protocol; its connection is closed."""


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(eq=False)
class _Session:
    client_id: str
    writer: asyncio.StreamWriter
    keepalive: int
    will: Message | None
    subscriptions: dict[str, int] = field(default_factory=dict)
    pending_qos2: dict[int, Message] = field(default_factory=dict)
    packet_ids: itertools.cycle[int] = field(default_factory=lambda: itertools.cycle(range(1, 65536)))

    def send(self, packet: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(packet)


def encode_remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        length, digit = divmod(length, 128)
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _packet(first_byte: int, body: bytes = b"") -> bytes:
    return bytes([first_byte]) + encode_remaining_length(len(body)) + body


def _encode_str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


class _Reader:
    """Cursor over one packet body; any overrun is a malformed packet."""

    def __init__(self, body: bytes) -> None:
        self.body, self.pos = body, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.body):
            raise MalformedPacketError("packet shorter than its fields")
        chunk = self.body[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("!H", self.take(2))[0])

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        try:
            return self.binary().decode()
        except UnicodeDecodeError as exc:
            raise MalformedPacketError("string is not UTF-8") from exc

    def rest(self) -> bytes:
        chunk, self.pos = self.body[self.pos :], len(self.body)
        return chunk

    @property
    def done(self) -> bool:
        return self.pos >= len(self.body)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(first byte, body) of the next packet; IncompleteReadError if the peer goes away mid-packet."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    for _ in range(4):
        digit = (await reader.readexactly(1))[0]
        length |= (digit & 0x7F) << shift
        if not digit & 0x80:
            return first, await reader.readexactly(length)
        shift += 7
    raise MalformedPacketError("remaining length longer than 4 bytes")


def topic_matches(topic_filter: str, topic: str) -> bool:
    filter_levels, topic_levels = topic_filter.split("/"), topic.split("/")
    # Wildcards at the first level never match $SYS-style topics (spec 4.7.2).
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= len(topic_levels) or (level != "+" and level != topic_levels[i]):
            return False
    return len(filter_levels) == len(topic_levels)


def valid_filter(topic_filter: str) -> bool:
    # `#` only as the whole last level, `+` only as a whole level.
    levels = topic_filter.split("/")
    if not topic_filter or "#" in "".join(levels[:-1]):
        return False
    if "#" in levels[-1] and levels[-1] != "#":
        return False
    return all("+" not in level or level == "+" for level in levels)


class EmbeddedBroker:
    """`async with EmbeddedBroker() as broker:` then connect MQTT clients to broker.host:broker.port."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, Message] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._client_ids = (f"embedded-{n}" for n in itertools.count(1))
        self._stopping = False

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._stopping = False
        self._server = await asyncio.start_server(self._handle_client, host, port)
        self.host, self.port = host, int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        # Close the connections rather than cancel their handlers: each handler then ends on EOF. (On
        # Python 3.11, asyncio logs an error for every start_server handler task that is cancelled.)
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            _, stragglers = await asyncio.wait(list(self._tasks), timeout=2.0)
            for task in stragglers:
                task.cancel()
            await asyncio.gather(*stragglers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _handle_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        if self._stopping:  # accepted just before stop() closed the server
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            return
        session: _Session | None = None
        clean_disconnect = False
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                first, body = await read_packet(reader)
            session = self._connect(first, body, writer)
            if session is None:
                return
            clean_disconnect = await self._serve(session, reader)
        except (MalformedPacketError, asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass  # that client broke the protocol, went away or timed out: drop it, keep the broker
        finally:
            if session is not None:
                if self._sessions.get(session.client_id) is session:
                    del self._sessions[session.client_id]
                if session.will is not None and not clean_disconnect and not self._stopping:
                    self._publish(session.will)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._writers.discard(writer)
            self._tasks.discard(task)

    def _connect(self, first: int, body: bytes, writer: asyncio.StreamWriter) -> _Session | None:
        if first != CONNECT << 4:
            raise MalformedPacketError("first packet is not CONNECT")
        r = _Reader(body)
        protocol, level, flags, keepalive = r.text(), r.u8(), r.u8(), r.u16()
        if protocol != "MQTT" or level != 4:
            writer.write(_packet(CONNACK << 4, bytes([0, CONNACK_BAD_PROTOCOL])))
            return None
        if flags & 0x01:
            raise MalformedPacketError("reserved CONNECT flag set")
        client_id = r.text() or next(self._client_ids)
        will = None
        if flags & 0x04:
            will_topic, will_payload = r.text(), r.binary()
            will = Message(will_topic, will_payload, min((flags >> 3) & 0x03, 2), bool(flags & 0x20))
        if flags & 0x80:
            r.text()  # username, ignored
        if flags & 0x40:
            r.binary()  # password, ignored
        old = self._sessions.get(client_id)
        if old is not None:
            old.writer.close()  # takeover: the old connection's task ends on its next read
        session = _Session(client_id, writer, keepalive, will)
        self._sessions[client_id] = session
        writer.write(_packet(CONNACK << 4, bytes([0, CONNACK_ACCEPTED])))
        return session

    async def _serve(self, session: _Session, reader: asyncio.StreamReader) -> bool:
        """Handle packets until the client disconnects; True if it sent DISCONNECT."""
        idle_limit = session.keepalive * 1.5 if session.keepalive else None
        while True:
            async with asyncio.timeout(idle_limit):
                first, body = await read_packet(reader)
            kind, flags = first >> 4, first & 0x0F
            if kind == PUBLISH:
                self._on_publish(session, flags, body)
            elif kind == PUBREL and flags == 0x02:
                packet_id = _Reader(body).u16()
                message = session.pending_qos2.pop(packet_id, None)
                if message is not None:
                    self._publish(message)
                session.send(_packet(PUBCOMP << 4, struct.pack("!H", packet_id)))
            elif kind == SUBSCRIBE and flags == 0x02:
                self._on_subscribe(session, body)
            elif kind == UNSUBSCRIBE and flags == 0x02:
                r = _Reader(body)
                packet_id = r.u16()
                while not r.done:
                    session.subscriptions.pop(r.text(), None)
                session.send(_packet(UNSUBACK << 4, struct.pack("!H", packet_id)))
            elif kind == PINGREQ:
                session.send(_packet(PINGRESP << 4))
            elif kind == DISCONNECT:
                return True
            elif kind in (PUBACK, PUBREC, PUBCOMP):
                pass  # acks for our deliveries: QoS 1 delivery is fire-and-forget, QoS 2 is never granted
            else:
                raise MalformedPacketError(f"unexpected packet type {kind} flags {flags:#x}")
            if session.writer.is_closing():
                return False  # taken over by a newer connection with the same client id

    def _on_publish(self, session: _Session, flags: int, body: bytes) -> None:
        qos, retain = (flags >> 1) & 0x03, bool(flags & 0x01)
        if qos == 3:
            raise MalformedPacketError("PUBLISH with QoS 3")
        r = _Reader(body)
        topic = r.text()
        if not topic or "+" in topic or "#" in topic:
            raise MalformedPacketError(f"invalid topic name {topic!r}")
        packet_id = r.u16() if qos else 0
        message = Message(topic, r.rest(), qos, retain)
        if qos == 2:
            # Delivered on PUBREL: a re-sent PUBLISH with the same id only replaces the pending copy.
            session.pending_qos2[packet_id] = message
            session.send(_packet(PUBREC << 4, struct.pack("!H", packet_id)))
            return
        self._publish(message)
        if qos == 1:
            session.send(_packet(PUBACK << 4, struct.pack("!H", packet_id)))

    def _on_subscribe(self, session: _Session, body: bytes) -> None:
        r = _Reader(body)
        packet_id = r.u16()
        granted: list[int] = []
        new_filters: list[str] = []
        while not r.done:
            topic_filter, requested = r.text(), r.u8()
            if requested > 2:
                raise MalformedPacketError("SUBSCRIBE with QoS > 2")
            if not valid_filter(topic_filter):
                granted.append(0x80)
                continue
            session.subscriptions[topic_filter] = min(requested, MAX_GRANTED_QOS)
            granted.append(session.subscriptions[topic_filter])
            new_filters.append(topic_filter)
        if not granted:
            raise MalformedPacketError("SUBSCRIBE without topic filters")
        session.send(_packet(SUBACK << 4, struct.pack("!H", packet_id) + bytes(granted)))
        for message in self._retained.values():
            granted = [session.subscriptions[f] for f in new_filters if topic_matches(f, message.topic)]
            if granted:
                self._deliver(session, message, min(max(granted), message.qos), retain=True)

    def _publish(self, message: Message) -> None:
        if message.retain:
            if message.payload:
                self._retained[message.topic] = message
            else:
                self._retained.pop(message.topic, None)
        for session in self._sessions.values():
            # Overlapping subscriptions get one copy, at the highest granted QoS.
            granted = [q for f, q in session.subscriptions.items() if topic_matches(f, message.topic)]
            if granted:
                # Established subscriptions see retain=0 (spec 3.3.1-9).
                self._deliver(session, message, min(max(granted), message.qos), retain=False)

    @staticmethod
    def _deliver(session: _Session, message: Message, qos: int, *, retain: bool) -> None:
        header = PUBLISH << 4 | qos << 1 | int(retain)
        packet_id = struct.pack("!H", next(session.packet_ids)) if qos else b""
        session.send(_packet(header, _encode_str(message.topic) + packet_id + message.payload))
