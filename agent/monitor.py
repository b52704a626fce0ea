"""The platform's view of what agents deliver: subscribes to the broker, checks every data message against
the wire format (docs/payload.schema.json) and accounts for it per gateway and buffer: sequence numbers
(received, duplicates, gaps, out of order), rate, latency from poll to arrival, per-device health and the
gateways' status messages. `edge-agent monitor` prints it for integrators commissioning a gateway; the
demo's live view, the test suite and the benchmarks use `Monitor` directly.

How it works, and what it promises:

- paho's network thread only stamps each message with its arrival time and queues it; a second thread
  decodes, validates and accounts. jsonschema costs tens of microseconds per reading, and a burst of
  messages (every device polled on the same second) would otherwise queue in the socket and show up as
  latency that the agent never caused.
- A gap is a sequence number missing between the first number seen and the highest of a (gateway,
  buffer_id). A message re-sent after a reconnect can arrive after newer ones, so a missing number only
  counts as lost once a higher number arrived more than `gap_grace` seconds ago; until then it is
  "pending". Numbers below the first one seen were sent before the monitor subscribed: never gaps.
- An invalid message is counted against its gateway (from the topic) and not accounted further, as a
  platform would park it: its readings show as a gap too.
- A compact message that names a point table not received yet (neither in a data message nor on the meta
  topic: a monitor that joined late, a broker that keeps no retained meta) waits, as docs/payload.md tells
  a platform to, and is accounted when the table arrives (the agent sends it again within a minute). One
  still waiting when the monitor stops is invalid.
- Sparkplug B (`[mqtt] encoding = "sparkplug"`, subscribe to `spBv1.0/#`): the edge node counts as the
  gateway, the NBIRTH names its buffer_id, each DBIRTH its device's metrics by alias; a DDATA is accounted
  like a JSON message by the "seq" property of each metric, a metric in a folder ("demand/energy") as a
  reading of that stream ("incomer-1/demand"), so windows and alarms reach the energy view as in JSON. A
  DDATA seen before those births is invalid.
- Memory stays bounded on long runs: a window of one byte per sequence number (older numbers folded into
  a list of missing ranges), a fixed number of latency samples per stream.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import functools
import json
import logging
import math
import queue
import signal
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import cache
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from jsonschema import Draft202012Validator, FormatChecker
from paho.mqtt.enums import CallbackAPIVersion

from agent.compact import CBOR_SCHEMA, META_SCHEMA, SELF_DESCRIBED, decode_polls
from agent.payload import SCHEMA, STATUS_SCHEMA, iso_utc
from energy.records import ALARM_STREAM, WINDOW_STREAM
from energy.watch import EnergyView, MeterReport, meter_lines

log = logging.getLogger(__name__)

ERRORS_KEPT = 5               # validation errors remembered per gateway
ERRORS_PER_MESSAGE = 3
ERROR_TEXT_MAX = 200
LATENCY_SAMPLES = 10_000      # per stream, for the percentiles
INBOX_MESSAGES = 10_000       # received, not yet accounted; a full inbox slows the network thread down
ENERGY_STREAMS = (WINDOW_STREAM, ALARM_STREAM)  # a meter's streams: one topic level below its device's
WAITING_MAX = 10_000          # compact messages waiting for their point table, all gateways together
SEQ_WINDOW = 1 << 22          # sequence numbers held one byte each (4 MiB) before the oldest are folded
HIGH_WATER_STEP = 0.1         # seconds: resolution of "when was this number first exceeded"
RATE_BUCKET = 0.1             # seconds
CONNECT_TIMEOUT = 5.0         # `edge-agent monitor`: give up on the broker after this long


class BrokerUnavailable(ConnectionError):
    """The broker could not be reached, or refused the connection."""


@cache
def payload_validator() -> Draft202012Validator:
    """The v1 data-message schema, shipped in the package (a copy of docs/payload.schema.json)."""
    schema = json.loads(resources.files("agent").joinpath("payload.schema.json").read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    # jsonschema only checks "date-time" when rfc3339-validator is installed; do not depend on that.
    formats = FormatChecker(formats=())
    formats.checks("date-time", raises=ValueError)(_is_date_time)
    return Draft202012Validator(schema, format_checker=formats)


def _is_date_time(value: object) -> bool:
    if isinstance(value, str):
        datetime.fromisoformat(value)
    return True


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def with_lock(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return with_lock


class SeqSet:
    """Which sequence numbers arrived, one byte each: compact for the millions a benchmark produces.

    The bytes start at the first number seen, so joining a gateway at seq 2_000_000_000 costs nothing.
    When they would outgrow `window`, the older half is folded into sorted missing ranges: below the window
    a number counts as seen unless it lies in one of them. Memory: `window` bytes plus one range per gap.
    """

    def __init__(self, window: int = SEQ_WINDOW) -> None:
        # Numbers arrive on the monitor's worker thread while tests and benchmarks ask from theirs; folding
        # rewrites the ranges, so every public method holds this (re-entrant: missing() asks `in`).
        self._lock = threading.RLock()
        self._window = max(window, 2)
        self._seen = bytearray()
        self._base = 0                       # the number _seen[0] stands for
        self._folded: list[list[int]] = []   # [first, last] missing, sorted, all below _base
        self.count = 0
        self.duplicates = 0
        self.highest = 0
        self.first = 0    # the first number seen: gaps are counted from here
        self.lowest = 0

    @_locked
    def add(self, seq: int) -> None:
        if not self.count:
            self._base = self.first = self.lowest = self.highest = seq
        if seq >= self._base:
            index = seq - self._base
            if index >= self._window:
                self._fold(seq + 1 - self._window // 2)
                index = seq - self._base
            if index >= len(self._seen):
                size = min(self._window, max(index + 1, 2 * len(self._seen)))
                self._seen.extend(bytes(size - len(self._seen)))
            if self._seen[index]:
                self.duplicates += 1
                return
            self._seen[index] = 1
        elif seq < self.lowest:
            if seq + 1 < self.lowest:
                self._folded.insert(0, [seq + 1, self.lowest - 1])
            self.lowest = seq
        elif not self._unfold(seq):
            self.duplicates += 1
            return
        self.count += 1
        self.highest = max(self.highest, seq)

    @_locked
    def __contains__(self, seq: int) -> bool:
        if seq >= self._base:
            index = seq - self._base
            return index < len(self._seen) and bool(self._seen[index])
        return self.count > 0 and seq >= self.lowest and self._folded_index(seq) is None

    @_locked
    def missing(self, first: int, last: int) -> list[int]:
        """Numbers in first..last (inclusive) that never arrived."""
        return [s for s in range(first, last + 1) if s not in self]

    @_locked
    def gaps(self, upto: int | None = None) -> list[tuple[int, int]]:
        """Missing ranges (first, last) from the first number seen up to `upto` (default: the highest)."""
        high = self.highest if upto is None else min(upto, self.highest)
        if not self.count or high <= self.first:
            return []
        out: list[tuple[int, int]] = []
        for first, last in self._folded:
            if last < self.first:
                continue
            if first > high:
                break
            out.append((max(first, self.first), min(last, high)))
        if high >= self._base:
            for first, last in self._zero_runs(max(self.first, self._base) - self._base, high - self._base + 1):
                first, last = first + self._base, last + self._base
                if out and out[-1][1] + 1 == first:
                    first = out.pop()[0]
                out.append((first, last))
        return out

    def _zero_runs(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """Index ranges (inclusive) of numbers not seen in _seen[start:end]."""
        end = min(end, len(self._seen))
        while start < end:
            zero = self._seen.find(0, start, end)
            if zero < 0:
                return
            one = self._seen.find(1, zero, end)
            one = end if one < 0 else one
            yield zero, one - 1
            start = one

    def _fold(self, new_base: int) -> None:
        kept_from = min(new_base - self._base, len(self._seen))
        missing = [(self._base + a, self._base + b) for a, b in self._zero_runs(0, kept_from)]
        if new_base > self._base + kept_from:  # numbers beyond the bytes, below the one arriving: missing
            missing.append((self._base + kept_from, new_base - 1))
        for first, last in missing:
            if self._folded and self._folded[-1][1] + 1 == first:
                self._folded[-1][1] = last
            else:
                self._folded.append([first, last])
        del self._seen[:kept_from]
        self._base = new_base

    def _folded_index(self, seq: int) -> int | None:
        index = bisect.bisect_right(self._folded, seq, key=lambda r: r[0]) - 1
        return index if index >= 0 and self._folded[index][1] >= seq else None

    def _unfold(self, seq: int) -> bool:
        """A late number below the window: True if it was missing (and is not any more)."""
        index = self._folded_index(seq)
        if index is None:
            return False
        first, last = self._folded[index]
        if first == last:
            del self._folded[index]
        elif seq == first:
            self._folded[index][0] += 1
        elif seq == last:
            self._folded[index][1] -= 1
        else:
            self._folded[index][1] = seq - 1
            self._folded.insert(index + 1, [seq + 1, last])
        return True


@dataclass
class Latest:
    value: Any
    unit: str | None
    quality: str
    ts: str


@dataclass
class StreamState:
    """One agent's buffer lifetime, identified by (gateway, buffer_id)."""

    seqs: SeqSet = field(default_factory=SeqSet)
    messages: int = 0
    out_of_order: int = 0    # messages that brought a new number lower than the highest already seen
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    latency_max: float | None = None
    # (monotonic second, new readings), for the recent rate
    _arrivals: deque[list[float]] = field(default_factory=deque, repr=False)
    # (monotonic time, highest number by then), newest last: which gaps are old enough to count
    _high_water: deque[tuple[float, int]] = field(default_factory=deque, repr=False)

    def record(self, seqs: list[int], latency: float, now: float, grace: float, rate_window: float) -> None:
        highest, count = self.seqs.highest, self.seqs.count
        for seq in seqs:
            self.seqs.add(seq)
        self.messages += 1
        new = self.seqs.count - count
        if new and count and min(seqs) < highest:
            self.out_of_order += 1
        self.latencies.append(latency)
        self.latency_max = latency if self.latency_max is None else max(self.latency_max, latency)
        bucket = now - now % RATE_BUCKET
        if self._arrivals and self._arrivals[-1][0] == bucket:
            self._arrivals[-1][1] += new
        else:
            self._arrivals.append([bucket, new])
        if self.seqs.highest > highest:
            # Stamped with the end of its step: "by then, this was the highest" holds, never too early.
            stamp = now - now % HIGH_WATER_STEP + HIGH_WATER_STEP
            if self._high_water and self._high_water[-1][0] == stamp:
                self._high_water[-1] = (stamp, self.seqs.highest)
            else:
                self._high_water.append((stamp, self.seqs.highest))
        self._prune(now, grace, rate_window)

    def _prune(self, now: float, grace: float, rate_window: float) -> None:
        while self._arrivals and self._arrivals[0][0] <= now - rate_window - RATE_BUCKET:
            self._arrivals.popleft()
        while len(self._high_water) >= 2 and self._high_water[1][0] <= now - grace:
            self._high_water.popleft()

    def settled_upto(self, now: float, grace: float) -> int:
        """The highest number that had already arrived `grace` seconds ago: gaps below it are lost."""
        self._prune(now, grace, math.inf)
        if self._high_water and self._high_water[0][0] <= now - grace:
            return self._high_water[0][1]
        return self.seqs.first

    def recent_readings(self, now: float, rate_window: float) -> int:
        self._prune(now, math.inf, rate_window)
        return sum(int(n) for bucket, n in self._arrivals if bucket + RATE_BUCKET / 2 > now - rate_window)


