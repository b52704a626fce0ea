"""The store-and-forward buffer: every reading is on disk before anything tries to send it.

Invariants (what is written when, what a crash can leave, what recovery does):

1. A poll result is safe once `append()` has returned its readings as stored: its row was committed in one
   transaction together with the advance of the sequence counter. Until then it exists only in the
   writer's bounded memory queue. `append()` returning 0 means given up and counted (3, 3a), never pending.
2. Every reading gets the next sequence number. A row holds the readings of one device's poll: `seq` is
   its first reading's number, `count` how many follow it. The counter (`meta.next_seq`) advances in the
   same transaction as the rows, so after any crash counter and rows agree. A number is never given to two
   readings for the life of this buffer file (identified by `meta.buffer_id`), even when the file itself
   forgets commits (a damaged WAL is discarded by SQLite without a word; with durability "process-crash" a
   power cut loses the last commits): the high-water mark `<name>.seq`, a small side file overwritten in
   place (it never needs new disk space), says how far numbering went:
   - `next_seq`, written after every commit and every give-up, before the uplink can read the rows (the
     buffer's lock is held); fsynced each time with durability "power-loss", else left to the page cache,
     which survives a kill of the agent;
   - `reserved`, fsynced before any number at or above the previous `reserved` is used (blocks of
     `SEQ_BLOCK`), which survives a power cut too;
   - `clean` and the kernel's boot id, so that opening knows whether the page cache could have been lost.
   Opening continues at the highest of the file's counter and the mark (`reserved` after an unclean stop
   of an earlier boot by a run that did not fsync `next_seq`). A counter behind the mark is a rollback: it is logged at
   ERROR and the numbers passed over are counted (`meta.skipped`, an upper bound of the loss: some may
   have been delivered). The buffer_id stays: rows the file still holds (some perhaps delivered, their
   deletes forgotten) are re-sent under it, and consumers drop them as duplicates; the platform sees what
   was really lost as a gap.
   A number that could not be stored (disk full, a write error that persists) is still used up (see 3).
3. A row leaves the buffer only through `delete()`, which the uplink calls after the broker acknowledged
   the message that carried it, or through a limit, which counts every reading it gives up:
   - the size cap with policy "drop_oldest" deletes the oldest rows (`meta.dropped_oldest`);
   - the size cap with policy "reject_new" stores no new rows while the data is over the cap, but still
     advances the counter past them (`meta.rejected`), so the platform sees the loss as a gap;
   - `max_age` deletes rows older than that (`meta.expired`); it is off unless configured;
   - the uplink gives up a message the broker refused again and again (`delete_refused()`,
     `meta.refused`).
   - readings that cannot be written (`meta.unstored`): the disk is full, or a write error outlasted
     the writer's retries, or the agent stopped while commits failed. Their numbers are used up (recorded
     in the high-water mark, which needs no new space), so the platform sees a gap.
   The counters are persisted in the same transaction as the deletion (`unstored`: with the next commit
   that succeeds, and in the high-water mark at once). Rows handed to the uplink (`read_after`) and not
   yet deleted are never dropped at the cap nor expired: they may be delivered, and would then be counted
   twice.
   `max_bytes` bounds everything the buffer keeps on disk: the data (dropped or refused above `max_bytes`
   minus the WAL budget, twice the reserve and SQLite's 32 KiB index), the WAL (checkpointed at half its
   budget, `max_bytes / 16` within 64 KiB-64 MiB, and truncated back to it) and the reserve. A commit larger
   than the reserve can pass the cap by the difference until the next drop.
3a. A full disk: `<name>.reserve`, a preallocated file (`max_bytes / 32` within 128 KiB-16 MiB), is given
   back to the file system at the first write that fails for lack of space, so that deletes of delivered
   rows, loss counters and checkpoints still find room; the uplink keeps delivering what is on disk. While
   the disk is full, new readings are given up (counted in `unstored`, numbered, a gap), never held in
   memory; after a failed attempt the next one waits `FULL_PROBE_INTERVAL`. Rows that fit in room freed
   inside the file are stored again at once; the state ends when the reserve can be preallocated again.
4. Durability: the file is in WAL mode. With durability "power-loss" (synchronous=FULL) a returned
   `append()` survives a power cut. With "process-crash" (synchronous=NORMAL) it survives a crash or
   SIGKILL of the agent; a power cut may lose the last commits, but never corrupts the file.
5. Recovery: opening the file lets SQLite replay or discard its WAL. A file that is not a readable
   buffer (not a database, a damaged header or schema) is renamed aside to `<name>.corrupt-<utc time>`
   with its WAL, a loud log line says so, and a fresh buffer with a new `buffer_id` starts: the agent
   never crash-loops on a bad file, and the platform sees from the new buffer_id that numbering restarted.
6. Point tables (the compact encoding, agent/compact.py): a row in that encoding names its table by id
   (`batches.tbl`; NULL for JSON rows). A table is written in the same transaction as the rows handed in
   with it, so no committed row names a table the file lacks; tables no row names any more are removed
   when the buffer is opened. A table id is a hash of its content: it never changes meaning.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import json
import logging
import os
import sqlite3
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import aiosqlite

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: point tables for the compact encoding (batches.tbl, tables); a 1 is upgraded on open
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    seq     INTEGER PRIMARY KEY,  -- sequence number of the row's first reading
    count   INTEGER NOT NULL,     -- readings in the row: they hold seq .. seq + count - 1
    device  TEXT NOT NULL,
    ts      REAL NOT NULL,        -- poll time, UTC epoch seconds
    payload BLOB NOT NULL,        -- the encoded poll: JSON zlib-compressed (level 1: ~4x smaller, ~0.2 us per
                                  -- reading), compact as is (zlib makes its ~5.5 bytes per reading larger)
    tbl     TEXT                  -- compact encoding: the id of the point table; NULL: JSON
);
CREATE TABLE IF NOT EXISTS tables (
    device  TEXT NOT NULL,
    id      TEXT NOT NULL,
    points  TEXT NOT NULL,        -- JSON: [{"point": ..., "unit": ...}, ...], as the meta message carries it
    PRIMARY KEY (device, id)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class StoredBatch:
    seq: int
    count: int
    device: str
    ts: float
    payload: bytes
    table: str | None = None  # the compact encoding's point table; None: a JSON poll


@dataclass(frozen=True, slots=True)
class BufferStats:
    rows: int
    readings: int
    oldest_ts: float | None
    bytes_on_disk: int
    dropped_oldest: int
    rejected: int
    expired: int
    next_seq: int
    buffer_id: str
    unstored: int = 0  # readings that could not be written (disk full, lasting write errors)
    skipped: int = 0  # numbers passed over after the file lost commits (invariant 2): at most that many lost
    disk_full: bool = False  # the last write found no room and the reserve is not back yet (invariant 3a)
    refused: int = 0  # given up by the uplink: the broker refused their message (`delete_refused()`)

    @property
    def dropped(self) -> int:
        """Every reading the buffer gave up, for any reason (`skipped` is a bound, not a count: not in it)."""
        return self.dropped_oldest + self.rejected + self.expired + self.unstored + self.refused


OnFull = Literal["drop_oldest", "reject_new"]
# Readings given up, by reason: what `dropped`, the status message, /metrics and the CLI add up.
LOSS_REASONS = ("dropped_oldest", "rejected", "expired", "unstored", "refused")
_LOSS_KEYS = (*LOSS_REASONS, "skipped")  # skipped: a bound on a loss, not a count (invariant 2)
SEQ_BLOCK = 65_536  # numbers reserved (one fsync of the high-water mark) ahead of use; see invariant 2
FULL_PROBE_INTERVAL = 2.0  # seconds between attempts to store while the disk is full (invariant 3a)
_DELETE_CHUNK = 500  # sequence numbers per DELETE statement (SQLite allows 32,766 parameters)
_ROW_OVERHEAD = 64  # bytes a row takes besides its payload, at most (its columns, the b-tree cell)


class Buffer:
    """Open with `await Buffer.open(...)`. One writer (the agent's buffer writer) appends; one reader
    (the uplink) reads and deletes. Both run on the same event loop."""

    def __init__(self, db: aiosqlite.Connection, path: Path, buffer_id: str, next_seq: int,
                 losses: dict[str, int], page_size: int) -> None:
        self._db = db
        self.path = path
        self.max_bytes = 1 << 30
        self.on_full: OnFull = "drop_oldest"
        self.max_age: float | None = None
        self.buffer_id = buffer_id
        self._next_seq = next_seq
        self._losses = losses
        self._page_size = page_size
        # One connection serves the writer and the uplink: every operation holds this lock, so no
        # transaction interleaves with another and no read ever sees a transaction that is still open.
        self._lock = asyncio.Lock()
        self._lock_file: IO[bytes] | None = None
        self._capped = False  # inside an episode of dropping at the cap: log its start once
        # The size is measured (a query) only when it may be near the cap: after a measurement, appends add
        # at most `_grown` bytes (twice their size with each row's overhead, a bound), deletions only free.
        self._used_measured: int | None = None
        self._grown = 0
        self._mark: _HighWaterMark | None = None
        self._reserved = 0  # every number below this may have been used (the mark's fsynced bound)
        self._sync_mark = True  # durability "power-loss": the exact mark is fsynced after each commit
        self._unstored_saved = losses["unstored"]  # the part of `unstored` already in the file's meta
        self._leased: set[int] = set()  # rows handed to the uplink and not deleted: never dropped at the cap
        self._reserve = _Reserve(path.with_name(path.name + ".reserve"), 0)
        self._full_since: float | None = None  # the disk is full (invariant 3a): when it was found
        self._last_full_failure = 0.0  # monotonic time of the last write that found no room
        self._saved_before_rollback = self._unstored_saved
        self._data_cap = self.max_bytes  # the data's part of max_bytes: without the WAL budget and the reserve

    @classmethod
    async def open(cls, path: Path | str, max_bytes: int = 1 << 30,
                   durability: Literal["power-loss", "process-crash"] = "power-loss",
                   on_full: OnFull = "drop_oldest", max_age: float | None = None) -> Buffer:
        """Open (or create) the buffer. Raises `BufferUnavailable` when the file cannot be used at all
        (no permission, another agent holds it); a corrupt file is moved aside instead (invariant 5)."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = _lock(path)
        except OSError as exc:
            raise BufferUnavailable(f"cannot use the buffer {path}: {exc.strerror or exc}") from exc
        wal_budget, reserve = _wal_budget(max_bytes), _reserve_size(max_bytes)
        buffer: Buffer | None = None
        try:
            try:
                buffer = await cls._open(path, wal_budget, durability)
            except BufferUnavailable:
                raise
            except sqlite3.DatabaseError as exc:
                if not _is_corruption(exc):
                    raise BufferUnavailable(f"cannot open the buffer {path}: {exc}") from exc
                aside = _move_aside(path)
                log.error("buffer %s is unreadable (%s): moved it aside to %s and started a new, empty buffer; "
                          "readings in the old file were not sent", path, exc, aside)
                buffer = await cls._open(path, wal_budget, durability)
            buffer._lock_file = lock
            buffer.max_bytes, buffer.on_full, buffer.max_age = max_bytes, on_full, max_age
            # Room for SQLite's shared-memory index (32 KiB) and for one commit beyond the cap before the drop.
            buffer._data_cap = max(max_bytes - wal_budget - 2 * reserve - (32 << 10), max_bytes // 2)
            buffer._reserve = _Reserve(path.with_name(path.name + ".reserve"), reserve)
            buffer._sync_mark = durability == "power-loss"
            await buffer._recover_numbering(durability)
            if not buffer._reserve.make():
                buffer._enter_full(f"no room for the buffer's reserve of {reserve} bytes")
        except BaseException:
            if buffer is not None:
                await buffer._db.close()
                if buffer._mark is not None:
                    buffer._mark.close()
            lock.close()
            raise
        return buffer

    @classmethod
    async def _open(cls, path: Path, wal_budget: int, durability: str) -> Buffer:
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute(f"PRAGMA synchronous={'FULL' if durability == 'power-loss' else 'NORMAL'}")
            # 256 KiB of page cache (SQLite's default is 2 MiB): rows are appended at one end and read once
            # from the other, so a large cache only holds memory; it grew RSS by ~1.7 MB during an outage.
            await db.execute("PRAGMA cache_size=-256")
            # The WAL counts against max_bytes (invariant 3): checkpointed when it reaches its budget (SQLite's
            # default, 1000 pages, let a 4 MB buffer take 8.3 MB) and truncated back to it after each checkpoint.
            await db.execute(f"PRAGMA journal_size_limit={wal_budget}")
            if await _schema_version(db) == 1:
                await _upgrade_from_1(db)
            await db.executescript(_SCHEMA)
            meta = dict(await db.execute_fetchall("SELECT key, value FROM meta"))
            if not meta:
                meta = {"schema_version": SCHEMA_VERSION, "buffer_id": uuid.uuid4().hex, "next_seq": 1,
                        "created": time.time(), **dict.fromkeys(_LOSS_KEYS, 0)}
                await db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", meta.items())
            version = meta.get("schema_version")
            if isinstance(version, int) and version > SCHEMA_VERSION:
                raise BufferUnavailable(f"the buffer {path} was written by a newer edge-agent (buffer schema "
                                        f"{version}, this version reads {SCHEMA_VERSION}); its readings are "
                                        "kept: run the newer agent, or move the file away to start afresh")
            if version != SCHEMA_VERSION:
                raise _NotABuffer(f"unknown buffer schema version {version!r}")
            (last,), = await db.execute_fetchall("SELECT coalesce(max(seq + count), 1) FROM batches")
            (page_size,), = await db.execute_fetchall("PRAGMA page_size")
            await db.execute(f"PRAGMA wal_autocheckpoint={max(16, min(1000, wal_budget // page_size // 2))}")
            next_seq = int(meta["next_seq"])
            if last > next_seq:  # cannot happen with invariant 2; refuse to reuse numbers if it ever does
                log.error("buffer %s: counter %d behind its rows (%d); continuing after the rows", path,
                          next_seq, last)
                next_seq = last
            losses = {key: int(meta.get(key, 0)) for key in _LOSS_KEYS}
            await db.execute("DELETE FROM tables WHERE (device, id) NOT IN "
                             "(SELECT DISTINCT device, tbl FROM batches WHERE tbl IS NOT NULL)")
            return cls(db, path, str(meta["buffer_id"]), next_seq, losses, page_size)
        except BaseException:
            await db.close()
            raise

    async def _recover_numbering(self, durability: str) -> None:
        """Invariant 2 at opening: continue after every number the mark says was used, loudly if the file
        forgot some; then mark this run as not cleanly stopped, with a fresh block reserved."""
        mark_path = self.path.with_name(self.path.name + ".seq")
        record = _HighWaterMark.read(mark_path)
        self._mark = _HighWaterMark.create(mark_path)
        if record is not None and record.get("buffer_id") == self.buffer_id:
            used = int(record.get("next_seq", 1))
            lost_page_cache = not record.get("clean") and record.get("boot") != _boot_id()
            why = "its WAL was damaged or discarded"
            if lost_page_cache and not record.get("synced", durability == "power-loss"):
                # A power cut (or kernel crash) with synchronous=NORMAL: the last commits and the exact mark
                # may both be gone; only the fsynced reservation is sure.
                used = max(used, int(record.get("reserved", used)))
                why = "the machine stopped without a clean shutdown (durability \"process-crash\")"
            self._losses["unstored"] = max(self._losses["unstored"], int(record.get("unstored", 0)))
            if used > self._next_seq:
                skipped = used - self._next_seq
                log.error("buffer %s lost commits (%s): its counter is at %d but numbers up to %d were used; "
                          "continuing at %d under the same buffer_id %s so that no number is given twice. "
                          "Readings numbered %d-%d that had not been delivered are lost (at most %d); the "
                          "platform sees them as a gap", self.path, why, self._next_seq, used - 1, used,
                          self.buffer_id, self._next_seq, used - 1, skipped)
                self._losses["skipped"] += skipped
                self._next_seq = used
        elif record is not None:
            log.info("buffer %s: its high-water mark belonged to buffer %s; starting a new one", self.path,
                     record.get("buffer_id"))
        await self._reserve_numbers(self._next_seq + 1)
        try:
            await self._persist_counters()
        except sqlite3.OperationalError as exc:  # a full disk at start: the mark holds the numbers meanwhile
            if not _is_full(exc):
                raise
            log.debug("buffer %s: counters not saved at opening: %s", self.path, exc)

    @property
    def next_seq(self) -> int:
        """The sequence number the next appended reading will get."""
        return self._next_seq

    @property
    def disk_full(self) -> bool:
        return self._full_since is not None

    async def append(self, batches: Sequence[StoredBatch], tables: Sequence[tuple[str, str, str]] = ()) -> int:
        """Commit rows in one transaction. Their numbers must continue `next_seq` without a gap. `tables`:
        point tables (device, id, points JSON) the rows may name, stored with them (invariant 6). Returns
        how many readings were stored: on a full disk they are given up instead, counted (invariant 3a)."""
        if not batches:
            return 0
        expected = self._next_seq
        for batch in batches:
            if batch.seq != expected:
                raise ValueError(f"sequence gap: row starts at {batch.seq}, expected {expected}")
            expected += batch.count
        readings = expected - self._next_seq
        rows = [(b.seq, b.count, b.device, b.ts, zlib.compress(b.payload, 1) if b.table is None else b.payload,
                 b.table) for b in batches]
        async with self._lock:
            await self._reserve_numbers(expected)
            if self._full_since is not None and not self._may_try_while_full():
                await self._give_up_locked(readings, "the disk is full")
                return 0
            reject = self.on_full == "reject_new" and self._may_be_near_cap() and \
                await self._used_bytes() > self._data_cap
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                if reject:
                    await self._count_loss("rejected", readings)
                else:
                    if tables:
                        await self._db.executemany(
                            "INSERT OR IGNORE INTO tables(device, id, points) VALUES (?, ?, ?)", tables)
                    await self._db.executemany(
                        "INSERT INTO batches(seq, count, device, ts, payload, tbl) VALUES (?, ?, ?, ?, ?, ?)", rows)
                await self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (expected,))
                await self._save_unstored()
                await self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                await self._rollback()
                if not _is_full(exc):
                    raise
                self._unstored_saved = self._saved_before_rollback
                self._found_full(str(exc))
                await self._give_up_locked(readings, "the disk is full")
                return 0
            except BaseException:
                await self._rollback()
                self._unstored_saved = self._saved_before_rollback
                raise
            self._next_seq = expected
            await self._write_mark()
            if self._full_since is not None:
                self._last_full_failure = 0.0  # it fitted: the next one is tried at once
                if self._room_for_reserve() and self._reserve.make():
                    self._leave_full()
            if not reject:
                self._grown += sum(2 * (len(row[4]) + _ROW_OVERHEAD) for row in rows)
            if reject:
                self._episode_log(f"refusing new readings ({readings} now, {self._losses['rejected']} in all)")
            elif not self._may_be_near_cap():
                pass  # far below the cap: no query (two saved round trips to SQLite's thread per commit)
            elif self.on_full == "drop_oldest":
                await self._drop_oldest_over_cap()
            else:
                await self._end_episode_below_cap()
            return 0 if reject else readings

    async def give_up(self, readings: int, reason: str) -> int:
        """Number `readings` that cannot be stored (a write error that outlasted the writer's retries, a stop
        while commits fail) and count them as unstored: they show as a gap, never as nothing (invariant 3).
        Needs no room on the disk. Returns the first number used."""
        async with self._lock:
            first = self._next_seq
            await self._reserve_numbers(first + readings)
            await self._give_up_locked(readings, reason)
            return first

    async def _give_up_locked(self, readings: int, reason: str) -> None:
        self._next_seq += readings
        self._losses["unstored"] += readings
        await self._write_mark()
        log.debug("buffer %s: %d readings not stored (%s), numbers up to %d used; %d unstored in all",
                  self.path, readings, reason, self._next_seq - 1, self._losses["unstored"])

    async def read_after(self, seq: int, limit: int, before: int | None = None) -> list[StoredBatch]:
        """Rows whose first sequence number is above `seq` (and below `before`), oldest first. They count as
        being sent until `delete()`: the cap does not drop them (invariant 3)."""
        async with self._lock:
            rows = await self._db.execute_fetchall(
                "SELECT seq, count, device, ts, payload, tbl FROM batches WHERE seq > ? AND seq < ? ORDER BY seq "
                "LIMIT ?", (seq, (1 << 62) if before is None else before, limit))
        self._leased.update(row[0] for row in rows)
        return [StoredBatch(seq, count, device, ts, zlib.decompress(blob) if table is None else blob, table)
                for seq, count, device, ts, blob, table in rows]

    async def tables(self, device: str) -> dict[str, str]:
        """The device's point tables by id (points JSON): every table a row in the buffer names, and any
        handed in since the buffer was opened."""
        async with self._lock:
            rows = await self._db.execute_fetchall("SELECT id, points FROM tables WHERE device = ?", (device,))
        return dict(rows)  # type: ignore[arg-type]

    async def delete(self, seqs: Sequence[int]) -> None:
        """Forget rows the broker has acknowledged. A delete lost in a crash means a duplicate, never a loss."""
        # One statement (its own transaction) per chunk: one round trip to SQLite's thread instead of three.
        # A chunk that fails leaves the others deleted, which is fine: a row deleted late is a duplicate.
        async with self._lock:
            for start in range(0, len(seqs), _DELETE_CHUNK):
                chunk = list(seqs[start:start + _DELETE_CHUNK])
                statement = f"DELETE FROM batches WHERE seq IN ({','.join('?' * len(chunk))})"
                await self._write_with_room(lambda s=statement, c=chunk: self._db.execute(s, c))  # type: ignore[misc]
                self._leased.difference_update(chunk)

    async def delete_refused(self, rows: Sequence[tuple[int, int]]) -> None:
        """Delete rows (seq, count) the uplink cannot deliver (the broker refused their message again and
        again), counted as lost (`refused`) in the same transaction: the platform sees the gap, the status
        message counts it."""
        async with self._lock:
            await self._delete_counted(list(rows), "refused")

    async def stats(self) -> BufferStats:
        async with self._lock:
            (rows, readings, oldest), = await self._db.execute_fetchall(
                "SELECT count(*), coalesce(sum(count), 0), min(ts) FROM batches")
        on_disk = sum(p.stat().st_size for p in _files(self.path) if p.exists())
        losses = self._losses
        return BufferStats(rows, readings, oldest, on_disk, losses["dropped_oldest"], losses["rejected"],
                           losses["expired"], self._next_seq, self.buffer_id, losses["unstored"], losses["skipped"],
                           self._full_since is not None, losses["refused"])

    async def note_uplink(self, inflight: int) -> None:
        """Record the uplink's in-flight count, so `edge-agent buffer stats` can show it from outside. Best
        effort: on a full disk the figure is not worth the room a delete may need."""
        if self._full_since is not None:
            return
        async with self._lock:
            await self._db.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [("uplink_inflight", inflight), ("uplink_noted", time.time())])

    async def expire(self, now: float | None = None) -> int:
        """Delete rows older than `max_age` (when set), counted as expired, but not rows being sent
        (invariant 3). Returns how many readings went."""
        if self.max_age is None:
            return 0
        cutoff = (time.time() if now is None else now) - self.max_age
        async with self._lock:
            old = await self._db.execute_fetchall(
                "SELECT seq, count FROM batches WHERE ts < ? ORDER BY seq", (cutoff,))
            victims = [row for row in old if row[0] not in self._leased]
            if victims:
                await self._delete_counted(victims, "expired")
        expired = sum(count for _, count in victims)
        if expired:
            log.warning("buffer %s: %d readings older than max_age (%g s) were deleted unsent (%d in all)",
                        self.path, expired, self.max_age, self._losses["expired"])
        return expired

    async def close(self) -> None:
        async with self._lock:
            try:
                await self._persist_counters()
            except sqlite3.Error as exc:  # a full disk: the mark below holds what matters
                log.debug("buffer %s: counters not saved at close: %s", self.path, exc)
            await self._db.close()
            if self._mark is not None:
                await self._write_mark(clean=True, sync=True)
                self._mark.close()
                self._mark = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # --- numbering and the high-water mark (invariant 2) ------------------------------------------

    async def _reserve_numbers(self, upto: int) -> None:
        """Before any number below `upto` is used: make sure the fsynced mark covers it."""
        if upto > self._reserved:
            self._reserved = upto + SEQ_BLOCK
            await self._write_mark(sync=True)

    async def _write_mark(self, clean: bool = False, sync: bool | None = None) -> None:
        assert self._mark is not None
        record = {"buffer_id": self.buffer_id, "next_seq": self._next_seq, "reserved": self._reserved,
                  "unstored": self._losses["unstored"], "clean": clean, "boot": _boot_id(),
                  "synced": self._sync_mark}
        if self._sync_mark if sync is None else sync:
            # An fsync can take tens of milliseconds on an SD card: not on the event loop.
            await asyncio.to_thread(self._mark.write, record, True)
        else:
            self._mark.write(record, False)  # a pwrite of 512 bytes to the page cache: ~4 us

    async def _persist_counters(self) -> None:
        """The counter and loss counts into the file's meta (after a recovery, at close)."""
        await self._write_with_room(self._persist_counters_once)

    async def _persist_counters_once(self) -> None:
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            await self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (self._next_seq,))
            await self._db.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [(key, self._losses[key]) for key in ("unstored", "skipped")])
            await self._db.execute("COMMIT")
        except BaseException:
            await self._rollback()
            raise
        self._unstored_saved = self._losses["unstored"]

    async def _save_unstored(self) -> None:
        """Inside a transaction: readings given up since the last commit join the file's count."""
        self._saved_before_rollback = self._unstored_saved
        if self._losses["unstored"] != self._unstored_saved:
            await self._db.execute("INSERT INTO meta(key, value) VALUES ('unstored', ?) ON CONFLICT(key) DO "
                                   "UPDATE SET value = excluded.value", (self._losses["unstored"],))
            self._unstored_saved = self._losses["unstored"]

    # --- a full disk (invariant 3a) ------------------------------------------------------------------

    async def _write_with_room(self, write: Any) -> Any:
        """Run a write; if the disk is full, give back the reserve and try once more."""
        try:
            return await write()
        except sqlite3.OperationalError as exc:
            if not _is_full(exc) or not self._reserve.held:
                raise
            self._found_full(str(exc))
            return await write()

    def _found_full(self, reason: str) -> None:
        self._last_full_failure = time.monotonic()
        if self._full_since is None:
            self._enter_full(reason)
        self._reserve.release()

    def _enter_full(self, reason: str) -> None:
        self._full_since = time.monotonic()
        self._last_full_failure = self._full_since
        log.error("buffer %s: the disk is full (%s). New readings are not stored but counted as lost "
                  "('unstored', a gap in sequence numbers) while it is; what the buffer holds is still sent "
                  "and deleted once acknowledged (the reserve of %d bytes was given back for that). Free space "
                  "on %s", self.path, reason, self._reserve.size, self.path.parent)

    def _leave_full(self) -> None:
        assert self._full_since is not None
        log.info("buffer %s: the disk has room again after %.0f s; new readings are stored (%d readings were "
                 "not stored in all)", self.path, time.monotonic() - self._full_since, self._losses["unstored"])
        self._full_since = None

    def _may_try_while_full(self) -> bool:
        """While the disk is full: try to store again once the reserve is back, or at most every
        FULL_PROBE_INTERVAL (room freed inside the file by delivered rows is used at once)."""
        if self._room_for_reserve() and self._reserve.make():
            self._leave_full()
            return True
        return time.monotonic() - self._last_full_failure >= FULL_PROBE_INTERVAL

    def _room_for_reserve(self) -> bool:
        """Room for the reserve and as much again: making it with only its own room back (what releasing it
        freed) would end the state just to start it again at the next write."""
        try:
            disk = os.statvfs(self.path.parent)
        except OSError:
            return False
        return disk.f_bavail * disk.f_frsize >= 2 * self._reserve.size

    # --- the cap ------------------------------------------------------------------------------------

    def _may_be_near_cap(self) -> bool:
        return self._capped or self._used_measured is None or \
            self._used_measured + self._grown > self._data_cap * 0.9

    async def _used_bytes(self) -> int:
        (pages,), = await self._db.execute_fetchall(
            "SELECT (SELECT page_count FROM pragma_page_count()) - "
            "(SELECT freelist_count FROM pragma_freelist_count())")
        self._used_measured, self._grown = pages * self._page_size, 0
        return self._used_measured

    async def _drop_oldest_over_cap(self) -> None:
        """Drop the oldest rows while the data exceeds its part of max_bytes; freed pages are reused, so the
        file stops growing at the cap. Rows being sent are left alone (invariant 3)."""
        used = await self._used_bytes()
        if used <= self._data_cap:
            await self._end_episode_below_cap(used)
            return
        dropped = 0
        while used > self._data_cap * 0.95:
            (rows,), = await self._db.execute_fetchall("SELECT count(*) FROM batches")
            batch = max(1, rows // 50)
            candidates = await self._db.execute_fetchall(
                "SELECT seq, count FROM batches ORDER BY seq LIMIT ?", (batch + len(self._leased),))
            victims = [row for row in candidates if row[0] not in self._leased][:batch]
            if not victims:
                break
            await self._delete_counted(victims, "dropped_oldest")
            dropped += sum(count for _, count in victims)
            used = await self._used_bytes()
        self._episode_log(f"dropping the oldest readings ({dropped} now, {self._losses['dropped_oldest']} in all)")

    async def _delete_counted(self, victims: list[Any], reason: str) -> None:
        async def once() -> None:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                await self._db.executemany("DELETE FROM batches WHERE seq = ?", [(seq,) for seq, _ in victims])
                await self._db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                                       "value = value + excluded.value", (reason, readings))
                await self._db.execute("COMMIT")
            except BaseException:
                await self._rollback()
                raise

        readings = sum(count for _, count in victims)
        await self._write_with_room(once)
        self._losses[reason] += readings
        self._leased.difference_update(seq for seq, _ in victims)

    async def _count_loss(self, reason: str, readings: int) -> None:
        """Inside a transaction: add to a loss counter, in memory once the transaction commits."""
        await self._db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                               "value = value + excluded.value", (reason, readings))
        self._losses[reason] += readings

    def _episode_log(self, what: str) -> None:
        log.log(logging.DEBUG if self._capped else logging.WARNING,
                "buffer %s reached its cap of %d bytes: %s%s", self.path, self.max_bytes, what,
                "" if self._capped else "; further losses are logged at debug level until it is below the cap")
        self._capped = True

    async def _end_episode_below_cap(self, used: int | None = None) -> None:
        if not self._capped:
            return
        used = await self._used_bytes() if used is None else used
        if used < self._data_cap * 0.9:
            self._capped = False
            lost = sum(self._losses[key] for key in ("dropped_oldest", "rejected", "expired"))
            log.info("buffer %s is below its cap again (%d readings lost to limits in all)", self.path, lost)

    async def _rollback(self) -> None:
        try:
            await self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the failed statement may already have ended the transaction


