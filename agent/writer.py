"""Moves poll results from the pollers into the buffer, many results per transaction.

The queue between them is bounded: if the disk stalls, pollers wait on `submit()`, their next ticks are
counted as overruns, and memory stays flat. A failed commit is retried with the same sequence numbers,
so a transient disk error never leaves a gap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from agent.compact import CborEncoder
from agent.health import FailureLog
from agent.model import PollResult
from agent.payload import Encoder
from buffer.store import Buffer, StoredBatch

log = logging.getLogger(__name__)

MAX_ROWS_PER_TRANSACTION = 2000


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
        """Wait until everything submitted so far is committed (used at shutdown)."""
        await self._queue.join()

    async def _commit(self, results: list[PollResult]) -> None:
        delay = 0.1
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
                await self._buffer.append(batches, tables)
            except Exception as exc:  # noqa: BLE001 - disk full, I/O error: keep the results and retry
                self._failures.failed(exc, "readings wait in memory; polling slows down if this persists")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._failures.succeeded()
            self.readings_committed += seq - batches[0].seq if batches else 0
            self._on_commit()
            return
