"""The compact encoding (agent/compact.py): decodable by a standard CBOR library into exactly what the JSON
encoding says, its tables, and its path through the buffer and the uplink to a real broker."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import socket
import sqlite3
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from agent.compact import CBOR_SCHEMA, SELF_DESCRIBED, CborEncoder, _good_values, _values_and_extra, decode_polls
from agent.demo.mosquitto import MosquittoProcess, free_port
from agent.model import Float32, PollResult, Quality, Reading
from agent.monitor import Monitor
from agent.payload import Encoder
from buffer.store import Buffer, StoredBatch
from drivers.modbus.decode import shortest_float32
from drivers.modbus.simulator import SimServer
from tests.conftest import agent_config, meter_device
from tests.test_end_to_end import GATEWAY, eventually, nothing_lost, start_agent, stop_agent

BUFFER_ID = "0123456789abcdef0123456789abcdef"
POINTS = [("voltage_l1", "V"), ("current_l1", "A"), ("power_factor", None), ("energy", "Wh"), ("alarm", None)]


def encoders() -> tuple[CborEncoder, Encoder]:
    compact = CborEncoder("gw-1", "site-1", BUFFER_ID)
    compact.declare("meter", POINTS)
    return compact, Encoder("gw-1", "site-1", BUFFER_ID)


def tables_of(encoder: CborEncoder) -> dict[str, list[dict[str, Any]]]:
    return {table_id: json.loads(text) for _, table_id, text in encoder.take_tables()}


def same_value(compact: Any, plain: Any) -> bool:
    """A compact value means what the JSON value means: equal, or the float32 whose shortest decimal it is."""
    if isinstance(compact, float) and isinstance(plain, float) and compact != plain:
        return shortest_float32(compact) == plain
    return type(compact) is type(plain) and compact == plain


def as_json_polls(message: bytes, tables: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    polls = decode_polls(cbor2.loads(message), tables)
    for poll in polls:
        poll.pop("ts")
    return polls


def f32(value: float) -> Float32:
    return Float32(shortest_float32(struct.unpack(">f", struct.pack(">f", value))[0]))


def test_a_standard_decoder_reads_a_poll_of_good_numbers_in_about_6_bytes_a_value() -> None:
    compact, plain = encoders()
    result = PollResult("meter", 1764000000.5, (
        Reading("voltage_l1", f32(229.8), "V"), Reading("current_l1", f32(12.345678), "A"),
        Reading("power_factor", 0.95), Reading("energy", 4_000_000_123, "Wh"), Reading("alarm", False)))
    message = compact.message(result, 41)
    assert message.startswith(SELF_DESCRIBED)
    decoded = cbor2.loads(message)
    assert {k: decoded[k] for k in ("schema", "gateway", "site", "buffer_id", "device")} == {
        "schema": CBOR_SCHEMA, "gateway": "gw-1", "site": "site-1", "buffer_id": BUFFER_ID, "device": "meter"}
    (poll,) = decoded["polls"]
    ts_ms, seq, table_id, values = poll  # no fifth item: every reading good, in table order
    assert (ts_ms, seq) == (1764000000500, 41)
    tables = tables_of(compact)
    assert tables == {table_id: [{"point": "voltage_l1", "unit": "V"}, {"point": "current_l1", "unit": "A"},
                                             {"point": "power_factor"}, {"point": "energy", "unit": "Wh"},
                                             {"point": "alarm"}]}
    # float32 on the wire: the meter's own 4 bytes; 0.95 (a float64 that is a float32's shortest decimal) too
    assert values[0] == struct.unpack(">f", struct.pack(">f", 229.8))[0]
    assert list(values[2:]) == [struct.unpack(">f", struct.pack(">f", 0.95))[0], 4_000_000_123, False]
    fragment, _ = compact.fragment(result, 41)
    assert len(fragment) == 1 + 9 + 2 + 9 + 1 + 5 + 5 + 5 + 5 + 1
    wanted = json.loads(plain.message(result, 41))["polls"]
    for poll_c, poll_j in zip(as_json_polls(message, tables), wanted, strict=True):
        for reading_c, reading_j in zip(poll_c["readings"], poll_j["readings"], strict=True):
            assert same_value(reading_c.pop("value"), reading_j.pop("value"))
            assert reading_c == reading_j


def test_a_float64_that_is_no_float32_goes_as_float64() -> None:
    compact, _ = encoders()
    for value in (0.1 + 0.2, 123456789.1, 1e300, 5e-324):
        values = cbor2.loads(compact.message(PollResult("meter", 0.0, (Reading("voltage_l1", value, "V"),)), 1))
        assert list(values["polls"][0][3]) == [value]
    raw = compact.fragment(PollResult("meter", 0.0, (Reading("voltage_l1", 0.1 + 0.2, "V"),)), 1)[0]
    assert b"\xfb" + struct.pack(">d", 0.1 + 0.2) in raw


readings = st.builds(
    Reading,
    st.sampled_from([p for p, _ in POINTS] + ["extra_point"]),
    st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.text(max_size=8),
              st.floats(allow_nan=True, allow_infinity=True),
              st.floats(width=32, allow_nan=False, allow_infinity=False).map(f32),
              st.sampled_from([Float32(math.nan), Float32(-math.inf)])),
    st.sampled_from([None, "V", "A", "Wh"]),
    st.sampled_from(list(Quality)),
    st.one_of(st.none(), st.text(max_size=10)),
    st.one_of(st.none(), st.floats(1.6e9, 1.9e9)),
    st.one_of(st.none(), st.floats(1.6e9, 1.9e9)))


@settings(max_examples=300, deadline=None)
@given(st.lists(readings, max_size=8))
def test_any_poll_decodes_to_what_the_json_encoding_says(poll: list[Reading]) -> None:
    """Both paths (good numbers, and everything else), tables grown for unknown points, positions for a
    subset or another order, quality, reasons, device timestamps and values neither encoding can carry."""
    compact, plain = encoders()
    result = PollResult("meter", 1764000000.25, tuple(poll))
    message = compact.message(result, 7)
    wanted = json.loads(plain.message(result, 7))["polls"]
    got = as_json_polls(message, tables_of(compact))
    for poll_c, poll_j in zip(got, wanted, strict=True):
        for reading_c, reading_j in zip(poll_c["readings"], poll_j["readings"], strict=True):
            assert same_value(reading_c.pop("value"), reading_j.pop("value")), (reading_c, reading_j)
            for key in ("source_ts", "server_ts"):  # milliseconds, as the JSON encoding's text
                if key in reading_j:
                    assert reading_c.pop(key) == pytest.approx(
                        math.floor(getattr(result.readings[reading_c["seq"] - 7], key) * 1000) / 1000)
                    reading_j.pop(key)
            assert reading_c == reading_j
    good = _good_values(result.readings)
    if good is not None:  # the fast path writes what the general path writes
        assert good == _values_and_extra(result.readings)[0]


def test_tables_are_named_by_their_content_and_handed_out_once() -> None:
    compact, _ = encoders()
    full = PollResult("meter", 0.0, tuple(Reading(p, 1, u) for p, u in POINTS))
    assert compact.take_tables() == []  # declared, not yet used by a poll
    compact.fragment(full, 1)
    (first,) = compact.take_tables()
    again = CborEncoder("other-gw", "other-site", "f" * 32)
    again.declare("meter", POINTS)
    again.fragment(full, 1)
    assert again.take_tables() == [first]  # the same points: the same id, whatever the gateway or run
    compact.declare("meter", POINTS)
    compact.fragment(full, 6)
    assert compact.take_tables() == []
    # Every point in another order (Modbus reads by register): that order becomes the table, once.
    reordered = PollResult("meter", 0.0, full.readings[::-1])
    poll = cbor2.loads(compact.message(reordered, 11))["polls"][0]
    (turned,) = compact.take_tables()
    assert len(poll) == 4 and poll[2] == turned[1] != first[1]
    assert [entry["point"] for entry in json.loads(turned[2])] == [p for p, _ in POINTS][::-1]
    compact.declare("meter", POINTS)
    compact.fragment(full, 16)
    assert compact.take_tables() == [first]
    # A subset (a subscription's changes) names positions in the table instead of a new table.
    subset = PollResult("meter", 0.0, (Reading("energy", 5, "Wh"), Reading("voltage_l1", 230, "V")))
    poll = cbor2.loads(compact.message(subset, 1))["polls"][0]
    assert poll[2] == first[1] and list(poll[4]["points"]) == [3, 0] and compact.take_tables() == []
    # A point the configuration did not declare makes a new table, never a failure.
    surprise = PollResult("meter", 0.0, (Reading("voltage_l1", 230, "V"), Reading("new_point", 1)))
    poll = cbor2.loads(compact.message(surprise, 1))["polls"][0]
    (grown,) = compact.take_tables()
    assert poll[2] == grown[1] != first[1]
    assert json.loads(grown[2])[-1] == {"point": "new_point"} and list(poll[4]["points"]) == [0, 5]


def test_a_message_carries_its_tables_until_one_that_did_is_acknowledged_and_again_later() -> None:
    """In band: a data message decodes with nothing but the data topic's earlier messages. Every message
    carries its table until the broker acknowledged one that did (a refused or lost one cannot leave it
    unsent), again on each new connection, and again after TABLE_REPEAT for subscribers that joined late."""
    from agent.compact import TABLE_REPEAT

    compact, _ = encoders()
    result = PollResult("meter", 1764000000.0, tuple(Reading(p, 1.5, u) for p, u in POINTS))
    first, table_id = compact.fragment(result, 1)
    compact.tables_known("meter", {table_id: text for _, table_id, text in compact.take_tables()})

    def carried(now: float) -> list[str]:
        due = compact.due("meter", [table_id], now)
        message = compact.frame("meter", [first], due)
        assert len(message) == compact.framed_size("meter", len(first), 1, now)
        return list(cbor2.loads(message).get("tables", {}))

    assert carried(100.0) == carried(100.5) == [table_id]  # none acknowledged yet: each one carries it
    tables: dict[str, list[dict[str, Any]]] = {}
    assert as_json_polls(compact.frame("meter", [first], [table_id]), tables)[0]["readings"][0] == {
        "seq": 1, "point": "voltage_l1", "value": 1.5, "quality": "good", "unit": "V"}
    assert tables[table_id][2] == {"point": "power_factor"}  # decode_polls keeps what the message carried
    compact.carried("meter", [table_id], 101.0)
    assert carried(101.1) == [] and carried(101.0 + TABLE_REPEAT - 1) == []
    assert carried(101.0 + TABLE_REPEAT) == [table_id]  # a subscriber that joined since gets it again
    compact.carried("meter", [table_id], 200.0)
    compact.new_connection()
    assert carried(200.1) == [table_id]
    assert compact.due("other-device", [table_id], 200.1) == []  # a table it was never told of: not its own
    assert as_json_polls(compact.frame("meter", [first], []), tables)  # later messages: the kept table


def test_framed_size_is_the_length_of_the_frame() -> None:
    compact, _ = encoders()
    result = PollResult("meter", 0.0, tuple(Reading(p, 1.5, u) for p, u in POINTS))
    fragments = [compact.fragment(result, seq)[0] for seq in (1, 6, 11)]
    for device in ("meter", "a-device-name-longer-than-23-characters"):
        assert len(compact.frame(device, fragments)) == compact.framed_size(device, sum(map(len, fragments)), 3)
        assert len(cbor2.loads(compact.frame(device, fragments))["polls"]) == 3


async def test_the_buffer_keeps_compact_rows_as_they_are_and_the_tables_they_name(tmp_path: Path) -> None:
    compact, _ = encoders()
    result = PollResult("meter", 1.0, tuple(Reading(p, 1.5, u) for p, u in POINTS))
    payload, table = compact.fragment(result, 1)
    buffer = await Buffer.open(tmp_path / "b.db")
    try:
        await buffer.append([StoredBatch(1, 5, "meter", 1.0, payload, table)], compact.take_tables())
        (row,) = await buffer.read_after(0, 10)
        assert (row.payload, row.table) == (payload, table)
        assert list(await buffer.tables("meter")) == [table]
        with sqlite3.connect(tmp_path / "b.db") as db:  # stored as is: zlib would make it larger
            assert db.execute("SELECT payload, tbl FROM batches").fetchall() == [(payload, table)]
        await buffer.append([StoredBatch(6, 1, "meter", 2.0, b'{"ts":"x","readings":[]}')])
        await buffer.delete([1])
    finally:
        await buffer.close()
    buffer = await Buffer.open(tmp_path / "b.db")  # no row names the table any more: it goes
    try:
        assert await buffer.tables("meter") == {}
    finally:
        await buffer.close()


async def test_a_version_1_buffer_is_upgraded_with_its_readings(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
            CREATE TABLE batches (seq INTEGER PRIMARY KEY, count INTEGER NOT NULL, device TEXT NOT NULL,
                                  ts REAL NOT NULL, payload BLOB NOT NULL);
            INSERT INTO meta VALUES ('schema_version', 1), ('buffer_id', 'abc'), ('next_seq', 3),
                                    ('dropped_oldest', 0), ('rejected', 0), ('expired', 0);
        """)
        db.execute("INSERT INTO batches VALUES (1, 2, 'meter', 1.0, ?)", (zlib.compress(b'{"ts":1}'),))
    buffer = await Buffer.open(path)
    try:
        (row,) = await buffer.read_after(0, 10)
        assert (row.payload, row.table, buffer.buffer_id, buffer.next_seq) == (b'{"ts":1}', None, "abc", 3)
    finally:
        await buffer.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [(2,)]


