"""The compact wire encoding: CBOR (RFC 8949), selected with `[mqtt] encoding = "cbor"`. Specified for the
platform in docs/payload.md ("The compact encoding").

The same messages as the JSON encoding, without the text that repeats: a poll carries its time, its first
sequence number, the id of a point table and its values in table order; point names and units travel in
the tables, now and then in the data messages themselves (below) and in a retained JSON message on the
meta topic, which lists the tables by id. A value is a CBOR
integer, boolean, text or null, a float32 when the value is a float32 shown by its shortest decimal (what a
meter's float32 register decodes to, and what the JSON encoding writes as that decimal: the same value, in
5 bytes), or else a float64. Quality, reasons and device timestamps ride in an optional map keyed by
position, so a poll of good numbers costs nothing for them.

Like the JSON encoder, a poll is encoded once (a "fragment", stored in the buffer) and a message is its
fragments joined under a header by byte concatenation: the polls are an indefinite-length array.

Tables: a device's table is declared from its configuration (`declare`), points in configuration order;
its id is the first 8 hex digits of the SHA-256 of its JSON, so the same points always give the same id
and an id never changes meaning. A poll that holds a point the table lacks (a driver that reports points
it was not configured with) makes a new table with that point added, never a failure. New tables are
handed to the buffer with the rows that use them (`take_tables`), so a row on disk is always decodable.

Tables travel in band. MQTT orders messages within one topic only: a table published on the meta topic
can reach a subscriber after the data that names it (aedes), or never (RabbitMQ 3.10 does not deliver
retained messages to wildcard subscriptions). So a data message carries, under "tables", every table its
polls name that no acknowledged message of the device carried on this connection in the last
TABLE_REPEAT seconds. The invariant that follows from per-topic order alone: before a subscriber gets a
message naming a table without carrying it, it got (on the same topic, from the same connection) a
message that carried it; a subscriber that joined later gets it again within TABLE_REPEAT. Until an
acknowledgement comes back every message carries the table, so one the broker refuses or a link that
drops cannot leave a table unsent. The uplink tells the encoder which tables a device has
(`tables_known`), when a connection starts (`new_connection`) and what was acknowledged (`carried`); the
retained meta message stays, for subscribers that join late on brokers that keep it.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from agent.floats import shortest_float32
from agent.model import Float32, PollResult, Quality, Reading
from agent.payload import bad_if_unsendable

CBOR_SCHEMA = "edge-agent/cbor/v1"
META_SCHEMA = "edge-agent/meta/v1"
CONTENT_TYPE = "application/cbor"
SELF_DESCRIBED = b"\xd9\xd9\xf7"  # tag 55799: marks the bytes as CBOR (a JSON message starts with "{")
_POLLS_OPEN, _BREAK = b"\x9f", b"\xff"  # an indefinite-length array and its end

_F32, _F64 = struct.Struct(">f"), struct.Struct(">d")
_pack_f32, _unpack_f32, _pack_f64 = _F32.pack, _F32.unpack, _F64.pack
_TRUE, _FALSE, _NULL = b"\xf5", b"\xf4", b"\xf6"
# Seconds after which a device's tables ride in its data again: how long a subscriber that joined late on a
# broker that keeps no retained meta waits for them. At 1 s polls of 50 points it costs ~0.3 bytes a reading.
TABLE_REPEAT = 60.0


class Table(NamedTuple):
    id: str
    points: tuple[tuple[str, str | None], ...]  # (point, unit) in value order
    index: dict[tuple[str, str | None], int]
    text: str  # the JSON of the points, as the meta message and the buffer carry it


def table_of(points: Iterable[tuple[str, str | None]]) -> Table:
    points = tuple(points)
    text = json.dumps([{"point": p} if u is None else {"point": p, "unit": u} for p, u in points],
                      separators=(",", ":"), ensure_ascii=False)
    table_id = hashlib.sha256(text.encode()).hexdigest()[:8]
    return Table(table_id, points, {key: i for i, key in enumerate(points)}, text)


class CborEncoder:
    def __init__(self, gateway: str, site: str, buffer_id: str) -> None:
        fields = b"".join(item(key) + item(value) for key, value in
                          (("schema", CBOR_SCHEMA), ("gateway", gateway), ("site", site), ("buffer_id", buffer_id)))
        self._head = SELF_DESCRIBED + _header(0xA0, 6) + fields + item("device")
        self._head_with_tables = SELF_DESCRIBED + _header(0xA0, 7) + fields + item("device")
        self._polls_key, self._tables_key = item("polls"), item("tables")
        # In-band tables: per device, the CBOR of each table it has (id item + table, as "tables" holds it),
        # and when a message carrying it was last acknowledged on this connection (monotonic seconds).
        self._inline: dict[str, dict[str, bytes]] = {}
        self._carried: dict[str, dict[str, float]] = {}
        self._tables: dict[str, Table] = {}  # device -> its table now
        self._stored: dict[str, Table] = {}  # device -> the table last handed out to be stored with rows
        self._new: list[tuple[str, str, str]] = []  # (device, table id, points JSON) not yet handed out
        self._devices: dict[str, bytes] = {}
        self._table_ids: dict[str, bytes] = {}

    # --- tables -----------------------------------------------------------------------------------

    def declare(self, device: str, points: Iterable[tuple[str, str | None]]) -> None:
        """The device's points from its configuration: its polls are encoded against them. A driver that
        reads them in another order (Modbus: by register) gets a table in that order at its first poll."""
        self._tables[device] = table_of(points)

    def take_tables(self) -> list[tuple[str, str, str]]:
        """Tables that fragments used since the last call, as (device, id, points JSON), to be stored with
        those fragments."""
        new, self._new = self._new, []
        return new

    # --- tables in band (see the module's docstring) -----------------------------------------------------

    def tables_known(self, device: str, tables: dict[str, str]) -> None:
        """The device's tables by id (points JSON, as the buffer stores them): what its messages may carry.
        Called before any message of the device is framed on a connection."""
        known = self._inline.get(device, {})
        self._inline[device] = {table_id: known.get(table_id) or item(table_id) + item(json.loads(text))
                                for table_id, text in tables.items()}

    def new_connection(self) -> None:
        """A new MQTT connection: a subscriber may have joined in between, so every table rides again."""
        self._carried.clear()

    def due(self, device: str, table_ids: Iterable[str | None], now: float | None = None) -> list[str]:
        """Of the tables some polls name, those their message must carry (sorted)."""
        now = time.monotonic() if now is None else now
        carried, known = self._carried.get(device, {}), self._inline.get(device, {})
        return sorted({table_id for table_id in table_ids if table_id in known and
                       now - carried.get(table_id, -math.inf) >= TABLE_REPEAT})

    def carried(self, device: str, table_ids: Iterable[str], now: float | None = None) -> None:
        """The broker acknowledged a message of the device that carried these tables."""
        now = time.monotonic() if now is None else now
        self._carried.setdefault(device, {}).update(dict.fromkeys(table_ids, now))

    def _due_bytes(self, device: str, now: float | None) -> int:
        """What the tables a message of the device would carry now add to it (all of its due tables: the
        size limit must hold whichever of them its polls name)."""
        known = self._inline.get(device)
        if not known:
            return 0
        due = self.due(device, known, now)
        if not due:
            return 0
        return len(self._tables_key) + len(_header(0xA0, len(due))) + sum(len(known[t]) for t in due)

    def _use(self, device: str, table: Table) -> Table:
        self._tables[device] = table
        return table

    def _table_for(self, result: PollResult) -> tuple[Table, list[int] | None]:
        """The device's table and, unless the poll holds its points in table order, their positions."""
        readings = result.readings
        table = self._tables.get(result.device)
        if table is not None:
            points = table.points
            if len(points) == len(readings):
                for reading, (point, unit) in zip(readings, points, strict=True):
                    if reading[0] != point or reading[2] != unit:
                        break
                else:
                    return table, None
            index = table.index
            positions = [index.get((r[0], r[2]), -1) for r in readings]
            if -1 not in positions:
                if len(positions) < len(points) or len(set(positions)) < len(positions):
                    return table, positions
                # Every point, in another order: the order the driver reads in becomes the table's.
                table = self._use(result.device, table_of((r[0], r[2]) for r in readings))
                return table, None
            known = table.points
        else:
            known = ()
        seen = set(known)
        added = [key for key in ((r[0], r[2]) for r in readings) if not (key in seen or seen.add(key))]
        table = self._use(result.device, table_of(known + tuple(added)))
        if table.points == tuple((r[0], r[2]) for r in readings):
            return table, None
        return table, [table.index[(r[0], r[2])] for r in readings]

    # --- polls and messages -------------------------------------------------------------------------

    def fragment(self, result: PollResult, first_seq: int) -> tuple[bytes, str]:
        """One poll as a fragment of a message, and the id of the table it uses. Never fails: a value CBOR
        cannot carry (NaN, an unknown type) is sent as a bad reading, as in the JSON encoding."""
        table, positions = self._table_for(result)
        stored = self._stored.get(result.device)
        if stored is not table and (stored is None or stored.id != table.id):
            self._stored[result.device] = table
            self._new.append((result.device, table.id, table.text))
        readings = result.readings
        values = _good_values(readings)
        extra: dict[str, Any] = {}
        if values is None:
            values, extra = _values_and_extra(readings)
        if positions is not None:
            extra["points"] = positions
        return b"".join((_header(0x80, 5 if extra else 4), item(int(result.ts * 1000)), item(first_seq),
                         self._table_ids.get(table.id) or self._table_item(table.id),
                         _header(0x80, len(readings)), *values, item(extra) if extra else b"")), table.id

    def _table_item(self, table_id: str) -> bytes:
        encoded = self._table_ids[table_id] = item(table_id)
        return encoded

    def frame(self, device: str, polls: list[bytes], tables: Iterable[str] = ()) -> bytes:
        """The message for some polls of one device, oldest first, carrying `tables` (ids from `due`)."""
        known = self._inline.get(device, {})
        carry = [known[table_id] for table_id in tables]
        if not carry:
            return b"".join((self._head, self._device(device), self._polls_key, _POLLS_OPEN, *polls, _BREAK))
        # "tables" before "polls": a streaming decoder has the tables before the values that need them.
        return b"".join((self._head_with_tables, self._device(device), self._tables_key,
                         _header(0xA0, len(carry)), *carry, self._polls_key, _POLLS_OPEN, *polls, _BREAK))

    def framed_size(self, device: str, polls_bytes: int, polls: int, now: float | None = None) -> int:
        """At most the length of `frame` for these polls now, tables it would carry included."""
        return len(self._head) + len(self._device(device)) + len(self._polls_key) + 2 + polls_bytes + \
            self._due_bytes(device, now)

    def message(self, result: PollResult, first_seq: int) -> bytes:
        """A single poll as a whole message (tests, tools)."""
        return self.frame(result.device, [self.fragment(result, first_seq)[0]])

    def _device(self, device: str) -> bytes:
        encoded = self._devices.get(device)
        if encoded is None:
            encoded = self._devices[device] = item(device)
        return encoded


