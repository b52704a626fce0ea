"""Sparkplug B 3.0 edge node: `[mqtt] encoding = "sparkplug"`. Specified for the platform in docs/payload.md
("Sparkplug B").

The gateway is an edge node (`spBv1.0/<group>/N.../<edge node>`), each configured device a Sparkplug device.
This package owns everything Sparkplug: the session state (bdSeq, seq, births, aliases, the primary host's
STATE) and the framing of buffer rows as DDATA. The uplink (agent/uplink.py) calls it through a narrow seam:
`attach` when it makes the MQTT client, `connected`/`disconnected` on the link's changes, `ready` before
sending, `publish` per data message, `publish_live` per live state (energy's live demand), `status` for the
periodic status, `stop` at a clean shutdown; the uplink's task group runs `watch_devices` for as long as the
uplink runs.

Invariants:
1. Only the buffer is sent, as in every encoding: a DDATA carries buffer rows (stored in the JSON encoding)
   at QoS 1, and its rows leave the buffer after its PUBACK. Each metric of a DDATA carries our gapless
   sequence number as the property "seq"; the NBIRTH carries the buffer id. Births, deaths and NDATA are
   Sparkplug's own state messages: QoS 0 as the specification requires (deaths: QoS 1).
2. bdSeq: every CONNECT registers an NDEATH will with the next bdSeq (0-255, persisted beside the buffer
   before the CONNECT is sent, so a restart never reuses the last one); the NBIRTH of that connection
   carries the same bdSeq.
3. seq: every message of the node but NDEATH carries seq, 0 at each NBIRTH and +1 (mod 256) per message in
   the order handed to paho, which is the order on the wire.
4. No DDATA before its NBIRTH and DBIRTH on this connection: a data message of a device not born (new, after
   a rebirth, after its DDEATH) is preceded by its DBIRTH; a metric the DBIRTH lacks (a new point, a value of
   another type) makes a new DBIRTH first. A device is dead while its polls fail (the agent's device health:
   it stopped answering) or while the newest poll sent live had no good reading; a born device that is dead
   gets a DDEATH (within WATCH seconds of its first failed poll, or right after the DDATA that showed it),
   and its next message a DBIRTH. A dead device's backlog still goes out, between a DBIRTH and a DDEATH.
5. A new connection is a new session: messages still in flight belong to the old one. Each connection is
   a new paho client (agent/uplink.py), so none of them is re-sent with the old seq among the new births
   (where a host drops them or asks for a rebirth); the uplink sends their rows again after the NBIRTH. The
   cost is duplicates, which our sequence numbers expose, never a loss.
6. With a primary host configured, nothing is born and no data sent until its STATE says online; when it
   says offline, data waits in the buffer and goes out as a backlog with is_historical once it is back.
7. Live states (a meter's live demand, `publish_live`) are not buffered: DDATA at QoS 0 without our "seq"
   property, in a folder named `live` (LIVE_FOLDER), only while `ready` and the device is not dead; dropped
   otherwise, never held, since they are stale a second later. They take the node's seq like every other
   message, and a new one of their metrics makes a DBIRTH first, as in `publish`.

paho-mqtt runs its callbacks in the connection's thread; `_pre_connect` runs there (it must arm the will
before the CONNECT goes out), everything else is handed to the event loop. Every publish is made on the
event loop and written by the connection's thread (agent/uplink.py, invariant 5 and its closing note).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.health import DeviceHealth
from agent.model import PollResult
from agent.sparkplug.sparkplug_b_pb2 import Payload
from buffer.store import LOSS_REASONS

log = logging.getLogger(__name__)

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
BDSEQ = "bdSeq"
BUFFER_ID = "Edge Agent/Buffer ID"
# Data types (sparkplug_b.proto, "Indexes of Data Types").
INT32, INT64, UINT64, FLOAT, DOUBLE, BOOLEAN, STRING = 3, 4, 8, 9, 10, 11, 12
QUALITY_BAD = 0  # the "Quality" property's code for bad (Sparkplug 3.0: 0 bad, 192 good, 500 stale)
TYPE_NAMES = {INT64: "Int64", UINT64: "UInt64", FLOAT: "Float", DOUBLE: "Double", BOOLEAN: "Boolean",
              STRING: "String"}
_U64 = (1 << 64) - 1
WATCH = 0.25  # seconds between looks at the devices' health, for DDEATH
LIVE_FOLDER = "live"  # live state metrics: "demand/live/projected_kw" (invariant 7)


def is_live(name: str) -> bool:
    """A metric of a live state (not a buffered reading: no seq property). Point names hold no '/'
    (agent/names.py), so a level "live" before the last is always this folder."""
    return LIVE_FOLDER in name.split("/")[:-1]


def datatype_of(value: Any) -> int | None:
    """The Sparkplug data type of a value as the JSON encoding stores it (None for a null value)."""
    kind = type(value)
    if kind is bool:
        return BOOLEAN
    if kind is int:
        return INT64
    if kind is float:
        return DOUBLE
    if kind is str:
        return STRING
    return None


def set_value(metric: Any, datatype: int, value: Any) -> None:
    """Put a value in a Metric or PropertyValue of the given type; None is sent as is_null."""
    if value is None:
        metric.is_null = True
    elif datatype == BOOLEAN:
        metric.boolean_value = bool(value)
    elif datatype == INT32:
        metric.int_value = int(value) & 0xFFFFFFFF
    elif datatype in (INT64, UINT64):
        metric.long_value = int(value) & _U64  # Int64: two's complement in the uint64 field, as Tahu does
    elif datatype == DOUBLE:
        metric.double_value = float(value)
    elif datatype == FLOAT:
        metric.float_value = float(value)
    else:
        metric.string_value = str(value)


def value_of(metric: Any) -> Any:
    """The value of a decoded Metric (for the monitor and tests)."""
    if metric.is_null:
        return None
    which = metric.WhichOneof("value")
    if which is None:
        return None
    value = getattr(metric, which)
    datatype = metric.datatype if hasattr(metric, "datatype") else metric.type  # a Metric or a PropertyValue
    if which == "long_value" and datatype in (1, 2, 3, 4) and value >= 1 << 63:
        value -= 1 << 64
    return value


def add_property(metric: Any, key: str, datatype: int, value: Any) -> None:
    metric.properties.keys.append(key)
    prop = metric.properties.values.add()
    prop.type = datatype
    set_value(prop, datatype, value)


@dataclass(slots=True)
class _Point:
    alias: int
    datatype: int
    unit: str | None
    value: Any = None  # the newest value sent, for births
    ts: int = 0


@dataclass(slots=True)
class _Device:
    points: dict[str, _Point] = field(default_factory=dict)
    born: bool = False  # a DBIRTH went out in this node session and no DDEATH since
    bad: bool = False  # its newest poll sent live had no good reading


class BdSeq:
    """The birth/death sequence number, persisted in a small file beside the buffer (invariant 2)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.value = -1
        try:
            self.value = int(path.read_text(encoding="ascii").strip()) % 256
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.error("cannot read the Sparkplug bdSeq from %s (%s): starting again from 0", path, exc)

    def next(self) -> int:
        """The bdSeq of the next CONNECT, written to disk (atomically, fsynced) before it is used."""
        value = (self.value + 1) % 256
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(temporary, "w", encoding="ascii") as file:
                file.write(f"{value}\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:  # the session still works; a restart may then reuse a bdSeq
            log.error("cannot persist the Sparkplug bdSeq to %s: %s", self.path, exc)
        self.value = value
        return value


class SparkplugSession:
    def __init__(self, group_id: str, edge_node_id: str, primary_host_id: str | None, buffer_id: str,
                 bdseq_path: Path, version: str, on_ready: Callable[[], None]) -> None:
        self.group_id, self.edge_node_id, self.primary_host_id = group_id, edge_node_id, primary_host_id
        self._buffer_id = buffer_id
        self._version = version
        self._on_ready = on_ready  # the uplink: rows held while not ready become a backlog, sending resumes
        self._bdseq = BdSeq(bdseq_path)
        self._connect_bdseq = 0  # the bdSeq of the will of the current connection
        self._seq = 0
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = False
        self._node_born = False
        self._host_online = primary_host_id is None
        self._host_since = -1  # the timestamp of the STATE that said online
        self._devices: dict[str, _Device] = {}
        self._next_alias = 1
        self._node_metrics: dict[str, tuple[int, int, Any]] = {}  # name -> (alias, datatype, value)
        # Every node metric is in every NBIRTH (Sparkplug: no metric may appear later), until the first status
        # with zeros.
        self._stage_node_metrics({BUFFER_ID: buffer_id, "Edge Agent/Version": version, **_node_values({})})
        prefix = f"{NAMESPACE}/{group_id}"
        self.topic_nbirth = f"{prefix}/NBIRTH/{edge_node_id}"
        self.topic_ndeath = f"{prefix}/NDEATH/{edge_node_id}"
        self.topic_ndata = f"{prefix}/NDATA/{edge_node_id}"
        self.topic_ncmd = f"{prefix}/NCMD/{edge_node_id}"
        self.topic_state = f"{NAMESPACE}/STATE/{primary_host_id}" if primary_host_id else None
        self.births = 0  # NBIRTHs sent (tests, logs)
        # The agent's device health (agent/health.py), set by the daemon: a device whose polls fail is dead.
        self.health: Mapping[str, DeviceHealth] = {}

    # --- the seam the uplink calls ------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Data may be sent: connected, the node born, the primary host (if any) online."""
        return self._connected and self._node_born and self._host_online

    def attach(self, client: Any) -> None:
        """The uplink made its MQTT client: arm the NDEATH will before every CONNECT, route NCMD and STATE."""
        self._client = client
        self._loop = asyncio.get_running_loop()
        client.on_pre_connect = self._pre_connect
        client.message_callback_add(self.topic_ncmd, self._on_message)
        if self.topic_state is not None:
            client.message_callback_add(self.topic_state, self._on_message)

    def connected(self) -> None:
        """A new connection (event loop): a new session. Born at once, or when the primary host is online."""
        self._connected = True
        self._node_born = False
        client = self._client
        client.subscribe(self.topic_ncmd, qos=1)
        if self.topic_state is not None:
            self._host_online = False  # learnt again from its retained STATE, which the subscription brings
            client.subscribe(self.topic_state, qos=1)
        else:
            self._birth()

    def disconnected(self) -> None:
        self._connected = False
        self._node_born = False

    def publish(self, client: Any, device: str, rows: Iterable[Any], historical: bool) -> tuple[Any, str, int]:
        """Publish buffer rows (JSON polls of one device, oldest first) as one DDATA at QoS 1, with the
        DBIRTH it needs before it and the DDEATH it implies after it (invariant 4). Returns paho's
        MQTTMessageInfo of the DDATA (the uplink tracks its PUBACK), its topic and its size.

        A stream of a device ("meter/demand": energy windows, alarms) is a folder of the device's metrics
        ("demand/kwh"): Sparkplug device ids cannot hold '/', metric names can (hosts show them as folders)."""
        device, _, folder = device.partition("/")
        state = self._devices.setdefault(device, _Device())
        polls = [(int(row.ts * 1000), json.loads(row.payload)["readings"]) for row in rows]
        if folder:
            for _, readings in polls:
                for reading in readings:
                    reading["point"] = f"{folder}/{reading['point']}"
        rebirth = not state.born
        for _, readings in polls:
            for reading in readings:
                point = state.points.get(reading["point"])
                datatype = datatype_of(reading["value"])
                if point is None:
                    point = state.points[reading["point"]] = _Point(self._alias(), datatype or DOUBLE,
                                                                    reading.get("unit"))
                    rebirth = True
                elif datatype is not None and datatype != point.datatype:
                    point.datatype = datatype  # a host keeps a metric's type from its birth: born again
                    rebirth = True
                elif not historical and reading.get("unit") != point.unit:
                    point.unit = reading.get("unit")
                    rebirth = True
        if not historical:  # a birth shows the newest values
            self._remember(state, polls)
        if rebirth:
            self._publish_dbirth(device, state)
        payload = Payload(timestamp=int(time.time() * 1000), seq=self._next_seq())
        metrics = payload.metrics
        points = state.points
        for ts, readings in polls:
            for reading in readings:
                point = points[reading["point"]]
                metric = metrics.add()
                metric.alias = point.alias
                metric.timestamp = ts
                metric.datatype = point.datatype
                if historical:
                    metric.is_historical = True
                set_value(metric, point.datatype, reading["value"])
                add_property(metric, "seq", UINT64, reading["seq"])
                if reading["quality"] == "bad":  # Sparkplug's own property, which any host reads
                    add_property(metric, "Quality", INT32, QUALITY_BAD)
                elif reading["quality"] != "good":  # "uncertain": Sparkplug has no code for it
                    add_property(metric, "quality", STRING, reading["quality"])
                if reading["quality"] != "good":
                    if "reason" in reading:
                        add_property(metric, "reason", STRING, reading["reason"])
                for key in ("source_ts", "server_ts"):
                    if key in reading:
                        add_property(metric, key, STRING, reading[key])
        topic, body = f"{NAMESPACE}/{self.group_id}/DDATA/{self.edge_node_id}/{device}", payload.SerializeToString()
        info = client.publish(topic, body, qos=1)
        if not historical and polls and not folder:  # history says nothing of the device now
            state.bad = all(reading["quality"] == "bad" for reading in polls[-1][1])
        if self._dead(device, state):
            self._publish_ddeath(device, state)
        return info, topic, len(body)

    def publish_live(self, state: PollResult) -> bool:
        """A live state (invariant 7): the readings of `state` as metrics of its device in the folder of its
        stream ("incomer-1/demand/live" -> device incomer-1, metrics "demand/live/..."), as a DDATA at QoS 0
        carrying only the values that changed (Sparkplug's report by exception: a host keeps the last value
        of each metric), or inside a DBIRTH when a metric is new. False when not sent: the session is not
        ready (not connected, not born, primary host offline) or the device is dead."""
        if not self.ready or self._client is None:
            return False
        device, _, folder = state.device.partition("/")
        device_state = self._devices.setdefault(device, _Device())
        if self._dead(device, device_state):
            return False
        ts = int(state.ts * 1000)
        rebirth = not device_state.born
        changed: list[_Point] = []
        for reading in state.readings:
            name = f"{folder}/{reading.point}" if folder else reading.point
            datatype = datatype_of(reading.value) or DOUBLE
            point = device_state.points.get(name)
            if point is None:
                point = device_state.points[name] = _Point(self._alias(), datatype, reading.unit)
                rebirth = True
            elif datatype != point.datatype or reading.unit != point.unit:
                point.datatype, point.unit = datatype, reading.unit
                rebirth = True
            if point.value != reading.value:
                changed.append(point)
            point.value, point.ts = reading.value, ts
        if rebirth:
            self._publish_dbirth(device, device_state)  # it carries every value, these ones too
            return True
        if not changed:
            return True
        payload = Payload(timestamp=int(time.time() * 1000), seq=self._next_seq())
        for point in changed:
            metric = payload.metrics.add(alias=point.alias, timestamp=ts, datatype=point.datatype)
            set_value(metric, point.datatype, point.value)
        self._client.publish(f"{NAMESPACE}/{self.group_id}/DDATA/{self.edge_node_id}/{device}",
                             payload.SerializeToString(), qos=0)
        return True

    def status(self, details: dict[str, Any]) -> None:
        """The periodic status: node metrics, in the next NBIRTH and as NDATA now."""
        values = _node_values(details)
        if not self.ready:
            self._stage_node_metrics(values)
            return
        payload = Payload(timestamp=int(time.time() * 1000))
        for name, value in values.items():
            known = self._node_metrics.get(name)
            if known is None or known[1] != _node_type(value) or known[2] == value:
                continue  # unchanged, or not in the NBIRTH of this session: it shows in the next one
            self._node_metrics[name] = (known[0], known[1], value)
            metric = payload.metrics.add()
            metric.alias, metric.datatype, metric.timestamp = known[0], known[1], payload.timestamp
            set_value(metric, known[1], value)
        if not payload.metrics:
            return
        payload.seq = self._next_seq()
        self._client.publish(self.topic_ndata, payload.SerializeToString(), qos=0)

    def stop(self) -> None:
        """A clean shutdown: DISCONNECT suppresses the will, so the NDEATH is sent first."""
        if self._connected and self._client is not None:
            self._client.publish(self.topic_ndeath, self.death_payload(self._connect_bdseq), qos=1)

    # --- births and deaths ----------------------------------------------------------------------------

    @staticmethod
    def death_payload(bdseq: int) -> bytes:
        payload = Payload(timestamp=int(time.time() * 1000))
        metric = payload.metrics.add(name=BDSEQ, datatype=UINT64, long_value=bdseq)
        metric.timestamp = payload.timestamp
        return payload.SerializeToString()

    def _pre_connect(self, client: Any, userdata: Any) -> None:
        # paho's thread, right before the CONNECT: the will carries the next bdSeq (invariant 2). Each
        # connection is a new paho client (agent/uplink.py), so no message of an old session is queued in it:
        # what was in flight then is sent again by the uplink, in this session, after its births.
        self._connect_bdseq = bdseq = self._bdseq.next()
        client.will_set(self.topic_ndeath, self.death_payload(bdseq), qos=1, retain=False)

    def _birth(self) -> None:
        """NBIRTH, then a DBIRTH for every device known and alive, all with seq from 0."""
        self._seq = 0
        now = int(time.time() * 1000)
        payload = Payload(timestamp=now, seq=self._next_seq())
        payload.metrics.add(name=BDSEQ, timestamp=now, datatype=UINT64, long_value=self._connect_bdseq)
        payload.metrics.add(name=REBIRTH, timestamp=now, datatype=BOOLEAN, boolean_value=False)
        for name, (alias, datatype, value) in self._node_metrics.items():
            metric = payload.metrics.add(name=name, alias=alias, timestamp=now, datatype=datatype)
            set_value(metric, datatype, value)
        self._client.publish(self.topic_nbirth, payload.SerializeToString(), qos=0)
        self._node_born = True
        self.births += 1
        log.info("Sparkplug: NBIRTH as %s/%s (bdSeq %d)", self.group_id, self.edge_node_id, self._connect_bdseq)
        for device, state in self._devices.items():
            state.born = False
            if state.points and not self._dead(device, state):
                self._publish_dbirth(device, state)

    def _publish_dbirth(self, device: str, state: _Device) -> None:
        now = int(time.time() * 1000)
        payload = Payload(timestamp=now, seq=self._next_seq())
        for name, point in state.points.items():
            metric = payload.metrics.add(name=name, alias=point.alias, timestamp=point.ts or now,
                                         datatype=point.datatype)
            set_value(metric, point.datatype, point.value)
            if point.unit is not None:
                add_property(metric, "engUnit", STRING, point.unit)
        self._client.publish(f"{NAMESPACE}/{self.group_id}/DBIRTH/{self.edge_node_id}/{device}",
                             payload.SerializeToString(), qos=0)
        state.born = True

    def _publish_ddeath(self, device: str, state: _Device) -> None:
        if state.born:
            payload = Payload(timestamp=int(time.time() * 1000), seq=self._next_seq())
            self._client.publish(f"{NAMESPACE}/{self.group_id}/DDEATH/{self.edge_node_id}/{device}",
                                 payload.SerializeToString(), qos=0)
            log.debug("Sparkplug: DDEATH of %s", device)  # its failure is logged by its health
        state.born = False

    def _dead(self, device: str, state: _Device) -> bool:
        health = self.health.get(device)
        return state.bad or (health is not None and health.failures.failing)

    async def watch_devices(self) -> None:
        """DDEATH for a born device whose polls fail: a failed poll writes nothing to the buffer, so no
        message would show it. Run by the uplink's task group: it ends with the uplink."""
        while True:
            await asyncio.sleep(WATCH)
            if self.ready:
                for device, state in self._devices.items():
                    if state.born and self._dead(device, state):
                        self._publish_ddeath(device, state)

    @staticmethod
    def _remember(state: _Device, polls: list[tuple[int, list[dict[str, Any]]]]) -> None:
        for ts, readings in polls:
            for reading in readings:
                point = state.points[reading["point"]]
                point.value = reading["value"] if datatype_of(reading["value"]) == point.datatype else None
                point.ts = ts

    # --- commands and the primary host ----------------------------------------------------------------

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._command, message.topic, message.payload)

    def _command(self, topic: str, body: bytes) -> None:
        if topic == self.topic_state:
            self._host_state(body)
            return
        try:
            payload = Payload.FromString(body)
        except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError; anyone may publish here
            log.warning("Sparkplug: ignored an NCMD that is not a Sparkplug B payload (%s)", exc)
            return
        for metric in payload.metrics:
            name = metric.name or next((n for n, (a, _, _) in self._node_metrics.items()
                                        if metric.HasField("alias") and a == metric.alias), "")
            if name == REBIRTH and metric.boolean_value:
                log.info("Sparkplug: rebirth requested (NCMD)")
                if self._connected and self._host_online:
                    self._birth()
            else:
                log.warning("Sparkplug: ignored NCMD metric %r: only %s is acted on", name or metric.alias,
                            REBIRTH)

    def _host_state(self, body: bytes) -> None:
        try:
            state = json.loads(body)
            online, timestamp = state["online"], state["timestamp"]
            if not isinstance(online, bool) or not isinstance(timestamp, int):
                raise ValueError("online is not true or false, or timestamp not an integer")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("Sparkplug: ignored a STATE message of %s that is not Sparkplug 3.0 JSON (%s)",
                        self.primary_host_id, exc)
            return
        if not online and timestamp < self._host_since:
            return  # an offline STATE older than the online one we act on (a late will): not this session
        if online and not self._host_online:
            log.info("Sparkplug: primary host %s is online", self.primary_host_id)
            self._host_online, self._host_since = True, timestamp
            if self._connected:
                self._birth()
                self._on_ready()
        elif not online and self._host_online:
            log.warning("Sparkplug: primary host %s is offline: data waits in the buffer", self.primary_host_id)
            self._host_online = False

    # --- helpers --------------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (seq + 1) % 256
        return seq

    def _alias(self) -> int:
        alias = self._next_alias
        self._next_alias += 1
        return alias

    def _stage_node_metrics(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            known = self._node_metrics.get(name)
            datatype = _node_type(value)
            alias = known[0] if known is not None else self._alias()
            self._node_metrics[name] = (alias, datatype, value)


def _node_type(value: Any) -> int:
    return datatype_of(value) or STRING


def _node_values(details: dict[str, Any]) -> dict[str, Any]:
    """Node metrics from the status message's details (agent/status.py)."""
    buffer = details.get("buffer", {})
    devices = details.get("devices", {})
    values: dict[str, Any] = {
        "Buffer/Readings": buffer.get("readings", 0),
        "Buffer/Bytes": buffer.get("bytes", 0),
        "Buffer/Oldest Age": float(buffer.get("oldest_age_s", 0.0)),
        "Buffer/Lost": sum(buffer.get(key, 0) for key in LOSS_REASONS),
        "Uplink/Inflight": details.get("uplink", {}).get("inflight", 0),
        "Devices/Failing": sum(1 for device in devices.values() if device.get("state") not in ("ok", None)),
    }
    clock = details.get("clock")
    if isinstance(clock, dict) and "state" in clock:
        values["Clock/State"] = str(clock["state"])
    return values



def birth_points(payload: Any) -> dict[int, tuple[str, str | None]]:
    """A decoded DBIRTH's metrics by alias: (name, unit). For the monitor and tests."""
    points = {}
    for metric in payload.metrics:
        properties = dict(zip(metric.properties.keys, metric.properties.values, strict=False))
        unit = properties["engUnit"].string_value if "engUnit" in properties else None
        points[metric.alias] = (metric.name, unit)
    return points


def data_polls(payload: Any, points: dict[int, tuple[str, str | None]]) -> list[dict[str, Any]]:
    """A decoded DDATA's readings in the JSON encoding's shape: polls ({ts (epoch seconds), readings}),
    a poll being a run of metrics with one timestamp. Live state metrics (`is_live`) are not readings and are
    left out. Raises KeyError for an alias the DBIRTH did not name and ValueError for a metric without our
    "seq" property. For the monitor; a platform does the same."""
    polls: list[dict[str, Any]] = []
    for metric in payload.metrics:
        if is_live(points[metric.alias][0]):
            continue
        properties = {key: value_of(value) for key, value in
                      zip(metric.properties.keys, metric.properties.values, strict=False)}
        if "seq" not in properties:
            raise ValueError(f"metric {metric.alias} has no seq property")
        name, unit = points[metric.alias]
        reading = {"seq": properties["seq"], "point": name, "value": value_of(metric),
                   "quality": "bad" if properties.get("Quality") == QUALITY_BAD else properties.get("quality", "good")}
        if unit is not None:
            reading["unit"] = unit
        for key in ("reason", "source_ts", "server_ts"):
            if key in properties:
                reading[key] = properties[key]
        ts = metric.timestamp / 1000
        if not polls or polls[-1]["ts"] != ts:
            polls.append({"ts": ts, "readings": [], "historical": metric.is_historical})
        polls[-1]["readings"].append(reading)
    return polls