@dataclass
class DeviceState:
    messages: int = 0
    readings: int = 0
    bad: int = 0               # readings whose quality is not "good"
    last_seen: float = 0.0     # arrival, wall clock
    last_ts: str = ""          # the poll time it carried


@dataclass
class GatewayState:
    devices: dict[str, DeviceState] = field(default_factory=dict)
    invalid: int = 0
    errors: list[str] = field(default_factory=list)  # the first ERRORS_KEPT
    waiting: int = 0           # compact messages waiting for a point table
    status: dict[str, Any] | None = None
    status_received: float | None = None


# --- reports: values for the CLI, tests and anything else that asks ------------------------------------

@dataclass(frozen=True)
class Latency:
    p50_ms: float | None
    p95_ms: float | None
    max_ms: float | None


@dataclass(frozen=True)
class StreamReport:
    buffer_id: str
    messages: int
    readings: int              # distinct sequence numbers
    duplicates: int            # readings received again
    out_of_order: int          # messages
    first_seq: int
    highest_seq: int
    rate: float                # readings/s over the last rate_window seconds
    rate_overall: float        # readings/s since the monitor started
    gaps: int                  # missing ranges older than the grace period
    lost: int                  # readings in them
    gap_ranges: tuple[tuple[int, int], ...]  # the first 20
    pending: int               # readings missing for less than the grace period
    latency: Latency