def meta_message(gateway: str, site: str, device: str, tables: dict[str, str]) -> bytes:
    """The retained meta message of a device: its point tables by id (JSON text of each, as stored)."""
    head = json.dumps({"schema": META_SCHEMA, "gateway": gateway, "site": site, "device": device},
                      separators=(",", ":"), ensure_ascii=False)
    body = ",".join(f"{json.dumps(table_id)}:{text}" for table_id, text in sorted(tables.items()))
    return f'{head[:-1]},"tables":{{{body}}}}}'.encode()


def decode_polls(message: Any, tables: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """A decoded compact message's polls in the JSON encoding's shape ({ts (epoch seconds), readings}),
    given the device's tables by id (from its meta messages and earlier data messages); the tables the
    message carries are added to `tables`. For the monitor and tests; a platform does the same in its own
    language. Raises KeyError for a table neither the message nor `tables` holds."""
    carried = message.get("tables")
    if carried is not None:
        if not isinstance(carried, Mapping):
            raise TypeError(f"tables is a {type(carried).__name__}, not a map")
        tables.update(carried)
    polls = []
    for poll in message["polls"]:
        ts_ms, seq, table_id, values, *rest = poll
        extra = rest[0] if rest else {}
        points = tables[table_id]
        positions = extra.get("points") or range(len(values))
        qualities, reasons = extra.get("quality", {}), extra.get("reason", {})
        readings = []
        for i, (position, value) in enumerate(zip(positions, values, strict=True)):
            reading = {"seq": seq + i, "point": points[position]["point"], "value": value,
                       "quality": qualities.get(i, "good")}
            if "unit" in points[position]:
                reading["unit"] = points[position]["unit"]
            if i in reasons:
                reading["reason"] = reasons[i]
            for key in ("source_ts", "server_ts"):
                if i in extra.get(key, {}):
                    reading[key] = extra[key][i] / 1000
            readings.append(reading)
        polls.append({"ts": ts_ms / 1000, "readings": readings})
    return polls


# --- values ---------------------------------------------------------------------------------------------

def _good_values(readings: tuple[Reading, ...]) -> list[bytes] | None:
    """The encoded values when every reading is good, sendable and without device timestamps (the common
    poll), else None. The same bytes as the general path (a test holds them equal), in less time."""
    out: list[bytes] = []
    append = out.append
    good = Quality.GOOD
    for _, value, _, quality, _, source_ts, server_ts in readings:
        if quality is not good or source_ts is not None or server_ts is not None:
            return None
        kind = type(value)
        if kind is Float32 and value - value == 0.0:  # not NaN or infinite: JSON makes those bad readings
            append(b"\xfa" + _pack_f32(value))
        elif kind is float or kind is Float32:
            encoded = _float(value)
            if encoded is None:
                return None
            append(encoded)
        elif kind is int:
            append(_small_ints[value] if 0 <= value < 256 else item(value))
        elif kind is bool:
            append(_TRUE if value else _FALSE)
        elif kind is str:
            append(item(value))
        else:
            return None
    return out


def _values_and_extra(readings: tuple[Reading, ...]) -> tuple[list[bytes], dict[str, Any]]:
    values: list[bytes] = []
    extra: dict[str, Any] = {}
    for i, reading in enumerate(readings):
        value = reading.value
        kind = type(value)
        encoded: bytes | None
        if kind is Float32 and value - value == 0.0:  # type: ignore[operator]
            encoded = b"\xfa" + _pack_f32(value)
        elif kind is float or kind is Float32:
            encoded = _float(value)  # type: ignore[arg-type]
        elif value is None:
            encoded = _NULL
        elif kind in (int, bool, str):
            encoded = item(value)
        else:
            encoded = None
        if encoded is None:
            reading = bad_if_unsendable(reading)
            encoded = _NULL
        values.append(encoded)
        if reading.quality is not Quality.GOOD:
            extra.setdefault("quality", {})[i] = reading.quality.value
            if reading.reason:
                extra.setdefault("reason", {})[i] = reading.reason
        for key, ts in (("source_ts", reading.source_ts), ("server_ts", reading.server_ts)):
            if ts is not None and ts - ts == 0.0:
                extra.setdefault(key, {})[i] = int(ts * 1000)
    return values, extra


# --- CBOR items ---------------------------------------------------------------------------------------

def _float(value: float) -> bytes | None:
    """float32 when that loses nothing (the value is a float32 or its shortest decimal), else float64;
    None for NaN and infinities, which the JSON encoding cannot carry either."""
    if value - value != 0.0:
        return None
    try:
        single = _pack_f32(value)
    except OverflowError:
        return b"\xfb" + _pack_f64(value)
    narrowed = _unpack_f32(single)[0]
    if narrowed == value or shortest_float32(narrowed) == value:
        return b"\xfa" + single
    return b"\xfb" + _pack_f64(value)


_small_ints = [bytes((n,)) if n < 24 else bytes((24, n)) for n in range(256)]


def _header(major: int, length: int) -> bytes:
    """The head of an item: major type (0x00 unsigned, 0x20 negative, 0x40 bytes, 0x60 text, 0x80 array,
    0xA0 map) and its argument."""
    if length < 24:
        return bytes((major | length,))
    if length < 0x100:
        return bytes((major | 24, length))
    if length < 0x10000:
        return bytes((major | 25,)) + length.to_bytes(2, "big")
    if length < 0x100000000:
        return bytes((major | 26,)) + length.to_bytes(4, "big")
    return bytes((major | 27,)) + length.to_bytes(8, "big")


def item(value: Any) -> bytes:
    """One CBOR item of the few kinds the messages use."""
    if value is None:
        return _NULL
    if value is True:
        return _TRUE
    if value is False:
        return _FALSE
    if isinstance(value, int):
        if value >= 0:
            if value < 1 << 64:
                return _header(0x00, value)
            magnitude, tag = value, b"\xc2"  # bignums (tags 2 and 3): no meter sends them, but never fail
        else:
            if value >= -(1 << 64):
                return _header(0x20, -1 - value)
            magnitude, tag = -1 - value, b"\xc3"
        return tag + item(magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "big"))
    if isinstance(value, float):
        return _float(value) or b"\xfb" + _pack_f64(value)
    if isinstance(value, str):
        encoded = value.encode()
        return _header(0x60, len(encoded)) + encoded
    if isinstance(value, bytes):
        return _header(0x40, len(value)) + value
    if isinstance(value, list | tuple):
        return _header(0x80, len(value)) + b"".join(item(v) for v in value)
    if isinstance(value, dict):
        return _header(0xA0, len(value)) + b"".join(item(k) + item(v) for k, v in value.items())
    raise TypeError(f"no CBOR item for {type(value).__name__}")
