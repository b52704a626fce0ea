"""Store-and-forward under the failures that lose data in today's gateways, against real peers:
a broker killed under load, an agent killed again and again, a buffer at its cap, a corrupt buffer file."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from pathlib import Path

import pytest

from agent.demo.mosquitto import MosquittoProcess
from agent.model import PollResult, Reading
from agent.monitor import Monitor
from agent.payload import Encoder
from buffer.store import Buffer, StoredBatch
from drivers.modbus.simulator import SimServer
from tests.conftest import AgentProcess, PartitionProxy, agent_config, meter_device
from tests.test_end_to_end import GATEWAY, all_sequence_numbers, eventually, nothing_lost, start_agent, stop_agent

TOPIC = f"edge/test-site/{GATEWAY}/#"


def devices(port: int, count: int, interval: str = "100ms") -> str:
    """`count` devices on one simulator (4 points each): load from many connections at once."""
    return "".join(meter_device(port, name=f"meter-{n:02d}", interval=interval) for n in range(count))


async def test_broker_killed_under_load_and_back_30_s_later_leaves_no_gap(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer, partition_proxy: PartitionProxy) -> None:
    # The agent reaches the broker through a proxy that can cut the link (see PartitionProxy for why).
    config = agent_config(tmp_path, partition_proxy.port, devices(modbus_sim.port, 8))  # ~320 readings/s
    monitor = Monitor("127.0.0.1", mosquitto.port, TOPIC, session="platform")
    monitor.start()
    try:
        agent, stop, task = await start_agent(config)
        assert agent.uplink is not None and agent.buffer is not None
        await eventually(lambda: monitor.received(GATEWAY) >= 2000, 20, "load before the kill")
        await asyncio.sleep(1.5)  # let the broker autosave the subscriber's session
        partition_proxy.partition()  # the link fails; the agent keeps polling and sending into it
        await asyncio.sleep(1.0)
        assert agent.uplink.inflight > 0  # sent, unacknowledged: what the crash must not lose
        mosquitto.kill()
        partition_proxy.heal()
        await asyncio.sleep(30)
        assert (await agent.buffer.stats()).readings >= 30 * 300  # polling went on into the buffer
        mosquitto.restart()
        await eventually(lambda: agent.uplink.connected, 15, "the agent to reconnect")
        for _ in range(600):  # the backlog drains alongside the live stream
            if (await agent.buffer.stats()).readings < 400:
                break
            await asyncio.sleep(0.1)
        await stop_agent(stop, task)
        stream, last, still_buffered = await nothing_lost(monitor, tmp_path / "buffer.db", 30)
    finally:
        monitor.stop()
    assert [s for s in stream.seqs.missing(1, last) if s not in still_buffered] == []
    # Duplicates only from what was in flight at the kill: at most the window (32 messages of 4 readings).
    assert stream.seqs.duplicates <= 32 * 4


async def test_agent_killed_five_times_under_load_loses_no_committed_reading(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer,
        agent_process: type[AgentProcess]) -> None:
    config = agent_config(tmp_path, mosquitto.port, devices(modbus_sim.port, 8))
    with Monitor("127.0.0.1", mosquitto.port, TOPIC) as monitor:
        for run in range(5):
            agent = agent_process(config, tmp_path / "agent.log")
            agent.start()
            target = monitor.stream(GATEWAY).seqs.highest + 300
            await eventually(lambda t=target: monitor.stream(GATEWAY).seqs.highest >= t, 20, f"run {run} delivering")
            await asyncio.sleep(random.Random(run).uniform(0.0, 0.5))  # kill at a different moment each time
            agent.kill()
        final = agent_process(config, tmp_path / "agent.log")
        final.start()
        await eventually(final.connected, 20, "the last run to connect")
        await asyncio.sleep(2)
        assert final.terminate() == 0
        stream, last, still_buffered = await nothing_lost(monitor, tmp_path / "buffer.db", 15)
    assert last > 5 * 300
    assert [s for s in range(1, last + 1) if s not in stream.seqs and s not in still_buffered] == []
    assert stream.seqs.duplicates <= 5 * 32 * 4  # at most one window per kill
    assert "Traceback" not in final.log()


async def test_readings_refused_at_the_cap_are_counted_reported_and_seen_as_a_gap(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer) -> None:
    # A buffer already over its 1 MiB cap, as after a long outage, with policy reject_new.
    buffer = await Buffer.open(tmp_path / "buffer.db")
    encoder = Encoder(GATEWAY, "test-site", buffer.buffer_id)
    rng = random.Random(7)
    rows = []
    for seq in range(1, 80_001, 100):  # random floats compress to ~20 bytes a reading: ~1.6 MB of data
        result = PollResult("old-meter", 1_700_000_000.0, tuple(Reading(f"p{i}", rng.random()) for i in range(100)))
        rows.append(StoredBatch(seq, 100, "old-meter", 1_700_000_000.0, encoder.encode(result, seq)))
    await buffer.append(rows)
    await buffer.close()
    prefilled = 80_000
    with sqlite3.connect(tmp_path / "buffer.db") as db:
        (pages,), = db.execute("PRAGMA page_count").fetchall()
        (page_size,), = db.execute("PRAGMA page_size").fetchall()
    assert pages * page_size > 1 << 20, "the prefill must put the buffer over its cap"

    monitor = Monitor("127.0.0.1", mosquitto.port, TOPIC, session="platform")  # kept through the outage
    monitor.start()
    await asyncio.sleep(1.5)  # autosaved by the broker
    mosquitto.stop()
    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port, interval="100ms"))
    limits = 'durability = "process-crash"\nmax_bytes = "1MiB"\non_full = "reject_new"'
    config.write_text(config.read_text().replace('durability = "process-crash"', limits))
    agent, stop, task = await start_agent(config)
    assert agent.buffer is not None and agent.uplink is not None
    await asyncio.sleep(2)  # polling while the broker is down and the buffer full: everything new is refused
    stats = await agent.buffer.stats()
    assert stats.rejected >= 40 and stats.readings == prefilled
    mosquitto.restart()
    try:
        await eventually(lambda: any(s.get("buffer", {}).get("rejected") for s in monitor.status.values()), 15,
                         "a status message reporting the refused readings")
        status = next(iter(monitor.status.values()))
        # The backlog drains, the buffer goes below its cap, new readings are accepted again.
        await eventually(lambda: monitor.stream(GATEWAY).seqs.highest > prefilled + stats.rejected + 100, 60,
                         "readings accepted again after the drain")
        await stop_agent(stop, task)
        buffer_id, last, still_buffered = await all_sequence_numbers(tmp_path / "buffer.db")
        stream = monitor.stream(GATEWAY, buffer_id)
        final = await _final_losses(tmp_path / "buffer.db")
        await eventually(lambda: len([s for s in stream.seqs.missing(1, last) if s not in still_buffered])
                         <= final, 20, "the subscriber to catch up")
    finally:
        monitor.stop()
    assert status["buffer"]["rejected"] >= stats.rejected
    assert status["buffer"]["lost_since_last_status"] == status["buffer"]["rejected"]
    assert status["devices"]["power-meter"]["state"] == "ok"
    json.dumps(status)  # plain JSON all the way down
    # The platform sees exactly the refused readings as missing: one gap, right after the prefilled ones.
    missing = [s for s in stream.seqs.missing(1, last) if s not in still_buffered]
    assert len(missing) == final and missing == list(range(prefilled + 1, prefilled + 1 + final))


async def _final_losses(path: Path) -> int:
    buffer = await Buffer.open(path)
    try:
        return (await buffer.stats()).rejected
    finally:
        await buffer.close()


async def test_a_corrupt_buffer_file_is_set_aside_and_the_agent_starts(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer,
        agent_process: type[AgentProcess]) -> None:
    (tmp_path / "buffer.db").write_bytes(b"\x00garbage left by a failing SD card" * 500)
    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port, interval="100ms"))
    with Monitor("127.0.0.1", mosquitto.port, TOPIC) as monitor:
        agent = agent_process(config, tmp_path / "agent.log")
        agent.start()
        await eventually(lambda: monitor.received(GATEWAY) >= 20, 20, "readings on a fresh buffer")
        assert agent.terminate() == 0
    aside = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"\x00garbage")
    log = agent.log()
    assert "is unreadable" in log and "moved it aside" in log and str(aside[0]) in log


async def test_buffer_stats_reads_a_buffer_the_running_agent_holds(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    mosquitto.stop()  # readings pile up in the buffer
    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port, interval="100ms"))
    agent, stop, task = await start_agent(config)
    assert agent.buffer is not None
    await eventually(lambda: agent.buffer.next_seq > 40, 10, "readings in the buffer")
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "agent", "buffer", "stats", "--config", str(config), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=30)
    human = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "agent", "buffer", "stats", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=30)
    await stop_agent(stop, task)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["readings"] >= 40 and stats["rows"] >= 10 and stats["oldest_age_s"] >= 0
    assert stats["buffer_id"] == agent.buffer.buffer_id and stats["dropped"] == 0
    assert human.returncode == 0 and "readings in" in human.stdout and "waiting for the broker" in human.stdout


class StatusLog(Monitor):
    """The subscriber, keeping every status message in the order they came (the Monitor keeps the last)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.statuses: list[dict[str, object]] = []

    def _handle_status(self, arrived: float, topic: str, gateway: str, payload: bytes) -> None:
        super()._handle_status(arrived, topic, gateway, payload)
        if payload:
            self.statuses.append(json.loads(payload))


