"""Wall-clock aligned polling, driven with short real intervals.

The drivers here are fakes on purpose: they stand for faults no real server produces on demand (a poll
that raises something unexpected, one that hangs forever, one that is slower than its interval). Ticks are
checked against the wall clock itself: a result's timestamp must sit a few milliseconds after a multiple of
the interval, never before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import scheduler
from agent.errors import DeviceError
from agent.health import DeviceHealth, FailureLog
from agent.model import PollResult, Quality, Reading
from agent.scheduler import DEAD_AFTER, MAX_BACKOFF, backoff_ticks, poll_loop, tick_index_after
from drivers.base import PollingDriver

pytestmark = pytest.mark.timeout(10)

LOGGER = "tests.scheduler.device"
# How late after its tick a poll may start on a busy test machine. Every interval below is more than twice
# this, so a poll that started early (before its tick) can never pass for a late one.
LATE_S = 0.02
WAIT_S = 3.0

# --- tick arithmetic ---------------------------------------------------------------------------------------


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def test_quarter_hour_ticks_land_on_00_15_30_45() -> None:
    now = utc(2024, 5, 1, 3, 7, 31) + 0.25
    first = tick_index_after(now, 900)
    ticks = [datetime.fromtimestamp((first + i) * 900, UTC) for i in range(6)]
    assert ticks[0] == datetime(2024, 5, 1, 3, 15, tzinfo=UTC)
    assert [(t.minute, t.second, t.microsecond) for t in ticks] == [
        (15, 0, 0), (30, 0, 0), (45, 0, 0), (0, 0, 0), (15, 0, 0), (30, 0, 0)]
    kst = timezone(timedelta(hours=9))  # also on the quarter hours of local time in Korea
    assert [t.astimezone(kst).strftime("%H:%M:%S") for t in ticks[:2]] == ["12:15:00", "12:30:00"]


def test_a_time_exactly_on_a_tick_waits_for_the_next_one() -> None:
    on_tick = utc(2024, 5, 1, 3, 15)
    assert tick_index_after(on_tick, 900) * 900 == on_tick + 900
    assert tick_index_after(on_tick - 0.001, 900) * 900 == on_tick


def test_one_second_ticks_land_on_whole_seconds() -> None:
    first = tick_index_after(utc(2024, 5, 1, 3, 7, 31) + 0.731, 1.0)
    assert [(first + i) * 1.0 for i in range(3)] == [utc(2024, 5, 1, 3, 7, s) for s in (32, 33, 34)]


@given(now=st.floats(1.5e9, 2.5e9), interval=st.sampled_from([1.0, 5.0, 10.0, 60.0, 300.0, 900.0, 3600.0]))
def test_the_next_tick_is_the_first_multiple_strictly_after_now(now: float, interval: float) -> None:
    tick = tick_index_after(now, interval)
    assert isinstance(tick, int)
    assert (tick - 1) * interval <= now < tick * interval


def test_backoff_doubles_from_one_tick_and_caps_near_a_minute() -> None:
    assert [backoff_ticks(n, 1.0) for n in range(1, 11)] == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    assert [backoff_ticks(n, 5.0) for n in range(1, 7)] == [1, 2, 4, 8, 12, 12]
    assert backoff_ticks(0, 1.0) == 1
    assert backoff_ticks(10**6, 1.0) == 60


@pytest.mark.parametrize("interval", [0.01, 0.05, 0.5, 1.0, 7.0, 45.0, 60.0])
def test_backoff_never_waits_much_more_than_max_backoff(interval: float) -> None:
    waits = [backoff_ticks(n, interval) * interval for n in range(1, 40)]
    assert waits == sorted(waits)
    assert max(waits) <= MAX_BACKOFF
    assert max(waits) > MAX_BACKOFF - interval


def test_a_device_failing_for_less_than_dead_after_is_tried_within_ten_tries_of_time() -> None:
    # Timeouts of 1 s at a 1 s interval: at most a tenth of the line, so at least every 10 s ...
    assert [backoff_ticks(n, 1.0, failing_for=n, try_seconds=1.0) for n in range(1, 8)] == [1, 2, 4, 8, 10, 10, 10]
    # ... at a 15 s interval every tick, however many it missed (the old backoff: 60 s after the 3rd miss) ...
    assert {backoff_ticks(n, 15.0, failing_for=15.0 * n, try_seconds=1.0) for n in range(1, 20)} == {1}
    # ... and only once it has been silent for DEAD_AFTER, up to a minute: a dead meter costs its line little.
    assert backoff_ticks(30, 1.0, failing_for=DEAD_AFTER, try_seconds=1.0) == 60
    assert backoff_ticks(30, 1.0, failing_for=DEAD_AFTER - 1, try_seconds=1.0) == 10
    # Slow failures (a 5 s timeout) still keep to their share, whatever the interval.
    assert backoff_ticks(10, 1.0, failing_for=10.0, try_seconds=5.0) == 50


@pytest.mark.parametrize("interval", [900.0, 3600.0])
def test_backoff_on_a_long_interval_is_the_next_tick(interval: float) -> None:
    assert {backoff_ticks(n, interval) for n in range(1, 20)} == {1}


# --- poll_loop with fake drivers -------------------------------------------------------------------------

Behaviour = str | BaseException | float  # "ok", "hang", an exception to raise, or seconds to take


class FakeMeter:
    """A PollingDriver that follows a script, one behaviour per poll, then `default` forever."""

    def __init__(self, script: Sequence[Behaviour] = (), default: Behaviour = "ok",
                 max_poll_seconds: float = 1.0) -> None:
        self.script = list(script)
        self.default = default
        self._max_poll_seconds = max_poll_seconds
        self.started: list[float] = []
        self.cancelled = 0
        self.active = 0
        self.max_active = 0

    @property
    def max_poll_seconds(self) -> float:
        return self._max_poll_seconds

    async def poll(self) -> Sequence[Reading]:
        self.started.append(time.time())
        behaviour = self.script.pop(0) if self.script else self.default
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if isinstance(behaviour, BaseException):
                raise behaviour
            if behaviour == "hang":
                await asyncio.Event().wait()
            elif isinstance(behaviour, float):
                await asyncio.sleep(behaviour)
            return [Reading("voltage", 230.1, "V"), Reading("current", None, "A", Quality.BAD, "illegal address")]
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def close(self) -> None:
        pass


class Loop:
    """One poll_loop task and what it submitted."""

    def __init__(self, interval: float, meter: FakeMeter, clock: Callable[[], float] = time.time,
                 first_at_once: bool = False) -> None:
        _: PollingDriver = meter  # the fake satisfies the protocol the scheduler is typed against
        self.interval = interval
        self.meter = meter
        self.results: list[PollResult] = []
        self.health = DeviceHealth("meter-1", FailureLog("device meter-1", logging.getLogger(LOGGER)))
        self.task = asyncio.create_task(poll_loop("meter-1", interval, meter, self.health, self._submit, clock,
                                                  first_at_once))

    async def _submit(self, result: PollResult) -> None:
        self.results.append(result)

    async def until(self, condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                assert not self.task.done(), self.task
                await asyncio.sleep(0.002)

    async def stop(self) -> None:
        self.task.cancel()
        async with asyncio.timeout(0.5):
            with pytest.raises(asyncio.CancelledError):
                await self.task

    def tick_of(self, ts: float) -> int:
        """The tick a time belongs to; asserts it is at most LATE_S after it and never before."""
        tick = round(ts / self.interval)
        late = ts - tick * self.interval
        assert 0 <= late < LATE_S, f"{ts} is {late * 1000:.1f} ms off tick {tick}"
        return tick


@pytest.fixture
def device_log(caplog: pytest.LogCaptureFixture) -> Callable[[], list[logging.LogRecord]]:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    # Lines about bad points of an answering device have their own test; these are about failed polls.
    return lambda: [r for r in caplog.records if r.name == LOGGER and ": bad readings:" not in r.getMessage()]


async def test_polls_happen_on_consecutive_wall_clock_ticks() -> None:
    loop = Loop(0.05, FakeMeter())
    await loop.until(lambda: len(loop.results) >= 6)
    await loop.stop()
    ticks = [loop.tick_of(r.ts) for r in loop.results]
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))
    assert all(loop.tick_of(t) for t in loop.meter.started)
    assert loop.health.overruns == 0
    assert loop.health.polls_ok == len(loop.results)
    assert loop.health.readings == 2 * len(loop.results)
    assert loop.health.bad_readings == len(loop.results)
    assert loop.health.last_success == loop.results[-1].ts
    assert loop.health.state == "ok"
    assert loop.results[0].device == "meter-1"
    assert [r.point for r in loop.results[0].readings] == ["voltage", "current"]


async def test_the_first_poll_is_at_once_and_the_next_on_the_first_tick_after_it() -> None:
    # 03:14:40 UTC: polled at once, then at 03:15:00, never waiting the first quarter hour for values.
    offset = utc(2024, 5, 1, 3, 14, 59) + 0.9 - time.time()
    loop = Loop(900.0, FakeMeter(), clock=lambda: time.time() + offset, first_at_once=True)
    await loop.until(lambda: len(loop.results) == 2)
    await loop.stop()
    first, second = (datetime.fromtimestamp(r.ts, UTC) for r in loop.results)
    assert first < datetime(2024, 5, 1, 3, 15, tzinfo=UTC)
    assert timedelta(0) <= second - datetime(2024, 5, 1, 3, 15, tzinfo=UTC) < timedelta(seconds=LATE_S)
    assert loop.health.overruns == 0 and loop.health.polls_ok == 2


async def test_a_quarter_hour_interval_polls_on_the_quarter_hour() -> None:
    # A wall clock that reads 03:14:59.950 UTC now: the first poll must be stamped 03:15:00.000.
    offset = utc(2024, 5, 1, 3, 14, 59) + 0.95 - time.time()
    loop = Loop(900.0, FakeMeter(), clock=lambda: time.time() + offset)
    await loop.until(lambda: len(loop.results) == 1)
    await loop.stop()
    stamped = datetime.fromtimestamp(loop.results[0].ts, UTC)
    assert stamped - datetime(2024, 5, 1, 3, 15, tzinfo=UTC) < timedelta(seconds=LATE_S)
    assert stamped >= datetime(2024, 5, 1, 3, 15, tzinfo=UTC)


FAULTS = [
    pytest.param(RuntimeError("boom"), "unexpected RuntimeError: boom", id="RuntimeError"),
    pytest.param(DeviceError("10.0.0.5:502 unit 1: connection refused"), "10.0.0.5:502 unit 1: connection refused",
                 id="DeviceError"),
    pytest.param("hang", "poll timed out", id="hangs-forever"),
]


@pytest.mark.parametrize(("fault", "described"), FAULTS)
async def test_a_failing_driver_is_counted_logged_once_and_recovers(
        fault: Behaviour, described: str, device_log: Callable[[], list[logging.LogRecord]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A failed try of more than FAILING_SHARE x 50 ms (5 ms: a preemption on a loaded machine, between the
    # poll's start and its failure) would earn a second tick of backoff; a share of 0.4 allows the same 20 ms
    # of lateness as the tick checks (LATE_S), and the rule under test is unchanged.
    monkeypatch.setattr(scheduler, "FAILING_SHARE", 0.4)
    meter = FakeMeter([fault, fault], max_poll_seconds=0.08)
    loop = Loop(0.05, meter)
    await loop.until(lambda: loop.health.polls_failed == 1)
    assert loop.health.last_error == described
    assert loop.health.state == "failing"
    assert [(r.levelno, r.getMessage()) for r in device_log()] == [
        (logging.ERROR, f"device meter-1: {described} (repeats are logged at debug level until it recovers)")]

    await loop.until(lambda: loop.health.polls_failed == 2)
    assert [r.levelno for r in device_log()] == [logging.ERROR, logging.DEBUG]
    assert "still failing (2 in a row)" in device_log()[1].getMessage()

    await loop.until(lambda: len(loop.results) >= 3)
    await loop.stop()
    assert loop.health.polls_failed == 2
    assert loop.health.polls_ok == len(loop.results)
    assert loop.health.failures.consecutive == 0
    assert loop.health.state == "ok"
    records = device_log()
    assert [r.levelno for r in records] == [logging.ERROR, logging.DEBUG, logging.INFO]
    assert records[2].getMessage().startswith("device meter-1: recovered after 2 failures over ")
    assert all(r.readings[0] == Reading("voltage", 230.1, "V") for r in loop.results)

    ticks = [loop.tick_of(t) for t in meter.started]
    if fault == "hang":
        assert meter.cancelled == 2  # the timeout cancelled each stuck poll; none is left behind
        assert meter.max_active == 1
    else:
        # A try that fails at once costs the line nothing: a device that answered a moment ago is tried at
        # every tick, and back on every tick when it answers.
        assert [b - a for a, b in pairwise(ticks)][:3] == [1, 1, 1]


async def test_a_driver_that_stays_broken_backs_off_and_logs_one_error(
        device_log: Callable[[], list[logging.LogRecord]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler, "DEAD_AFTER", 0.0)  # failing long enough to count as dead
    loop = Loop(0.04, FakeMeter(default=DeviceError("timed out")))
    await loop.until(lambda: loop.health.polls_failed == 6)
    await loop.stop()
    ticks = [loop.tick_of(t) for t in loop.meter.started]
    assert [b - a for a, b in pairwise(ticks)] == [1, 2, 4, 8, 16]
    assert loop.results == []
    assert loop.health.polls_ok == 0
    assert [r.levelno for r in device_log()] == [logging.ERROR] + [logging.DEBUG] * 5


async def test_each_new_outage_is_logged_again_and_each_recovery_once(
        device_log: Callable[[], list[logging.LogRecord]]) -> None:
    loop = Loop(0.02, FakeMeter([DeviceError("refused"), "ok", "ok", DeviceError("reset"), "ok", "ok"]))
    await loop.until(lambda: len(loop.results) >= 5)
    await loop.stop()
    assert [(r.levelno, r.getMessage().split(" (")[0].split(" over ")[0]) for r in device_log()] == [
        (logging.ERROR, "device meter-1: refused"),
        (logging.INFO, "device meter-1: recovered after 1 failures"),
        (logging.ERROR, "device meter-1: reset"),
        (logging.INFO, "device meter-1: recovered after 1 failures"),
    ]


async def test_a_poll_slower_than_its_interval_skips_ticks_instead_of_piling_up() -> None:
    meter = FakeMeter(default=0.12)  # 2.4 intervals
    loop = Loop(0.05, meter)
    await loop.until(lambda: len(loop.results) >= 3)
    await loop.stop()
    ticks = [loop.tick_of(r.ts) for r in loop.results]
    assert [b - a for a, b in pairwise(ticks)] == [3] * (len(ticks) - 1)
    assert meter.max_active == 1
    assert loop.health.overruns == 2 * len(loop.results)
    assert 0.12 <= loop.health.last_poll_seconds < 0.12 + LATE_S
    assert loop.health.polls_failed == 0


async def test_a_hung_poll_that_times_out_counts_the_ticks_it_overran() -> None:
    meter = FakeMeter(["hang"], max_poll_seconds=0.11)
    loop = Loop(0.05, meter)
    await loop.until(lambda: len(loop.results) >= 1)
    await loop.stop()
    first, second = (loop.tick_of(t) for t in meter.started[:2])
    assert second - first == 3  # timed out at 2.2 ticks: ticks +1 and +2 skipped, polled again at +3
    assert loop.health.overruns == 2


async def test_cancelling_a_sleeping_loop_ends_it_promptly() -> None:
    loop = Loop(10.0, FakeMeter())
    await asyncio.sleep(0.01)
    started = time.monotonic()
    await loop.stop()
    assert time.monotonic() - started < 0.1
    assert loop.task.cancelled()


async def test_cancelling_during_a_poll_cancels_the_poll_and_ends_the_loop() -> None:
    meter = FakeMeter(default="hang", max_poll_seconds=60.0)
    loop = Loop(0.02, meter)
    await loop.until(lambda: meter.active == 1)
    started = time.monotonic()
    await loop.stop()
    assert time.monotonic() - started < 0.1
    assert loop.task.cancelled()
    assert meter.cancelled == 1
    assert meter.active == 0
    assert loop.health.polls_failed == 0  # a shutdown is not a device failure


async def test_points_a_device_spoils_are_logged_once_and_their_recovery_once(
        caplog: pytest.LogCaptureFixture) -> None:
    answers = [[Reading.bad("pf", "Modbus exception 2 (illegal data address)"), Reading("v", 1.0)]] * 3 + \
        [[Reading("pf", 0.9), Reading("v", 1.0)]] * 100

    class Spoiling:
        max_poll_seconds = 1.0

        def __init__(self) -> None:
            self.polls = 0

        async def poll(self) -> list[Reading]:
            self.polls += 1
            return answers[self.polls - 1]

        async def close(self) -> None:
            pass

    driver = Spoiling()
    logger = logging.getLogger("test.bad_points")
    health = DeviceHealth("m", FailureLog("device m", logger))
    five_polls = asyncio.Event()

    async def submit(result: object) -> None:
        if driver.polls >= 5:
            five_polls.set()

    with caplog.at_level(logging.DEBUG, logger="test.bad_points"):
        task = asyncio.create_task(poll_loop("m", 0.05, driver, health, submit))
        async with asyncio.timeout(5):
            await five_polls.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "test.bad_points"]
    assert [level for level, _ in lines] == ["ERROR", "DEBUG", "DEBUG", "INFO"], lines
    assert "1 of 2 points bad: pf: Modbus exception 2" in lines[0][1]
    assert health.bad_readings == 3 and health.polls_failed == 0


async def test_a_cancellation_swallowed_inside_the_driver_still_stops_the_loop() -> None:
    """Python 3.11's asyncio.wait_for, used by pymodbus for each request, returns the result and drops a
    cancellation that arrives as the read completes. The poll loop must stop anyway."""

    class Swallowing:
        max_poll_seconds = 30.0

        async def poll(self) -> list[Reading]:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                return [Reading("v", 1.0)]  # what wait_for does when the read finished at the same moment
            return []

        async def close(self) -> None:
            pass

    submitted: list[PollResult] = []

    async def submit(result: PollResult) -> None:
        submitted.append(result)

    health = DeviceHealth("m", FailureLog("m", logging.getLogger(LOGGER)))
    task = asyncio.create_task(poll_loop("m", 0.05, Swallowing(), health, submit))
    await asyncio.sleep(0.2)  # inside poll()
    task.cancel()
    async with asyncio.timeout(2):
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert task.cancelled()
    assert submitted == []  # the swallowed poll's result is not passed on after the stop


async def test_stop_tasks_cancels_again_and_names_a_task_that_refuses(caplog: pytest.LogCaptureFixture) -> None:
    from agent.daemon import stop_tasks

    async def ignores_first_cancel() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)
        await asyncio.sleep(10)

    release = asyncio.Event()

    async def refuses() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    stubborn = asyncio.create_task(ignores_first_cancel(), name="stubborn")
    hopeless = asyncio.create_task(refuses(), name="hopeless")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="agent"):
        await stop_tasks([stubborn, hopeless], grace=0.1, attempts=3)
    assert stubborn.cancelled()
    assert not hopeless.done()
    assert any("refusing to stop" in r.getMessage() and "hopeless" in r.getMessage() for r in caplog.records)
    assert "stubborn" not in " ".join(r.getMessage() for r in caplog.records)
    release.set()
    await hopeless
