"""Sparkplug B end to end: the agent as a process against a real mosquitto and a real Modbus server, every
message decoded by Eclipse Tahu's JavaScript codec (npm: sparkplug-payload), not by the agent's own code.

The normative statements of Sparkplug 3.0 these tests check are listed in docs/payload.md ("Sparkplug B").
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.errors import EX_CONFIG
from agent.monitor import Monitor
from agent.sparkplug.sparkplug_b_pb2 import Payload
from drivers.modbus.simulator import PowerMeter, SimServer
from tests.conftest import REPO, agent_config, meter_device

pytestmark = pytest.mark.timeout(90)

TAHU_VERSION = "1.0.3"
DECODER = Path(__file__).with_name("tahu_decode.js")


@pytest.fixture(scope="session")
def tahu() -> Path:
    """A folder holding Eclipse Tahu's JavaScript payload codec, installed from the npm registry once."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed to decode Sparkplug with an independent implementation (Eclipse "
                    "Tahu's sparkplug-payload); install nodejs and npm")
    folder = REPO / ".venv" / "tahu-js"
    if not (folder / "node_modules" / "sparkplug-payload" / "package.json").exists():
        subprocess.run([npm, "install", "--prefix", str(folder), "--no-audit", "--no-fund", "--loglevel=error",
                        f"sparkplug-payload@{TAHU_VERSION}"], check=True, timeout=300, capture_output=True)
    return folder