async def _schema_version(db: aiosqlite.Connection) -> Any:
    try:
        rows = await db.execute_fetchall("SELECT value FROM meta WHERE key = 'schema_version'")
    except sqlite3.OperationalError:  # no meta table: a new file
        return None
    return rows[0][0] if rows else None


async def _upgrade_from_1(db: aiosqlite.Connection) -> None:
    """Schema 1 -> 2 in one transaction: rows of version 1 are JSON (tbl NULL) and stay as they are."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        await db.execute("ALTER TABLE batches ADD COLUMN tbl TEXT")
        await db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise
    log.info("buffer: upgraded the file's schema from 1 to %d (its readings are kept)", SCHEMA_VERSION)


def read_stats(path: Path) -> dict[str, Any]:
    """The buffer's figures, read-only and without the agent's lock, so it works while the agent runs."""
    if not path.exists():
        raise BufferUnavailable(f"no buffer at {path}")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise BufferUnavailable(f"cannot read the buffer {path}: {exc}") from exc
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        (rows, readings, oldest), = db.execute("SELECT count(*), coalesce(sum(count), 0), min(ts) FROM batches")
    except sqlite3.DatabaseError as exc:
        raise BufferUnavailable(f"cannot read the buffer {path}: {exc}") from exc
    finally:
        db.close()
    losses = {key: int(meta.get(key, 0)) for key in _LOSS_KEYS}
    mark = _HighWaterMark.read(path.with_name(path.name + ".seq"))
    if mark is not None and mark.get("buffer_id") == meta.get("buffer_id"):  # ahead of the file while it is full
        losses["unstored"] = max(losses["unstored"], int(mark.get("unstored", 0)))
        meta["next_seq"] = max(int(meta.get("next_seq", 1)), int(mark.get("next_seq", 1)))
    return {
        "path": str(path), "buffer_id": meta.get("buffer_id"), "rows": rows, "readings": readings,
        "oldest_ts": oldest, "oldest_age_s": round(time.time() - oldest, 1) if oldest is not None else None,
        "bytes_on_disk": sum(p.stat().st_size for p in _files(path) if p.exists()),
        "next_seq": int(meta.get("next_seq", 1)), **losses,
        "dropped": sum(losses[key] for key in LOSS_REASONS),
        "inflight": meta.get("uplink_inflight"), "inflight_noted": meta.get("uplink_noted"),
    }


class BufferUnavailable(Exception):
    """The buffer file cannot be used (permissions, held by another agent). Nothing was changed on disk."""


class _NotABuffer(sqlite3.DatabaseError):
    """A readable SQLite file that is not a buffer of a schema this version knows."""


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    # Only damage is a reason to set a file aside: "database is locked" or "unable to open" are not.
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, _NotABuffer) or code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _lock(path: Path) -> IO[bytes]:
    """An exclusive lock beside the buffer: two agents must never share one buffer (numbers would clash)."""
    handle = path.with_name(path.name + ".lock").open("a+b")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise BufferUnavailable(f"the buffer {path} is in use by another edge-agent process") from exc
    return handle


def _files(path: Path) -> list[Path]:
    """What the buffer keeps on disk (the cap bounds them all; the lock file is empty)."""
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"),
            path.with_name(path.name + ".reserve"), path.with_name(path.name + ".seq")]


def _wal_budget(max_bytes: int) -> int:
    return min(64 << 20, max(64 << 10, max_bytes // 16))


def _reserve_size(max_bytes: int) -> int:
    return min(16 << 20, max(128 << 10, max_bytes // 32))


def _is_full(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc)


@functools.cache
def _boot_id() -> str:
    """The kernel's id of this boot: a mark left by another boot may have lost what the page cache held."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