# --- end to end: the agent, a real mosquitto, a subscriber that decodes with cbor2 --------------------

def retained(port: int, topic: str) -> bytes:
    """The retained message on a topic, as a new subscriber gets it."""
    got: list[bytes] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, m: got.append(m.payload)
    client.connect("127.0.0.1", port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    try:
        for _ in range(100):
            if got:
                return got[0]
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
    raise AssertionError(f"no retained message on {topic}")


async def test_compact_messages_reach_the_platform_with_their_tables(tmp_path: Path, mosquitto: MosquittoProcess,
                                                                    modbus_sim: SimServer) -> None:
    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port), extra_mqtt='encoding = "cbor"')
    with Monitor("127.0.0.1", mosquitto.port, f"edge/test-site/{GATEWAY}/#") as monitor:
        _, stop, task = await start_agent(config)
        await eventually(lambda: monitor.received(GATEWAY) >= 40, 10, "compact readings")
        await stop_agent(stop, task)
        stream, _, _ = await nothing_lost(monitor, tmp_path / "buffer.db")
    assert monitor.invalid == 0 and stream.seqs.duplicates == 0
    latest = monitor.latest["power-meter"]
    assert latest["voltage_avg"].unit == "V" and latest["voltage_avg"].quality == "good"
    assert 200 < latest["voltage_avg"].value < 260
    meta = json.loads(retained(mosquitto.port, f"edge/test-site/{GATEWAY}/meta/power-meter"))
    assert meta["schema"] == "edge-agent/meta/v1" and meta["device"] == "power-meter"
    (points,) = meta["tables"].values()  # one table: in the order the driver reads (holding registers first)
    assert points[0] == {"point": "active_energy_wh"} and {"point": "voltage_avg", "unit": "V"} in points


