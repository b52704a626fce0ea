"""The periodic status message: what the platform needs to trust the data stream of one gateway.

Sent retained on the status topic right after every (re)connect and then every `status_interval`: buffer
depth and age, bytes on disk, every reading lost to a buffer limit (in all, and since the previous status),
each device's health, the clock's health (energy/clock.py), and the agent's version. Readings lost to limits
also show as gaps in sequence numbers; the status says why.

"Since the previous status" means since the previous status the broker acknowledged: a status computed
while the broker is unreachable, or lost on the way, does not count as reported, so the next one that
arrives carries those losses again. A platform that adds `lost_since_last_status` up may count a loss
twice when a PUBACK was lost, never miss one; the totals (`dropped_oldest` ...) are exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.health import DeviceHealth
from agent.payload import iso_utc
from buffer.store import LOSS_REASONS, Buffer


@dataclass(frozen=True, slots=True)
class _Sent:
    lost_total: int  # the buffer's loss total the status message carried
    acknowledged: Callable[[], bool]  # true once the broker's PUBACK for it came


class StatusReporter:
    def __init__(self, buffer: Buffer, health: dict[str, DeviceHealth], lost_at_start: int,
                 lines: Callable[[], list[dict[str, Any]]] = list,
                 extra: Callable[[], dict[str, Any]] = dict) -> None:
        """`lost_at_start`: the buffer's loss total when the agent started, so the first status reports
        what was lost since then. `lines`: the shared lines' own figures (a serial port or TCP gateway
        with several devices: utilisation, requests, timeouts, queue). `extra`: sections owned elsewhere
        (the clock's health, the energy stage's figures), added as they are."""
        self._buffer = buffer
        self._lines = lines
        self._extra = extra
        self._health = health
        self._started = time.time()
        self._lost_reported = lost_at_start
        self._sent: _Sent | None = None

    def sent(self, snapshot: dict[str, Any], acknowledged: Callable[[], bool]) -> None:
        """`snapshot` was handed to the broker: its losses count as reported once `acknowledged()` is true
        (checked at the next snapshot). Only the latest sent status is tracked: it carries the most."""
        buffer = snapshot["buffer"]
        self._sent = _Sent(sum(buffer[key] for key in LOSS_REASONS), acknowledged)

    async def snapshot(self, inflight: int, delivered: int) -> dict[str, Any]:
        """The status as it stands; `lost_since_last_status` counts from the last acknowledged status.
        A metrics scrape calls this too: it changes nothing."""
        if self._sent is not None and self._sent.acknowledged():
            self._lost_reported, self._sent = self._sent.lost_total, None
        stats = await self._buffer.stats()
        now = time.time()
        lost_since = stats.dropped - self._lost_reported
        return {
            "uptime_s": round(now - self._started),
            "buffer": {
                "buffer_id": stats.buffer_id,
                "readings": stats.readings,
                "rows": stats.rows,
                "bytes": stats.bytes_on_disk,
                "oldest_ts": iso_utc(stats.oldest_ts) if stats.oldest_ts is not None else None,
                "oldest_age_s": round(now - stats.oldest_ts, 1) if stats.oldest_ts is not None else 0,
                "next_seq": stats.next_seq,
                "dropped_oldest": stats.dropped_oldest,
                "rejected": stats.rejected,
                "expired": stats.expired,
                "unstored": stats.unstored,
                "refused": stats.refused,
                "skipped": stats.skipped,
                "disk_full": stats.disk_full,
                "lost_since_last_status": lost_since,
            },
            "uplink": {"inflight": inflight, "delivered_readings": delivered},
            "devices": {name: _device(health) for name, health in sorted(self._health.items())},
            "lines": self._lines(),
            **self._extra(),
        }


def _device(health: DeviceHealth) -> dict[str, Any]:
    return {
        "state": health.state,
        "polls_ok": health.polls_ok,
        "polls_failed": health.polls_failed,
        "overruns": health.overruns,
        "readings": health.readings,
        "bad_readings": health.bad_readings,
        "last_success": iso_utc(health.last_success) if health.last_success is not None else None,
        "last_poll_ms": round(health.last_poll_seconds * 1000, 1),
        "last_error": health.last_error if health.failures.failing else None,
    }
