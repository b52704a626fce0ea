"""The whole pipeline against real peers: a pymodbus server, a mosquitto process, the agent, and a
subscriber that accounts for every sequence number the way the platform does."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.daemon import Agent
from agent.demo.mosquitto import MosquittoProcess
from agent.monitor import Monitor
from buffer.store import Buffer
from drivers.modbus.simulator import SimServer
from tests.conftest import AgentProcess, FixedRegisters, PartitionProxy, agent_config, meter_device

GATEWAY = "gw-test"


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
        await asyncio.sleep(0.05)


def words(fmt: str, value: float) -> list[int]:
    data = struct.pack(">" + fmt, value)
    return list(struct.unpack(f">{len(data) // 2}H", data))


async def start_agent(config_path: Path) -> tuple[Agent, asyncio.Event, asyncio.Task[None]]:
    agent = Agent(load_config(config_path))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    async with asyncio.timeout(10):
        await agent.started.wait()
    return agent, stop, task


async def stop_agent(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    async with asyncio.timeout(10):
        await task


async def all_sequence_numbers(buffer_path: Path) -> tuple[str, int, set[int]]:
    """(buffer_id, last assigned number, numbers still in the buffer) of a stopped agent's buffer."""
    buffer = await Buffer.open(buffer_path)
    try:
        rows = await buffer.read_after(0, 1 << 30)
        return buffer.buffer_id, buffer.next_seq - 1, {s for r in rows for s in range(r.seq, r.seq + r.count)}
    finally:
        await buffer.close()


async def nothing_lost(monitor: Monitor, buffer_path: Path, timeout: float = 10.0) -> tuple[Any, int, set[int]]:
    """The platform's proof, once the agent has stopped: every sequence number it assigned reached the
    subscriber or is still in the buffer (what the broker acknowledged may still be on its way, so wait).
    Returns (the subscriber's stream, the last number assigned, the numbers still buffered)."""
    buffer_id, last, still_buffered = await all_sequence_numbers(buffer_path)
    stream = monitor.stream(GATEWAY, buffer_id)  # one buffer_id: restarts and reloads continue its numbering
    await eventually(lambda: all(s in stream.seqs or s in still_buffered for s in range(1, last + 1)), timeout,
                     "every committed reading delivered or still buffered")
    return stream, last, still_buffered


async def test_decoded_values_arrive_correct_to_the_register(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    inputs = [0] * 40
    inputs[0:2] = words("f", 229.8)                                          # float32 ABCD
    inputs[2:4] = list(reversed(words("f", -17.25)))                         # float32 CDAB
    inputs[4:6] = [((w & 0xFF) << 8) | (w >> 8) for w in words("f", 0.875)]  # float32 BADC
    inputs[6:8] = list(struct.unpack(">2H", struct.pack("<f", 60.02)))       # float32 DCBA
    holding = [0] * 20
    holding[0:2] = list(reversed(words("I", 4_000_000_123)))                 # uint32 CDAB, e.g. Wh counter
    holding[2] = 2205                                                        # uint16 x0.1 -> 220.5
    holding[3] = struct.unpack(">H", struct.pack(">h", -125))[0]             # int16 x0.1 -> -12.5
    holding[4:6] = words("i", -123456)                                       # int32
    holding[6] = 40                                                          # uint16 - 40 offset
    device = FixedRegisters(holding=holding, inputs=inputs)
    async with SimServer({7: device}, update_interval=None) as server:
        config = agent_config(tmp_path, mosquitto.port, f"""
            [[devices]]
            name = "fixed"
            driver = "modbus"
            host = "127.0.0.1"
            port = {server.port}
            unit_id = 7
            poll_interval = "200ms"
            points = [
              {{ name = "f_abcd", function = "input", address = 0, type = "float32", unit = "V" }},
              {{ name = "f_cdab", function = "input", address = 2, type = "float32", word_order = "CDAB" }},
              {{ name = "f_badc", function = "input", address = 4, type = "float32", word_order = "BADC" }},
              {{ name = "f_dcba", function = "input", address = 6, type = "float32", word_order = "DCBA" }},
              {{ name = "missing", function = "input", address = 100, type = "uint16" }},
              {{ name = "wh", function = "holding", address = 0, type = "uint32", word_order = "CDAB", unit = "Wh" }},
              {{ name = "u16", function = "holding", address = 2, type = "uint16", scale = 0.1 }},
              {{ name = "i16", function = "holding", address = 3, type = "int16", scale = 0.1 }},
              {{ name = "i32", function = "holding", address = 4, type = "int32" }},
              {{ name = "celsius", function = "holding", address = 6, type = "uint16", offset = -40 }},
            ]
            """)
        with Monitor("127.0.0.1", mosquitto.port, f"edge/test-site/{GATEWAY}/#") as monitor:
            _, stop, task = await start_agent(config)
            await eventually(lambda: len(monitor.latest.get("fixed", {})) == 10, 10, "a full poll of 'fixed'")
            await stop_agent(stop, task)
    latest = monitor.latest["fixed"]
    assert {name: latest[name].value for name in latest if name != "missing"} == {
        "f_abcd": 229.8, "f_cdab": -17.25, "f_badc": 0.875, "f_dcba": 60.02, "wh": 4_000_000_123,
        "u16": 220.5, "i16": -12.5, "i32": -123456, "celsius": 0.0}
    assert latest["f_abcd"].unit == "V" and latest["wh"].unit == "Wh"
    assert all(latest[name].quality == "good" for name in latest if name != "missing")
    # An address the device refuses spoils only its own point, and says why.
    assert latest["missing"].quality == "bad" and latest["missing"].value is None
    assert device.write_attempts == 0


async def test_a_broker_outage_of_10_s_loses_nothing(tmp_path: Path, mosquitto: MosquittoProcess,
                                                    modbus_sim: SimServer) -> None:
    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port, interval="200ms"))
    monitor = Monitor("127.0.0.1", mosquitto.port, f"edge/test-site/{GATEWAY}/#", session="test-platform")
    monitor.start()
    try:
        agent, stop, task = await start_agent(config)
        assert agent.uplink is not None and agent.buffer is not None
        await eventually(lambda: monitor.received(GATEWAY) >= 20, 10, "readings before the outage")

        mosquitto.stop()
        await eventually(lambda: not agent.uplink.connected, 5, "the agent to notice the outage")
        polled_before = agent.buffer.next_seq
        await asyncio.sleep(10)
        polled_during = agent.buffer.next_seq - polled_before
        assert polled_during >= 100, "polling must go on while the broker is down (4 points x 5/s x 10 s)"
        assert (await agent.buffer.stats()).readings >= polled_during  # held on disk, not lost

        mosquitto.restart()
        await eventually(lambda: agent.uplink.connected, 10, "the agent to reconnect")
        last = agent.buffer.next_seq - 1
        stream = monitor.stream(GATEWAY)
        await eventually(lambda: all(s in stream.seqs for s in range(1, last + 1)), 20,
                         "every reading polled during the outage to arrive")
        await stop_agent(stop, task)
    finally:
        monitor.stop()
    buffer_id, last, _ = await all_sequence_numbers(tmp_path / "buffer.db")
    stream = monitor.stream(GATEWAY, buffer_id)
    assert stream.seqs.missing(1, last) == []


