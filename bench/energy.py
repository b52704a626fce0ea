"""The energy stage's cost: CPU per poll for a device without an energy table (a dict lookup) and for a
meter (the counter arithmetic, live demand, a state save every 10 s), and the size of 13 months of history
per meter. Prints numbers; asserts nothing. Run: .venv/bin/python -m bench.energy"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from energy_sim import Profile, SimMeter, poll_times, polls

from agent.model import PollResult, Reading
from energy.clock import ClockState
from energy.config import EnergyPlan
from energy.history import History
from energy.stage import EnergyStage
from energy.windows import MeterSpec, WindowRecord, local_iso

SEOUL = ZoneInfo("Asia/Seoul")
T0 = datetime(2024, 5, 14, 9, 7, 30, tzinfo=SEOUL).timestamp()


async def _nothing(_: PollResult) -> None:
    return None


async def _flush() -> None:
    return None


async def stage_cost(folder: Path) -> None:
    spec = MeterSpec("incomer-1", "energy_active_import", resolution=0.01, max_kw=5000.0, target_kw=500.0,
                     levels_kw=(450.0, 500.0), hysteresis_kw=25.0)
    clock = {"t": 0.0}
    stage = EnergyStage(EnergyPlan({"incomer-1": spec}, ()), folder / "energy-state.json", None, _nothing, _flush,
                        clock_state=lambda: ClockState(True, True, 0.0, 0.0), monotonic=lambda: clock["t"])
    await stage.start()
    other = [PollResult("boiler", T0 + i, tuple(Reading(f"p{j}", 1.5 * j) for j in range(20))) for i in range(50_000)]
    started = time.process_time()
    for result in other:
        await stage.submit(result)
    plain = (time.process_time() - started) / len(other)
    started = time.process_time()
    for result in other:
        await _nothing(result)
    bare = (time.process_time() - started) / len(other)
    meter = SimMeter(Profile(T0, base=400.0, swing=100.0))
    results = list(polls("incomer-1", meter, poll_times(T0, T0 + 86400, 1.0)))
    started = time.process_time()
    for result in results:
        clock["t"] = result.ts
        await stage.submit(result)
    metered = (time.process_time() - started) / len(results)
    print(f"poll of a device without an energy table: {(plain - bare) * 1e6:.2f} us above a direct submit "
          f"({(plain - bare) / 20 * 1e9:.0f} ns per reading of a 20-point poll)")
    print(f"poll of a meter (1 s polls, a day, state saved every 10 s): {metered * 1e6:.1f} us per poll")


def history_size(folder: Path) -> None:
    history = History(folder / "energy-history.db")
    start = T0 - T0 % 900
    for i in range(397 * 96):  # 13 months of 15-minute windows
        a = start + i * 900
        history.add(WindowRecord("incomer-1", a, a + 900, local_iso(a, SEOUL), 900, 123.456789, 493.827156, None,
                                 1.0, 1.0, frozenset()), SEOUL)
    history.close()
    size = sum(p.stat().st_size for p in folder.glob("energy-history.db*"))
    print(f"13 months of 15-minute windows of one meter: {397 * 96} rows, {size / 1e6:.1f} MB on disk")


def main() -> None:
    logging.disable(logging.WARNING)  # the simulated profile raises and clears the alarm every hour
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(stage_cost(Path(folder)))
        history_size(Path(folder))


if __name__ == "__main__":
    main()