@pytest.mark.parametrize("encoding", ["json", "cbor"])
async def test_losses_while_the_broker_is_unreachable_are_reported_when_it_is_back(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer, encoding: str) -> None:
    # A buffer over its 1 MiB cap (drop_oldest): the agent's first commits drop the oldest readings.
    buffer = await Buffer.open(tmp_path / "buffer.db")
    rng = random.Random(3)
    await buffer.append([StoredBatch(seq, 100, "old-meter", 1_700_000_000.0, rng.randbytes(2000))
                         for seq in range(1, 80_001, 100)])
    await buffer.close()
    monitor = StatusLog("127.0.0.1", mosquitto.port, TOPIC, session="platform")
    monitor.start()
    await asyncio.sleep(1.5)  # autosaved by the broker
    mosquitto.stop()
    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port, interval="100ms"),
                          extra_mqtt=f'encoding = "{encoding}"')
    config.write_text(config.read_text().replace('site = "test-site"', 'site = "test-site"\nstatus_interval = "1s"')
                      .replace('durability = "process-crash"', 'durability = "process-crash"\nmax_bytes = "1MiB"'))
    agent, stop, task = await start_agent(config)
    assert agent.buffer is not None
    try:
        await eventually(lambda: agent.buffer._losses["dropped_oldest"] > 0, 10, "drops at the cap")
        await asyncio.sleep(2.5)  # status rounds while the broker is unreachable: nothing reported yet
        mosquitto.restart()
        await eventually(lambda: any(s["state"] == "online" for s in monitor.statuses), 15, "a status message")
        await stop_agent(stop, task)
    finally:
        monitor.stop()
    first = next(s for s in monitor.statuses if s["state"] == "online")["buffer"]
    assert isinstance(first, dict) and first["dropped_oldest"] > 0
    # Everything given up since the start (the prefilled buffer had lost nothing) is in the first status the
    # platform receives.
    assert first["lost_since_last_status"] == first["dropped_oldest"]