async def test_a_backlog_in_json_and_live_compact_both_arrive_after_a_switch(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer) -> None:
    """The encoding is changed while readings wait in the buffer: each row goes in the encoding it was
    stored in, nothing is lost, and the platform's decoder handles both on one topic."""
    device = meter_device(modbus_sim.port)
    monitor = Monitor("127.0.0.1", mosquitto.port, f"edge/test-site/{GATEWAY}/#", session="switch-platform")
    monitor.start()
    try:
        mosquitto.stop()
        _, stop, task = await start_agent(agent_config(tmp_path, mosquitto.port, device))
        await asyncio.sleep(1.5)  # JSON rows pile up in the buffer
        await stop_agent(stop, task)
        mosquitto.start()
        assert monitor.wait_subscribed(10)
        agent, stop, task = await start_agent(agent_config(tmp_path, mosquitto.port, device,
                                                           extra_mqtt='encoding = "cbor"'))
        buffered = agent.buffer.next_seq - 1 if agent.buffer else 0
        await eventually(lambda: monitor.received(GATEWAY) >= buffered + 40, 15, "backlog and live readings")
        await stop_agent(stop, task)
        _, last, _ = await nothing_lost(monitor, tmp_path / "buffer.db")
    finally:
        monitor.stop()
    assert buffered >= 20 and last > buffered and monitor.invalid == 0