async def test_sigkill_loses_no_committed_reading_and_numbering_continues(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer,
        agent_process: type[AgentProcess]) -> None:
    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port, interval="100ms"))
    with Monitor("127.0.0.1", mosquitto.port, f"edge/test-site/{GATEWAY}/#") as monitor:
        first = agent_process(config, tmp_path / "agent.log")
        first.start()
        await eventually(lambda: monitor.received(GATEWAY) >= 40, 15, "readings from the first run")
        first.kill()
        received_at_kill = monitor.stream(GATEWAY).seqs.highest

        second = agent_process(config, tmp_path / "agent.log")
        second.start()
        await eventually(lambda: monitor.stream(GATEWAY).seqs.highest >= received_at_kill + 40, 15,
                         "readings from the second run")
        assert second.terminate() == 0
        stream, last, still_buffered = await nothing_lost(monitor, tmp_path / "buffer.db", 10)
    assert [s for s in range(1, last + 1) if s not in stream.seqs and s not in still_buffered] == []
    # Duplicates come only from the in-flight window at the moment of the kill (32 messages x 4 readings).
    assert stream.seqs.duplicates <= 32 * 4
    assert "Traceback" not in first.log()


async def test_a_dead_device_does_not_stop_the_others(tmp_path: Path, mosquitto: MosquittoProcess,
                                                      modbus_sim: SimServer,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from agent.demo.mosquitto import free_port

    devices = meter_device(modbus_sim.port, interval="100ms") + meter_device(free_port(), name="dead-meter",
                                                                             interval="100ms")
    config = agent_config(tmp_path, mosquitto.port, devices)
    with Monitor("127.0.0.1", mosquitto.port, f"edge/test-site/{GATEWAY}/#") as monitor:
        agent, stop, task = await start_agent(config)
        await eventually(lambda: agent.health["dead-meter"].polls_failed >= 3, 10, "failed polls of dead-meter")
        await eventually(lambda: agent.health["power-meter"].polls_ok >= 10, 10, "polls of power-meter")
        await stop_agent(stop, task)
    assert "dead-meter" not in monitor.latest and "power-meter" in monitor.latest
    assert agent.health["dead-meter"].state == "failing"
    errors = [r for r in caplog.records if "dead-meter" in r.getMessage() and r.levelname == "ERROR"]
    assert len(errors) == 1, [r.getMessage() for r in errors]  # loud once, then quiet


async def test_sigterm_stops_the_agent_within_seconds_and_keeps_the_buffer(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer,
        agent_process: type[AgentProcess]) -> None:
    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port, interval="100ms"))
    process = agent_process(config, tmp_path / "agent.log")
    process.start()
    await eventually(lambda: "agent started" in process.log(), 15, "the agent to start")
    await asyncio.sleep(1)
    began = time.monotonic()
    assert process.terminate() == 0
    assert time.monotonic() - began < 5
    assert "stopped;" in process.log()
    _, last, _ = await all_sequence_numbers(tmp_path / "buffer.db")
    assert last > 0