def decode(tahu: Path, messages: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """Every message the edge node sent (not the host's STATE and NCMD) decoded by Tahu, in order of arrival."""
    lines = "".join(json.dumps({"topic": topic, "payload": base64.b64encode(body).decode()}) + "\n"
                    for topic, body in messages if "/STATE/" not in topic and "/NCMD/" not in topic)
    result = subprocess.run(["node", str(DECODER)], input=lines.encode(), capture_output=True, timeout=60,
                            check=True, env={"NODE_PATH": str(tahu / "node_modules"), "PATH": "/usr/bin:/bin"})
    decoded = [json.loads(line) for line in result.stdout.decode().splitlines()]
    errors = [d for d in decoded if "error" in d]
    assert not errors, errors[:3]
    for message in decoded:
        message["kind"] = message["topic"].split("/")[2]
    return decoded


class Capture:
    """A subscriber to spBv1.0/#, keeping every message in order of arrival; also publishes commands."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sparkplug-test-host")
        self.client.on_connect = lambda c, *a: c.subscribe("spBv1.0/#", qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload))

    def kinds(self) -> list[str]:
        with self._lock:
            return [topic.split("/")[1 if topic.startswith("spBv1.0/STATE/") else 2] for topic, _ in self.messages]

    def wait(self, condition: Callable[[list[str]], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self.kinds()):
            assert time.monotonic() < deadline, f"timed out; seen {self.kinds()}"
            time.sleep(0.05)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def capture(mosquitto: Any) -> Iterator[Capture]:
    capture = Capture(mosquitto.port)
    yield capture
    capture.close()


def sparkplug_config(tmp_path: Path, mqtt_port: int, modbus_port: int, primary_host: str | None = None) -> Path:
    host = f'primary_host_id = "{primary_host}"' if primary_host else ""
    return agent_config(tmp_path, mqtt_port, meter_device(modbus_port), extra_mqtt=f"""
        encoding = "sparkplug"
        [mqtt.sparkplug]
        group_id = "plant-1"
        {host}
        """)


def ncmd(name: str, value: bool) -> bytes:
    payload = Payload(timestamp=int(time.time() * 1000))
    payload.metrics.add(name=name, datatype=11, boolean_value=value)
    return payload.SerializeToString()


def seq_of(metric: dict[str, Any]) -> int:
    return int(metric["properties"]["seq"]["value"])


def check_seq(decoded: list[dict[str, Any]]) -> None:
    """[tck-id-payloads-sequence-num-*]: seq 0 at NBIRTH, +1 mod 256 per message, NDEATH without; and no
    message between an NDEATH and the next NBIRTH, where a host would drop it (what the MQTT client would
    re-send after a reconnect: Sparkplug invariant 5)."""
    expected = None
    born = False
    for message in decoded:
        kind, seq = message["kind"], message["payload"].get("seq")
        if kind == "NDEATH":
            assert seq is None
            born = False
            continue
        assert kind == "NBIRTH" or born, f"{kind} outside a session (after an NDEATH, before the NBIRTH)"
        born = True
        assert seq is not None, f"{kind} without seq: {message}"
        seq = int(seq)
        if kind == "NBIRTH":
            assert seq == 0
        elif expected is not None:
            assert seq == expected, f"{kind} has seq {seq}, expected {expected}"
        expected = (seq + 1) % 256


def check_births(decoded: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """No DDATA of a device without its DBIRTH since the last NBIRTH and its last DDEATH; every alias in a
    DDATA was named, with its datatype, in that DBIRTH. Returns every alias ever named (alias -> metric)."""
    born: dict[str, dict[int, dict[str, Any]]] = {}
    named: dict[int, dict[str, Any]] = {}
    node_born = False
    for message in decoded:
        kind, levels, metrics = message["kind"], message["topic"].split("/"), message["payload"].get("metrics", [])
        if kind == "NBIRTH":
            node_born, born = True, {}
        elif kind == "NDEATH":
            node_born = False
        elif kind == "DBIRTH":
            assert node_born, "DBIRTH before NBIRTH"
            born[levels[4]] = {int(m["alias"]): m for m in metrics}
            for metric in metrics:
                assert metric["name"] and metric["type"] and "value" in metric
                named[int(metric["alias"])] = metric
        elif kind == "DDEATH":
            born.pop(levels[4], None)
        elif kind == "DDATA":
            assert node_born and levels[4] in born, f"DDATA of {levels[4]} without its DBIRTH"
            for metric in metrics:
                birth = born[levels[4]][int(metric["alias"])]
                assert "name" not in metric  # by alias only
                assert metric["type"] == birth["type"]
    return named


def readings(decoded: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    return [(seq_of(m), m) for d in decoded if d["kind"] == "DDATA" for m in d["payload"]["metrics"]]


def assert_exactly_once(seqs: list[int]) -> None:
    assert len(seqs) == len(set(seqs)), "a reading arrived twice"
    assert sorted(seqs) == list(range(1, max(seqs) + 1)), "a reading is missing"


async def wait_kinds(capture: Capture, condition: Callable[[list[str]], bool], timeout: float = 20.0) -> None:
    await asyncio.to_thread(capture.wait, condition, timeout)


async def test_births_data_device_death_rebirth_and_clean_death(tmp_path: Path, mosquitto: Any, capture: Capture,
                                                               agent_process: Any, tahu: Path) -> None:
    meter = SimServer({1: PowerMeter(seed=1)}, update_interval=0.2)
    await meter.start()
    port = meter.port
    monitor = Monitor("127.0.0.1", mosquitto.port, topic_filter="spBv1.0/#").start()
    agent = agent_process(sparkplug_config(tmp_path, mosquitto.port, port), tmp_path / "agent.log")
    agent.start()
    try:
        await wait_kinds(capture, lambda k: k.count("DDATA") >= 3)
        await meter.stop()  # the meter stops answering: DDEATH
        await wait_kinds(capture, lambda k: "DDEATH" in k)
        meter = SimServer({1: PowerMeter(seed=1)}, port=port, update_interval=0.2)
        await meter.start()  # and answers again: DBIRTH, then data
        await wait_kinds(capture, lambda k: k[k.index("DDEATH"):].count("DDATA") >= 2)
        # Only "Node Control/Rebirth" is acted on; another command is logged and ignored.
        capture.client.publish("spBv1.0/plant-1/NCMD/gw-test", ncmd("Node Control/Reboot", True), qos=1)
        capture.client.publish("spBv1.0/plant-1/NCMD/gw-test", ncmd("Node Control/Rebirth", True), qos=1)
        await wait_kinds(capture, lambda k: k.count("NBIRTH") == 2 and k[k.index("NBIRTH", 1):].count("DDATA") >= 2)
        assert agent.terminate() == 0
        await wait_kinds(capture, lambda k: "NDEATH" in k)
    finally:
        await meter.stop()
        monitor_report = monitor.report(final=True)
        monitor.stop()
    assert "ignored NCMD metric 'Node Control/Reboot'" in agent.log()

    decoded = decode(tahu, capture.messages)
    kinds = [d["kind"] for d in decoded]
    # NBIRTH first; the device's DBIRTH comes with its first data, after node data (status) or not: the order
    # between them is the machine's timing, and check_births below requires a DBIRTH before every DDATA.
    assert kinds[0] == "NBIRTH" and kinds[-1] == "NDEATH" and kinds.index("DBIRTH") < kinds.index("DDATA")
    assert kinds.count("NBIRTH") == 2  # the start and the rebirth; the other command made none
    check_seq(decoded)
    named = check_births(decoded)
    # DDEATH when the meter stopped answering, DBIRTH before its data again.
    death = kinds.index("DDEATH")
    assert "DBIRTH" in kinds[death:] and kinds[death:].index("DBIRTH") < kinds[death:].index("DDATA")
    births = [d["payload"] for d in decoded if d["kind"] == "NBIRTH"]
    node = {m["name"]: m for m in births[0]["metrics"]}
    rebirth = node["Node Control/Rebirth"]
    assert rebirth["value"] is False and rebirth["type"] == "Boolean" and "alias" not in rebirth
    assert node["Edge Agent/Buffer ID"]["type"] == "String"
    assert node["Buffer/Readings"]["type"] == "Int64" and node["Buffer/Oldest Age"]["type"] == "Double"
    # The status at connect goes out as NDATA, by the aliases of the NBIRTH.
    aliases = {int(m["alias"]): m["type"] for m in births[0]["metrics"] if "alias" in m}
    ndata = [m for d in decoded if d["kind"] == "NDATA" for m in d["payload"]["metrics"]]
    assert ndata and all(aliases[int(m["alias"])] == m["type"] and "name" not in m for m in ndata)
    bdseq = int(node["bdSeq"]["value"])
    assert all(int({m["name"]: m for m in b["metrics"]}["bdSeq"]["value"]) == bdseq for b in births)
    death_payload = decoded[-1]["payload"]
    assert [m["name"] for m in death_payload["metrics"]] == ["bdSeq"] and "seq" not in death_payload
    assert int(death_payload["metrics"][0]["value"]) == bdseq
    # Names, datatypes and units as properties in the DBIRTH.
    voltage = next(m for m in named.values() if m["name"] == "voltage_avg")
    assert voltage["type"] == "Double" and voltage["properties"]["engUnit"]["value"] == "V"
    energy = next(m for m in named.values() if m["name"] == "active_energy_wh")
    assert energy["type"] == "Int64"
    # Every reading exactly once by our sequence number (a poll that failed wrote none: no number is skipped).
    got = readings(decoded)
    assert_exactly_once([seq for seq, _ in got])
    # edge-agent monitor decodes Sparkplug too and proves the same.
    gateway = next(g for g in monitor_report.gateways if g.gateway == "gw-test")
    assert gateway.invalid == 0, gateway.invalid_errors
    assert len(gateway.streams) == 1 and gateway.streams[0].buffer_id == node["Edge Agent/Buffer ID"]["value"]
    assert (gateway.gaps, gateway.lost, gateway.duplicates, gateway.readings) == (0, 0, 0, len(got))


async def test_ndeath_will_on_kill_matches_nbirth_bdseq_and_increments(tmp_path: Path, mosquitto: Any,
                                                                      capture: Capture, agent_process: Any,
                                                                      tahu: Path, modbus_sim: Any) -> None:
    config = sparkplug_config(tmp_path, mosquitto.port, modbus_sim.port)
    agent = agent_process(config, tmp_path / "agent.log")
    agent.start()
    await wait_kinds(capture, lambda k: "DDATA" in k)
    agent.kill()  # SIGKILL: the broker publishes the will
    await wait_kinds(capture, lambda k: "NDEATH" in k)
    agent = agent_process(config, tmp_path / "agent2.log")
    agent.start()
    await wait_kinds(capture, lambda k: k.count("NBIRTH") == 2 and "DDATA" in k[k.index("NBIRTH", 1):])
    agent.terminate()
    decoded = decode(tahu, capture.messages)
    births = [int(m["value"]) for d in decoded if d["kind"] == "NBIRTH" for m in d["payload"]["metrics"]
              if m.get("name") == "bdSeq"]
    deaths = [int(d["payload"]["metrics"][0]["value"]) for d in decoded if d["kind"] == "NDEATH"]
    assert all(len(d["payload"]["metrics"]) == 1 for d in decoded if d["kind"] == "NDEATH")
    assert deaths[0] == births[0]  # the will of the killed process
    assert births[1] == (births[0] + 1) % 256  # persisted beside the buffer, incremented across the restart
    assert (tmp_path / "buffer.db.bdseq").read_text().strip() == str(births[1])
    check_seq(decoded)
    check_births(decoded)
    # At least once across a SIGKILL: what the killed process had in flight (its PUBACK may have been on the
    # wire) is sent again by the next one, no more than max_inflight messages (32 by default); nothing missing.
    first_life = decoded[:next(i for i, d in enumerate(decoded) if d["kind"] == "NDEATH")]
    seqs = [seq for seq, _ in readings(decoded)]
    again = {seq for seq in seqs if seqs.count(seq) > 1}
    assert sorted(set(seqs)) == list(range(1, max(seqs) + 1)), "a reading is missing"
    resent = [d for d in first_life if d["kind"] == "DDATA" and again & {seq_of(m) for m in d["payload"]["metrics"]}]
    assert len(resent) <= 32 and all(seqs.count(seq) == 2 for seq in again), (len(resent), sorted(again))


async def test_primary_host_offline_holds_data_then_backlog_is_historical(tmp_path: Path, mosquitto: Any,
                                                                         capture: Capture, agent_process: Any,
                                                                         tahu: Path, modbus_sim: Any) -> None:
    def publish_state(online: bool) -> int:
        now = int(time.time() * 1000)
        body = json.dumps({"online": online, "timestamp": now})  # Sparkplug 3.0 STATE
        capture.client.publish("spBv1.0/STATE/scada", body, qos=1, retain=True).wait_for_publish(5)
        return now

    async def host(online: bool) -> int:  # off the event loop: the Modbus server in this process must answer
        return await asyncio.to_thread(publish_state, online)

    await host(False)
    agent = agent_process(sparkplug_config(tmp_path, mosquitto.port, modbus_sim.port, primary_host="scada"),
                          tmp_path / "agent.log")
    agent.start()
    await asyncio.sleep(2.5)  # polls every 200 ms go to the buffer only
    assert not [k for k in capture.kinds() if k != "STATE"], "sent before the primary host was online"
    first_online_at = await host(True)
    await wait_kinds(capture, lambda k: k.count("DDATA") >= 4)
    offline_at = await host(False)
    await asyncio.sleep(0.5)  # what was already in flight arrives
    held = capture.kinds().count("DDATA")
    await asyncio.sleep(2.0)
    assert capture.kinds().count("DDATA") == held, "data sent while the primary host was offline"
    online_at = await host(True)
    await wait_kinds(capture, lambda k: k.count("NBIRTH") == 2 and k[k.index("NBIRTH", 1):].count("DDATA") >= 3)
    await asyncio.sleep(1.0)  # live data after the backlog
    agent.terminate()

    decoded = decode(tahu, capture.messages)
    check_seq(decoded)
    check_births(decoded)
    got = readings(decoded)
    assert_exactly_once([seq for seq, _ in got])
    # The first 2.5 s of polls come as history, and so do the polls taken during the second hold (with a
    # margin for the STATE to reach the agent); the polls after it are live, beside that history.
    first = [m for _, m in got if int(m["timestamp"]) < first_online_at - 300]
    assert len(first) >= 20 and all(m.get("isHistorical") for m in first) and seq_of(first[0]) == 1
    during = [m for _, m in got if offline_at + 500 < int(m["timestamp"]) < online_at - 300]
    assert len(during) >= 8 and all(m.get("isHistorical") for m in during)
    after = [m for _, m in got if int(m["timestamp"]) > online_at + 500]
    assert after and not any(m.get("isHistorical") for m in after)


def test_sparkplug_ids_are_checked_like_every_name(tmp_path: Path) -> None:
    """Sparkplug ids are topic levels: '/', '+' and '#' (and anything else a name may not hold) are refused
    at the dotted path, exit 78. (Their defaults, the gateway's id, show in the topics of the tests above.)"""
    config = tmp_path / "c.toml"
    config.write_text('[gateway]\nid = "gw-1"\nsite = "plant-a"\n[mqtt]\nencoding = "sparkplug"\n'
                      '[mqtt.sparkplug]\ngroup_id = "plant/a"\nedge_node_id = "gw+1"\nprimary_host_id = "scada#"\n'
                      '[[devices]]\nname = "m"\ndriver = "modbus"\nhost = "10.0.0.5"\n'
                      'points = [{ name = "v", function = "input", address = 0, type = "float32" }]\n')
    result = subprocess.run([sys.executable, "-m", "agent", "check", "--config", str(config)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EX_CONFIG
    lines = result.stdout.splitlines() + result.stderr.splitlines()
    for key, bad, why in (("group_id", "plant/a", "'/' is not allowed: it separates topic levels"),
                          ("edge_node_id", "gw+1", "'+' is not allowed: it is an MQTT wildcard"),
                          ("primary_host_id", "scada#", "'#' is not allowed: it is an MQTT wildcard")):
        assert any(line.startswith(f"{config}: mqtt.sparkplug.{key}: ") and why in line and f"(got '{bad}')" in line
                   for line in lines), lines


class _Collect:
    """Takes what the session publishes, in order (the codec test needs no broker)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.qos: list[int] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        self.messages.append((topic, payload))
        self.qos.append(qos)

    def message_callback_add(self, topic: str, callback: object) -> None:
        pass

    def subscribe(self, topic: str, qos: int = 0) -> None:
        pass


async def test_values_of_every_type_and_bad_readings_decode_with_tahu(tmp_path: Path, tahu: Path) -> None:
    """Each value type as its Sparkplug datatype, null as is_null, a bad reading with Sparkplug's Quality
    code 0 and our reason, an uncertain one with our quality; a negative Int64 survives; a point whose type
    changes gets a new DBIRTH first; a device's stream ("dev/demand") is a folder of its metrics."""
    from agent.model import PollResult, Quality, Reading
    from agent.payload import Encoder
    from agent.sparkplug import SparkplugSession
    from buffer.store import StoredBatch

    encoder = Encoder("gw", "site", "buf")
    poll = PollResult("dev", 1_764_000_000.5, (
        Reading("f", 1.5, "kW"), Reading("i", -5), Reading("b", True), Reading("s", "RUN"),
        Reading("n", None, None, Quality.BAD, "no answer"), Reading("u", 2.0, None, Quality.UNCERTAIN)))
    later = PollResult("dev", 1_764_000_001.5, (Reading("i", "text now"),))
    demand = PollResult("dev/demand", 1_764_000_002.0, (Reading("kwh", 12.5, "kWh"),))  # a stream of the device
    rows = [StoredBatch(1, 6, "dev", poll.ts, encoder.encode(poll, 1)),
            StoredBatch(7, 1, "dev", later.ts, encoder.encode(later, 7)),
            StoredBatch(8, 1, "dev/demand", demand.ts, encoder.encode(demand, 8))]
    wire = _Collect()
    session = SparkplugSession("g", "node", None, "buf", tmp_path / "bdseq", "test", lambda: None)
    session.attach(wire)
    session.publish(wire, "dev", rows[:1], historical=False)
    session.publish(wire, "dev", rows[1:2], historical=True)
    session.publish(wire, "dev/demand", rows[2:], historical=False)
    session.stop()
    decoded = decode(tahu, wire.messages)
    assert [d["kind"] for d in decoded] == ["DBIRTH", "DDATA", "DBIRTH", "DDATA", "DBIRTH", "DDATA"]
    assert {d["topic"] for d in decoded} == {"spBv1.0/g/DBIRTH/node/dev", "spBv1.0/g/DDATA/node/dev"}
    birth = {m["name"]: m for m in decoded[0]["payload"]["metrics"]}
    assert {name: m["type"] for name, m in birth.items()} == {
        "f": "Double", "i": "Int64", "b": "Boolean", "s": "String", "n": "Double", "u": "Double"}
    assert birth["f"]["properties"]["engUnit"]["value"] == "kW" and birth["n"]["value"] is None
    data = {seq_of(m): m for m in decoded[1]["payload"]["metrics"]}
    assert [data[seq]["value"] for seq in range(1, 7)] == [1.5, "-5", True, "RUN", None, 2.0]
    assert data[5]["properties"]["Quality"] == {"type": "Int32", "value": 0}
    assert data[5]["properties"]["reason"]["value"] == "no answer"
    assert data[6]["properties"]["quality"]["value"] == "uncertain"
    assert all(int(m["timestamp"]) == 1_764_000_000_500 for m in data.values())
    assert {m["name"]: m["type"] for m in decoded[2]["payload"]["metrics"]}["i"] == "String"
    (last,) = decoded[3]["payload"]["metrics"]
    assert last["value"] == "text now" and last["isHistorical"] is True and seq_of(last) == 7
    # The stream's metric joins the device's birth, in a folder; the earlier metrics stay in it.
    folder = {m["name"]: m for m in decoded[4]["payload"]["metrics"]}
    assert folder["demand/kwh"]["properties"]["engUnit"]["value"] == "kWh" and "f" in folder
    (kwh,) = decoded[5]["payload"]["metrics"]
    assert kwh["alias"] == folder["demand/kwh"]["alias"] and kwh["value"] == 12.5 and seq_of(kwh) == 8


async def test_after_a_link_failure_what_was_in_flight_is_sent_again_inside_the_new_session(
        tmp_path: Path, mosquitto: Any, capture: Capture, partition_proxy: Any, agent_process: Any, tahu: Path,
        modbus_sim: Any) -> None:
    """Sparkplug invariant 5 (agent/sparkplug): paho would re-send the messages that were in flight when the
    link failed as soon as it reconnects, with the old session's seq, around the new NBIRTH: a host drops them
    or takes them as out of order. Their rows must go again inside the new session, and the stale copies not
    at all: every reading arrives between an NBIRTH and an NDEATH, after its device's DBIRTH, in seq order."""
    config = agent_config(tmp_path, partition_proxy.port, meter_device(modbus_sim.port), extra_mqtt="""
        encoding = "sparkplug"
        keepalive = "1s"
        """)
    agent = agent_process(config, tmp_path / "agent.log")
    agent.start()
    await wait_kinds(capture, lambda k: k.count("DDATA") >= 3)
    partition_proxy.partition()  # the broker times the agent out and publishes its NDEATH
    await wait_kinds(capture, lambda k: "NDEATH" in k)
    await asyncio.sleep(1.0)  # more polls, sent into the void
    partition_proxy.heal()
    await wait_kinds(capture, lambda k: k.count("NBIRTH") == 2 and k[k.index("NBIRTH", 1):].count("DDATA") >= 5)
    agent.terminate()
    decoded = decode(tahu, capture.messages)
    check_seq(decoded)
    births = [int(m["value"]) for d in decoded if d["kind"] == "NBIRTH" for m in d["payload"]["metrics"]
              if m.get("name") == "bdSeq"]
    deaths = [int(d["payload"]["metrics"][0]["value"]) for d in decoded if d["kind"] == "NDEATH"]
    assert deaths[0] == births[0] and births[1] > births[0]  # +1 per CONNECT, some lost in the partition
    # What a host accepts: DDATA while the node and the device are born.
    accepted, node_born, born = [], False, set()
    for message in decoded:
        kind, device = message["kind"], message["topic"].split("/")[-1]
        if kind == "NBIRTH":
            node_born, born = True, set()
        elif kind == "NDEATH":
            node_born = False
        elif kind == "DBIRTH":
            born.add(device)
        elif kind == "DDATA" and node_born and device in born:
            accepted += [seq_of(m) for m in message["payload"]["metrics"]]
    assert sorted(set(accepted)) == list(range(1, max(accepted) + 1)), "a reading reached the host only outside a " \
                                                                      "session"


async def test_buffer_lost_in_the_nbirth_counts_every_loss_reason(tmp_path: Path) -> None:
    """`Buffer/Lost` is every reading the buffer gave up (LOSS_REASONS, as the status message, /metrics and
    the status line count them): readings a full disk could not store and readings the broker refused are
    lost as surely as those dropped at the cap, and show as gaps too."""
    from agent.sparkplug import SparkplugSession
    from agent.status import StatusReporter
    from buffer.store import Buffer, StoredBatch

    buffer = await Buffer.open(tmp_path / "b.db")
    try:
        await buffer.append([StoredBatch(1, 3, "dev", 1_764_000_000.0, b"{}")])
        await buffer.delete_refused([(1, 3)])  # the broker refused its message again and again
        await buffer.give_up(2, "write failed")  # not stored (a failing disk)
        snapshot = await StatusReporter(buffer, {}, 0).snapshot(0, 0)
    finally:
        await buffer.close()
    wire = _Collect()
    session = SparkplugSession("g", "node", None, "buf", tmp_path / "bdseq", "test", lambda: None)
    session.attach(wire)
    session.status(snapshot)  # before the session is up: staged for the NBIRTH
    session.connected()
    session.stop()
    (birth,) = [Payload.FromString(body) for topic, body in wire.messages if "/NBIRTH/" in topic]
    metrics = {metric.name: metric for metric in birth.metrics}
    assert metrics["Buffer/Lost"].long_value == 5


def _watchers() -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks() if task.get_name() == "sparkplug-device-deaths"]


async def test_the_device_death_watch_ends_with_the_uplink_also_when_the_broker_is_gone(
        tmp_path: Path, mosquitto: Any) -> None:
    """The task that sends DDEATHs for failing devices belongs to the uplink: it ends with it however the
    uplink stops, not only after a clean NDEATH on a live connection."""
    from tests.test_end_to_end import eventually
    from tests.test_uplink_brokers import running_uplink

    async with running_uplink(tmp_path, mosquitto.port, encoding="sparkplug", reconnect_min="5s",
                              reconnect_max="10s") as (uplink, _):
        await eventually(lambda: uplink.connected, 10, "connected")
        assert len(_watchers()) == 1
        mosquitto.stop()
        await eventually(lambda: uplink.last_error is not None, 10, "the link to drop")  # waiting to reconnect
    assert not _watchers()


async def test_live_state_is_born_first_sent_by_exception_at_qos_0_and_only_while_the_device_lives(
        tmp_path: Path, tahu: Path) -> None:
    """Live demand (agent/sparkplug invariant 7): nothing before the session is up; its first values inside a
    DBIRTH that names them beside the buffered metrics; then DDATA at QoS 0 with only what changed and no seq
    property; nothing while the device is dead; the node's seq runs on through all of it."""
    from agent.health import DeviceHealth, FailureLog
    from agent.model import PollResult, Reading
    from agent.payload import Encoder
    from agent.sparkplug import SparkplugSession
    from buffer.store import StoredBatch
    from energy.records import live_poll
    from energy.windows import LiveDemand

    zone = ZoneInfo("Asia/Seoul")
    start = 1_764_000_000.0

    def live(ts: float, kwh: float, alarms: tuple[float, ...]) -> PollResult:
        return live_poll(LiveDemand("m", ts, start, start + 900, kwh, 400.0, kwh * 4 + 100, alarms), zone, 500.0)

    encoder = Encoder("gw", "site", "buf")
    poll = PollResult("m", start + 1, (Reading("energy_active_import", 1000.0, "kWh"),))
    wire = _Collect()
    session = SparkplugSession("g", "node", None, "buf", tmp_path / "bdseq", "test", lambda: None)
    session.attach(wire)
    assert not session.publish_live(live(start + 1, 0.1, ()))  # not connected: dropped, not held
    session.connected()  # NBIRTH
    session.publish(wire, "m", [StoredBatch(1, 1, "m", poll.ts, encoder.encode(poll, 1))], historical=False)
    assert session.publish_live(live(start + 2, 0.2, ()))  # new metrics: a DBIRTH with them, no DDATA
    assert session.publish_live(live(start + 3, 0.3, (450.0,)))  # DDATA: energy, projection and the alarm
    health = DeviceHealth("m", FailureLog("device m", logging.getLogger("tests.sparkplug")))
    session.health = {"m": health}
    health.failures.failed("no answer")
    assert not session.publish_live(live(start + 4, 0.4, (450.0,)))  # the meter is dead
    session.stop()
    decoded = decode(tahu, wire.messages)
    assert [d["kind"] for d in decoded] == ["NBIRTH", "DBIRTH", "DDATA", "DBIRTH", "DDATA", "NDEATH"]
    check_seq(decoded)
    check_births(decoded)
    birth = {m["name"]: m for m in decoded[3]["payload"]["metrics"]}
    assert "energy_active_import" in birth  # the device's readings stay in its birth
    live_birth = {name[len("demand/live/"):]: m for name, m in birth.items() if name.startswith("demand/live/")}
    assert {name: (m["type"], m["value"]) for name, m in live_birth.items()} == {
        "energy_kwh": ("Double", 0.2), "power_kw": ("Double", 400.0), "projected_kw": ("Double", 100.8),
        "alarms_raised": ("Int64", "0"), "alarm_level_kw": ("Double", 0.0), "estimated_s": ("Double", 0.0),
        "settling_s": ("Double", 0.0), "window_start": ("String", "2025-11-25T01:00:00+09:00"),
        "target_kw": ("Double", 500.0)}
    assert live_birth["projected_kw"]["properties"]["engUnit"]["value"] == "kW"
    assert all(int(m["timestamp"]) == (start + 2) * 1000 for m in live_birth.values())
    by_alias = {int(m["alias"]): name for name, m in live_birth.items()}
    changed = {by_alias[int(m["alias"])]: m for m in decoded[4]["payload"]["metrics"]}
    assert {name: m["value"] for name, m in changed.items()} == {
        "energy_kwh": 0.3, "projected_kw": 101.2, "alarms_raised": "1", "alarm_level_kw": 450.0}
    assert all("properties" not in m or "seq" not in m["properties"] for m in changed.values())
    assert all(int(m["timestamp"]) == (start + 3) * 1000 for m in changed.values())
    assert wire.qos[wire.messages.index(next(m for m in wire.messages if "/DDATA/" in m[0]))] == 1  # buffered
    assert wire.qos[4] == 0  # live


class _LiveJson:
    """A subscriber to the gateway's retained JSON live demand topics, keeping each state in order."""

    def __init__(self, port: int) -> None:
        self.states: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="live-json-test")
        self.client.on_connect = lambda c, *a: c.subscribe("edge/test-site/gw-test/demand/#", qos=0)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.states.append(json.loads(message.payload))

    def count(self) -> int:
        with self._lock:
            return len(self.states)

    def alarmed(self) -> bool:
        with self._lock:
            return any(state["alarms_kw"] for state in self.states)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def test_live_demand_reaches_the_host_as_born_metrics_equal_to_the_json_and_not_while_it_is_offline(
        tmp_path: Path, mosquitto: Any, capture: Capture, agent_process: Any, tahu: Path) -> None:
    """An energy meter in Sparkplug mode with a primary host: the live demand goes on the retained JSON topic
    all along, and to the host as demand/live/* metrics of the meter (declared in a DBIRTH before any DDATA
    uses them, equal to the JSON's figures, in the node's one seq with the buffered DDATA) only while the
    host is online: stale a second later, it is dropped while the host is offline, not held."""
    def publish_state(online: bool) -> None:
        body = json.dumps({"online": online, "timestamp": int(time.time() * 1000)})
        capture.client.publish("spBv1.0/STATE/scada", body, qos=1, retain=True).wait_for_publish(5)

    async def host(online: bool) -> None:  # off the event loop: the Modbus server in this process must answer
        await asyncio.to_thread(publish_state, online)

    async def sparkplug_count() -> int:
        return len([k for k in capture.kinds() if k != "STATE"])

    meter = SimServer({1: PowerMeter(seed=1)}, update_interval=0.2)  # about 45 kW and more: both levels raised
    await meter.start()
    live_json = _LiveJson(mosquitto.port)
    monitor = Monitor("127.0.0.1", mosquitto.port, topic_filter="spBv1.0/#").start()
    device = meter_device(meter.port) + """
        [devices.energy]
        window = "1m"
        import_point = "active_energy_wh"
        counter_unit = "Wh"
        target_kw = 40
        alarm_levels = [50, 100]
        """
    config = agent_config(tmp_path, mosquitto.port, device, extra_mqtt="""
        encoding = "sparkplug"
        [mqtt.sparkplug]
        group_id = "plant-1"
        primary_host_id = "scada"
        """)
    try:
        await host(False)
        agent = agent_process(config, tmp_path / "agent.log")
        agent.start()
        deadline = time.monotonic() + 40
        # Until the alarm levels are raised (waited in this event loop, where the Modbus server answers):
        # alarms wait for a present power measured over the full lookback, 15 s in a 1-minute window.
        while not live_json.alarmed():
            assert time.monotonic() < deadline, agent.log()[-3000:]
            await asyncio.sleep(0.1)
        assert live_json.states[0]["settling_s"] > 0  # counted down until the alarm could be decided
        assert await sparkplug_count() == 0, "sent before the primary host was online"
        await host(True)
        # The backlog, then about 5 s of polls (every 200 ms) and of live demand (every second).
        await wait_kinds(capture, lambda k: k.count("DDATA") >= 35)
        await host(False)
        await asyncio.sleep(0.5)  # what was already on its way arrives
        held, json_before = await sparkplug_count(), live_json.count()
        await asyncio.sleep(2.0)
        assert await sparkplug_count() == held, "sent while the primary host was offline"
        assert live_json.count() > json_before, "the JSON live state must go on for its other consumers"
        assert agent.terminate() == 0
    finally:
        await meter.stop()
        live_json.close()
        monitor_report = monitor.report(final=True)
        monitor.stop()

    decoded = decode(tahu, capture.messages)
    check_seq(decoded)  # live and buffered DDATA in one unbroken seq
    named = check_births(decoded)  # every live metric born before a DDATA used it
    live_aliases = {alias: m["name"][len("demand/live/"):] for alias, m in named.items()
                    if m["name"].startswith("demand/live/")}
    assert set(live_aliases.values()) == {"energy_kwh", "power_kw", "projected_kw", "alarms_raised",
                                          "alarm_level_kw", "estimated_s", "settling_s", "window_start",
                                          "target_kw"}
    data = [d for d in decoded if d["kind"] == "DDATA"]
    live_data = [d for d in data if any(int(m["alias"]) in live_aliases for m in d["payload"]["metrics"])]
    assert len(live_data) >= 3
    # A live DDATA carries live metrics only, without our seq (they are not buffer rows); the buffered ones
    # still carry every reading exactly once by it.
    assert all(int(m["alias"]) in live_aliases and "seq" not in m.get("properties", {})
               for d in live_data for m in d["payload"]["metrics"])
    buffered = [seq_of(m) for d in data if d not in live_data for m in d["payload"]["metrics"]]
    assert_exactly_once(buffered)
    # What the host holds after each live message (a DBIRTH carries every value, a DDATA those that changed)
    # equals the JSON state of the same moment, within its rounding.
    held_values: dict[str, Any] = {}
    at: dict[int, dict[str, Any]] = {}
    for message in decoded:
        if message["kind"] not in ("DBIRTH", "DDATA"):
            continue
        moments = set()
        for metric in message["payload"]["metrics"]:
            name = live_aliases.get(int(metric["alias"]))
            if name is not None:
                held_values[name] = metric["value"]
                moments.add(int(metric["timestamp"]))
        for moment in moments:
            at[moment] = dict(held_values)
    compared = 0
    for state in live_json.states:
        host_view = at.get(int(state["ts"] * 1000))
        if host_view is None:
            continue  # sent while the host was offline (or nothing changed at that moment)
        compared += 1
        for key in ("energy_kwh", "power_kw", "projected_kw", "estimated_s", "settling_s", "target_kw"):
            assert host_view[key] == pytest.approx(state[key], abs=1e-6), (key, host_view, state)
        assert host_view["window_start"] == state["window_start"]
        assert int(host_view["alarms_raised"]) == len(state["alarms_kw"])
        assert host_view["alarm_level_kw"] == pytest.approx(max(state["alarms_kw"], default=0.0))
    assert compared >= 3
    assert any(int(view["alarms_raised"]) > 0 for view in at.values())  # the alarm levels reached the host
    # edge-agent monitor takes the live metrics for what they are, not for readings without a seq.
    gateway = next(g for g in monitor_report.gateways if g.gateway == "gw-test")
    assert gateway.invalid == 0, gateway.invalid_errors
    assert (gateway.gaps, gateway.duplicates) == (0, 0)
