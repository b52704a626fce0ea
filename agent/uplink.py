"""The MQTT uplink: sends what the buffer holds, and deletes a row only after the broker's PUBACK.

Invariants:
1. Only the buffer is sent. A row is handed to paho-mqtt at QoS 1 and stays in the buffer; it is deleted
   when paho reports the PUBACK for that message id (`on_publish`), never when `publish()` returns:
   "handed to the client library" is not "delivered".
2. At most `max_inflight` messages are sent and not yet deleted: a message holds its place in the window
   from its publish until its rows are deleted after the PUBACK, so a crash or SIGKILL re-sends at most
   `max_inflight` messages. Deleting still follows the next send (a delete waits behind the writer's
   commits) and is one statement per 500 rows; only a full window waits for it. Throughput does not wait
   on the broker's round trip and memory stays bounded however large the backlog: the backlog lives on
   disk, read in windows. A message carries the polls of one device, as many as fit the message limit
   (`max_message_bytes`, lowered by the broker's Maximum Packet Size and by what the broker was seen to
   refuse, invariant 7): live usually one, in a backlog many. Rows read but not yet sent wait in a bounded
   list and go first at the next fill.
3. Live and backlog together: at each (re)connect, the rows already in the buffer become a backlog range.
   Each fill of the window gives the live stream (rows committed since) at most half and the backlog the
   rest, so after an outage the platform's live view recovers at once while the backlog drains at full
   speed, and neither starves. Within the live stream and within each backlog range, rows go out in
   sequence order over one connection, and MQTT keeps that order per topic: a device's readings arrive in
   order within each stream; a live reading may overtake the same device's backlog.
4. Compact encoding (agent/compact.py): a data message carries the point tables its polls name until a
   message carrying them is acknowledged on this connection, and again every `compact.TABLE_REPEAT`
   seconds, so per-topic order alone puts a table before the data that needs it. The device's tables are
   also published, retained, on its meta topic at the first message of each connection, for subscribers
   that join later on brokers that keep them. Each row is sent in the encoding it was stored in: after
   `encoding` was changed, the backlog goes out in the old one.
5. One connection, one paho client, run by a thread of ours. When a connection ends, the rows of the
   messages still in flight go back to the front of the queue, in order, and are sent on the next
   connection; their rows are still in the buffer. If the agent stops or crashes first, the next run sends
   them: the cost of a crash is duplicates, which the platform drops by sequence number, never a loss.
6. Reconnecting: the wait doubles from `reconnect_min` up to `reconnect_max`, each wait random between
   the step and twice it (at the cap between half and all of `reconnect_max`), so a fleet does not come
   back in step. It starts from `reconnect_min` again only after a connection that lasted
   `reconnect_max`: a broker that accepts the agent and drops it at once is not hammered either.
7. A message the broker will not take does not stop the others. The suspect is the oldest unacknowledged
   message when the link drops within BLAME_WINDOW of its send, or a message an MQTT 5 broker refuses in
   its PUBACK. It is sent again as it was (a broker restart under load looks the same once); failing a
   second time, its first poll goes alone, before anything else: if that poll is acknowledged, the
   message was too large (messages are at most half its size from then on, logged);
   a poll that fails MAX_TRIES times is given up: deleted and counted as lost (`refused` in the buffer,
   so the platform sees the gap and the status message counts it), logged at ERROR with the device, the
   topic and what the broker said, and the topic's next messages are given up unsent for QUARANTINE
   seconds before it is tried again. With MQTT 5 no message exceeds the broker's Maximum Packet Size
   (CONNACK); a single poll larger than that is given up at once.
8. Liveness: while connected, a message unacknowledged for `keepalive` seconds ends the connection, so a
   half-open link is noticed about one keepalive after the last acknowledgement while data flows (with
   nothing to send, paho's ping notices it within 2 x keepalive); a CONNACK that does not come within
   min(keepalive, CONNACK_TIMEOUT) ends the attempt with words about `mqtt.protocol`; a network thread that
   fails is logged at ERROR and replaced by the next connection: the uplink never stops silently.
9. Sparkplug (`encoding = "sparkplug"`, agent/sparkplug): JSON rows go out as DDATA framed by the session
   (backlog rows with is_historical), and nothing is sent while the session is not ready (no NBIRTH yet,
   primary host offline). A Sparkplug session ends with its connection: what was in flight goes again in the
   next one (invariant 5), after its births, with the new session's seq. Live states (`publish_state`:
   energy's live demand) also go to the Sparkplug host, as DDATA at QoS 0 while the session is ready, and
   are dropped while it is not: they are stale a second later.

paho-mqtt's network loop runs in the connection's thread, the only one that writes to the socket; its
callbacks only note facts on the connection (`_Session`) and hand events to the event loop with
`call_soon_threadsafe`. Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from agent import __version__
from agent.compact import CONTENT_TYPE as CBOR_CONTENT_TYPE
from agent.compact import CborEncoder, meta_message
from agent.config import GatewayConfig, MqttConfig
from agent.health import FailureLog
from agent.model import PollResult
from agent.payload import CONTENT_TYPE as JSON_CONTENT_TYPE
from agent.payload import STATUS_SCHEMA, Encoder, Topics, iso_utc
from agent.sparkplug import SparkplugSession
from buffer.store import Buffer, StoredBatch

log = logging.getLogger(__name__)

LIVE, BACKLOG = 0, 1
ROWS_READ_PER_MESSAGE = 16  # how many rows a fill reads per free window slot, so that messages can batch
BLAME_WINDOW = 5.0  # s: a link that drops this soon after a message was sent may have been dropped over it
MAX_TRIES = 3  # a poll the broker refuses this many times is given up (invariant 7)
QUARANTINE = 600.0  # s: messages to a topic the broker refused are given up unsent for this long
CONNACK_TIMEOUT = 10.0  # s, at most: a broker silent after CONNECT does not speak our protocol version
WATCH_INTERVAL = 0.25  # s: how often the watchdog looks at the connection
_PUBLISH_OVERHEAD = 16  # bytes of a PUBLISH packet besides topic, payload and content type, at most
# PUBACK reasons that say "not now", not "never": the message is sent again without counting a try.
_TRANSIENT_REFUSALS = frozenset({"Quota exceeded", "Server busy", "Implementation specific error"})


@dataclass(slots=True)
class _InFlight:
    stream: int
    rows: list[StoredBatch]  # the buffer rows the message carries
    topic: str
    size: int  # payload bytes
    sent: float  # time.monotonic() of the publish
    tables: tuple[str, list[str]] | None = None  # compact: (device, the point tables it carries in band)

    @property
    def readings(self) -> int:
        return sum(row.count for row in self.rows)

    @property
    def first_seq(self) -> int:
        return self.rows[0].seq


@dataclass(slots=True)
class _Suspect:
    """A message the broker may be refusing (invariant 7), named by its first sequence number."""
    seq: int
    device: str
    topic: str
    size: int  # the payload size of the message first suspected
    polls: int  # how many polls it carried: several, then it may just be too large
    tries: int = 1
    reason: str = ""
    probing: bool = False  # its first poll is in flight, alone, on this connection


@dataclass(slots=True)
class _Session:
    """One connection: its paho client and the facts its thread noted (plain attributes, set once each)."""
    client: mqtt.Client
    thread: threading.Thread | None = None
    socket_open: float | None = None  # monotonic: TCP (and TLS) up, CONNECT sent
    connected_at: float | None = None  # monotonic, event-loop side: CONNACK accepted
    refusal: str | None = None  # the CONNACK's failure reason
    disconnect: tuple[str, bool, str | None] | None = None  # paho's reason, from the broker?, socket error
    dropped_at: float | None = None
    error: str | None = None  # the connect failed, or the thread failed: why, in words
    ended_by_us: str | None = None  # the watchdog ended it: why
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    socket_error: str | None = None  # paho's last error log line


def reconnect_wait(failures: int, low: float, high: float, rand: Callable[[], float] = random.random) -> float:
    """The wait before the next try after `failures` consecutive failed or short connections (invariant 6):
    random between the step (low doubled per failure) and twice the step, within [high / 2, high]."""
    step = low * 2 ** min(failures, 40)
    bottom, top = min(step, max(high / 2, low)), min(2 * step, high)
    return max(bottom, min(top, bottom + (top - bottom) * rand()))


class MqttUplink:
    def __init__(self, config: MqttConfig, gateway: GatewayConfig, buffer: Buffer) -> None:
        self._config = config
        self._gateway = gateway
        self._buffer = buffer
        self._wake = asyncio.Event()
        self._inflight: dict[int, _InFlight] = {}  # by message id, in send order
        self._acked: list[_InFlight] = []  # acknowledged, rows not yet deleted: still in the window
        self._pending: list[tuple[int, StoredBatch]] = []  # (stream, row): read, not yet handed to paho
        # Framers by encoding (a row's table is None for JSON): each message is framed in its rows' encoding.
        self._json = Encoder(gateway.id, gateway.site, buffer.buffer_id)
        self._cbor = CborEncoder(gateway.id, gateway.site, buffer.buffer_id)
        self._properties: dict[bool, Any] = {}  # MQTT 5: the content type of each encoding
        self._announced: dict[str, set[str]] = {}  # device -> point tables published on this connection
        self._cursor = 0  # live stream: the highest sequence number handed to paho
        # Backlog ranges still to send, oldest first: rows with after < seq < before.
        self._backlog: deque[tuple[int, int]] = deque()
        self._connected = False
        self._stopping = False
        self._link = FailureLog(f"MQTT broker {config.host}:{config.effective_port}", log)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: _Session | None = None
        self._client: mqtt.Client | None = None  # the current connection's client
        self._last_ack = 0.0  # monotonic: the broker's last PUBACK on this connection (or its CONNACK)
        # Message size limits besides max_message_bytes (invariant 7): the broker's Maximum Packet Size
        # (MQTT 5 CONNACK) and what the broker was seen to refuse.
        self._packet_limit: int | None = None
        self._learned_limit: int | None = None
        self._suspect: _Suspect | None = None
        self._quarantine: dict[str, tuple[float, str]] = {}  # topic -> (until, monotonic; why)
        self._give_up: list[tuple[StoredBatch, str, str]] = []  # (row, topic, why): to be given up
        self._requeued = 0  # messages in flight when the last connection ended
        self.readings_delivered = 0
        # For the status page: since when the session is up, and the last reason it was not (never a secret).
        self.connected_since: float | None = None
        self.last_error: tuple[float, str] | None = None
        self.messages_delivered = 0
        self.topics = Topics(config.data_topic, config.status_topic, config.topic_prefix, gateway.site, gateway.id,
                             config.meta_topic)
        self.status_topic = self.topics.status
        # Set on every (re)connect: the agent then sends a full status message at once.
        self.status_due = asyncio.Event()
        # encoding = "sparkplug": births, deaths, seq and bdSeq live in agent/sparkplug; rows go out as DDATA.
        self.sparkplug: SparkplugSession | None = None
        if config.encoding == "sparkplug":
            sp = config.sparkplug
            self.sparkplug = SparkplugSession(
                sp.group_id or gateway.site, sp.edge_node_id or gateway.id, sp.primary_host_id, buffer.buffer_id,
                buffer.path.with_name(buffer.path.name + ".bdseq"), __version__, self._start_backlog)

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def notify(self) -> None:
        """New rows were committed to the buffer."""
        self._wake.set()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._keep_connected(), name="mqtt-connection")
                group.create_task(self._pump(), name="mqtt-pump")
                if self.sparkplug is not None:
                    group.create_task(self.sparkplug.watch_devices(), name="sparkplug-device-deaths")
        finally:
            await self._disconnect()

    async def drain(self, grace: float) -> None:
        """At shutdown: stop sending new rows and give what is in flight `grace` seconds to be acknowledged.
        Whatever is not acknowledged by then stays in the buffer for the next run."""
        self._stopping = True
        deadline = time.monotonic() + grace
        while self._inflight and self._connected and time.monotonic() < deadline:
            self._wake.clear()
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._wake.wait()
            except TimeoutError:
                break
        await self._delete_acked()

    # --- connections: one paho client and thread each, reconnects with backoff -----------------------

    async def _keep_connected(self) -> None:
        failures = 0
        while not self._stopping:
            session = self._start_session()
            await self._watch(session)
            lasted = await self._session_over(session)
            if self._stopping:
                return
            if lasted >= self._config.reconnect_max:
                failures = 0
            delay = reconnect_wait(failures, self._config.reconnect_min, self._config.reconnect_max)
            failures += 1
            reason = self._why(session)
            self.last_error = (time.time(), reason)  # for the status page
            self._link.failed(reason, f"{self._requeued} messages in flight stay in the buffer; "
                                                  f"reconnecting in {delay:.1f} s, then less and less often "
                                                  f"(up to every {self._config.reconnect_max:g} s)")
            await asyncio.sleep(delay)

    def _start_session(self) -> _Session:
        session = _Session(self._make_client())
        session.client.user_data_set(session)
        self._session, self._client = session, session.client
        session.thread = threading.Thread(target=self._network, args=(session,), daemon=True,
                                          name="mqtt-network")
        session.thread.start()
        return session

    def _network(self, session: _Session) -> None:
        """The connection's thread: connect, run paho's loop until the connection ends, report the end.
        Whatever it raises is reported, never lost with the thread (invariant 8)."""
        client, config = session.client, self._config
        try:
            client.connect(config.host, config.effective_port, keepalive=round(config.keepalive))
            session.socket_open = time.monotonic()
            # One step through `loop()` makes paho's socket pair, through which a publish from the event loop
            # wakes this thread to write it (loop_forever alone has none: it would write only once a second).
            if client.loop(timeout=0) == MQTTErrorCode.MQTT_ERR_SUCCESS:
                client.loop_forever()
        except OSError as exc:
            session.error = describe_connect_error(exc)
        except BaseException as exc:  # noqa: BLE001 - reported in words, then the next connection is made
            session.error = f"the MQTT client failed ({type(exc).__name__}: {exc}); check the [mqtt] settings " \
                            "(mqtt.keepalive at most 65535 s)"
        finally:
            self._from_paho(session.ended.set)

    async def _watch(self, session: _Session) -> None:
        """Until the connection ends: end it when the CONNACK is late or acknowledgements stop (invariant 8)."""
        keepalive = self._config.keepalive
        connack_timeout = min(CONNACK_TIMEOUT, keepalive)
        while not session.ended.is_set():
            try:
                async with asyncio.timeout(WATCH_INTERVAL):
                    await session.ended.wait()
                return
            except TimeoutError:
                pass
            now = time.monotonic()
            if session.ended_by_us is not None:
                continue
            if session.connected_at is not None and now - session.connected_at >= self._config.reconnect_max:
                self._link.succeeded()  # up for a while with nothing to send: recovered all the same
            if session.connected_at is None:
                if session.socket_open is not None and now - session.socket_open > connack_timeout:
                    self._end(session, f"the broker accepted the connection but did not answer the MQTT CONNECT "
                                       f"within {connack_timeout:g} s; " + self._protocol_hint())
            else:
                oldest = next(iter(self._inflight.values()), None)
                if oldest is not None and now - max(oldest.sent, self._last_ack) > keepalive:
                    self._end(session, f"no acknowledgement from the broker for {keepalive:g} s (mqtt.keepalive): "
                                       "the network path to it is broken")
            if session.thread is not None and not session.thread.is_alive() and not session.ended.is_set():
                await asyncio.sleep(WATCH_INTERVAL)  # its last report may still be on its way
                if not session.ended.is_set():
                    session.error = session.error or "the MQTT network thread stopped"
                    return

    def _end(self, session: _Session, why: str) -> None:
        """End a connection from the event loop: shutting its socket down wakes paho's thread, which ends."""
        session.ended_by_us = why
        sock = session.client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    async def _session_over(self, session: _Session) -> float:
        """The connection ended: messages in flight go back to the queue, a suspect is blamed (invariant 7).
        Returns how long it was connected."""
        connected_at = session.connected_at
        self._connected = False
        self.connected_since = None
        if self.sparkplug is not None:
            self.sparkplug.disconnected()
        inflight = list(self._inflight.values())
        self._inflight.clear()
        self._requeued = len(inflight)
        if connected_at is not None and session.ended_by_us is None and not self._stopping and inflight:
            oldest = inflight[0]
            dropped = session.dropped_at or time.monotonic()
            if dropped - oldest.sent <= BLAME_WINDOW:
                self._blame(oldest, self._why(session))
        self._pending[:0] = [(entry.stream, row) for entry in inflight for row in entry.rows]
        if self._suspect is not None:
            self._suspect.probing = False
        self._wake.set()
        await self._give_up_rows()
        return time.monotonic() - connected_at if connected_at is not None else 0.0

    def _why(self, session: _Session) -> str:
        if session.ended_by_us is not None:
            return session.ended_by_us
        if session.refusal is not None:
            return describe_refusal(session.refusal)
        if session.error is not None:
            return session.error
        if session.disconnect is not None:
            reason, from_broker, socket_error = session.disconnect
            return describe_disconnect(reason, socket_error, from_broker=from_broker,
                                       connected=session.connected_at is not None,
                                       protocol_hint=self._protocol_hint())
        return "the connection ended"

    def _protocol_hint(self) -> str:
        if self._config.protocol == "5":
            return 'if the broker speaks only MQTT 3.1.1, set mqtt.protocol = "3.1.1"'
        return "is mqtt.port the broker's MQTT port (a TLS port needs [mqtt.tls])? The broker's log says why"

    # --- the pump: buffer -> broker ---------------------------------------------------------------

    async def _pump(self) -> None:
        storage = FailureLog("uplink reading the buffer", log)
        delay = 0.5
        while True:
            self._wake.clear()
            try:
                # Send first: room in the window is freed by the acks themselves, so deleting what was
                # acknowledged (a write to the buffer, behind the writer's commits) can wait until after.
                client = self._client
                if self._connected and not self._stopping and client is not None and \
                        (self.sparkplug is None or self.sparkplug.ready):
                    await self._fill_window(client)
                if await self._delete_acked():
                    self._wake.set()  # their places in the window are free: fill it again
                await self._give_up_rows()
            except Exception as exc:  # noqa: BLE001 - a disk error must not end the uplink; nothing is lost
                storage.failed(exc, "sending pauses, the rows stay in the buffer")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            storage.succeeded()
            delay = 0.5
            await self._wake.wait()

    def _room(self) -> int:
        """Free places in the window (invariant 2); one message only while a suspect is probed."""
        suspect = self._probing()
        if suspect is not None:
            return 0 if self._inflight or suspect.probing else 1
        return self._config.max_inflight - len(self._inflight) - len(self._acked)

    async def _fill_window(self, client: mqtt.Client) -> None:
        room = self._room()
        if room <= 0:
            return
        if not self._pending:
            await self._read_rows(room)
        self._set_aside_quarantined()
        await self._announce_tables(client)
        sent = self._send_pending(client, room)
        room = self._room()
        if sent and room > 0 and not self._pending:  # everything pending went out: read on, within the room
            await self._read_rows(room)
            self._set_aside_quarantined()
            await self._announce_tables(client)
            self._send_pending(client, room)

    async def _read_rows(self, room: int) -> None:
        """Read rows into `_pending`: the live stream at most half the room while a backlog exists."""
        live_rows = (max(1, room // 2) if self._backlog else room) * ROWS_READ_PER_MESSAGE
        live = await self._buffer.read_after(self._cursor, live_rows)
        if live:
            self._cursor = live[-1].seq
            self._pending.extend((LIVE, row) for row in live)
        left = room * ROWS_READ_PER_MESSAGE - len(live)
        while left > 0 and self._backlog:
            after, before = self._backlog[0]
            rows = await self._buffer.read_after(after, left, before)
            self._pending.extend((BACKLOG, row) for row in rows)
            if len(rows) < left:
                self._backlog.popleft()
            else:
                self._backlog[0] = (rows[-1].seq, before)
            left -= len(rows)

    async def _announce_tables(self, client: mqtt.Client) -> None:
        """Publish the point tables of each device whose pending rows name one not yet announced on this
        connection (invariant 4): all the device's tables, retained, before its data."""
        devices = {row.device for _, row in self._pending
                   if row.table is not None and row.table not in self._announced.get(row.device, ())}
        for device in sorted(devices):
            tables = await self._buffer.tables(device)
            missing = {row.table for _, row in self._pending if row.device == device} - set(tables) - {None}
            if missing:  # cannot happen (invariant 6 of the buffer); the rows still go, loudly
                log.error("device %s: point table(s) %s missing from the buffer; its compact messages cannot be "
                          "decoded by the platform", device, ", ".join(sorted(missing)))
            self._cbor.tables_known(device, tables)
            payload = meta_message(self._gateway.id, self._gateway.site, device, tables)
            info = client.publish(self.topics.meta(device), payload, qos=1, retain=True,
                                  properties=self._content_type(False))
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                raise RuntimeError(f"the MQTT client refused a message: {mqtt.error_string(info.rc)}")
            self._announced[device] = set(tables) | missing

    def _content_type(self, compact: bool) -> Any:
        """MQTT 5: the message's content type (None with 3.1.1, which has no properties)."""
        if self._config.protocol != "5":
            return None
        properties = self._properties.get(compact)
        if properties is None:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = self._properties[compact] = Properties(PacketTypes.PUBLISH)
            properties.ContentType = CBOR_CONTENT_TYPE if compact else JSON_CONTENT_TYPE
        return properties

    def _limit(self, device: str, compact: bool) -> int:
        """The largest payload for the device's messages now (invariant 7)."""
        limit = self._config.max_message_bytes
        if self._learned_limit is not None:
            limit = min(limit, self._learned_limit)
        packet = self._packet_payload_limit(device, compact)
        return limit if packet is None else min(limit, packet)

    def _packet_payload_limit(self, device: str, compact: bool) -> int | None:
        """MQTT 5: the largest payload the broker's Maximum Packet Size leaves for this device's topic."""
        if self._packet_limit is None:
            return None
        content_type = CBOR_CONTENT_TYPE if compact else JSON_CONTENT_TYPE
        return self._packet_limit - _PUBLISH_OVERHEAD - len(self.topics.data(device).encode()) - len(content_type)

    def _send_pending(self, client: mqtt.Client, room: int) -> int:
        """Group pending rows into messages per stream and device (oldest first, within the message limit)
        and send up to `room` of them: live first up to half the room, then the backlog, then more live.
        Only whole prefixes of each stream go, so a device's rows stay in order. While a suspect is
        probed (invariant 7), only its first poll goes."""
        if not self._connected or client is not self._client:
            return 0  # the connection ended while rows were read: they go on the next one
        chunks: dict[int, list[list[StoredBatch]]] = {LIVE: [], BACKLOG: []}
        open_chunks: dict[tuple[int, str, bool], tuple[list[StoredBatch], int]] = {}
        for stream, row in self._pending:
            compact = row.table is not None
            key = (stream, row.device, compact)
            chunk, size = open_chunks.get(key, ([], 0))
            framer = self._cbor if compact else self._json
            if not chunk or framer.framed_size(row.device, size + len(row.payload), len(chunk) + 1) > \
                    self._limit(row.device, compact):
                chunk, size = [], 0
                chunks[stream].append(chunk)
            chunk.append(row)
            open_chunks[key] = (chunk, size + len(row.payload))
        suspect = self._probing()
        if suspect is not None:
            return self._send_probe(client, chunks, suspect)
        live_first = min(len(chunks[LIVE]), max(1, room // 2) if chunks[BACKLOG] else room)
        backlog = min(len(chunks[BACKLOG]), room - live_first)
        live = min(len(chunks[LIVE]), room - backlog)
        self._pending = [(stream, row) for stream, count in ((LIVE, live), (BACKLOG, backlog))
                         for chunk in chunks[stream][count:] for row in chunk]
        to_send = [(LIVE, chunk) for chunk in chunks[LIVE][:live]] + \
                  [(BACKLOG, chunk) for chunk in chunks[BACKLOG][:backlog]]
        for index, (stream, chunk) in enumerate(to_send):
            try:
                self._publish(client, stream, chunk)
            except Exception:
                # This chunk and the ones after it were not sent: back to the front, in order.
                self._pending[:0] = [(stream, row) for stream, unsent in to_send[index:] for row in unsent]
                raise
        return live + backlog

    def _send_probe(self, client: mqtt.Client, chunks: dict[int, list[list[StoredBatch]]], suspect: _Suspect) -> int:
        for stream in (LIVE, BACKLOG):
            for chunk in chunks[stream]:
                if chunk[0].seq == suspect.seq:
                    probe = chunk[0]
                    self._pending.remove((stream, probe))
                    try:
                        self._publish(client, stream, [probe])
                    except Exception:
                        self._pending.insert(0, (stream, probe))
                        raise
                    suspect.probing = True
                    return 1
        self._suspect = None  # its rows are no longer queued (its topic given up): nothing to find out
        self._wake.set()
        return 0

    def _publish(self, client: mqtt.Client, stream: int, rows: list[StoredBatch]) -> None:
        device, compact = rows[0].device, rows[0].table is not None
        if self.sparkplug is not None and not compact:  # JSON rows as DDATA (compact ones stay compact)
            info, topic, size = self.sparkplug.publish(client, device, rows, historical=stream == BACKLOG)
            self._track(info, _InFlight(stream, rows, topic, size, time.monotonic()))
            return
        if compact:  # with the point tables it must carry (invariant 4)
            carried = self._cbor.due(device, (row.table for row in rows))
            payload = self._cbor.frame(device, [row.payload for row in rows], carried)
        else:
            carried, payload = [], self._json.frame(device, [row.payload for row in rows])
        topic = self.topics.data(device)
        packet_limit = self._packet_payload_limit(device, compact)
        if packet_limit is not None and len(payload) > packet_limit:
            # One poll larger than the broker takes (several are never grouped past it): it can never go.
            self._give_up.extend((row, topic, f"a poll of {len(payload)} bytes is larger than the broker's "
                                              f"Maximum Packet Size ({self._packet_limit} bytes)") for row in rows)
            return
        info = client.publish(topic, payload, qos=1, properties=self._content_type(compact))
        self._track(info, _InFlight(stream, rows, topic, len(payload), time.monotonic(),
                                    (device, carried) if carried else None))

    def _track(self, info: mqtt.MQTTMessageInfo, entry: _InFlight) -> None:
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            # Not queued by paho at all: the caller puts the rows back; tried again after a pause.
            raise RuntimeError(f"the MQTT client refused a message: {mqtt.error_string(info.rc)}")
        # MQTT_ERR_NO_CONN: the link dropped just now; the rows go back to the queue when the connection's end
        # is handled (invariant 5).
        self._inflight[info.mid] = entry

    async def _delete_acked(self) -> bool:
        """Delete the rows of acknowledged messages; True if any were (their window places are free)."""
        if not self._acked:
            return False
        acked = self._acked[:]
        # If this fails they stay in `_acked`, retried on the next wake: a failed delete loses nothing.
        await self._buffer.delete([row.seq for entry in acked for row in entry.rows])
        del self._acked[:len(acked)]
        self.readings_delivered += sum(entry.readings for entry in acked)
        self.messages_delivered += len(acked)
        return True

    # --- messages the broker refuses (invariant 7) -----------------------------------------------------

    def _probing(self) -> _Suspect | None:
        """The suspect, once it failed twice: from then on its first poll goes alone. (Once is not enough:
        a broker restarting under load would otherwise make the oldest message in flight look refused.)"""
        suspect = self._suspect
        return suspect if suspect is not None and suspect.tries >= 2 else None

    def _blame(self, entry: _InFlight, why: str) -> None:
        """`entry` failed: the link dropped right after it, or the broker refused it in its PUBACK."""
        suspect = self._suspect
        device = entry.rows[0].device
        if suspect is None or suspect.seq != entry.first_seq:
            self._suspect = _Suspect(entry.first_seq, device, entry.topic, entry.size, len(entry.rows), reason=why)
            log.debug("device %s: %s, right after a message to %s; it is sent again", device, why, entry.topic)
            return
        suspect.tries += 1
        suspect.reason = why
        if suspect.tries == 2:
            log.warning("device %s: %s, twice right after a message to %s (%d bytes, %d polls, readings from seq "
                        "%d); sending its first poll alone next, to find out whether the broker refuses the topic "
                        "or the size", device, why, entry.topic, suspect.size, suspect.polls, entry.first_seq)
        if suspect.tries >= MAX_TRIES and len(entry.rows) == 1:
            self._give_up.append((entry.rows[0], entry.topic, f"the broker refused it {suspect.tries} times: {why}"))
            self._quarantine[entry.topic] = (time.monotonic() + QUARANTINE, why)
            self._suspect = None

    def _probe_passed(self, suspect: _Suspect) -> None:
        self._suspect = None
        if suspect.polls > 1:
            # Its first poll alone went through: the message was too large for this broker.
            limit = max(1024, suspect.size // 2)
            self._learned_limit = limit if self._learned_limit is None else min(limit, self._learned_limit)
            log.warning("device %s: the broker took one poll but not a message of %d bytes to %s (%s): sending "
                        "messages of at most %d bytes from now on; set mqtt.max_message_bytes below the broker's "
                        "message size limit", suspect.device, suspect.size, suspect.topic, suspect.reason,
                        self._learned_limit)

    def _set_aside_quarantined(self) -> None:
        """Pending rows whose topic the broker refused recently are given up unsent (invariant 7)."""
        if not self._quarantine:
            return
        now = time.monotonic()
        for topic, (until, _) in list(self._quarantine.items()):
            if until <= now:
                del self._quarantine[topic]
                log.info("trying messages to %s again (refused by the broker %g min ago)", topic, QUARANTINE / 60)
        keep: list[tuple[int, StoredBatch]] = []
        for stream, row in self._pending:
            topic = self.topics.data(row.device)
            refused = self._quarantine.get(topic)
            if refused is None:
                keep.append((stream, row))
            else:
                self._give_up.append((row, topic, f"its topic was refused by the broker: {refused[1]}"))
        self._pending = keep

    async def _give_up_rows(self) -> None:
        """Delete the rows to give up, counted as lost by the buffer (`refused`); each topic's first give-up
        at ERROR, the next ones of a quarantined topic at debug."""
        if not self._give_up:
            return
        batch, self._give_up = self._give_up, []
        given = {row.seq for row, _, _ in batch}
        self._pending = [(stream, row) for stream, row in self._pending if row.seq not in given]
        try:
            await self._buffer.delete_refused([(row.seq, row.count) for row, _, _ in batch])
        except BaseException:
            self._give_up[:0] = batch  # tried again at the next wake; until then the rows stay in the buffer
            raise
        for (device, topic, why), rows in _grouped(batch).items():
            readings = sum(row.count for row in rows)
            last = rows[-1].seq + rows[-1].count - 1
            quiet = why.startswith("its topic was refused")
            log.log(logging.DEBUG if quiet else logging.ERROR,
                    "device %s: gave up %d readings (seq %d-%d) for topic %s: %s; they are counted as lost "
                    "(refused, in the status message), the platform sees them as a gap%s", device, readings,
                    rows[0].seq, last, topic, why,
                    "" if quiet or topic not in self._quarantine else
                    f"; its next messages are given up unsent for {QUARANTINE / 60:g} min, then tried again")

    # --- paho callbacks (the connection's thread) -> event loop -------------------------------------

    def _from_paho(self, callback: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:
                pass  # the loop closed in between: the agent has stopped

    def _on_connect(self, client: mqtt.Client, session: _Session, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        if reason.is_failure:
            session.refusal = str(reason)
            return
        packet_limit = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        self._from_paho(self._on_connected, session, packet_limit)

    def _on_disconnect(self, client: mqtt.Client, session: _Session, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        session.dropped_at = time.monotonic()
        session.disconnect = (str(reason), bool(getattr(flags, "is_disconnect_packet_from_server", False)),
                              session.socket_error)

    def _on_log(self, client: mqtt.Client, session: _Session, level: int, text: str) -> None:
        # paho reports why a socket failed only in its log (e.g. a TLS alert after the handshake); keep the
        # last such line for the disconnect message. Its error lines never hold credentials.
        if level in (mqtt.MQTT_LOG_ERR, mqtt.MQTT_LOG_WARNING):
            session.socket_error = text

    def _on_publish(self, client: mqtt.Client, session: _Session, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        self._from_paho(self._on_ack, session, mid, reason.is_failure, str(reason))

    # --- event-loop side of the callbacks -----------------------------------------------------------

    def _on_connected(self, session: _Session, packet_limit: int | None) -> None:
        if session is not self._session or session.ended.is_set():
            return
        session.connected_at = self._last_ack = time.monotonic()
        self._connected = True
        self._packet_limit = packet_limit
        log.info("connected to MQTT broker %s:%d%s", self._config.host, self._config.effective_port,
                 f" (MQTT 5, packets up to {packet_limit} bytes)" if packet_limit else "")
        self.connected_since = time.time()
        self._announced.clear()  # a new session: announce point tables again before their data
        self._cbor.new_connection()  # and carry them in band again
        self._start_backlog()
        if self.sparkplug is not None:
            self.sparkplug.connected()
        self.status_due.set()

    def _start_backlog(self) -> None:
        """What piled up while disconnected (or before this run, or while a Sparkplug primary host was
        offline) becomes a backlog range."""
        live_from = self._buffer.next_seq
        if live_from - 1 > self._cursor:
            self._backlog.append((self._cursor, live_from))
            self._cursor = live_from - 1
        self._wake.set()

    def _on_ack(self, session: _Session, mid: int, failed: bool, reason: str) -> None:
        if session is not self._session:
            return  # a previous connection's: its messages were queued again when it ended
        entry = self._inflight.pop(mid, None)
        if entry is None:
            return  # the status message or a meta message
        self._last_ack = time.monotonic()
        suspect = self._suspect
        if failed:
            # An MQTT 5 broker refused the message: it was not delivered. Its rows go back to the front.
            if reason in _TRANSIENT_REFUSALS:
                log.warning("device %s: the broker refused a message for now (%s); it is sent again",
                            entry.rows[0].device, reason)
            else:
                self._blame(entry, f"the broker refused it: {reason}")
            if suspect is not None:
                suspect.probing = False
            self._pending[:0] = [(entry.stream, row) for row in entry.rows]
        else:
            # The link is back once it carries data: a broker that accepts the agent and then drops it at
            # its first message is still failing (logged quietly), not recovered again and again.
            self._link.succeeded()
            self._acked.append(entry)
            if entry.tables is not None:  # later messages of the device need not carry them (invariant 4)
                self._cbor.carried(*entry.tables)
            if suspect is not None and entry.first_seq == suspect.seq:
                if suspect.probing:
                    self._probe_passed(suspect)
                else:
                    self._suspect = None  # it went through when sent again: the link, not the message
        self._wake.set()

    # --- client setup and teardown --------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        config = self._config
        client_id = config.client_id or f"edge-agent-{self._gateway.id}"
        # Reconnecting is ours (invariant 6): each connection is a new client, which ends with its link.
        if config.protocol == "5":
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                                 reconnect_on_failure=False)
        else:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                 clean_session=True, reconnect_on_failure=False)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_log = self._on_log
        # Only the connection's thread writes to the socket. paho writes a publish at once from the caller's
        # thread unless it runs its own thread (loop_start, which would also reconnect by itself) or this
        # callback is set; without it the event loop and paho's thread could interleave two packets' bytes.
        # paho's loop is woken through its socket pair and writes what is queued.
        client.on_socket_register_write = _write_in_network_thread
        client.max_inflight_messages_set(0)  # the window is ours (max_inflight); paho must not queue
        if self.sparkplug is not None:
            self.sparkplug.attach(client)  # the will is the NDEATH, with the next bdSeq
        else:
            # The broker publishes the will long after this moment: it carries no timestamp.
            client.will_set(self.status_topic, self._status_payload("offline", stamped=False), qos=1, retain=True)
        if config.username is not None:
            client.username_pw_set(config.username, read_password(config))
        if config.tls_enabled:
            assert config.tls is not None
            context = ssl.create_default_context(
                cafile=str(config.tls.ca_file) if config.tls.ca_file else None)
            if config.tls.cert_file and config.tls.key_file:
                context.load_cert_chain(str(config.tls.cert_file), str(config.tls.key_file))
            client.tls_set_context(context)
        return client

    def publish_status(self, details: dict[str, Any]) -> mqtt.MQTTMessageInfo | None:
        """Send the status message (retained), if connected. Returns paho's handle (`is_published()`: the
        broker acknowledged it), or None when not sent."""
        if not self._connected or self._stopping:
            return None
        if self.sparkplug is not None:  # node metrics, as NDATA (QoS 0: never counted as acknowledged)
            self.sparkplug.status(details)
            return None
        return self._publish_status("online", details)

    def publish_state(self, topic: str, payload: bytes, state: PollResult | None = None) -> bool:
        """A retained current-state message that is not buffered (live demand, out of date a second later;
        energy/records.py), if connected; QoS 0: the next one replaces it anyway. With Sparkplug, `state` (the
        same figures as readings of a device's stream) also goes to the Sparkplug host as DDATA, when its
        session is ready (agent/sparkplug, invariant 7); the JSON topic stays for its other consumers.
        Called on the event loop, like every publish (invariant 9's seq is counted here, in one order)."""
        if not self._connected or self._stopping or self._client is None:
            return False
        self._client.publish(topic, payload, qos=0, retain=True)
        if self.sparkplug is not None and state is not None:
            self.sparkplug.publish_live(state)
        return True

    def _status_payload(self, state: str, stamped: bool = True, details: dict[str, Any] | None = None) -> bytes:
        status: dict[str, Any] = {"schema": STATUS_SCHEMA, "state": state, "gateway": self._gateway.id,
                                  "site": self._gateway.site, "version": __version__}
        if stamped:
            status["ts"] = iso_utc(time.time())
        status.update(details or {})
        return json.dumps(status, separators=(",", ":")).encode()

    def _publish_status(self, state: str, details: dict[str, Any] | None = None) -> mqtt.MQTTMessageInfo | None:
        if self._client is None:
            return None
        return self._client.publish(self.status_topic, self._status_payload(state, details=details), qos=1,
                                    retain=True)

    async def _disconnect(self) -> None:
        self._stopping = True
        session = self._session
        if session is not None and not session.ended.is_set():
            if self.sparkplug is not None:
                self.sparkplug.stop()  # the NDEATH, as the will would have
            elif self._connected:
                # A clean DISCONNECT suppresses the will, so say "offline" ourselves first.
                self._publish_status("offline")
            session.client.disconnect()
            try:
                async with asyncio.timeout(2.0):
                    await session.ended.wait()
            except TimeoutError:
                pass  # still connecting: its thread ends on its own (a daemon thread never holds up the exit)
        self._connected = False


def _write_in_network_thread(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Nothing to do: the connection's thread writes (see `_make_client`)."""


def _grouped(batch: list[tuple[StoredBatch, str, str]]) -> dict[tuple[str, str, str], list[StoredBatch]]:
    groups: dict[tuple[str, str, str], list[StoredBatch]] = {}
    for row, topic, why in batch:
        groups.setdefault((row.device, topic, why), []).append(row)
    return groups


def describe_connect_error(exc: BaseException | None) -> str:
    """Why a connection attempt failed, in words that point at the fix."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS: the broker's certificate was not accepted ({exc.verify_message}); check mqtt.tls.ca_file "
                "and that mqtt.host is a name the certificate was issued for")
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc}); check the TLS settings of the broker and of [mqtt.tls]"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens on that host and port (check mqtt.host, mqtt.port and that " \
               "the broker runs)"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "connection timed out: the broker does not answer (network, firewall)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the broker's host name ({exc.strerror})"
    if isinstance(exc, OSError):
        return f"cannot connect: {exc.strerror or exc}"
    return "cannot connect"


# What an MQTT reason means for the technician: the setting to look at (CONNACK refusals and the reasons
# of a broker's DISCONNECT, MQTT 5 names as paho gives them; 3.1.1 return codes map onto the same names).
_REASON_HINTS = {
    "Unsupported protocol version": 'the broker does not speak this MQTT version: set mqtt.protocol = "3.1.1"',
    "Bad user name or password": "the broker refused the login; check mqtt.username and the password "
                                 "(password_file or password_env)",
    "Not authorized": "the broker refused the login or this client's topics; check mqtt.username, the password "
                      "(password_file or password_env) and the broker's access rules for the topics",
    "Client identifier not valid": "the broker refused mqtt.client_id (too long, or characters it does not take)",
    "Identifier rejected": "the broker refused mqtt.client_id (too long, or characters it does not take)",
    "Server unavailable": "the broker is up but not taking clients (starting, or overloaded)",
    "Banned": "the broker has banned this client",
    "Session taken over": "another client connected with the same mqtt.client_id",
    "Server shutting down": "the broker is shutting down (restart or maintenance)",
    "Keep alive timeout": "the broker heard nothing from the agent for 1.5 x mqtt.keepalive",
    "Topic Name invalid": "the broker refused a topic; check the names in it (gateway.site, gateway.id, device "
                          "names, mqtt.topic_prefix)",
    "Packet too large": "the broker refused a message as too large; set mqtt.max_message_bytes below its limit",
    "Message rate too high": "the broker limits this client's message rate",
    "Quota exceeded": "the broker's quota for this client is used up",
}


def describe_refusal(reason: str) -> str:
    """The broker answered CONNECT with a refusal (CONNACK)."""
    hint = _REASON_HINTS.get(reason)
    return f"the broker refused the connection: {reason}" + (f"; {hint}" if hint else "")


def describe_disconnect(reason: str, socket_error: str | None, *, from_broker: bool = False, connected: bool = True,
                        protocol_hint: str = "") -> str:
    """Why the link dropped, in words that point at the fix. paho's own reason is "Unspecified error" for
    most ends of a connection, so the circumstances say more: who ended it, and when."""
    if from_broker:
        hint = _REASON_HINTS.get(reason)
        return f"the broker disconnected the agent: {reason}" + (f"; {hint}" if hint else "")
    if socket_error is not None:
        text = socket_error.upper()
        if "CERTIFICATE_REQUIRED" in text:
            hint = "the broker requires a client certificate: set mqtt.tls.cert_file and mqtt.tls.key_file"
        elif "UNKNOWN_CA" in text or "BAD_CERTIFICATE" in text or "CERTIFICATE_UNKNOWN" in text:
            hint = "the broker did not accept the client certificate (mqtt.tls.cert_file): is it signed by a CA " \
                   "the broker trusts?"
        else:
            hint = ""
        return f"connection lost ({socket_error}){'; ' + hint if hint else ''}"
    if not connected and reason == "Keep alive timeout":  # paho's own CONNACK wait, as long as the keepalive
        return "the broker accepted the connection but did not answer the MQTT CONNECT within mqtt.keepalive" + \
            (f"; {protocol_hint}" if protocol_hint else "")
    if reason == "Keep alive timeout":
        return "no answer from the broker to the keepalive ping (mqtt.keepalive): the network path to it is broken"
    if reason == "Protocol error":
        return "the client could not accept the broker's answer (Protocol error); brokers answer so to a message " \
               "larger than their limit: set mqtt.max_message_bytes below it"
    if not connected:
        return "the broker closed the connection before accepting it" + (f"; {protocol_hint}" if protocol_hint else "")
    return "the broker closed the connection (restarted, or refused what the agent sent: its log says which)"


def read_password(config: MqttConfig) -> str | None:
    """The broker password from its file or environment variable; never logged."""
    if config.password_file is not None:
        return config.password_file.read_text(encoding="utf-8").splitlines()[0] if \
            config.password_file.stat().st_size else ""
    if config.password_env is not None:
        return os.environ.get(config.password_env)
    return None