@dataclass(frozen=True)
class DeviceReport:
    device: str
    messages: int
    readings: int
    bad: int
    last_seen: str
    last_seen_ago_s: float
    last_ts: str


@dataclass(frozen=True)
class GatewayReport:
    gateway: str
    state: str | None          # the last status message: "online", "offline", None when none arrived
    state_since: str | None
    messages: int
    readings: int
    duplicates: int
    out_of_order: int
    rate: float
    rate_overall: float
    gaps: int
    lost: int
    pending: int
    invalid: int
    invalid_errors: tuple[str, ...]
    latency: Latency
    streams: tuple[StreamReport, ...]
    devices: tuple[DeviceReport, ...]
    waiting_for_table: int = 0  # compact messages held until their point table arrives
    meters: tuple[MeterReport, ...] = ()  # energy: demand windows, live demand, alarms (energy/watch.py)


@dataclass(frozen=True)
class Report:
    time: str
    elapsed_s: float
    final: bool
    gateways: tuple[GatewayReport, ...]
    ignored: int               # messages on topics that are neither data nor status

    @property
    def lost(self) -> int:
        return sum(g.lost for g in self.gateways)

    @property
    def invalid(self) -> int:
        return sum(g.invalid for g in self.gateways)

    @property
    def ok(self) -> bool:
        """No gap persisted, nothing was invalid, no demand window is missing or came with two values."""
        return self.lost == 0 and self.invalid == 0 and \
            not any(m.missing or m.conflicting for g in self.gateways for m in g.meters)

    def to_dict(self) -> dict[str, Any]:
        return {"report": "final" if self.final else "interval", "ok": self.ok, "lost": self.lost,
                "invalid": self.invalid, **asdict(self)}


