"""The buffer's disk full, for real: a small tmpfs holds the buffer and a file fills the rest. The agent
must go on polling (numbers advance, what cannot be stored is counted and shows as a gap), deliver and
delete what it holds, say "disk full" in the status, store again once there is room, and stop promptly."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.demo.mosquitto import MosquittoProcess
from agent.monitor import Monitor
from drivers.modbus.simulator import SimServer
from tests.conftest import agent_config, meter_device
from tests.test_end_to_end import GATEWAY, all_sequence_numbers, eventually, start_agent, stop_agent

TOPIC = f"edge/test-site/{GATEWAY}/#"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of its own, unmounted at teardown."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=10)


def fill(disk: Path) -> Path:
    """Take every free byte of the file system (in ever smaller pieces, down to one byte)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        chunk = 1 << 16
        while chunk:
            try:
                os.write(fd, b"\xa5" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                chunk //= 2
    finally:
        os.close(fd)
    return filler


async def test_a_full_disk_is_counted_as_a_gap_delivery_and_status_go_on_and_the_stop_is_prompt(
        tmp_path: Path, small_disk: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer) -> None:
    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port, "m1", "100ms") +
                          meter_device(modbus_sim.port, "m2", "100ms"), extra_mqtt="")
    config.write_text(config.read_text().replace(f'path = "{tmp_path / "buffer.db"}"',
                                                 f'path = "{small_disk / "buffer.db"}"\nmax_bytes = "8MiB"'))
    monitor = Monitor("127.0.0.1", mosquitto.port, TOPIC, session="platform")  # kept through the outage
    monitor.start()
    try:
        await asyncio.sleep(1.5)  # the subscriber's session autosaved by the broker
        mosquitto.stop()
        agent, stop, task = await start_agent(config)
        assert agent.buffer is not None and agent.writer is not None
        buffer = agent.buffer
        await eventually(lambda: buffer.next_seq > 100, 10, "readings in the buffer")
        fill(small_disk)
        await eventually(lambda: buffer.disk_full, 10, "the buffer to find the disk full")
        # Polling goes on: numbers advance past what cannot be stored, counted.
        at_full = buffer.next_seq
        await asyncio.sleep(2)
        stats = await buffer.stats()
        assert stats.next_seq > at_full + 80, "polling stopped on a full disk"
        assert stats.unstored > 0 and stats.disk_full
        held = stats.readings
        assert held > 0
        # The broker comes back: what the buffer holds is delivered and deleted, and the status says why
        # readings are missing.
        mosquitto.restart()
        await eventually(lambda: any(s.get("buffer", {}).get("disk_full") for s in monitor.status.values()), 15,
                         "a status message saying the disk is full")
        status = next(iter(monitor.status.values()))["buffer"]
        assert status["unstored"] > 0 and status["lost_since_last_status"] >= status["unstored"]
        for _ in range(200):
            if (await buffer.stats()).readings == 0:
                break
            await asyncio.sleep(0.05)
        assert (await buffer.stats()).readings < held, "delivered rows could not be deleted on the full disk"
        assert monitor.stream(GATEWAY).seqs.highest > at_full, "readings polled on the full disk were not delivered"
        # SIGTERM while the disk is still full (the writer's commits fail): a prompt stop.
        assert buffer.disk_full
        began = time.monotonic()
        await stop_agent(stop, task)
        assert time.monotonic() - began < 5
        (small_disk / "filler").unlink()
        buffer_id, last, still_buffered = await all_sequence_numbers(small_disk / "buffer.db")
        from buffer.store import read_stats

        unstored = read_stats(small_disk / "buffer.db")["unstored"]
        stream = monitor.stream(GATEWAY, buffer_id)
        # The platform's view: every number was delivered, is still buffered, or is one of the counted
        # unstored readings (a gap), nothing else.
        await eventually(lambda: len([s for s in range(1, last + 1) if s not in stream.seqs and
                                      s not in still_buffered]) <= unstored, 10, "the subscriber to catch up")
        missing = [s for s in range(1, last + 1) if s not in stream.seqs and s not in still_buffered]
    finally:
        monitor.stop()
    assert unstored > 0 and len(missing) == unstored


async def test_the_buffer_stores_again_once_the_disk_has_room(small_disk: Path) -> None:
    from buffer.store import Buffer, StoredBatch

    buffer = await Buffer.open(small_disk / "b.db", max_bytes=8 << 20, durability="process-crash")
    try:
        assert await buffer.append([StoredBatch(1, 10, "m", 0.0, os.urandom(2000))]) == 10
        filler = fill(small_disk)
        seq, stored = 11, 10
        while not buffer.disk_full:  # the WAL's room first, then no more
            stored += await buffer.append([StoredBatch(seq, 10, "m", 0.0, os.urandom(2000))])
            seq += 10
        assert await buffer.append([StoredBatch(seq, 10, "m", 0.0, os.urandom(2000))]) == 0  # given up, counted
        seq += 10
        stats = await buffer.stats()
        assert (stats.next_seq, stats.unstored + stats.readings) == (seq, seq - 1)
        await buffer.delete([row.seq for row in await buffer.read_after(0, 1000)])  # deletes find room
        filler.unlink()
        assert await buffer.append([StoredBatch(seq, 10, "m", 0.0, os.urandom(2000))]) == 10
        assert not buffer.disk_full
    finally:
        await buffer.close()
    reopened = await Buffer.open(small_disk / "b.db", max_bytes=8 << 20, durability="process-crash")
    assert (await reopened.stats()).unstored == stats.unstored and reopened.next_seq == seq + 10
    await reopened.close()
