"""Wall-clock aligned polling: the agent owns time, the driver owns the protocol.

A device with a 1 s interval is polled on whole seconds, one with 15 min on :00/:15/:30/:45 UTC (which
is also on the quarter hours of KST), so demand windows line up with the utility meter's; once more at
the moment it starts, so a technician sees values at once. Each tick is
computed from the wall clock, never by adding intervals, so there is no drift. A poll slower than its
interval skips the ticks it overran (counted), it never piles up. A failed poll is logged once, counted,
and retried on a growing backoff (still aligned to ticks); nothing a driver raises can end the loop.

The backoff is for dead devices, and a live one that misses a few answers must not be held by it: while a
device has been failing for less than `DEAD_AFTER`, the wait between tries is capped so that its failed
tries take at most `FAILING_SHARE` of the time (a try that costs a 1 s timeout is repeated at least every
10 s, or every tick if the interval is longer). The first try that succeeds puts it back on its normal
interval at once. Only a device silent for longer waits up to `MAX_BACKOFF` between tries, so a dead meter
costs its line one timeout a minute.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from operator import attrgetter

from agent.errors import DeviceError
from agent.health import DeviceHealth
from agent.model import PollResult, Quality
from drivers.base import PollingDriver, StreamingDriver

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0
# A device failing for less than this is probably alive (a burst of noise on the line, a meter busy for a
# few seconds): it is tried often enough to be back within seconds of answering again.
DEAD_AFTER = 300.0
# ... but its failed tries may take at most this share of the time, which leaves its line to its neighbours.
FAILING_SHARE = 0.1
_quality = attrgetter("quality")


def tick_index_after(now: float, interval: float) -> int:
    """The index n of the first tick n * interval (seconds since the epoch) strictly after `now`."""
    return math.floor(now / interval) + 1


async def sleep_until(wall_time: float, clock: Callable[[], float] = time.time) -> None:
    delay = wall_time - clock()
    if delay > 0:
        await asyncio.sleep(delay)


def backoff_ticks(consecutive_failures: int, interval: float, failing_for: float = math.inf,
                  try_seconds: float = 0.0) -> int:
    """Ticks to wait after a failed poll: 1, 2, 4, ... up to about MAX_BACKOFF (at least one tick). While the
    device has been failing for less than DEAD_AFTER seconds, no longer than it takes for tries of
    `try_seconds` each to take FAILING_SHARE of the time."""
    cap = max(1, math.floor(MAX_BACKOFF / interval))
    if failing_for < DEAD_AFTER:
        cap = min(cap, max(1, math.ceil(try_seconds / FAILING_SHARE / interval)))
    return min(cap, 2 ** min(max(consecutive_failures - 1, 0), 30))


async def poll_loop(name: str, interval: float, driver: PollingDriver, health: DeviceHealth,
                    submit: Callable[[PollResult], Awaitable[None]],
                    clock: Callable[[], float] = time.time, first_at_once: bool = True) -> None:
    """`first_at_once`: poll once as soon as the device starts (at start-up and after a reload that changed
    it), so values show at once even on a 15-minute interval; every later poll is on the clock."""
    # Ticks are counted as integers and turned into wall time by one multiplication each: no drift.
    tick = tick_index_after(clock(), interval)
    at_once = first_at_once
    while True:
        _honour_swallowed_cancel()
        if not at_once:
            await sleep_until(tick * interval, clock)
        started = clock()  # the one clock read of this cycle: every reading of the poll carries it
        step = 1
        try:
            async with asyncio.timeout(driver.max_poll_seconds):
                readings = await driver.poll()
            _honour_swallowed_cancel()
        except Exception as exc:  # noqa: BLE001 - a poll task must survive anything a driver does
            health.polls_failed += 1
            health.last_error = _describe(exc)
            health.failures.failed(health.last_error)
            since = health.failures.failing_since
            failing_for = time.monotonic() - since if since is not None else 0.0
            step = backoff_ticks(health.failures.consecutive, interval, failing_for, clock() - started)
        else:
            health.polls_ok += 1
            health.readings += len(readings)
            # Counted in C first (a poll is nearly always all good); the bad ones are listed only when there are.
            # Uncertain readings carry a value and are not bad (docs/payload.md, Quality).
            bad_count = list(map(_quality, readings)).count(Quality.BAD)
            health.bad_readings += bad_count
            health.last_success = started
            health.failures.succeeded()
            if bad_count:
                health.points_bad({r.point: r.reason or r.quality.value for r in readings
                                   if r.quality is Quality.BAD}, len(readings))
            else:
                health.points_good()
            await submit(PollResult(name, started, tuple(readings)))
        now = clock()
        health.last_poll_seconds = now - started
        # After the poll at start, `tick` is still the first tick ahead: it is the next one, not skipped.
        following = tick + step - (1 if at_once else 0)
        at_once = False
        if now >= following * interval:
            skipped = tick_index_after(now, interval) - following
            health.overruns += skipped
            log.debug("%s: poll took %.3f s, skipped %d tick(s)", name, now - started, skipped)
            following += skipped
        tick = following


def stream_backoff(consecutive_failures: int, first: float, cap: float) -> float:
    """Seconds to wait before restarting a failed stream: first, 2 x first, 4 x first ... up to cap, each
    drawn between half and all of that, so that gateways do not all come back in the same second after a
    server restart."""
    base = min(cap, first * 2 ** min(max(consecutive_failures - 1, 0), 30))
    return base * random.uniform(0.5, 1.0)


async def stream_loop(name: str, driver: StreamingDriver, health: DeviceHealth,
                      submit: Callable[[PollResult], Awaitable[None]], *, first_backoff: float = 1.0,
                      max_backoff: float = MAX_BACKOFF) -> None:
    """Run a streaming driver for ever: each group of values it emits is counted and submitted like a poll;
    when it fails (session lost, server restarted, cannot connect) the failure is logged once and counted,
    and it is started again after a backoff. Only cancellation ends the loop."""
    bad_now: dict[str, str] = {}  # point -> reason, for the points whose latest value is not good

    async def emit(result: PollResult) -> None:
        health.polls_ok += 1
        health.readings += len(result.readings)
        health.last_success = result.ts
        health.failures.succeeded()
        for reading in result.readings:
            if reading.quality is Quality.BAD:
                health.bad_readings += 1
                bad_now[reading.point] = reading.reason or reading.quality.value
            else:
                bad_now.pop(reading.point, None)
        # A change of one point says nothing of the others: bad points are tracked until each recovers.
        if bad_now:
            health.points_bad(bad_now)
        else:
            health.points_good()
        await submit(result)

    while True:
        _honour_swallowed_cancel()
        try:
            await driver.run(emit)
            raise DeviceError("the stream ended on its own")
        except Exception as exc:  # noqa: BLE001 - a device task must survive anything a driver does
            health.polls_failed += 1
            health.last_error = _describe(exc)
            health.failures.failed(health.last_error)
        _honour_swallowed_cancel()
        await asyncio.sleep(stream_backoff(health.failures.consecutive, first_backoff, max_backoff))


def _honour_swallowed_cancel() -> None:
    """Python 3.11's asyncio.wait_for (which pymodbus uses for every request) returns the result and drops
    the cancellation when both arrive together; the request is still counted on the task. Without this
    check a poll task could go on polling after shutdown asked it to stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "poll timed out"
    if isinstance(exc, DeviceError):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc}"
