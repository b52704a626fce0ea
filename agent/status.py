"""The periodic status message: what the platform needs to trust the data stream of one gateway.

Sent retained on the status topic right after every (re)connect and then every `status_interval`: buffer
depth and age, bytes on disk, every reading lost to a buffer limit (in all, and since the previous status),
each device's health, the clock's health (energy/clock.py), and the agent's version. Readings lost to limits
also show as gaps in sequence numbers; the status says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from agent.health import DeviceHealth
from agent.payload import iso_utc
from buffer.store import Buffer


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

    async def snapshot(self, inflight: int, delivered: int, mark_reported: bool = True) -> dict[str, Any]:
        """`mark_reported`: this snapshot goes to the platform, so the next one counts losses from here.
        A metrics scrape passes False and leaves that count alone."""
        stats = await self._buffer.stats()
        now = time.time()
        lost_since = stats.dropped - self._lost_reported
        if mark_reported:
            self._lost_reported = stats.dropped
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
