"""The store-and-forward buffer: every reading is on disk before anything tries to send it.

Invariants (what is written when, what a crash can leave, what recovery does):

1. A poll result is safe once `append()` has returned: its row was committed in one transaction together
   with the advance of the sequence counter. Until then it exists only in the writer's memory queue.
2. Every reading gets the next sequence number. A row holds the readings of one device's poll: `seq` is
   its first reading's number, `count` how many follow it. The counter (`meta.next_seq`) advances in the
   same transaction as the rows, so after any crash counter and rows agree: a number is never reused
   and never skipped for the life of this buffer file (identified by `meta.buffer_id`).
3. A row leaves the buffer only through `delete()`, which the uplink calls after the broker acknowledged
   the message that carried it, or through a limit, which counts every reading it gives up:
   - the size cap with policy "drop_oldest" deletes the oldest rows (`meta.dropped_oldest`);
   - the size cap with policy "reject_new" stores no new rows while the data is over the cap, but still
     advances the counter past them (`meta.rejected`), so the platform sees the loss as a gap;
   - `max_age` deletes rows older than that (`meta.expired`); it is off unless configured;
   - the uplink gives up a message the broker refused again and again (`give_up()`, `meta.refused`).
   The counters are persisted in the same transaction as the deletion.
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
import fcntl
import logging
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
    refused: int = 0  # given up by the uplink: the broker refused their message (`give_up()`)

    @property
    def dropped(self) -> int:
        """Every reading the buffer gave up, for any reason."""
        return self.dropped_oldest + self.rejected + self.expired + self.refused


OnFull = Literal["drop_oldest", "reject_new"]
_LOSS_KEYS = ("dropped_oldest", "rejected", "expired", "refused")
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
        try:
            try:
                buffer = await cls._open(path, max_bytes, durability)
            except BufferUnavailable:
                raise
            except sqlite3.DatabaseError as exc:
                if not _is_corruption(exc):
                    raise BufferUnavailable(f"cannot open the buffer {path}: {exc}") from exc
                aside = _move_aside(path)
                log.error("buffer %s is unreadable (%s): moved it aside to %s and started a new, empty buffer; "
                          "readings in the old file were not sent", path, exc, aside)
                buffer = await cls._open(path, max_bytes, durability)
        except BaseException:
            lock.close()
            raise
        buffer._lock_file = lock
        buffer.max_bytes, buffer.on_full, buffer.max_age = max_bytes, on_full, max_age
        return buffer

    @classmethod
    async def _open(cls, path: Path, max_bytes: int, durability: str) -> Buffer:
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute(f"PRAGMA synchronous={'FULL' if durability == 'power-loss' else 'NORMAL'}")
            # 256 KiB of page cache (SQLite's default is 2 MiB): rows are appended at one end and read once
            # from the other, so a large cache only holds memory; it grew RSS by ~1.7 MB during an outage.
            await db.execute("PRAGMA cache_size=-256")
            # The WAL is truncated back to this after each checkpoint, so it cannot grow far past the cap.
            await db.execute(f"PRAGMA journal_size_limit={min(64 << 20, max_bytes // 16)}")
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

    @property
    def next_seq(self) -> int:
        """The sequence number the next appended reading will get."""
        return self._next_seq

    async def append(self, batches: Sequence[StoredBatch], tables: Sequence[tuple[str, str, str]] = ()) -> None:
        """Commit rows in one transaction. Their numbers must continue `next_seq` without a gap. `tables`:
        point tables (device, id, points JSON) the rows may name, stored with them (invariant 6)."""
        if not batches:
            return
        expected = self._next_seq
        for batch in batches:
            if batch.seq != expected:
                raise ValueError(f"sequence gap: row starts at {batch.seq}, expected {expected}")
            expected += batch.count
        rows = [(b.seq, b.count, b.device, b.ts, zlib.compress(b.payload, 1) if b.table is None else b.payload,
                 b.table) for b in batches]
        async with self._lock:
            reject = self.on_full == "reject_new" and self._may_be_near_cap() and \
                await self._used_bytes() > self.max_bytes
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                if reject:
                    await self._count_loss("rejected", expected - self._next_seq)
                else:
                    if tables:
                        await self._db.executemany(
                            "INSERT OR IGNORE INTO tables(device, id, points) VALUES (?, ?, ?)", tables)
                    await self._db.executemany(
                        "INSERT INTO batches(seq, count, device, ts, payload, tbl) VALUES (?, ?, ?, ?, ?, ?)", rows)
                await self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (expected,))
                await self._db.execute("COMMIT")
            except BaseException:
                await self._rollback()
                raise
            rejected = expected - self._next_seq if reject else 0
            self._next_seq = expected
            if not reject:
                self._grown += sum(2 * (len(row[4]) + _ROW_OVERHEAD) for row in rows)
            if reject:
                self._episode_log(f"refusing new readings ({rejected} now, {self._losses['rejected']} in all)")
            elif not self._may_be_near_cap():
                pass  # far below the cap: no query (two saved round trips to SQLite's thread per commit)
            elif self.on_full == "drop_oldest":
                await self._drop_oldest_over_cap()
            else:
                await self._end_episode_below_cap()

    async def read_after(self, seq: int, limit: int, before: int | None = None) -> list[StoredBatch]:
        """Rows whose first sequence number is above `seq` (and below `before`), oldest first."""
        async with self._lock:
            rows = await self._db.execute_fetchall(
                "SELECT seq, count, device, ts, payload, tbl FROM batches WHERE seq > ? AND seq < ? ORDER BY seq "
                "LIMIT ?", (seq, (1 << 62) if before is None else before, limit))
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
                await self._db.execute(f"DELETE FROM batches WHERE seq IN ({','.join('?' * len(chunk))})", chunk)

    async def give_up(self, rows: Sequence[tuple[int, int]]) -> None:
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
        return BufferStats(rows, readings, oldest, on_disk, self._losses["dropped_oldest"], self._losses["rejected"],
                           self._losses["expired"], self._next_seq, self.buffer_id, self._losses["refused"])

    async def note_uplink(self, inflight: int) -> None:
        """Record the uplink's in-flight count, so `edge-agent buffer stats` can show it from outside."""
        async with self._lock:
            await self._db.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [("uplink_inflight", inflight), ("uplink_noted", time.time())])

    async def expire(self, now: float | None = None) -> int:
        """Delete rows older than `max_age` (when set), counted as expired. Returns how many readings went."""
        if self.max_age is None:
            return 0
        cutoff = (time.time() if now is None else now) - self.max_age
        async with self._lock:
            victims = await self._db.execute_fetchall(
                "SELECT seq, count FROM batches WHERE ts < ? ORDER BY seq", (cutoff,))
            if victims:
                await self._delete_counted(victims, "expired")
        expired = sum(count for _, count in victims)
        if expired:
            log.warning("buffer %s: %d readings older than max_age (%g s) were deleted unsent (%d in all)",
                        self.path, expired, self.max_age, self._losses["expired"])
        return expired

    async def close(self) -> None:
        async with self._lock:
            await self._db.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _may_be_near_cap(self) -> bool:
        return self._capped or self._used_measured is None or \
            self._used_measured + self._grown > self.max_bytes * 0.9

    async def _used_bytes(self) -> int:
        (pages,), = await self._db.execute_fetchall(
            "SELECT (SELECT page_count FROM pragma_page_count()) - "
            "(SELECT freelist_count FROM pragma_freelist_count())")
        self._used_measured, self._grown = pages * self._page_size, 0
        return self._used_measured

    async def _drop_oldest_over_cap(self) -> None:
        """Drop the oldest rows while the data exceeds max_bytes; freed pages are reused, so the file stops
        growing at the cap."""
        used = await self._used_bytes()
        if used <= self.max_bytes:
            await self._end_episode_below_cap(used)
            return
        dropped = 0
        while used > self.max_bytes * 0.95:
            (rows,), = await self._db.execute_fetchall("SELECT count(*) FROM batches")
            if rows == 0:
                break
            victims = await self._db.execute_fetchall(
                "SELECT seq, count FROM batches ORDER BY seq LIMIT ?", (max(1, rows // 50),))
            await self._delete_counted(victims, "dropped_oldest")
            dropped += sum(count for _, count in victims)
            used = await self._used_bytes()
        self._episode_log(f"dropping the oldest readings ({dropped} now, {self._losses['dropped_oldest']} in all)")

    async def _delete_counted(self, victims: list[Any], reason: str) -> None:
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            await self._db.executemany("DELETE FROM batches WHERE seq = ?", [(seq,) for seq, _ in victims])
            await self._count_loss(reason, sum(count for _, count in victims))
            await self._db.execute("COMMIT")
        except BaseException:
            await self._rollback()
            raise

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
        if used < self.max_bytes * 0.9:
            self._capped = False
            lost = sum(self._losses.values())
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
    return {
        "path": str(path), "buffer_id": meta.get("buffer_id"), "rows": rows, "readings": readings,
        "oldest_ts": oldest, "oldest_age_s": round(time.time() - oldest, 1) if oldest is not None else None,
        "bytes_on_disk": sum(p.stat().st_size for p in _files(path) if p.exists()),
        "next_seq": int(meta.get("next_seq", 1)), **losses, "dropped": sum(losses.values()),
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
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    for source in _files(path):
        if source.exists():
            source.rename(aside.with_name(aside.name + source.name[len(path.name):]))
    return aside
