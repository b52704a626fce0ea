"""The SQLite buffer on a real file: sequence numbers, durability across reopen, the cap, a corrupt file."""

from __future__ import annotations

import logging
import random
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.model import PollResult, Reading
from agent.payload import Encoder
from agent.writer import BufferWriter
from buffer.store import Buffer, StoredBatch


def batch(seq: int, count: int = 3, device: str = "m1", size: int = 10) -> StoredBatch:
    """A row whose payload does not compress, so that `size` is what it takes on disk."""
    return StoredBatch(seq, count, device, 1_700_000_000.0 + seq, random.Random(seq).randbytes(size))


async def offer_more_than_twice_the_cap(buffer: Buffer, seq: int = 1) -> int:
    """600 rows of 5 readings and 4 KiB each (2.4 MB) into a 1 MiB buffer, numbered from `seq`; returns the
    next sequence number."""
    for _ in range(60):
        rows = []
        for _ in range(10):
            rows.append(batch(seq, 5, size=4096))
            seq += 5
        await buffer.append(rows)
    return seq


async def test_append_read_delete_in_sequence(tmp_path: Path) -> None:
    buffer = await Buffer.open(tmp_path / "b.db")
    assert buffer.next_seq == 1
    await buffer.append([batch(1), batch(4, 2), batch(6)])
    assert buffer.next_seq == 9
    rows = await buffer.read_after(0, 10)
    assert [(r.seq, r.count) for r in rows] == [(1, 3), (4, 2), (6, 3)]
    assert [r.seq for r in await buffer.read_after(1, 10)] == [4, 6]
    await buffer.delete([1, 4])
    stats = await buffer.stats()
    assert (stats.rows, stats.readings, stats.next_seq) == (1, 3, 9)
    await buffer.close()


async def test_a_gap_or_a_reused_number_is_refused(tmp_path: Path) -> None:
    buffer = await Buffer.open(tmp_path / "b.db")
    await buffer.append([batch(1)])
    with pytest.raises(ValueError, match="sequence gap"):
        await buffer.append([batch(5)])
    with pytest.raises(ValueError, match="sequence gap"):
        await buffer.append([batch(1)])
    assert buffer.next_seq == 4
    await buffer.close()


async def test_numbering_continues_after_reopen_even_when_everything_was_delivered(tmp_path: Path) -> None:
    buffer = await Buffer.open(tmp_path / "b.db")
    buffer_id = buffer.buffer_id
    await buffer.append([batch(1), batch(4)])
    await buffer.delete([1, 4])
    await buffer.close()
    reopened = await Buffer.open(tmp_path / "b.db")
    assert reopened.next_seq == 7
    assert reopened.buffer_id == buffer_id
    assert await reopened.read_after(0, 10) == []
    await reopened.close()


