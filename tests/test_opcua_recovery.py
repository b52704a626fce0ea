"""Recovery without a person: the simulator runs as a child process and is SIGKILLed and started again
(a real restart: the socket closes, sessions and subscriptions die with the process), once with its
namespace renumbered; and it is frozen (SIGSTOP), a server that is there but silent. The driver runs under
the agent's own loops (poll_loop, stream_loop), as in the daemon."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.demo.mosquitto import free_port
from agent.health import DeviceHealth, FailureLog
from agent.model import PollResult, Quality, Reading
from agent.scheduler import poll_loop, stream_loop
from drivers.opcua import DeviceConfig, create
from drivers.opcua.driver import OpcuaSubscriber
from drivers.opcua.simulator import PLANT
from tests.opcua_server import SimulatorProcess

pytestmark = pytest.mark.timeout(60)

COUNTER = f"nsu={PLANT};s=Boiler.Counter"
RECOVERY_S = 10.0  # "values flow again within seconds"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SimulatorProcess]:
    process = SimulatorProcess(free_port(), tmp_path / "simulator.log")
    try:
        yield process
    finally:
        process.stop()


def config(url: str, **settings: object) -> DeviceConfig:
    return DeviceConfig.model_validate({
        "name": "boiler", "driver": "opcua", "endpoint": url, "timeout": "500ms", "keepalive": "500ms",
        "namespaces": {"plant": PLANT},
        "points": [{"name": "counter", "node_id": COUNTER},
                   {"name": "by_path", "browse_path": "plant:Plant/plant:Boiler/plant:Temperature"},
                   # By index: right before the restart, wrong after it (the namespace moved): why nsu= exists.
                   {"name": "by_index", "node_id": "ns=2;s=Boiler.Running"}],
        **settings})


class Collected:
    def __init__(self) -> None:
        self.results: list[tuple[float, PollResult]] = []  # (monotonic arrival, result)

    async def submit(self, result: PollResult) -> None:
        self.results.append((time.monotonic(), result))

    def good_since(self, since: float, point: str) -> list[Reading]:
        return [r for at, result in self.results if at >= since for r in result.readings
                if r.point == point and r.quality is Quality.GOOD]


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def health() -> DeviceHealth:
    return DeviceHealth("boiler", FailureLog("device boiler", logging.getLogger("tests.opcua.recovery")))


async def restart_renumbered(server: SimulatorProcess) -> float:
    """SIGKILL the server and start it again with two more namespaces before the plant's; returns when it
    is up again (monotonic)."""
    before = server.namespace_index
    server.stop()
    await asyncio.to_thread(server.start, padding=2)
    assert server.namespace_index == (before or 0) + 2
    return time.monotonic()


async def test_read_mode_recovers_after_a_restart_that_renumbers_the_namespace(
        server: SimulatorProcess, tmp_path: Path) -> None:
    server.start(padding=0)
    driver = create(config(server.url, poll_interval="200ms"), state_dir=tmp_path)
    state, collected = health(), Collected()
    task = asyncio.create_task(poll_loop("boiler", 0.2, driver, state, collected.submit))
    try:
        await eventually(lambda: len(collected.good_since(0, "by_index")) >= 2, 10, "readings before the restart")
        up = await restart_renumbered(server)
        took = await eventually(lambda: len(collected.good_since(up, "counter")) >= 3, RECOVERY_S,
                                "counter values after the restart")
        assert took < RECOVERY_S
        # The restarted server counts from 0 again: these are new values, not stale ones.
        assert collected.good_since(up, "counter")[0].value < 100
        assert collected.good_since(up, "by_path"), "the browse path was resolved again"
        after = [r for at, result in collected.results if at >= up for r in result.readings if r.point == "by_index"]
        assert after and after[-1].quality is Quality.BAD and after[-1].reason == "BadNodeIdUnknown"
        assert state.polls_failed >= 1 and state.state == "ok"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await driver.close()


async def test_subscriptions_are_rebuilt_after_a_restart_and_a_silent_server(
        server: SimulatorProcess, tmp_path: Path) -> None:
    server.start(padding=0)
    driver = create(config(server.url, mode="subscribe", poll_interval="100ms"), state_dir=tmp_path)
    assert isinstance(driver, OpcuaSubscriber)
    state, collected = health(), Collected()
    task = asyncio.create_task(stream_loop("boiler", driver, state, collected.submit, first_backoff=0.2,
                                           max_backoff=1.0))
    try:
        await eventually(lambda: len(collected.good_since(0, "counter")) >= 3, 10, "changes before the restart")

        up = await restart_renumbered(server)
        await eventually(lambda: len(collected.good_since(up, "counter")) >= 3, RECOVERY_S,
                         "changes after the restart (subscription created again)")
        assert collected.good_since(up, "counter")[0].value < 100
        failures_after_restart = state.polls_failed
        assert failures_after_restart >= 1

        # Frozen: the socket stays open but nothing answers. The keep-alive watchdog must notice.
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        try:
            await eventually(lambda: state.polls_failed > failures_after_restart, 10,
                             "the silent server noticed by the keep-alive watchdog")
        finally:
            server.process.send_signal(signal.SIGCONT)
        thawed = time.monotonic()
        await eventually(lambda: len(collected.good_since(thawed, "counter")) >= 3, RECOVERY_S,
                         "changes after the server answers again")
        assert "session lost" in (state.last_error or "") or "no answer" in (state.last_error or "")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await driver.close()