def test_the_monitor_decodes_compact_messages_with_the_tables_it_was_sent() -> None:
    """Without a broker: the monitor's accounting fed a meta message and data messages directly. A message
    naming a table not received yet waits for it (as a platform should: the meta message can come later,
    or the table in a later data message); one whose table never comes is invalid at the end and says
    which table, never guessed."""
    compact, _ = encoders()
    result = PollResult("meter", 1764000000.0, (Reading("voltage_l1", f32(229.8), "V"),
                                                 Reading("current_l1", None, "A", Quality.BAD, "timed out")))
    data = compact.message(result, 1)
    (_, table_id, points), = compact.take_tables()
    topic = "edge/site-1/gw-1/data/meter"
    monitor = Monitor("127.0.0.1", 1, "edge/#")  # never started: nothing connects
    monitor._handle(time.time(), time.monotonic(), topic, data)
    assert monitor.invalid == 0 and monitor.report().gateways[0].waiting_for_table == 1
    meta = b'{"schema":"edge-agent/meta/v1","gateway":"gw-1","site":"site-1","device":"meter","tables":{"%s":%s}}' % (
        table_id.encode(), points.encode())
    monitor._handle(time.time(), time.monotonic(), "edge/site-1/gw-1/meta/meter", meta)
    assert monitor.stream("gw-1").seqs.count == 2 and monitor.report().gateways[0].waiting_for_table == 0
    latest = monitor.latest["meter"]
    assert repr(Float32(latest["voltage_l1"].value)) == "229.8" and latest["voltage_l1"].unit == "V"
    assert latest["current_l1"].quality == "bad" and latest["current_l1"].value is None
    # A table that never comes: the message is invalid when the monitor stops, named by its table.
    other = CborEncoder("gw-1", "site-1", BUFFER_ID)
    lost = other.message(PollResult("meter-2", 0.0, (Reading("x", 1),)), 3)
    (_, lost_table, _), = other.take_tables()
    monitor._handle(time.time(), time.monotonic(), "edge/site-1/gw-1/data/meter-2", lost)
    assert monitor.invalid == 0
    monitor.stop()
    assert monitor.invalid == 1 and monitor.report().gateways[0].waiting_for_table == 0
    assert lost_table in monitor.gateways["gw-1"].errors[0] and "meter-2" in monitor.gateways["gw-1"].errors[0]