async def test_a_corrupt_file_is_moved_aside_and_a_new_buffer_starts(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "b.db"
    path.write_bytes(b"this is not an SQLite database, it is what a bad SD card leaves behind" * 100)
    with caplog.at_level(logging.ERROR):
        buffer = await Buffer.open(path)
    aside = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1, list(tmp_path.iterdir())
    assert aside[0].read_bytes().startswith(b"this is not an SQLite database")
    assert any("unreadable" in r.getMessage() and str(aside[0]) in r.getMessage() for r in caplog.records)
    await buffer.append([batch(1)])
    assert buffer.next_seq == 4
    await buffer.close()


async def test_a_damaged_header_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    buffer = await Buffer.open(path)
    await buffer.append([batch(1)])
    await buffer.close()
    with path.open("r+b") as handle:  # overwrite the SQLite header magic
        handle.write(b"\0" * 100)
    buffer = await Buffer.open(path)
    assert buffer.next_seq == 1
    await buffer.close()
    assert any(".corrupt-" in p.name for p in tmp_path.iterdir())


async def test_the_cap_drops_the_oldest_rows_counts_them_and_bounds_the_file(tmp_path: Path) -> None:
    cap = 1 << 20
    buffer = await Buffer.open(tmp_path / "b.db", max_bytes=cap)
    seq = await offer_more_than_twice_the_cap(buffer)
    stats = await buffer.stats()
    kept = await buffer.read_after(0, 10_000)
    assert stats.dropped > 0
    assert stats.dropped + stats.readings == seq - 1  # every reading is either kept or counted as dropped
    assert kept[0].seq == stats.dropped + 1  # the oldest went first
    assert kept[-1].seq == seq - 5  # the newest is kept
    assert (tmp_path / "b.db").stat().st_size <= cap * 1.2
    await buffer.close()
    reopened = await Buffer.open(tmp_path / "b.db", max_bytes=cap)
    assert (await reopened.stats()).dropped == stats.dropped  # the count survives a restart
    await reopened.close()


class FailingOnce(Buffer):
    """A disk error on the first commit: a fault no real disk produces on demand."""

    failed = False

    async def append(self, batches: Sequence[StoredBatch], tables: Sequence[tuple[str, str, str]] = ()) -> int:
        if not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("disk I/O error")
        return await super().append(batches, tables)


async def test_writer_commits_many_results_per_transaction_and_retries_with_the_same_numbers(
        tmp_path: Path) -> None:
    plain = await Buffer.open(tmp_path / "b.db")
    await plain.close()
    buffer = await FailingOnce.open(tmp_path / "b.db")
    commits: list[int] = []
    writer = BufferWriter(buffer, Encoder("gw", "site", buffer.buffer_id), lambda: commits.append(1))
    readings = (Reading("a", 1.0), Reading("b", 2))
    for i in range(5):
        await writer.submit(PollResult(f"dev{i}", 1_700_000_000.0, readings))
    import asyncio

    task = asyncio.create_task(writer.run())
    async with asyncio.timeout(5):
        await writer.flush()
    task.cancel()
    rows = await buffer.read_after(0, 100)
    assert [r.seq for r in rows] == [1, 3, 5, 7, 9]
    assert len(commits) == 1  # one transaction for the five poll results, after one failed attempt
    assert writer.readings_committed == 10
    await buffer.close()


async def test_a_second_agent_cannot_open_a_buffer_in_use_and_the_file_is_left_alone(tmp_path: Path) -> None:
    from buffer.store import BufferUnavailable

    first = await Buffer.open(tmp_path / "b.db")
    await first.append([batch(1)])
    with pytest.raises(BufferUnavailable, match="in use by another edge-agent process"):
        await Buffer.open(tmp_path / "b.db")
    assert not any(".corrupt-" in p.name for p in tmp_path.iterdir())
    await first.close()
    again = await Buffer.open(tmp_path / "b.db")  # released on close
    assert again.next_seq == 4
    await again.close()


async def test_reject_new_keeps_the_oldest_counts_the_refused_and_leaves_a_gap(tmp_path: Path) -> None:
    cap = 1 << 20
    buffer = await Buffer.open(tmp_path / "b.db", max_bytes=cap, on_full="reject_new")
    seq = await offer_more_than_twice_the_cap(buffer)
    stats = await buffer.stats()
    kept = await buffer.read_after(0, 10_000)
    assert stats.rejected > 0 and stats.dropped_oldest == 0
    assert stats.rejected + stats.readings == seq - 1
    assert kept[0].seq == 1  # the oldest stay
    assert stats.next_seq == seq  # refused readings still used their numbers: the platform sees a gap
    # Once the uplink has delivered (deleted) rows, new readings are accepted again.
    await buffer.delete([row.seq for row in kept])
    await buffer.append([StoredBatch(seq, 5, "m1", 0.0, b"after")])
    assert [r.seq for r in await buffer.read_after(0, 10)] == [seq]
    await buffer.close()


async def test_max_age_deletes_old_rows_unsent_and_counts_them(tmp_path: Path) -> None:
    buffer = await Buffer.open(tmp_path / "b.db", max_age=3600.0)
    now = 1_800_000_000.0
    await buffer.append([StoredBatch(1, 2, "m", now - 7200, b"old"), StoredBatch(3, 2, "m", now - 60, b"new")])
    assert await buffer.expire(now) == 2
    stats = await buffer.stats()
    assert (stats.expired, stats.readings, [r.seq for r in await buffer.read_after(0, 10)]) == (2, 2, [3])
    await buffer.close()
    reopened = await Buffer.open(tmp_path / "b.db")
    assert (await reopened.stats()).expired == 2
    await reopened.close()


async def test_max_age_leaves_rows_being_sent(tmp_path: Path) -> None:
    """A row the uplink has read may yet be delivered: expiring it would count a delivered reading as lost,
    as dropping it at the cap would (issue 12, loss reporting)."""
    buffer = await Buffer.open(tmp_path / "b.db", max_age=3600.0)
    now = 1_800_000_000.0
    await buffer.append([StoredBatch(1, 2, "m", now - 7200, b"sent"), StoredBatch(3, 2, "m", now - 7200, b"old")])
    assert [r.seq for r in await buffer.read_after(0, 1)] == [1]  # in flight: its PUBACK has not come yet
    assert await buffer.expire(now) == 2
    await buffer.delete([1])  # delivered
    stats = await buffer.stats()
    assert (stats.expired, stats.readings) == (2, 0)  # each reading delivered or counted, never both
    await buffer.close()


async def test_rows_are_stored_compressed(tmp_path: Path) -> None:
    encoder = Encoder("changwon-a-gw01", "changwon-plant-a", "0123456789abcdef0123456789abcdef")
    payload = encoder.encode(PollResult("dev0001", 1_764_000_000.0, tuple(
        Reading(f"p{i}", 220.0 + i / 7, "V") for i in range(50))), 1_000_000)
    buffer = await Buffer.open(tmp_path / "b.db")
    await buffer.close()
    buffer = await Buffer.open(tmp_path / "b.db")
    buffer._next_seq = 1_000_000  # as a long-running gateway would be
    await buffer.append([StoredBatch(1_000_000, 50, "dev0001", 0.0, payload)])
    assert (await buffer.read_after(0, 1))[0].payload == payload
    await buffer.close()
    import sqlite3

    with sqlite3.connect(tmp_path / "b.db") as db:
        (stored,), = db.execute("SELECT length(payload) FROM batches").fetchall()
    assert stored < len(payload) / 3, (stored, len(payload))


_WRITE_AND_DIE = """
import asyncio, os, sys
from buffer.store import Buffer, StoredBatch

async def main() -> None:
    buffer = await Buffer.open(sys.argv[1], durability="process-crash")
    print(buffer.buffer_id, flush=True)
    seq = buffer.next_seq
    for _ in range(int(sys.argv[2])):  # one commit each: the WAL holds one commit frame per append
        await buffer.append([StoredBatch(seq, 100, "m1", 1_700_000_000.0, os.urandom(300))])
        seq += 100
    print(seq, flush=True)
    os._exit(0)  # a kill: no close, no checkpoint; the commits are in the WAL only

asyncio.run(main())
"""


def kill_after_commits(path: Path, commits: int) -> tuple[str, int]:
    """Append `commits` rows of 100 readings in a child process that then dies without closing the buffer.
    Returns (buffer_id, the next number it would have used)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run([sys.executable, "-c", _WRITE_AND_DIE, str(path), str(commits)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
    buffer_id, next_seq = done.stdout.split()
    return buffer_id, int(next_seq)


def damage_wal_halfway(path: Path) -> None:
    """Flip bytes in the page of the WAL frame that follows the commit frame halfway through the WAL (past
    the commits that created the file): SQLite then ignores that frame and every frame after it, silently,
    as it does with a torn or corrupt WAL."""
    import struct

    wal = path.with_name(path.name + "-wal")
    data = bytearray(wal.read_bytes())
    page_size = struct.unpack(">I", data[8:12])[0]
    frame = 24 + page_size
    commits = [offset + frame for offset in range(32, len(data) - frame + 1, frame)
               if struct.unpack(">I", data[offset + 4:offset + 8])[0]]  # a commit frame: the db size after it
    assert len(commits) > 10, "the WAL must hold the appends' commits"
    offset = commits[len(commits) // 2]
    data[offset + 24:offset + 64] = bytes(b ^ 0xFF for b in data[offset + 24:offset + 64])
    wal.write_bytes(bytes(data))


async def test_a_wal_that_lost_commits_never_makes_a_number_be_used_twice(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "b.db"
    buffer_id, used_up_to = kill_after_commits(path, 40)
    damage_wal_halfway(path)
    with caplog.at_level(logging.ERROR):
        buffer = await Buffer.open(path, durability="process-crash")
    try:
        kept = await buffer.read_after(0, 1000)
        assert len(kept) < 40, "the damage must have made SQLite drop commits"
        # No (buffer_id, seq) is given twice: the same buffer_id, numbering after everything used before.
        assert buffer.buffer_id == buffer_id
        assert buffer.next_seq >= used_up_to
        stats = await buffer.stats()
        assert stats.skipped == used_up_to - (kept[-1].seq + kept[-1].count if kept else 1)
        assert any("lost commits" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
        await buffer.append([batch(buffer.next_seq)])  # and appending continues from there
    finally:
        await buffer.close()
    reopened = await Buffer.open(path, durability="process-crash")
    assert reopened.next_seq == used_up_to + 3 and (await reopened.stats()).skipped == stats.skipped
    await reopened.close()


async def test_a_kill_without_damage_skips_no_number(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    buffer_id, used_up_to = kill_after_commits(path, 5)
    buffer = await Buffer.open(path, durability="process-crash")
    assert (buffer.buffer_id, buffer.next_seq, (await buffer.stats()).skipped) == (buffer_id, used_up_to, 0)
    await buffer.close()


async def test_rows_being_sent_are_not_dropped_at_the_cap(tmp_path: Path) -> None:
    """A row the uplink has read (in flight) may yet be delivered: dropping it would count a delivered
    reading as lost."""
    cap = 1 << 20
    buffer = await Buffer.open(tmp_path / "b.db", max_bytes=cap)
    await buffer.append([batch(1, 5, size=4096), batch(6, 5, size=4096)])
    in_flight = await buffer.read_after(0, 2)  # what the uplink sends: its PUBACK has not come yet
    assert [r.seq for r in in_flight] == [1, 6]
    seq = await offer_more_than_twice_the_cap(buffer, 11)
    stats = await buffer.stats()
    assert stats.dropped_oldest > 0
    kept = [r.seq for r in await buffer.read_after(0, 10_000)]
    assert kept[:2] == [1, 6]  # still there, so the ack deletes them and nobody counts them lost
    await buffer.delete([1, 6])  # delivered
    assert stats.dropped_oldest + stats.readings == seq - 1  # each reading either kept or counted, never both
    await buffer.close()


async def test_the_cap_bounds_every_file_of_the_buffer_the_wal_included(tmp_path: Path) -> None:
    cap = 4 << 20
    buffer = await Buffer.open(tmp_path / "b.db", max_bytes=cap)
    seq, largest = 1, 0
    for _ in range(200):  # 12 MB offered in small commits, as the writer makes them
        rows = []
        for _ in range(15):
            rows.append(batch(seq, 5, size=4096))
            seq += 5
        await buffer.append(rows)
        on_disk = sum(p.stat().st_size for p in tmp_path.iterdir() if p.name.startswith("b.db"))
        largest = max(largest, on_disk)
    stats = await buffer.stats()
    await buffer.close()
    assert stats.dropped_oldest > 0
    assert largest <= cap, f"{largest} bytes on disk for a cap of {cap}"
    assert stats.bytes_on_disk <= cap


class AlwaysFailing(Buffer):
    """Every commit fails with an I/O error (a dying SD card): a fault no real disk produces on demand."""

    async def append(self, batches: Sequence[StoredBatch], tables: Sequence[tuple[str, str, str]] = ()) -> int:
        raise sqlite3.OperationalError("disk I/O error")


async def test_a_stop_while_every_commit_fails_is_prompt_and_counts_what_was_not_stored(tmp_path: Path) -> None:
    import asyncio
    import time

    buffer = await AlwaysFailing.open(tmp_path / "b.db")
    writer = BufferWriter(buffer, Encoder("gw", "site", buffer.buffer_id), lambda: None)
    task = asyncio.create_task(writer.run())
    for i in range(3):
        await writer.submit(PollResult(f"dev{i}", 1_700_000_000.0, (Reading("a", 1.0), Reading("b", 2))))
    await asyncio.sleep(0.3)  # failing and retrying
    began = time.monotonic()
    await writer.stop(grace=5.0)
    assert time.monotonic() - began < 1.0
    task.cancel()
    stats = await buffer.stats()
    # Given up, but numbered and counted: the platform sees 6 missing readings and the status says why.
    assert (stats.unstored, stats.next_seq, stats.readings) == (6, 7, 0)
    await buffer.close()
    reopened = await Buffer.open(tmp_path / "b.db")
    assert (reopened.next_seq, (await reopened.stats()).unstored) == (7, 6)
    await reopened.close()


async def test_after_a_power_cut_with_process_crash_durability_numbering_continues_after_the_reserved_block(
        tmp_path: Path) -> None:
    """A power cut with synchronous=NORMAL: the last commits and the page cache (the exact mark) are gone.
    Simulated: the WAL lost, the mark as the page cache would have left it, written by another boot."""
    import json

    path = tmp_path / "b.db"
    first = await Buffer.open(path, durability="process-crash")  # created, then checkpointed at close
    await first.append([batch(1)])
    await first.close()
    buffer_id, used_up_to = kill_after_commits(path, 20)
    path.with_name(path.name + "-wal").write_bytes(b"")  # every commit since the last checkpoint: gone
    mark_path = path.with_name(path.name + ".seq")
    mark = json.loads(mark_path.read_bytes())
    assert mark["reserved"] > used_up_to and not mark["synced"]
    mark.update(next_seq=1, boot="an-earlier-boot")  # the page cache never reached the disk
    mark_path.write_bytes(json.dumps(mark).encode().ljust(511) + b"\n")
    buffer = await Buffer.open(path, durability="process-crash")
    assert (buffer.buffer_id, buffer.next_seq) == (buffer_id, mark["reserved"])
    assert buffer.next_seq >= used_up_to
    await buffer.close()
