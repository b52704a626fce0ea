"""Bad points in the log and in the counts, against the simulator: every bad point is named (once per episode,
a point that goes bad later in its own line), and an uncertain reading, which carries a value, is not counted
as bad (docs/payload.md, Quality)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from asyncua import ua

from agent.demo.mosquitto import free_port
from agent.health import DeviceHealth, FailureLog, name_bad_points
from agent.model import PollResult, Quality
from agent.scheduler import poll_loop
from drivers.opcua import DeviceConfig, create
from drivers.opcua.simulator import PLANT, Simulator, start

pytestmark = pytest.mark.timeout(30)

LOGGER = "tests.bad_points"


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    server = await start(free_port())
    try:
        yield server
    finally:
        await server.stop()


async def test_each_bad_point_is_named_and_uncertain_is_not_counted_bad(
        sim: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    points = [{"name": "temperature", "node_id": f"nsu={PLANT};s=Boiler.Temperature"},
              {"name": "doubtful", "node_id": f"nsu={PLANT};s=Boiler.Doubtful"},  # UncertainLastUsableValue
              {"name": "gone", "node_id": f"nsu={PLANT};s=Boiler.Gone"},
              {"name": "missing", "node_id": f"nsu={PLANT};s=Boiler.Missing"},
              {"name": "pressure", "node_id": f"nsu={PLANT};s=Boiler.Pressure"}]
    driver = create(DeviceConfig.model_validate({"name": "boiler", "driver": "opcua", "endpoint": sim.url,
                                                 "poll_interval": "100ms", "points": points}), state_dir=tmp_path)
    health = DeviceHealth("boiler", FailureLog("device boiler", logging.getLogger(LOGGER)))
    results: list[PollResult] = []
    polled = asyncio.Event()

    async def submit(result: PollResult) -> None:
        results.append(result)
        polled.set()

    task = asyncio.create_task(poll_loop("boiler", 0.1, driver, health, submit))
    try:
        for _ in range(2):
            polled.clear()
            await asyncio.wait_for(polled.wait(), 10)
        # Pressure goes bad later in the same episode: it gets a line of its own.
        await sim.nodes["Boiler.Pressure"].write_value(ua.DataValue(
            ua.Variant(1.25, ua.VariantType.Float), StatusCode=ua.StatusCode(ua.StatusCodes.BadSensorFailure)))
        for _ in range(2):
            polled.clear()
            await asyncio.wait_for(polled.wait(), 10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await driver.close()
    first = {r.point: r for r in results[0].readings}
    assert first["doubtful"].quality is Quality.UNCERTAIN and first["doubtful"].value == 7.5
    bad = sum(r.quality is Quality.BAD for result in results for r in result.readings)
    assert health.bad_readings == bad  # the uncertain readings are not in it
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, errors
    assert "2 of 5 points bad: gone, missing: BadNodeIdUnknown" in errors[0]
    assert "1 more point(s) bad: pressure: BadSensorFailure" in errors[1]
    assert "doubtful" not in " ".join(errors)


def test_many_bad_points_stay_one_line() -> None:
    text = name_bad_points({f"p{i}": "BadNodeIdUnknown" if i % 2 else "BadNotReadable" for i in range(500)})
    assert text.startswith("p0, p2, ")
    assert text.endswith("; and 480 more") and "p19: BadNodeIdUnknown" in text