async def test_handed_to_the_client_library_is_not_delivered(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer, partition_proxy: PartitionProxy,
        agent_process: type[AgentProcess]) -> None:
    """ThingsBoard gateway #2157: readings sent but not yet acknowledged must survive the agent dying.

    The link to the broker is cut: the agent's messages leave it but never arrive, so no PUBACK comes back.
    Then the agent is killed: whatever lived only in its memory (and its client library's) is gone.
    Everything unacknowledged must still be in the buffer and be delivered after the restart."""
    config = agent_config(tmp_path, partition_proxy.port, meter_device(modbus_sim.port, interval="100ms"))
    with Monitor("127.0.0.1", mosquitto.port, f"edge/test-site/{GATEWAY}/#") as monitor:
        first = agent_process(config, tmp_path / "agent.log")
        first.start()
        await eventually(lambda: monitor.received(GATEWAY) >= 40, 15, "readings before the cut")
        partition_proxy.partition()
        await asyncio.sleep(1.5)  # ~15 polls: sent into the cut link, never acknowledged
        await asyncio.to_thread(first.kill)
        partition_proxy.heal()

        second = agent_process(config, tmp_path / "agent.log")
        second.start()
        await eventually(second.connected, 15, "the second run to connect")
        await asyncio.sleep(1)
        assert await asyncio.to_thread(second.terminate) == 0
        stream, last, still_buffered = await nothing_lost(monitor, tmp_path / "buffer.db", 10)
    assert stream.seqs.missing(1, last) == sorted(still_buffered & set(range(1, last + 1)))


async def test_after_an_outage_live_readings_flow_while_the_backlog_drains(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer) -> None:
    """The backlog of a long outage must not hold the live stream back, nor the live stream the backlog."""
    from agent.model import PollResult, Reading
    from agent.payload import Encoder
    from buffer.store import StoredBatch

    backlog_rows, per_row = 3000, 10
    buffer = await Buffer.open(tmp_path / "buffer.db")
    encoder = Encoder(GATEWAY, "test-site", buffer.buffer_id)
    readings = tuple(Reading(f"p{i}", float(i)) for i in range(per_row))
    rows = [StoredBatch(1 + n * per_row, per_row, "old-meter", 1_700_000_000.0 + n,
                        encoder.encode(PollResult("old-meter", 1_700_000_000.0 + n, readings), 1 + n * per_row))
            for n in range(backlog_rows)]
    await buffer.append(rows)
    await buffer.close()
    backlog_last = backlog_rows * per_row

    arrivals: list[tuple[float, str, int]] = []  # (arrival, device, first seq), in arrival order
    polls_per_message: list[int] = []
    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port, interval="100ms"),
                          extra_mqtt="max_inflight = 2")
    with Monitor("127.0.0.1", mosquitto.port, f"edge/test-site/{GATEWAY}/data/#",
                 on_message=lambda topic, body: (
                     arrivals.append((time.monotonic(), body["device"], body["polls"][0]["readings"][0]["seq"])),
                     polls_per_message.append(len(body["polls"])))) as monitor:
        _, stop, task = await start_agent(config)
        stream = monitor.stream(GATEWAY)
        await eventually(lambda: all(s in monitor.stream(GATEWAY).seqs for s in range(1, backlog_last + 1)), 60,
                         "the backlog to drain")
        await stop_agent(stop, task)
    backlog_done = max(at for at, device, _ in arrivals if device == "old-meter")
    live = [(at, seq) for at, device, seq in arrivals if device == "power-meter"]
    live_during_drain = [seq for at, seq in live if at < backlog_done]
    assert len(live_during_drain) >= 3, f"live readings waited for the backlog ({len(live)} live in all)"
    # Each stream keeps its order.
    assert [seq for _, seq in live] == sorted(seq for _, seq in live)
    old = [seq for _, device, seq in arrivals if device == "old-meter"]
    assert old == sorted(old)
    # The backlog went out batched (many polls a message), not one message per poll.
    assert len(old) < backlog_rows / 10 and max(polls_per_message) > 10
    assert stream.seqs.duplicates == 0


async def test_mqtt_5_delivers_like_3_1_1(tmp_path: Path, mosquitto: MosquittoProcess,
                                          modbus_sim: SimServer) -> None:
    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port, interval="100ms"),
                          extra_mqtt='protocol = "5"')
    with Monitor("127.0.0.1", mosquitto.port, f"edge/test-site/{GATEWAY}/#") as monitor:
        agent, stop, task = await start_agent(config)
        await eventually(lambda: monitor.received(GATEWAY) >= 40, 10, "readings over MQTT 5")
        await stop_agent(stop, task)
        stream, last, still_buffered = await nothing_lost(monitor, tmp_path / "buffer.db", 10)
        await eventually(lambda: any(s.get("state") == "offline" for s in monitor.status.values()), 5,
                         "'offline' said on a clean stop")
    assert agent.uplink is not None and agent.uplink.readings_delivered >= 40
    assert [s for s in stream.seqs.missing(1, last) if s not in still_buffered] == []
