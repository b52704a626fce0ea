"""stream_loop: the agent's side of a streaming (subscription) driver.

The drivers here are fakes on purpose: they stand for faults a real server cannot be made to produce on
demand (a driver that raises something unexpected, a run that ends on its own). Real subscriptions against
real servers are in tests/test_opcua_driver.py and tests/test_opcua_recovery.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import pytest

from agent.errors import DeviceError
from agent.health import DeviceHealth, FailureLog
from agent.model import PollResult, Reading
from agent.scheduler import stream_backoff, stream_loop
from drivers.base import PollingDriver, StreamingDriver

pytestmark = pytest.mark.timeout(10)

LOGGER = "tests.opcua.stream"


class ScriptedStream:
    """Each run() follows the next step of a script: emit some results then raise, or raise at once."""

    def __init__(self, steps: list[tuple[list[PollResult], BaseException | None]]) -> None:
        self.steps = steps
        self.runs = 0
        self.started: list[float] = []

    async def run(self, emit: Callable[[PollResult], Awaitable[None]]) -> None:
        self.started.append(time.monotonic())
        step = self.steps[min(self.runs, len(self.steps) - 1)]
        self.runs += 1
        for result in step[0]:
            await emit(result)
        if step[1] is not None:
            raise step[1]
        await asyncio.Event().wait()  # a healthy stream runs until cancelled

    async def close(self) -> None:
        pass


def result(*readings: Reading) -> PollResult:
    return PollResult("boiler", time.time(), readings)


def health() -> DeviceHealth:
    return DeviceHealth("boiler", FailureLog("device boiler", logging.getLogger(LOGGER)))


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_a_streaming_driver_is_told_apart_from_a_polling_one() -> None:
    assert isinstance(ScriptedStream([]), StreamingDriver)

    class Poller:
        max_poll_seconds = 1.0

        async def poll(self) -> list[Reading]:
            return []

        async def close(self) -> None:
            pass

    assert not isinstance(Poller(), StreamingDriver)
    _: PollingDriver = Poller()


def test_backoff_doubles_with_jitter_and_caps() -> None:
    for failures, low, high in ((1, 0.5, 1.0), (2, 1.0, 2.0), (3, 2.0, 4.0), (10, 30.0, 60.0), (10**6, 30.0, 60.0)):
        for _ in range(20):
            assert low <= stream_backoff(failures, 1.0, 60.0) <= high


async def test_a_failing_stream_is_restarted_logged_once_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    submitted: list[PollResult] = []

    async def submit(r: PollResult) -> None:
        submitted.append(r)

    lost = DeviceError("session lost: connection closed")
    driver = ScriptedStream([([], DeviceError("cannot connect to opc.tcp://x: refused")),
                             ([], RuntimeError("a bug in a library")),
                             ([result(Reading("t", 1.0))], lost),
                             ([result(Reading("t", 2.0)), result(Reading.bad("p", "BadNodeIdUnknown"))], None)])
    state = health()
    task = asyncio.create_task(stream_loop("boiler", driver, state, submit, first_backoff=0.05, max_backoff=0.2))
    try:
        await wait_for(lambda: len(submitted) == 3)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert driver.runs == 4 and state.polls_failed == 3 and state.polls_ok == 3
    assert state.readings == 3 and state.bad_readings == 1
    assert [r.readings[0].value for r in submitted] == [1.0, 2.0, None]
    # The gap after two failures in a row is longer than after one (exponential), and never immediate.
    gaps = [b - a for a, b in zip(driver.started, driver.started[1:], strict=False)]
    assert all(gap >= 0.02 for gap in gaps)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == LOGGER]
    # Loud: the first failure, the unexpected error (a new reason, so loud once too), and again after a
    # recovery (the third run emitted, so the fourth failure is a new episode); the bad point is logged once.
    messages = [r.getMessage() for r in errors]
    assert any("refused" in m for m in messages) and any("BadNodeIdUnknown" in m for m in messages)
    assert sum("refused" in m for m in messages) == 1 and sum("RuntimeError" in m for m in messages) == 1
    assert any("recovered" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert state.last_error == "session lost: connection closed"


async def test_a_stream_that_ends_on_its_own_is_started_again() -> None:
    class Ends:
        runs = 0

        async def run(self, emit: Callable[[PollResult], Awaitable[None]]) -> None:
            self.runs += 1

        async def close(self) -> None:
            pass

    driver, state = Ends(), health()

    async def submit(r: PollResult) -> None:
        pass

    task = asyncio.create_task(stream_loop("boiler", driver, state, submit, first_backoff=0.01, max_backoff=0.02))
    try:
        await wait_for(lambda: driver.runs >= 3)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert state.last_error == "the stream ended on its own"


async def test_bad_points_are_tracked_until_each_recovers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    driver = ScriptedStream([([result(Reading.bad("a", "BadNodeIdUnknown")), result(Reading("b", 1.0)),
                               result(Reading("a", 3.0))], None)])
    state = health()

    async def submit(r: PollResult) -> None:
        pass

    task = asyncio.create_task(stream_loop("boiler", driver, state, submit))
    try:
        await wait_for(lambda: state.polls_ok == 3)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    recoveries = [r.getMessage() for r in caplog.records if "bad readings: recovered" in r.getMessage()]
    # A good change of point b says nothing about a: only a's own good value ends the episode.
    assert len(recoveries) == 1 and state.bad_readings == 1
    assert not state.bad_points.failing
