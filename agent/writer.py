"""Moves poll results from the pollers into the buffer, many results per transaction.

The queue between them is bounded: if the disk stalls, pollers wait on `submit()`, their next ticks are
counted as overruns, and memory stays flat. A failed commit is retried with the same sequence numbers,
so a transient disk error never leaves a gap. An error that lasts (`GIVE_UP_AFTER`), or any error once
the agent is stopping, makes the writer give the results up instead: the buffer numbers them and counts
them as unstored, so the platform sees a gap and the status says why, pollers go on polling and a stop
stays prompt. A full disk is the buffer's to handle (it gives the readings up at once, counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from agent.compact import CborEncoder
from agent.health import FailureLog
from agent.model import PollResult
from agent.payload import Encoder
from buffer.store import Buffer, StoredBatch

log = logging.getLogger(__name__)

MAX_ROWS_PER_TRANSACTION = 2000
GIVE_UP_AFTER = 10.0  # seconds a commit is retried before its results are given up (counted, numbered)


class BufferWriter:
    def __init__(self, buffer: Buffer, encoder: Encoder | CborEncoder, on_commit: Callable[[], None],
                 max_queue: int = 1000, observe: Callable[[PollResult], None] | None = None) -> None:
        """`observe`: sees every result submitted (polls, and what a stage derives from them), for the status
        page's last values; it must be cheap, it runs on every poll."""
        self._buffer = buffer
        self._encoder = encoder
        self._on_commit = on_commit
        self._queue: asyncio.Queue[PollResult] = asyncio.Queue(max_queue)
        self._failures = FailureLog("buffer write", log)
        self._stopping = asyncio.Event()
        self.readings_committed = 0
        self._observe = observe

    def declare(self, device: str, points: list[tuple[str, str | None]]) -> None:
        """A device's configured points, in order (the compact encoding's point table)."""
        self._encoder.declare(device, points)

    async def submit(self, result: PollResult) -> None:
        if self._observe is not None:
            self._observe(result)
        await self._queue.put(result)

    async def run(self) -> None:
        while True:
            results = [await self._queue.get()]
            while len(results) < MAX_ROWS_PER_TRANSACTION and not self._queue.empty():
                results.append(self._queue.get_nowait())
            await self._commit(results)
            for _ in results:
                self._queue.task_done()

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed or given up."""
        await self._queue.join()

    async def stop(self, grace: float) -> bool:
        """At shutdown, once the pollers have stopped: commit what they produced, giving up at once what a
        failing disk refuses (counted), and never wait longer than `grace` seconds. True if every result was
        dealt with (committed, or given up and numbered)."""
        self._stopping.set()
        try:
            async with asyncio.timeout(grace):
                await self._queue.join()
            return True
        except TimeoutError:
            log.error("buffer writer: %d poll results not committed within %.0f s of the stop (the disk does "
                      "not answer); they are lost and their readings were not numbered", self._queue.qsize(),
                      grace)
            return False

    async def _commit(self, results: list[PollResult]) -> None:
        delay = 0.1
        failing_since: float | None = None
        tables: list[tuple[str, str, str]] = []  # point tables new since the last commit: stored with its rows
        while True:
            seq = self._buffer.next_seq
            batches = []
            for result in results:
                if not result.readings:
                    continue
                payload, table = self._encoder.fragment(result, seq)
                batches.append(StoredBatch(seq, len(result.readings), result.device, result.ts, payload, table))
                seq += len(result.readings)
            tables += self._encoder.take_tables()
            try:
                stored = await self._buffer.append(batches, tables)
            except Exception as exc:  # noqa: BLE001 - an I/O error: keep the results and retry, for a while
                now = asyncio.get_running_loop().time()
                failing_since = now if failing_since is None else failing_since
                readings = seq - batches[0].seq if batches else 0
                if self._stopping.is_set() or now - failing_since >= GIVE_UP_AFTER:
                    await self._buffer.give_up(readings, f"write failed: {exc}")
                    self._failures.failed(exc, f"{readings} readings given up, counted as unstored (a gap)")
                    return
                self._failures.failed(exc, f"readings wait in memory; they are given up (counted) if this lasts "
                                           f"{GIVE_UP_AFTER:.0f} s")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
                delay = min(delay * 2, 5.0)
                continue
            self._failures.succeeded()
            self.readings_committed += stored
            if stored:
                self._on_commit()
            return