# --- no cross-topic ordering: a subscriber to the data topics alone decodes everything ------------------

DATA_ONLY = f"edge/test-site/{GATEWAY}/data/#"


def decode_in_arrival_order(messages: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """docs/payload.md's recipe, strictly: each message decoded when it arrives, with the tables the topics
    carried before it (in band on the data topic, or on the meta topic). Raises KeyError for a data message
    whose table had not arrived."""
    tables: dict[tuple[str, str], dict[str, Any]] = {}
    polls: list[dict[str, Any]] = []
    for topic, body in messages:
        kind, device = topic.split("/")[-2:]
        if kind == "meta":
            meta = json.loads(body)
            tables.setdefault((meta["gateway"], device), {}).update(meta["tables"])
        elif body.startswith(SELF_DESCRIBED):
            message = cbor2.loads(body)
            polls += decode_polls(message, tables.setdefault((message["gateway"], device), {}))
    return polls


async def test_a_subscriber_that_sees_the_data_before_the_tables_decodes_every_message(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer) -> None:
    """The aedes reordering, and RabbitMQ 3.10 (no retained message for a wildcard subscription): a
    subscriber that gets the data topics first and the meta topic only later decodes each data message
    the moment it arrives."""
    got: list[tuple[str, bytes]] = []
    subscriber = mqtt.Client(CallbackAPIVersion.VERSION2)
    subscriber.on_message = lambda c, u, m: got.append((m.topic, m.payload))
    subscriber.connect("127.0.0.1", mosquitto.port)
    subscriber.subscribe(DATA_ONLY, qos=1)
    subscriber.loop_start()
    try:
        devices = meter_device(modbus_sim.port) + meter_device(modbus_sim.port, name="env-sensor", unit_id=2)
        config = agent_config(tmp_path, mosquitto.port, devices, extra_mqtt='encoding = "cbor"')
        _, stop, task = await start_agent(config)
        try:
            await eventually(lambda: len(got) >= 10, 10, "data messages")
            subscriber.subscribe(f"edge/test-site/{GATEWAY}/meta/#", qos=1)  # the tables, after the data
            await eventually(lambda: any("/meta/" in topic for topic, _ in got), 10, "the retained meta")
        finally:
            await stop_agent(stop, task)
    finally:
        subscriber.loop_stop()
        subscriber.disconnect()
    assert "/data/" in got[0][0]
    polls = decode_in_arrival_order(got)
    seqs = [reading["seq"] for poll in polls for reading in poll["readings"]]
    assert len(polls) >= 10 and len(seqs) == len(set(seqs))
    assert {reading["point"] for poll in polls for reading in poll["readings"]} >= {"voltage_avg", "active_power"}


async def test_a_backlog_after_a_restart_decodes_from_the_data_topics_alone(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer) -> None:
    """Compact rows stored while the broker was away (a schema 2 buffer: the rows and tables an earlier
    version wrote are the same bytes), sent by the next run as a backlog beside the live stream: the
    platform's monitor, subscribed to the data topics only, decodes every reading, none waits."""
    device = meter_device(modbus_sim.port)
    config = agent_config(tmp_path, mosquitto.port, device, extra_mqtt='encoding = "cbor"')
    mosquitto.stop()
    agent, stop, task = await start_agent(config)
    await asyncio.sleep(1.5)  # compact rows pile up in the buffer
    await stop_agent(stop, task)
    with sqlite3.connect(tmp_path / "buffer.db") as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [(2,)]
        assert db.execute("SELECT count(*) FROM batches WHERE tbl IS NOT NULL").fetchone()[0] >= 5
    mosquitto.start()
    with Monitor("127.0.0.1", mosquitto.port, DATA_ONLY) as monitor:
        agent, stop, task = await start_agent(config)
        buffered = agent.buffer.next_seq - 1 if agent.buffer else 0
        await eventually(lambda: monitor.received(GATEWAY) >= buffered + 20, 15, "backlog and live readings")
        await stop_agent(stop, task)
        _, last, _ = await nothing_lost(monitor, tmp_path / "buffer.db")
        report = monitor.report()
    assert buffered >= 20 and last > buffered
    assert report.invalid == 0 and report.gateways[0].waiting_for_table == 0, report.gateways[0].invalid_errors


async def test_after_a_reconnect_the_first_messages_carry_the_tables_again(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer) -> None:
    """A subscriber that joins while the broker restarts (a new platform instance, a consumer that lost
    its tables) decodes the data topics alone at once: the agent's first messages on its new connection
    carry the tables; nothing waits for the minute's repeat."""
    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port), extra_mqtt='encoding = "cbor"')
    agent, stop, task = await start_agent(config)
    try:
        await eventually(lambda: agent.uplink is not None and agent.uplink.messages_delivered >= 5, 10,
                         "messages delivered, the tables acknowledged")
        mosquitto.restart()  # the agent waits reconnect_min (1 s) or more before it is back
        with Monitor("127.0.0.1", mosquitto.port, DATA_ONLY) as monitor:
            await eventually(lambda: monitor.received(GATEWAY) >= 40, 10, "readings after the reconnect")
            report = monitor.report()
    finally:
        await stop_agent(stop, task)
    assert report.invalid == 0 and report.gateways[0].waiting_for_table == 0, report.gateways[0].invalid_errors