class Monitor:
    def __init__(self, host: str, port: int, topic_filter: str = "#", keep_latencies: int = 200_000,
                 on_message: Callable[[str, dict[str, Any]], None] | None = None,
                 session: str | None = None, *, username: str | None = None, password: str | None = None,
                 tls: ssl.SSLContext | None = None, gap_grace: float = 5.0, rate_window: float = 10.0,
                 validate: bool = True) -> None:
        """`session`: a client id for a persistent session, so that across a broker restart (with broker
        persistence) nothing published while this subscriber was away is missed. `gap_grace`: seconds a
        missing sequence number may stay pending before it counts as lost. `validate=False` checks only
        the `schema` field: jsonschema costs ~50-70 µs of CPU per reading, which at thousands of readings
        a second competes with what a benchmark measures (on 2 vCPUs, 10,000 readings/s: latency p95 of
        640 ms instead of 100 ms)."""
        self.host, self.port, self.topic_filter = host, port, topic_filter
        self.validate = validate
        self.gap_grace, self.rate_window = gap_grace, rate_window
        self._lock = threading.Lock()
        self.streams: dict[tuple[str, str], StreamState] = {}
        self.gateways: dict[str, GatewayState] = {}
        self.latest: dict[str, dict[str, Latest]] = {}
        self.latencies: deque[float] = deque(maxlen=keep_latencies)
        self.status: dict[str, dict[str, Any]] = {}
        # Compact encoding: every point table seen on a meta topic, by (gateway, device) and id. Kept for
        # the monitor's life: an id never changes meaning, and backlog messages may name older tables.
        self.tables: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
        # Compact messages naming a table not received yet, by (gateway, device), in arrival order: the
        # arguments of _handle_data and the table's id. Only the worker thread touches them.
        self._waiting: dict[tuple[str, str], list[tuple[tuple[Any, ...], str]]] = {}
        self._waiting_count = 0
        # Sparkplug: the buffer id of each (group, edge node) from its NBIRTH; the metrics of each device by
        # alias from its DBIRTH.
        self._sparkplug_nodes: dict[tuple[str, str], str | None] = {}
        self._sparkplug_points: dict[tuple[str, str, str], dict[int, tuple[str, str | None]]] = {}
        self._tables_arrived: set[tuple[str, str]] = set()
        self.energy = EnergyView()  # demand windows, alarm events and live demand (energy/watch.py)
        self.invalid = 0
        self.ignored = 0
        self.started = time.monotonic()
        self._inbox: queue.Queue[tuple[float, float, str, bytes] | None] = queue.Queue(INBOX_MESSAGES)
        self._worker: threading.Thread | None = None
        self._refused: str | None = None
        self._connacked = False
        self._subscribed = threading.Event()
        self._callback = on_message
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=session or f"edge-monitor-{id(self):x}",
                                   clean_session=session is None)
        self._client.reconnect_delay_set(min_delay=1, max_delay=2)
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls is not None:
            self._client.tls_set_context(tls)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.on_disconnect = lambda *a: self._subscribed.clear()

    def start(self, timeout: float = 10.0, wait_for_broker: bool = True) -> Monitor:
        """Connect and subscribe. Raises BrokerUnavailable when the broker cannot be reached or refuses us
        (`wait_for_broker`: keep trying until `timeout` while it refuses connections, as one that is still
        starting does), TimeoutError when the subscription is not confirmed in time."""
        deadline = time.monotonic() + timeout
        self.started = time.monotonic()
        self._worker = threading.Thread(target=self._work, name="edge-monitor", daemon=True)
        self._worker.start()
        try:
            self._connect(deadline, retry=wait_for_broker)
            self._client.loop_start()
            while not self._subscribed.wait(0.05):
                if self._refused is not None:
                    raise BrokerUnavailable(f"the MQTT broker at {self.host}:{self.port} refused the connection: "
                                            f"{self._refused}")
                if time.monotonic() > deadline:
                    answer = "no subscription confirmed" if self._connacked else \
                        "connected, but no MQTT answer (not an MQTT port? a TLS one?)"
                    raise TimeoutError(f"monitor could not subscribe at {self.host}:{self.port}: {answer}")
        except BaseException:
            self.stop()
            raise
        return self

    def _connect(self, deadline: float, retry: bool) -> None:
        while True:
            self._client.connect_timeout = min(CONNECT_TIMEOUT, max(0.5, deadline - time.monotonic()))
            try:
                self._client.connect(self.host, self.port, keepalive=30)
                return
            except ssl.SSLError as exc:
                why = getattr(exc, "verify_message", None) or exc.reason or str(exc)
                raise BrokerUnavailable(f"TLS with the MQTT broker at {self.host}:{self.port} failed: {why}") from exc
            except (ConnectionError, TimeoutError) as exc:  # maybe not up yet: retry
                if not retry or time.monotonic() + 0.2 > deadline:
                    raise BrokerUnavailable(f"cannot reach the MQTT broker at {self.host}:{self.port}: "
                                            f"{exc.strerror or str(exc) or 'timed out'}") from exc
                time.sleep(0.2)
            except OSError as exc:  # no such host, no route: retrying will not help
                raise BrokerUnavailable(f"cannot reach the MQTT broker at {self.host}:{self.port}: "
                                        f"{exc.strerror or exc}") from exc

    def wait_subscribed(self, timeout: float) -> bool:
        """Block until (re)subscribed, e.g. after a broker restart."""
        return self._subscribed.wait(timeout)

    def stop(self) -> None:
        """Disconnect, then account for everything received before returning."""
        self._client.disconnect()
        self._client.loop_stop()
        if self._worker is not None:
            self._inbox.put(None)
            self._worker.join()
            self._worker = None
        self._give_up_waiting()

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connacked = True
        if reason.is_failure:
            self._refused = str(reason)
        else:
            self._refused = None
            client.subscribe(self.topic_filter, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._inbox.put((time.time(), time.monotonic(), message.topic, message.payload))

    def _work(self) -> None:
        while (item := self._inbox.get()) is not None:
            try:
                self._handle(*item)
            except Exception:  # a bug here must not leave the monitor deaf for the rest of the run
                log.exception("monitor: cannot account for a message on %s", item[2])

    # --- accounting (the worker thread) -------------------------------------------------------------

    def _handle(self, arrived: float, now: float, topic: str, payload: bytes) -> None:
        self._dispatch(arrived, now, topic, payload)
        while self._tables_arrived:  # messages that waited for a table that came with this one
            key = self._tables_arrived.pop()
            for args, _ in self._waiting.pop(key, []):
                self._waiting_count -= 1
                with self._lock:
                    self.gateways.setdefault(key[0], GatewayState()).waiting -= 1
                self._handle_data(*args)

    def _dispatch(self, arrived: float, now: float, topic: str, payload: bytes) -> None:
        levels = topic.split("/")
        if levels[0] == "spBv1.0":
            self._handle_sparkplug(arrived, now, topic, levels, payload)
        elif len(levels) >= 3 and levels[-1] == "status":
            self._handle_status(arrived, topic, levels[-2], payload)
        elif len(levels) >= 4 and levels[-2] == "data":
            self._handle_data(arrived, now, topic, levels[-4], levels[-3], levels[-1], payload)
        elif len(levels) >= 4 and levels[-2] == "meta":
            self._handle_meta(levels[-3], levels[-1], payload)
        elif len(levels) >= 5 and levels[-3] == "data" and levels[-1] in ENERGY_STREAMS:  # windows, alarms
            self._handle_data(arrived, now, topic, levels[-5], levels[-4], "/".join(levels[-2:]), payload)
        elif len(levels) >= 5 and levels[-3] == "meta" and levels[-1] in ENERGY_STREAMS:  # their point tables
            self._handle_meta(levels[-4], "/".join(levels[-2:]), payload)
        elif len(levels) >= 4 and levels[-2] == "demand":  # a meter's retained live demand
            self._handle_live(levels[-3], levels[-1], payload)
        else:
            with self._lock:
                self.ignored += 1

    def _handle_data(self, arrived: float, now: float, topic: str, site: str, gateway: str, device: str,
                     payload: bytes) -> None:
        if payload.startswith(SELF_DESCRIBED):
            body = self._from_compact((arrived, now, topic, site, gateway, device, payload))
            if body is None:
                return
        else:
            try:
                body = json.loads(payload)
            except (ValueError, RecursionError) as exc:
                self._reject(gateway, [f"{device}: not JSON ({exc})"])
                return
        problems = self._problems(body, topic, {"site": site, "gateway": gateway, "device": device})
        if problems:
            self._reject(gateway, problems)
            return
        self._account(arrived, now, topic, gateway, device, body)

    def _handle_sparkplug(self, arrived: float, now: float, topic: str, levels: list[str], payload: bytes) -> None:
        """Sparkplug B (docs/payload.md): the edge node id stands for the gateway; the NBIRTH names the
        buffer, a DBIRTH the aliases of its device; a DDATA is accounted like a JSON message. STATE, NDATA,
        deaths and commands only count as ignored."""
        from google.protobuf.message import DecodeError

        from agent.sparkplug import BUFFER_ID, birth_points, data_polls
        from agent.sparkplug.sparkplug_b_pb2 import Payload

        if len(levels) < 4 or levels[2] not in ("NBIRTH", "DBIRTH", "DDATA"):
            with self._lock:
                self.ignored += 1
            return
        group, kind, node, device = levels[1], levels[2], levels[3], "/".join(levels[4:])
        try:
            message = Payload.FromString(payload)
        except DecodeError as exc:
            self._reject(node, [f"{kind} {device}: not a Sparkplug B payload ({exc})"])
            return
        if kind == "NBIRTH":
            buffer_id = next((m.string_value for m in message.metrics if m.name == BUFFER_ID), None)
            self._sparkplug_nodes[(group, node)] = buffer_id
        elif kind == "DBIRTH":
            self._sparkplug_points[(group, node, device)] = birth_points(message)
        else:
            buffer_id = self._sparkplug_nodes.get((group, node))
            points = self._sparkplug_points.get((group, node, device))
            if buffer_id is None or points is None:
                self._reject(node, [f"DDATA {device}: before the NBIRTH and DBIRTH that name its buffer and "
                                    "metrics"])
                return
            try:
                polls = data_polls(message, points)
            except (KeyError, ValueError) as exc:
                self._reject(node, [f"DDATA {device}: {exc!r}"])
                return
            for stream, stream_polls in _sparkplug_streams(device, polls).items():
                self._account(arrived, now, topic, node, stream, {"schema": SCHEMA, "gateway": node, "site": group,
                                                                  "buffer_id": buffer_id, "device": stream,
                                                                  "polls": stream_polls})

    def _account(self, arrived: float, now: float, topic: str, gateway: str, device: str,
                 body: dict[str, Any]) -> None:
        with self._lock:
            stream = self.streams.setdefault((gateway, body["buffer_id"]), StreamState())
            state = self.gateways.setdefault(gateway, GatewayState()).devices.setdefault(device, DeviceState())
            state.messages += 1
            latest = self.latest.setdefault(device, {})
            for poll in body["polls"]:  # oldest first; several after an outage
                latency = arrived - _parse_ts(poll["ts"])
                readings = poll["readings"]
                stream.record([r["seq"] for r in readings], latency, now, self.gap_grace, self.rate_window)
                self.latencies.append(latency)
                state.readings += len(readings)
                state.bad += sum(1 for r in readings if r["quality"] != "good")
                state.last_seen, state.last_ts = arrived, poll["ts"]
                for reading in readings:
                    latest[reading["point"]] = Latest(reading["value"], reading.get("unit"), reading["quality"],
                                                      poll["ts"])
        if "/" in device:
            self.energy.records(gateway, device, body["polls"])
        if self._callback is not None:
            self._callback(topic, body)

    def _handle_meta(self, gateway: str, device: str, payload: bytes) -> None:
        if not payload:  # a retained message being cleared
            return
        try:
            body = json.loads(payload)
            if body.get("schema") != META_SCHEMA or not isinstance(body.get("tables"), dict):
                raise ValueError(f"not an {META_SCHEMA} message")
        except (ValueError, AttributeError, RecursionError) as exc:
            self._reject(gateway, [f"{device} meta: {exc}"])
            return
        self._learn_tables(gateway, device, body["tables"])

    def _learn_tables(self, gateway: str, device: str, tables: Mapping[str, Any]) -> None:
        """Point tables from a meta or a data message: messages waiting for one of them are accounted next."""
        with self._lock:
            known = self.tables.setdefault((gateway, device), {})
            new = tables.keys() - known.keys()
            known.update(tables)
        if new and (gateway, device) in self._waiting:
            self._tables_arrived.add((gateway, device))

    def _from_compact(self, args: tuple[Any, ...]) -> dict[str, Any] | None:
        """A compact message in the JSON encoding's shape, so that it is checked and counted the same way;
        None when it cannot be decoded (counted invalid) or waits for its point table. `args`: those of
        _handle_data."""
        import cbor2  # only a platform on the compact encoding pays for it

        gateway, device, payload = args[4], args[5], args[6]
        try:
            message = cbor2.loads(payload)
            if message.get("schema") != CBOR_SCHEMA:
                raise ValueError(f"not an {CBOR_SCHEMA} message")
            carried = message.get("tables")
            if carried is not None:
                if not isinstance(carried, Mapping):
                    raise TypeError(f"tables is a {type(carried).__name__}, not a map")
                self._learn_tables(gateway, device, carried)
            with self._lock:
                tables = dict(self.tables.get((gateway, device), {}))
            polls = decode_polls(message, tables)
        except KeyError as exc:
            table_id = exc.args[0] if exc.args else None
            if not isinstance(table_id, str) or table_id in tables:
                self._reject(gateway, [f"{device}: not a compact message (a point table without {exc})"])
            else:
                self._wait_for_table(args, table_id)
            return None
        except (ValueError, TypeError, AttributeError, IndexError, cbor2.CBORDecodeError) as exc:
            self._reject(gateway, [f"{device}: not a compact message ({exc})"])
            return None
        for poll in polls:
            poll["ts"] = iso_utc(poll["ts"])
            for reading in poll["readings"]:
                for key in ("source_ts", "server_ts"):
                    if key in reading:
                        reading[key] = iso_utc(reading[key])
        return {**{key: message.get(key) for key in ("gateway", "site", "buffer_id", "device")},
                "schema": SCHEMA, "polls": polls}

    def _wait_for_table(self, args: tuple[Any, ...], table_id: str) -> None:
        gateway, device = args[4], args[5]
        if self._waiting_count >= WAITING_MAX:
            self._reject(gateway, [_no_table(device, table_id)])
            return
        self._waiting.setdefault((gateway, device), []).append((args, table_id))
        self._waiting_count += 1
        with self._lock:
            self.gateways.setdefault(gateway, GatewayState()).waiting += 1

    def _give_up_waiting(self) -> None:
        """At stop: a message whose table never came is invalid, named by the table."""
        waiting, self._waiting, self._waiting_count = self._waiting, {}, 0
        for (gateway, device), messages in waiting.items():
            with self._lock:
                self.gateways.setdefault(gateway, GatewayState()).waiting -= len(messages)
            for _, table_id in messages:
                self._reject(gateway, [_no_table(device, table_id)])

    def _problems(self, body: Any, topic: str, from_topic: dict[str, str]) -> list[str]:
        device = from_topic["device"]
        if self.validate:
            errors = islice(payload_validator().iter_errors(body), ERRORS_PER_MESSAGE)
            problems = [f"{device}: {e.json_path}: {e.message}" for e in errors]
        elif not isinstance(body, dict) or body.get("schema") != SCHEMA:
            problems = [f"{device}: not an {SCHEMA} message"]
        else:
            problems = []
        if problems:
            return problems
        return [f"{device}: $.{name}: {body.get(name)!r} but the topic {topic!r} says {value!r}"
                for name, value in from_topic.items() if body.get(name) != value]

    def _handle_status(self, arrived: float, topic: str, gateway: str, payload: bytes) -> None:
        if not payload:  # a retained status being cleared
            return
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError) as exc:
            self._reject(gateway, [f"status: not JSON ({exc})"])
            return
        if not isinstance(body, dict) or body.get("schema") != STATUS_SCHEMA or \
                body.get("state") not in ("online", "offline"):
            self._reject(gateway, [f"status: not an {STATUS_SCHEMA} message: {payload[:100]!r}"])
            return
        with self._lock:
            self.status[topic] = body
            state = self.gateways.setdefault(gateway, GatewayState())
            state.status, state.status_received = body, arrived

    def _handle_live(self, gateway: str, meter: str, payload: bytes) -> None:
        if not payload:  # a retained state being cleared
            return
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict) or not self.energy.live(gateway, meter, body):
            self._reject(gateway, [f"{meter} live demand: not a demand state message: {payload[:100]!r}"])

    def _reject(self, gateway: str, problems: list[str]) -> None:
        with self._lock:
            self.invalid += 1
            state = self.gateways.setdefault(gateway, GatewayState())
            state.invalid += 1
            room = ERRORS_KEPT - len(state.errors)
            state.errors += [_shorten(p) for p in problems[:max(room, 0)]]

    # --- questions tests, the demo and the CLI ask ----------------------------------------------------

    def stream(self, gateway: str, buffer_id: str | None = None) -> StreamState:
        with self._lock:
            matches = [s for (gw, buf), s in self.streams.items() if gw == gateway and buffer_id in (None, buf)]
        if not matches:
            return StreamState()
        if len(matches) > 1:
            raise ValueError(f"gateway {gateway} has {len(matches)} buffers; name the buffer_id")
        return matches[0]

    def received(self, gateway: str, buffer_id: str | None = None) -> int:
        return self.stream(gateway, buffer_id).seqs.count

    def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.05)
        return condition()

    def settle(self, timeout: float | None = None, abort: threading.Event | None = None) -> None:
        """Wait until no gap is pending: each missing number arrived or became lost (at most `gap_grace`)."""
        deadline = time.monotonic() + (self.gap_grace + 0.2 if timeout is None else timeout)
        while time.monotonic() < deadline and not (abort is not None and abort.is_set()):
            if not any(g.pending for g in self.report().gateways):
                return
            time.sleep(0.1)

    def report(self, final: bool = False) -> Report:
        wall, now = time.time(), time.monotonic()
        with self._lock:
            gateways = {gw for gw, _ in self.streams} | set(self.gateways)
            return Report(time=iso_utc(wall), elapsed_s=round(now - self.started, 1), final=final,
                          gateways=tuple(self._gateway_report(gw, wall, now) for gw in sorted(gateways)),
                          ignored=self.ignored)

    def _gateway_report(self, gateway: str, wall: float, now: float) -> GatewayReport:
        state = self.gateways.get(gateway, GatewayState())
        streams = {buf: s for (gw, buf), s in self.streams.items() if gw == gateway}
        reports = tuple(self._stream_report(buf, s, now) for buf, s in sorted(streams.items()))
        samples = [x for s in streams.values() for x in s.latencies]
        highest = max((s.latency_max for s in streams.values() if s.latency_max is not None), default=None)
        return GatewayReport(
            gateway=gateway, state=state.status.get("state") if state.status else None,
            state_since=_status_since(state),
            messages=sum(r.messages for r in reports), readings=sum(r.readings for r in reports),
            duplicates=sum(r.duplicates for r in reports), out_of_order=sum(r.out_of_order for r in reports),
            rate=round(sum(r.rate for r in reports), 1), rate_overall=round(sum(r.rate_overall for r in reports), 1),
            gaps=sum(r.gaps for r in reports), lost=sum(r.lost for r in reports),
            pending=sum(r.pending for r in reports), invalid=state.invalid, invalid_errors=tuple(state.errors),
            latency=_latency(samples, highest), streams=reports, waiting_for_table=state.waiting,
            devices=tuple(DeviceReport(name, d.messages, d.readings, d.bad, iso_utc(d.last_seen),
                                       round(wall - d.last_seen, 1), d.last_ts)
                          for name, d in sorted(state.devices.items())),
            meters=self.energy.report(gateway))

    def _stream_report(self, buffer_id: str, stream: StreamState, now: float) -> StreamReport:
        settled = stream.settled_upto(now, self.gap_grace)
        lost = stream.seqs.gaps(upto=settled)
        pending = [(a, b) for a, b in stream.seqs.gaps() if b > settled]
        elapsed = max(now - self.started, 1e-3)
        return StreamReport(
            buffer_id=buffer_id, messages=stream.messages, readings=stream.seqs.count,
            duplicates=stream.seqs.duplicates, out_of_order=stream.out_of_order, first_seq=stream.seqs.first,
            highest_seq=stream.seqs.highest,
            rate=round(stream.recent_readings(now, self.rate_window) / min(self.rate_window, elapsed), 1),
            rate_overall=round(stream.seqs.count / elapsed, 1),
            gaps=len(lost), lost=sum(b - a + 1 for a, b in lost), gap_ranges=tuple(lost[:20]),
            pending=sum(b - max(a, settled + 1) + 1 for a, b in pending),
            latency=_latency(list(stream.latencies), stream.latency_max))


