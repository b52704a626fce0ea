"""The MQTT uplink: sends what the buffer holds, and deletes a row only after the broker's PUBACK.

Invariants:
1. Only the buffer is sent. A row is handed to paho-mqtt at QoS 1 and stays in the buffer; it is deleted
   when paho reports the PUBACK for that message id (`on_publish`), never when `publish()` returns:
   "handed to the client library" is not "delivered".
2. At most `max_inflight` messages await their PUBACK, so throughput does not wait on the broker's round
   trip and memory stays bounded however large the backlog: the backlog lives on disk, read in windows.
   A message carries the polls of one device, as many as fit `max_message_bytes`: live usually one, in a
   backlog many. Rows read but not yet sent wait in a bounded list and go first at the next fill.
3. Live and backlog together: at each (re)connect, the rows already in the buffer become a backlog range.
   Each fill of the window gives the live stream (rows committed since) at most half and the backlog the
   rest, so after an outage the platform's live view recovers at once while the backlog drains at full
   speed, and neither starves. Within the live stream and within each backlog range, rows go out in
   sequence order over one connection, and MQTT keeps that order per topic: a device's readings arrive in
   order within each stream; a live reading may overtake the same device's backlog.
4. Compact encoding (agent/compact.py): before the first message of a device that names a point table
   not yet announced on this connection, the device's tables are published, retained, on its meta topic
   - on the same connection, so the broker forwards them first. Each row is sent in the encoding it was
   stored in: after `encoding` was changed, the backlog goes out in the old one.
5. When the link drops, messages in flight stay with paho, which re-sends them (DUP) after reconnecting;
   their rows are still in the buffer. If the agent stops or crashes first, they are sent again by the
   next run: the cost of a crash is duplicates, which the platform drops by sequence number, never a loss.

paho-mqtt runs its network loop in its own thread (`loop_start`); its callbacks only hand events to the
event loop with `call_soon_threadsafe`. Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import ssl
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from agent import __version__
from agent.compact import CONTENT_TYPE as CBOR_CONTENT_TYPE
from agent.compact import CborEncoder, meta_message
from agent.config import GatewayConfig, MqttConfig
from agent.health import FailureLog
from agent.payload import CONTENT_TYPE as JSON_CONTENT_TYPE
from agent.payload import STATUS_SCHEMA, Encoder, Topics, iso_utc
from buffer.store import Buffer, StoredBatch

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _InFlight:
    seqs: list[int]  # the buffer rows the message carries
    readings: int


LIVE, BACKLOG = 0, 1
ROWS_READ_PER_MESSAGE = 16  # how many rows a fill reads per free window slot, so that messages can batch


class MqttUplink:
    def __init__(self, config: MqttConfig, gateway: GatewayConfig, buffer: Buffer) -> None:
        self._config = config
        self._gateway = gateway
        self._buffer = buffer
        self._wake = asyncio.Event()
        self._inflight: dict[int, _InFlight] = {}
        self._acked: list[_InFlight] = []
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
        self._socket_error: str | None = None
        self._client: mqtt.Client | None = None
        self.readings_delivered = 0
        self.messages_delivered = 0
        self.topics = Topics(config.data_topic, config.status_topic, config.topic_prefix, gateway.site, gateway.id,
                             config.meta_topic)
        self.status_topic = self.topics.status
        # Set on every (re)connect: the agent then sends a full status message at once.
        self.status_due = asyncio.Event()

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
        self._client = client = self._make_client()
        client.connect_async(self._config.host, self._config.effective_port,
                             keepalive=round(self._config.keepalive))
        client.loop_start()
        try:
            await self._pump(client)
        finally:
            await self._disconnect(client)

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

    # --- the pump: buffer -> broker ---------------------------------------------------------------

    async def _pump(self, client: mqtt.Client) -> None:
        storage = FailureLog("uplink reading the buffer", log)
        delay = 0.5
        while True:
            self._wake.clear()
            try:
                # Send first: room in the window is freed by the acks themselves, so deleting what was
                # acknowledged (a write to the buffer, behind the writer's commits) can wait until after.
                if self._connected and not self._stopping:
                    await self._fill_window(client)
                await self._delete_acked()
            except Exception as exc:  # noqa: BLE001 - a disk error must not end the uplink; nothing is lost
                storage.failed(exc, "sending pauses, the rows stay in the buffer")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            storage.succeeded()
            delay = 0.5
            await self._wake.wait()

    async def _fill_window(self, client: mqtt.Client) -> None:
        room = self._config.max_inflight - len(self._inflight)
        if room <= 0:
            return
        if not self._pending:
            await self._read_rows(room)
        await self._announce_tables(client)
        sent = self._send_pending(client, room)
        if sent < room and not self._pending:  # everything pending went out: read on, within the room left
            await self._read_rows(room - sent)
            await self._announce_tables(client)
            self._send_pending(client, room - sent)

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

    def _send_pending(self, client: mqtt.Client, room: int) -> int:
        """Group pending rows into messages per stream and device (oldest first, at most max_message_bytes)
        and send up to `room` of them: live first up to half the room, then the backlog, then more live.
        Only whole prefixes of each stream go, so a device's rows stay in order."""
        chunks: dict[int, list[list[StoredBatch]]] = {LIVE: [], BACKLOG: []}
        open_chunks: dict[tuple[int, str, bool], tuple[list[StoredBatch], int]] = {}
        limit = self._config.max_message_bytes
        for stream, row in self._pending:
            compact = row.table is not None
            key = (stream, row.device, compact)
            chunk, size = open_chunks.get(key, ([], 0))
            framer = self._cbor if compact else self._json
            if not chunk or framer.framed_size(row.device, size + len(row.payload), len(chunk) + 1) > limit:
                chunk, size = [], 0
                chunks[stream].append(chunk)
            chunk.append(row)
            open_chunks[key] = (chunk, size + len(row.payload))
        live_first = min(len(chunks[LIVE]), max(1, room // 2) if chunks[BACKLOG] else room)
        backlog = min(len(chunks[BACKLOG]), room - live_first)
        live = min(len(chunks[LIVE]), room - backlog)
        self._pending = [(stream, row) for stream, count in ((LIVE, live), (BACKLOG, backlog))
                         for chunk in chunks[stream][count:] for row in chunk]
        to_send = [(LIVE, chunk) for chunk in chunks[LIVE][:live]] + \
                  [(BACKLOG, chunk) for chunk in chunks[BACKLOG][:backlog]]
        for index, (_, chunk) in enumerate(to_send):
            try:
                self._publish(client, chunk)
            except Exception:
                # This chunk and the ones after it were not sent: back to the front, in order.
                self._pending[:0] = [(stream, row) for stream, unsent in to_send[index:] for row in unsent]
                raise
        return live + backlog

    def _publish(self, client: mqtt.Client, rows: list[StoredBatch]) -> None:
        device, compact = rows[0].device, rows[0].table is not None
        payload = (self._cbor if compact else self._json).frame(device, [row.payload for row in rows])
        info = client.publish(self.topics.data(device), payload, qos=1, properties=self._content_type(compact))
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            # Not queued by paho at all: the caller puts the rows back; tried again after a pause.
            raise RuntimeError(f"the MQTT client refused a message: {mqtt.error_string(info.rc)}")
        # MQTT_ERR_NO_CONN: the link dropped just now; paho keeps the message and sends it on reconnect.
        self._inflight[info.mid] = _InFlight([row.seq for row in rows], sum(row.count for row in rows))

    async def _delete_acked(self) -> None:
        if not self._acked:
            return
        acked, self._acked = self._acked, []
        try:
            await self._buffer.delete([seq for a in acked for seq in a.seqs])
        except Exception:
            self._acked = acked + self._acked  # retried on the next wake; a failed delete loses nothing
            raise
        self.readings_delivered += sum(a.readings for a in acked)
        self.messages_delivered += len(acked)

    # --- paho callbacks (paho's thread) -> event loop ---------------------------------------------

    def _from_paho(self, callback: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback, *args)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        text = str(reason)
        if reason.is_failure and any(word in text.lower() for word in ("authori", "password", "user name")):
            text += ": the broker refused the login; check mqtt.username and the password (password_file or " \
                    "password_env)"
        self._from_paho(self._connection_changed, not reason.is_failure, text)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError:` around the connect: the exception says why.
        self._from_paho(self._connection_changed, False, describe_connect_error(sys.exc_info()[1]))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        detail, self._socket_error = self._socket_error, None
        self._from_paho(self._connection_changed, False, describe_disconnect(str(reason), detail))

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        # paho reports why a socket failed only in its log (e.g. a TLS alert after the handshake); keep the
        # last such line for the disconnect message. Its error lines never hold credentials.
        if level in (mqtt.MQTT_LOG_ERR, mqtt.MQTT_LOG_WARNING):
            self._socket_error = text

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        self._from_paho(self._on_ack, mid, reason.is_failure, str(reason))

    # --- event-loop side of the callbacks -----------------------------------------------------------

    def _connection_changed(self, connected: bool, reason: str) -> None:
        was = self._connected
        self._connected = connected
        if connected:
            self._link.succeeded()
            if not was:
                log.info("connected to MQTT broker %s:%d", self._config.host, self._config.effective_port)
                self._announced.clear()  # a new session: announce point tables again before their data
                # What piled up while disconnected (or before this run) becomes a backlog range.
                live_from = self._buffer.next_seq
                if live_from - 1 > self._cursor:
                    self._backlog.append((self._cursor, live_from))
                    self._cursor = live_from - 1
                self.status_due.set()
        elif not self._stopping:
            self._link.failed(reason, f"{len(self._inflight)} messages in flight stay in the buffer; "
                                      "reconnecting with backoff")
            self._jitter_reconnect()
        self._wake.set()

    def _jitter_reconnect(self) -> None:
        """Spread reconnects: after a platform broker restart, hundreds of gateways must not all come back
        in the same second. paho doubles the delay from its minimum; a random minimum per attempt
        decorrelates the whole sequence."""
        if self._client is not None:
            low, high = self._config.reconnect_min, self._config.reconnect_max
            self._client.reconnect_delay_set(min_delay=random.uniform(low, min(2 * low, high)), max_delay=high)

    def _on_ack(self, mid: int, failed: bool, reason: str) -> None:
        entry = self._inflight.pop(mid, None)
        if entry is None:
            return  # the status message, or an ack for a message of a previous connection already counted
        if failed:
            # An MQTT 5 broker refused the message (e.g. quota exceeded): it was not delivered. It is queued
            # again as a one-row backlog range.
            log.error("broker refused a message of %d readings (rows from %d): %s; they stay in the buffer and "
                      "are sent again", entry.readings, entry.seqs[0], reason)
            self._backlog.extendleft((seq - 1, seq + 1) for seq in reversed(entry.seqs))
        else:
            self._acked.append(entry)
        self._wake.set()

    # --- client setup and teardown --------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        config = self._config
        client_id = config.client_id or f"edge-agent-{self._gateway.id}"
        if config.protocol == "5":
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        else:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                 clean_session=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_log = self._on_log
        client.max_inflight_messages_set(0)  # the window is ours (max_inflight); paho must not queue
        client.reconnect_delay_set(min_delay=config.reconnect_min, max_delay=config.reconnect_max)
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
        return self._publish_status("online", details)

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

    async def _disconnect(self, client: mqtt.Client) -> None:
        self._stopping = True
        if self._connected:
            # A clean DISCONNECT suppresses the will, so say "offline" ourselves first.
            self._publish_status("offline")
        client.disconnect()
        await asyncio.to_thread(client.loop_stop)
        self._connected = False


def describe_connect_error(exc: BaseException | None) -> str:
    """Why a connection attempt failed, in words that point at the fix."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS: the broker's certificate was not accepted ({exc.verify_message}); check mqtt.tls.ca_file "
                "and that mqtt.host is a name the certificate was issued for")
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc}); check the TLS settings of the broker and of [mqtt.tls]"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens on that host and port"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "connection timed out: the broker does not answer (network, firewall)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the broker's host name ({exc.strerror})"
    if isinstance(exc, OSError):
        return f"cannot connect: {exc.strerror or exc}"
    return "cannot connect"


def describe_disconnect(reason: str, socket_error: str | None) -> str:
    """Why the link dropped. paho's reason is often just "Unspecified error"; its socket error says more."""
    if socket_error is None:
        return f"disconnected: {reason}"
    text = socket_error.upper()
    if "CERTIFICATE_REQUIRED" in text:
        hint = "the broker requires a client certificate: set mqtt.tls.cert_file and mqtt.tls.key_file"
    elif "UNKNOWN_CA" in text or "BAD_CERTIFICATE" in text or "CERTIFICATE_UNKNOWN" in text:
        hint = "the broker did not accept the client certificate (mqtt.tls.cert_file): is it signed by a CA the " \
               "broker trusts?"
    else:
        hint = ""
    return f"disconnected: {reason} ({socket_error}){'; ' + hint if hint else ''}"


def read_password(config: MqttConfig) -> str | None:
    """The broker password from its file or environment variable; never logged."""
    if config.password_file is not None:
        return config.password_file.read_text(encoding="utf-8").splitlines()[0] if \
            config.password_file.stat().st_size else ""
    if config.password_env is not None:
        return os.environ.get(config.password_env)
    return None