class _HighWaterMark:
    """The side file of invariant 2: one JSON record padded to a fixed size, always overwritten in place at
    offset 0, so that it never needs a new block of the disk (it must work when the disk is full)."""

    SIZE = 512

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def create(cls, path: Path) -> _HighWaterMark:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < cls.SIZE:
                os.pwrite(fd, b" " * (cls.SIZE - 1) + b"\n", 0)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd)

    @staticmethod
    def read(path: Path) -> dict[str, Any] | None:
        try:
            record = json.loads(path.read_bytes() or b"null")
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def write(self, record: dict[str, Any], sync: bool) -> None:
        data = json.dumps(record, separators=(",", ":")).encode()
        os.pwrite(self._fd, data.ljust(self.SIZE - 1) + b"\n", 0)
        if sync:
            os.fdatasync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class _Reserve:
    """Disk space held back for a full disk (invariant 3a): preallocated, given back when a write finds no
    room, made again when there is room."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        self.held = False

    def make(self) -> bool:
        if self.held:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            self.path.unlink(missing_ok=True)  # a partial reserve would only take room
            return False
        self.held = True
        return True

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        self.held = False


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    for source in _files(path)[:3]:  # SQLite's files; the reserve and the mark stay with the new buffer
        if source.exists():
            source.rename(aside.with_name(aside.name + source.name[len(path.name):]))
    return aside