async def test_the_monitor_command_joining_late_decodes_without_the_meta_topic(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """`edge-agent monitor` subscribed to the data topics only, started after the agent had sent its
    tables: what arrives before the table rides again waits for it, and everything is decoded."""
    import subprocess
    import sys

    from tests.conftest import REPO

    monkeypatch.setattr("agent.compact.TABLE_REPEAT", 1.0, raising=False)  # the agent's 60 s: a slow test
    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port, interval="100ms"),
                          extra_mqtt='encoding = "cbor"')
    _, stop, task = await start_agent(config)
    try:
        await asyncio.sleep(0.5)  # the first messages, with the tables, are gone before the monitor starts
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "agent", "monitor", "--port", str(mosquitto.port),
                             "--topic", "edge/+/+/data/#", "--duration", "3", "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        await stop_agent(stop, task)
    assert result.returncode == 0, result.stdout + result.stderr
    final = json.loads(result.stdout.strip().splitlines()[-1])
    (gateway,) = final["gateways"]
    assert final["ok"] and final["invalid"] == 0 and gateway["waiting_for_table"] == 0, gateway["invalid_errors"]
    assert gateway["readings"] >= 40


# --- a second broker implementation: NATS's MQTT (its own ordering and retained-message code) -------------

NATS_SERVER = shutil.which("nats-server") or next((p for p in ("/usr/sbin/nats-server",) if Path(p).exists()), None)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.fixture
def nats_mqtt(tmp_path: Path) -> Iterator[int]:
    """nats-server with JetStream (its MQTT needs it) and an MQTT listener on a free loopback port."""
    if NATS_SERVER is None:
        pytest.skip("nats-server is not installed")
    port = free_port()
    config = tmp_path / "nats.conf"
    config.write_text(f'server_name: "edge_test"\nlisten: "127.0.0.1:-1"\n'
                      f'jetstream {{ store_dir: "{tmp_path / "nats"}" }}\nmqtt {{ host: "127.0.0.1", port: {port} }}\n')
    with (tmp_path / "nats.log").open("wb") as log_file:
        process = subprocess.Popen([NATS_SERVER, "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nats-server did not start: {(tmp_path / 'nats.log').read_text()[-500:]}")
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


async def test_a_data_topics_only_subscriber_decodes_everything_through_nats(
        tmp_path: Path, nats_mqtt: int, modbus_sim: SimServer) -> None:
    devices = meter_device(modbus_sim.port) + meter_device(modbus_sim.port, name="env-sensor", unit_id=2)
    config = agent_config(tmp_path, nats_mqtt, devices, extra_mqtt='encoding = "cbor"')
    with Monitor("127.0.0.1", nats_mqtt, DATA_ONLY) as monitor:
        _, stop, task = await start_agent(config)
        await eventually(lambda: monitor.received(GATEWAY) >= 60, 15, "compact readings through NATS")
        await stop_agent(stop, task)
        await nothing_lost(monitor, tmp_path / "buffer.db")
        report = monitor.report()
    assert report.invalid == 0 and report.gateways[0].waiting_for_table == 0, report.gateways[0].invalid_errors
    assert {d.device for d in report.gateways[0].devices} == {"power-meter", "env-sensor"}