def _latency(samples: list[float], highest: float | None) -> Latency:
    if not samples:
        return Latency(None, None, None)
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000, 1)

    return Latency(at(0.50), at(0.95), None if highest is None else round(highest * 1000, 1))


def _status_since(state: GatewayState) -> str | None:
    """When the gateway sent its last status; for the broker's last will (no `ts`), when it arrived."""
    if state.status is None or state.status_received is None:
        return None
    ts = state.status.get("ts")
    return ts if isinstance(ts, str) else iso_utc(state.status_received)


def _sparkplug_streams(device: str, polls: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """A DDATA's polls by the stream they belong to, in the JSON encoding's shape: a metric in a folder
    ("demand/energy") is a reading of the device's stream ("incomer-1/demand": energy windows and alarms,
    agent/sparkplug `publish`); point names hold no '/' (agent/names.py), so a '/' is always a folder."""
    streams: dict[str, list[dict[str, Any]]] = {}
    for poll in polls:
        ts = iso_utc(poll["ts"])
        for reading in poll["readings"]:
            folder, _, reading["point"] = reading["point"].rpartition("/")
            stream = streams.setdefault(f"{device}/{folder}" if folder else device, [])
            if not stream or stream[-1]["ts"] != ts:
                stream.append({"ts": ts, "readings": [], "historical": poll["historical"]})
            stream[-1]["readings"].append(reading)
    return streams


def _no_table(device: str, table_id: str) -> str:
    return f"{device}: names the point table {table_id!r} that neither a data message nor the meta topic carried"


def _parse_ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _shorten(text: str) -> str:
    return text if len(text) <= ERROR_TEXT_MAX else text[:ERROR_TEXT_MAX - 3] + "..."


# --- `edge-agent monitor` -------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="the broker (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="default 1883, 8883 with TLS")
    parser.add_argument("--topic", default="edge/#", help="what to subscribe to (default edge/#)")
    parser.add_argument("--username")
    parser.add_argument("--password-file", type=Path, help="a file whose first line is the password")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (implied by the three options below)")
    parser.add_argument("--ca-file", type=Path, help="CA certificate(s) to verify the broker with "
                        "(default: the system's)")
    parser.add_argument("--cert-file", type=Path, help="client certificate, for mutual TLS")
    parser.add_argument("--key-file", type=Path, help="the client certificate's key")
    parser.add_argument("--duration", type=_seconds, default=None, metavar="SECONDS",
                        help="stop after this long (default: until Ctrl-C)")
    parser.add_argument("--interval", type=_seconds, default=5.0, metavar="SECONDS",
                        help="a report every this many seconds (default 5); the rate is over the same span")
    parser.add_argument("--grace", type=_seconds, default=5.0, metavar="SECONDS",
                        help="a missing sequence number counts as lost after this long (default 5)")
    parser.add_argument("--json", action="store_true", help="one JSON object per report, one per line")
    parser.add_argument("--verbose", "-v", action="store_true", help="a line per device under each gateway")
    parser.add_argument("--no-validate", action="store_true",
                        help="check only the schema field, not the whole message against the JSON Schema "
                             "(validation costs about 60 us a reading: above a few thousand readings a second "
                             "it becomes the bottleneck)")


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    """Exit 0 when no gap persisted and nothing was invalid, 1 otherwise or when the broker is not there,
    2 when an option names a file that cannot be used."""
    try:
        monitor = _monitor_from(args)
    except (OSError, ssl.SSLError, ValueError) as exc:
        print(f"edge-agent monitor: {exc}", file=sys.stderr)
        return 2
    try:
        monitor.start(timeout=CONNECT_TIMEOUT, wait_for_broker=False)
    except (BrokerUnavailable, TimeoutError) as exc:
        print(f"edge-agent monitor: {exc}", file=sys.stderr)
        return 1
    stop, abort = threading.Event(), threading.Event()
    output = _Output(args.json, args.verbose, args.topic)
    try:
        with _signals_set(stop, abort):
            until = "" if args.duration is not None else " (Ctrl-C to stop)"
            print(f"edge-agent monitor: subscribed to {args.topic} at {monitor.host}:{monitor.port}{until}",
                  file=sys.stderr, flush=True)
            started = time.monotonic()
            end = math.inf if args.duration is None else started + args.duration
            next_report = started + args.interval
            while not stop.wait(max(0.0, min(next_report, end) - time.monotonic())):
                if time.monotonic() >= end:
                    break
                output.emit(monitor.report())
                next_report += args.interval
            monitor.settle(abort=abort)
            final = monitor.report(final=True)
    finally:
        monitor.stop()
    output.emit(final)
    return 0 if final.ok else 1


def _monitor_from(args: argparse.Namespace) -> Monitor:
    for option in ("password_file", "ca_file", "cert_file", "key_file"):
        path = getattr(args, option)
        if path is not None and not path.is_file():
            raise ValueError(f"--{option.replace('_', '-')}: no such file: {path}")
    password = None
    if args.password_file is not None:
        text = args.password_file.read_text(encoding="utf-8")
        password = text.splitlines()[0] if text else ""
        if args.username is None:
            raise ValueError("--password-file needs --username")
    context = None
    if args.tls or args.ca_file or args.cert_file or args.key_file:
        if args.key_file and not args.cert_file:
            raise ValueError("--key-file needs --cert-file")
        context = ssl.create_default_context(cafile=str(args.ca_file) if args.ca_file else None)
        if args.cert_file:
            context.load_cert_chain(str(args.cert_file), str(args.key_file) if args.key_file else None)
    port = args.port or (8883 if context is not None else 1883)
    return Monitor(args.host, port, args.topic, keep_latencies=LATENCY_SAMPLES, username=args.username,
                   password=password, tls=context, gap_grace=args.grace, rate_window=args.interval,
                   validate=not args.no_validate)


@contextlib.contextmanager
def _signals_set(stop: threading.Event, abort: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM end the run (with a final report); a second one skips waiting for pending gaps."""
    def handler(signum: int, frame: object) -> None:
        (abort if stop.is_set() else stop).set()

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():  # signals can only be caught there
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class _Output:
    def __init__(self, as_json: bool, verbose: bool, topic: str) -> None:
        self.as_json, self.verbose, self.topic = as_json, verbose, topic

    def emit(self, report: Report) -> None:
        if self.as_json:
            lines = [json.dumps(report.to_dict(), ensure_ascii=False)]
        elif report.final:
            lines = _summary_lines(report)
        else:
            lines = _report_lines(report, self.verbose, self.topic)
        print("\n".join(lines), flush=True)


def _report_lines(report: Report, verbose: bool, topic: str) -> list[str]:
    clock = datetime.fromisoformat(report.time.replace("Z", "+00:00")).astimezone().strftime("%H:%M:%S")
    if not report.gateways:
        return [f"{clock} nothing received on {topic} yet"]
    lines: list[str] = []
    for gateway in report.gateways:
        lines.append(f"{clock} {_gateway_line(gateway)}")
        lines += _detail_lines(gateway) if verbose else meter_lines(gateway.meters)
    return lines


def _gateway_line(g: GatewayReport) -> str:
    parts = [f"{g.gateway} {g.state or '-'}", f"msgs {g.messages}", f"readings {g.readings}",
             f"rate {g.rate:g}/s (avg {g.rate_overall:g}/s)", f"gaps {g.gaps}" + (f" ({_lost(g)})" if g.gaps else "")]
    if g.pending:
        parts.append(f"pending {g.pending}")
    parts += [f"dup {g.duplicates}"] + ([f"out-of-order {g.out_of_order}"] if g.out_of_order else [])
    if g.waiting_for_table:
        parts.append(f"waiting for a point table {g.waiting_for_table}")
    parts += [f"invalid {g.invalid}", f"latency p50 {_ms(g.latency.p50_ms)} p95 {_ms(g.latency.p95_ms)}"]
    if len(g.streams) > 1:
        parts.append(f"{len(g.streams)} buffers")
    return "  ".join(parts)


def _lost(g: GatewayReport) -> str:
    ranges = [f"{a}" if a == b else f"{a}..{b}" for s in g.streams for a, b in s.gap_ranges]
    more = ", ..." if len(ranges) < g.gaps or len(ranges) > 5 else ""
    return f"{g.lost} lost: {', '.join(ranges[:5])}{more}"


def _detail_lines(g: GatewayReport) -> list[str]:
    lines = []
    if len(g.streams) > 1:
        for s in g.streams:
            lines.append(f"    buffer {s.buffer_id}  seq {s.first_seq}..{s.highest_seq}  readings {s.readings}  "
                         f"gaps {s.gaps} ({s.lost} lost)  pending {s.pending}  dup {s.duplicates}")
    width = max((len(d.device) for d in g.devices), default=0)
    for d in g.devices:
        lines.append(f"    {d.device:<{width}}  msgs {d.messages}  readings {d.readings}  bad {d.bad}  "
                     f"last seen {d.last_seen_ago_s:g} s ago (poll {d.last_ts})")
    lines += meter_lines(g.meters)
    lines += [f"    invalid: {error}" for error in g.invalid_errors]
    return lines


def _summary_lines(report: Report) -> list[str]:
    readings = sum(g.readings for g in report.gateways)
    messages = sum(g.messages for g in report.gateways)
    lines = [f"summary after {report.elapsed_s:g} s: {len(report.gateways)} gateway(s), {readings} readings in "
             f"{messages} messages, {report.lost} lost, {sum(g.duplicates for g in report.gateways)} duplicates, "
             f"{report.invalid} invalid"]
    for gateway in report.gateways:
        lines += [f"  {_gateway_line(gateway)}", *_detail_lines(gateway)]
    if report.ok:
        lines.append("OK: no gaps and no invalid messages" if messages else "OK, but no data message arrived")
    else:
        gaps = sum(g.gaps for g in report.gateways)
        windows = [m for g in report.gateways for m in g.meters]
        bad_windows = f", {sum(m.missing for m in windows)} demand window(s) missing, " \
                      f"{sum(m.conflicting for m in windows)} with two values" if windows else ""
        lines.append(f"FAILED: {report.lost} reading(s) lost in {gaps} gap(s), {report.invalid} invalid "
                     f"message(s){bad_windows}")
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g} ms"
