"""The energy stage between the pollers and the writer: polls pass unchanged, windows and alarms follow as
polls of their own streams; a restart or a crash at the worst moment completes each window once, never with
two values; groups add their meters; clock steps and an unsynchronised clock are flagged."""

from __future__ import annotations

import itertools
import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from energy_sim import Profile, SimMeter, poll_times, polls

from agent.model import PollResult, Quality, Reading
from energy.clock import ClockState, StepDetector
from energy.config import EnergyPlan, GroupSpec
from energy.history import History, report
from energy.stage import EnergyStage, GroupTracker
from energy.windows import AlarmEvent, LiveDemand, MeterSpec, window_start

SEOUL = ZoneInfo("Asia/Seoul")
T0 = datetime(2024, 5, 14, 9, 7, 30, tzinfo=SEOUL).timestamp()
RES = 0.01


def meter_spec(name: str = "incomer-1", **changes: object) -> MeterSpec:
    base: dict[str, object] = {"name": name, "import_point": "energy_active_import", "resolution": RES,
                               "wrap": (1 << 32) * RES, "max_kw": 5000.0, "max_gap_s": 10.0}
    base.update(changes)
    return MeterSpec(**base)  # type: ignore[arg-type]


class Sink:
    """What the writer would receive, in order; `flush` as the writer's (everything handed over is stored)."""

    def __init__(self) -> None:
        self.polls: list[PollResult] = []
        self.flushes = 0

    async def submit(self, result: PollResult) -> None:
        self.polls.append(result)

    async def flush(self) -> None:
        self.flushes += 1

    def stream(self, name: str) -> list[PollResult]:
        return [p for p in self.polls if p.device == name]


class Clocks:
    """A wall clock and a monotonic clock the test moves (a step moves the wall clock alone)."""

    def __init__(self, t: float) -> None:
        self.wall, self.mono = t, 1000.0

    def at(self, t: float, step: float = 0.0) -> None:
        """The wall clock reads `t`, `step` of which is a step made just now (the monotonic clock skips it)."""
        self.mono += t - self.wall - step
        self.wall = t


def stage(tmp_path: Path, sink: Sink, plan: EnergyPlan, clocks: Clocks | None = None,
          synced: bool = True, history: History | None = None) -> EnergyStage:
    clocks = clocks or Clocks(T0)
    energy = EnergyStage(plan, tmp_path / "energy-state.json", history, sink.submit, sink.flush,
                         clock_state=lambda: ClockState(True, synced, 0.001, 0.01),
                         detector=StepDetector(lambda: clocks.wall, lambda: clocks.mono),
                         monotonic=lambda: clocks.mono)
    energy.clocks = clocks  # type: ignore[attr-defined]
    return energy


async def run(stage_: EnergyStage, results: list[PollResult]) -> None:
    """Submit polls as the scheduler would, the clocks moving with them (no step)."""
    clocks: Clocks = stage_.clocks  # type: ignore[attr-defined]
    for result in results:
        clocks.at(result.ts)
        await stage_.submit(result)


def value(poll: PollResult, point: str) -> object:
    return next(r.value for r in poll.readings if r.point == point)


async def test_polls_pass_unchanged_and_windows_follow_as_polls_of_their_own_stream(tmp_path: Path) -> None:
    sink = Sink()
    meter = SimMeter(Profile(T0, base=480.0))
    energy = stage(tmp_path, sink, EnergyPlan({"incomer-1": meter_spec()}, ()))
    await energy.start()
    other = [PollResult("boiler", t, (Reading("temperature", 71.5, "degC"),)) for t in poll_times(T0, T0 + 60, 1)]
    results = list(polls("incomer-1", meter, poll_times(T0, T0 + 3600, 1.0)))
    await run(energy, [*other, *results])
    assert sink.stream("boiler") == other and sink.stream("incomer-1") == results  # the same objects, in order
    windows = sink.stream("incomer-1/demand")
    assert len(windows) == 3
    for window in windows:
        start = datetime.fromisoformat(str(value(window, "window_start"))).timestamp()
        assert window.ts == start + 900
        assert value(window, "energy") == pytest.approx(meter.analytic_kwh(start, start + 900), abs=2 * RES)
        assert value(window, "demand") == pytest.approx(480.0, abs=0.1)
        assert value(window, "flags") == ""
        assert all(r.quality is Quality.GOOD for r in window.readings)


async def test_a_restart_mid_window_completes_the_window_once_flagged(tmp_path: Path) -> None:
    meter = SimMeter(Profile(T0, base=360.0))
    plan = EnergyPlan({"incomer-1": meter_spec()}, ())
    edge = window_start(T0, 900, SEOUL) + 2 * 900
    first, second = Sink(), Sink()
    before = stage(tmp_path, first, plan)
    await before.start()
    await run(before, list(polls("incomer-1", meter, poll_times(T0, edge - 300, 1.0))))
    # SIGKILL: no close(); the next agent starts from the state file and polls again after a 10-minute outage.
    after = stage(tmp_path, second, plan)
    await after.start()
    await run(after, list(polls("incomer-1", meter, poll_times(edge + 300, edge + 3600, 1.0))))
    windows = first.stream("incomer-1/demand") + second.stream("incomer-1/demand")
    starts = [value(w, "window_start") for w in windows]
    assert len(starts) == len(set(starts))  # none twice
    interrupted = next(w for w in windows if w.ts == edge)
    assert set(str(value(interrupted, "flags")).split(",")) == {"edge_gap", "restart"}
    assert value(interrupted, "energy") == pytest.approx(meter.analytic_kwh(edge - 900, edge), abs=2 * RES)
    assert next(r for r in interrupted.readings if r.point == "demand").quality is Quality.UNCERTAIN
    following = next(w for w in windows if w.ts == edge + 900)
    assert value(following, "energy") == pytest.approx(meter.analytic_kwh(edge, edge + 900), abs=2 * RES)
    assert [w.ts for w in windows] == sorted(w.ts for w in windows)
    assert windows[-1].ts - windows[0].ts == 900 * (len(windows) - 1)  # nothing skipped across the outage


async def test_a_crash_between_deciding_a_window_and_storing_it_sends_the_same_values_again(tmp_path: Path) -> None:
    meter = SimMeter(Profile(T0, base=360.0))
    plan = EnergyPlan({"incomer-1": meter_spec()}, ())
    edge = window_start(T0, 900, SEOUL) + 2 * 900

    class Crash(Exception):
        pass

    class CrashingSink(Sink):
        async def submit(self, result: PollResult) -> None:
            if result.device.endswith("/demand") and result.ts == edge:
                raise Crash  # the agent dies after deciding the window, before the writer stored it
            await super().submit(result)

    first, second = CrashingSink(), Sink()
    before = stage(tmp_path, first, plan)
    await before.start()
    with pytest.raises(Crash):
        await run(before, list(polls("incomer-1", meter, poll_times(T0, edge + 30, 1.0))))
    decided = json.loads((tmp_path / "energy-state.json").read_text())["outbox"]
    assert len(decided) == 1
    after = stage(tmp_path, second, plan)
    await after.start()
    # Restarted right away, polling on: the window is not decided again; its record is handed over as decided.
    await run(after, list(polls("incomer-1", meter, poll_times(edge + 31, edge + 1000, 1.0))))
    at_edge = [w for w in second.stream("incomer-1/demand") if w.ts == edge]
    assert len(at_edge) == 1
    assert at_edge[0].readings == tuple(Reading(*r[:3], Quality(r[3]), r[4]) for r in decided[0]["readings"])
    assert json.loads((tmp_path / "energy-state.json").read_text())["outbox"] == []


async def test_an_unreadable_state_file_is_moved_aside_and_the_stage_starts_afresh(tmp_path: Path) -> None:
    (tmp_path / "energy-state.json").write_text("{ not json")
    sink = Sink()
    energy = stage(tmp_path, sink, EnergyPlan({"incomer-1": meter_spec()}, ()))
    await energy.start()
    assert len(list(tmp_path.glob("energy-state.json.corrupt-*"))) == 1
    meter = SimMeter(Profile(T0, base=100.0))
    await run(energy, list(polls("incomer-1", meter, poll_times(T0, T0 + 1800, 1.0))))
    assert len(sink.stream("incomer-1/demand")) == 1


async def test_a_group_sums_its_meters_minus_export_and_alarms_on_the_sum(tmp_path: Path) -> None:
    start = window_start(T0, 900, SEOUL) + 900
    one = SimMeter(Profile(T0, base=400.0))
    two = SimMeter(Profile(T0, base=300.0, ramp=0.1))  # rises 90 kW over a window
    pv = SimMeter(Profile(T0, base=50.0))  # export counter of meter two (solar on its feeder)
    plan = EnergyPlan(
        {"incomer-1": meter_spec("incomer-1"),
         "incomer-2": meter_spec("incomer-2", export_point="energy_active_export")},
        (GroupSpec(MeterSpec("plant", "", target_kw=800.0, levels_kw=(800.0,), hysteresis_kw=40.0),
                   ("incomer-1", "incomer-2"), True),))
    sink = Sink()
    energy = stage(tmp_path, sink, plan)
    await energy.start()
    for t in poll_times(T0, start + 1805, 1.0):
        energy.clocks.at(t)  # type: ignore[attr-defined]
        await energy.submit(PollResult("incomer-1", t, (Reading("energy_active_import", one.counter(t), "kWh"),)))
        await energy.submit(PollResult("incomer-2", t + 0.2, (Reading("energy_active_import", two.counter(t + 0.2),
                                                                      "kWh"),
                                                              Reading("energy_active_export", pv.counter(t + 0.2),
                                                                      "kWh"))))
    plant = sink.stream("plant/demand")
    assert len(plant) == 2
    for window in plant:
        a = window.ts - 900
        expected = one.analytic_kwh(a, window.ts) + two.analytic_kwh(a, window.ts) - pv.analytic_kwh(a, window.ts)
        assert value(window, "energy") == pytest.approx(expected, abs=4 * RES)
    two_windows = sink.stream("incomer-2/demand")
    assert value(two_windows[0], "export_energy") == pytest.approx(12.5, abs=2 * RES)
    # Import alone: 700 kW rising 0.1 kW/s: the projection of the sum crosses 800 kW during the second window.
    alarms = sink.stream("plant/alarm")
    assert [value(a, "alarm") for a in alarms] == ["raised"]
    assert alarms[0].ts < start + 1800


async def feed_with_refused_export(energy: EnergyStage, grid: SimMeter, pv: SimMeter, until: float,
                                   outage: tuple[float, float]) -> None:
    """Polls of incomer-1 every second from T0 to `until`: import from `grid`, export from `pv`, except during
    `outage`, when the meter refuses the export register."""
    refused = Reading("energy_active_export", None, "kWh", Quality.BAD, "the meter refuses it: Modbus exception 2")
    for t in poll_times(T0, until, 1.0):
        energy.clocks.at(t)  # type: ignore[attr-defined]
        export = refused if outage[0] <= t < outage[1] else Reading("energy_active_export", pv.counter(t), "kWh")
        await energy.submit(PollResult("incomer-1", t, (Reading("energy_active_import", grid.counter(t), "kWh"),
                                                        export)))


async def test_an_export_counter_that_fails_does_not_stop_the_import_windows(tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A meter whose export register is refused (an EX-only register on a basic model, a decode problem) still
    gets every import window, good; the windows the export outage touches carry `export_unread` and their
    export energy is marked uncertain, a lower bound. Logged once when it fails, once when it reads again."""
    caplog.set_level("INFO", logger="energy.stage")
    start = window_start(T0, 900, SEOUL) + 900
    grid, pv = SimMeter(Profile(T0, base=400.0)), SimMeter(Profile(T0, base=40.0))
    plan = EnergyPlan({"incomer-1": meter_spec("incomer-1", export_point="energy_active_export")}, ())
    sink = Sink()
    energy = stage(tmp_path, sink, plan)
    await energy.start()
    await feed_with_refused_export(energy, grid, pv, start + 2705, (start + 1000, start + 1300))  # 2nd window
    windows = sink.stream("incomer-1/demand")
    assert [w.ts - 900 for w in windows] == [start, start + 900, start + 1800]
    for window in windows:  # the import is complete in every window, outage or not
        energy_reading = next(r for r in window.readings if r.point == "energy")
        assert energy_reading.quality is Quality.GOOD, energy_reading
        assert energy_reading.value == pytest.approx(grid.analytic_kwh(window.ts - 900, window.ts), abs=2 * RES)
    exports = [next(r for r in w.readings if r.point == "export_energy") for w in windows]
    assert [value(w, "flags") for w in windows] == ["", "export_unread", ""]
    assert [e.quality for e in exports] == [Quality.GOOD, Quality.UNCERTAIN, Quality.GOOD]
    assert exports[1].reason == "export_unread"
    # What the export counted while refused is missing, never guessed: 300 s of 40 kW less, about.
    full = pv.analytic_kwh(start + 900, start + 1800)
    assert exports[1].value == pytest.approx(full - 40.0 * 300 / 3600, abs=40.0 / 3600 + 2 * RES)
    assert exports[2].value == pytest.approx(pv.analytic_kwh(start + 1800, start + 2700), abs=2 * RES)
    said = [r.getMessage() for r in caplog.records if "export counter" in r.getMessage()]
    assert len(said) == 2 and "not read (the meter refuses it" in said[0] and "read again" in said[1], said


async def test_a_group_net_of_an_unread_export_is_uncertain_and_a_gross_group_is_not_touched(tmp_path: Path) -> None:
    """A group with `minus_export` subtracts its members' export: while one member's export counter is not
    read, the group's own energy and demand are too high by what that counter missed, so they are uncertain
    (flag export_unread). A group that only adds imports does not use the export at all: its windows stay
    complete, without the flag."""
    start = window_start(T0, 900, SEOUL) + 900
    grid, pv = SimMeter(Profile(T0, base=400.0)), SimMeter(Profile(T0, base=40.0))
    group = MeterSpec("plant", "", target_kw=800.0)
    plan = EnergyPlan({"incomer-1": meter_spec("incomer-1", export_point="energy_active_export")},
                      (GroupSpec(group, ("incomer-1",), True),
                       GroupSpec(MeterSpec("gross", "", target_kw=800.0), ("incomer-1",), False)))
    sink = Sink()
    energy = stage(tmp_path, sink, plan)
    await energy.start()
    await feed_with_refused_export(energy, grid, pv, start + 1805, (start + 1000, start + 1300))  # 2nd window
    net, gross = sink.stream("plant/demand"), sink.stream("gross/demand")
    assert [w.ts - 900 for w in net] == [w.ts - 900 for w in gross] == [start, start + 900]
    net_energy = [next(r for r in w.readings if r.point == "energy") for w in net]
    assert [value(w, "flags") for w in net] == ["", "export_unread"]
    assert [e.quality for e in net_energy] == [Quality.GOOD, Quality.UNCERTAIN]
    assert net_energy[1].reason == "export_unread"
    gross_energy = [next(r for r in w.readings if r.point == "energy") for w in gross]
    assert [value(w, "flags") for w in gross] == ["", ""]
    assert [e.quality for e in gross_energy] == [Quality.GOOD, Quality.GOOD]


async def test_a_bug_in_the_stage_costs_windows_never_the_poll_or_its_readings(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An internal error while deriving (a fault no real meter can provoke, hence the patched tracker) is
    logged once with its traceback; the poll still reaches the writer and submit returns, so the meter's
    poll task goes on; windows resume when the error does."""
    plan = EnergyPlan({"incomer-1": meter_spec("incomer-1")}, ())
    sink = Sink()
    energy = stage(tmp_path, sink, plan)
    await energy.start()
    broken = energy.trackers["incomer-1"]
    real = broken.observe

    def fail(*args: object, **kwargs: object) -> list[object]:
        raise IndexError("tuple index out of range")

    broken.observe = fail  # type: ignore[method-assign]
    meter = SimMeter(Profile(T0, base=400.0))
    polls = [PollResult("incomer-1", t, (Reading("energy_active_import", meter.counter(t), "kWh"),))
             for t in poll_times(T0, T0 + 5, 1.0)]
    await run(energy, polls)
    assert [p.ts for p in sink.stream("incomer-1")] == [p.ts for p in polls]
    said = [r for r in caplog.records if "demand windows stopped" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info is not None
    broken.observe = real  # type: ignore[method-assign]
    await run(energy, [PollResult("incomer-1", T0 + 6, (Reading("energy_active_import", meter.counter(T0 + 6),
                                                                 "kWh"),))])
    assert "incomer-1" not in energy._failing  # type: ignore[attr-defined]


async def test_a_clock_step_and_an_unsynchronised_clock_are_flagged(tmp_path: Path) -> None:
    meter = SimMeter(Profile(T0, base=200.0))
    clocks = Clocks(T0)
    sink = Sink()
    energy = stage(tmp_path, sink, EnergyPlan({"incomer-1": meter_spec()}, ()), clocks=clocks, synced=False)
    await energy.start()
    step_at = window_start(T0, 900, SEOUL) + 900 + 450
    for t in poll_times(T0, T0 + 3600, 1.0):
        stepped = 120.0 if t >= step_at else 0.0
        clocks.at(t + stepped, step=stepped if t - 1 < step_at <= t else 0.0)
        await energy.submit(next(polls("incomer-1", meter, [t], stamp=lambda x, s=stepped: x + s)))
    windows = sink.stream("incomer-1/demand")
    flags = [set(str(value(w, "flags")).split(",")) for w in windows]
    assert all("clock_unsynced" in f for f in flags)
    assert sum("clock_step" in f for f in flags) == 1
    assert energy.clock.steps == 1 and not energy.clock.state().synchronised


async def test_history_keeps_the_windows_and_reports_the_peak_of_each_month(tmp_path: Path) -> None:
    history = History(tmp_path / "energy-history.db")
    sink = Sink()
    energy = stage(tmp_path, sink, EnergyPlan({"incomer-1": meter_spec()}, ()), history=history)
    await energy.start()
    meter = SimMeter(Profile(T0, base=300.0, ramp=0.01))
    await run(energy, list(polls("incomer-1", meter, poll_times(T0, T0 + 7200, 2.0))))
    text = report(history, SEOUL, now=T0)
    last = sink.stream("incomer-1/demand")[-1]
    assert "2024-05" in text and f"{value(last, 'demand'):10.1f} kW  window from {value(last, 'window_start')}" in text
    assert history.count() == 7
    await energy.close()


def live_stage(tmp_path: Path, plan: EnergyPlan, sink: Sink, history: History | None = None,
               t: float = T0) -> tuple[EnergyStage, list[tuple[float, dict]]]:
    """A stage whose retained live state is captured: (monotonic time published, payload) per publication."""
    clocks = Clocks(t)
    published: list[tuple[float, dict]] = []
    energy = EnergyStage(plan, tmp_path / "energy-state.json", history, sink.submit, sink.flush,
                         lambda meter, payload, state: published.append((clocks.mono, json.loads(payload))),
                         "gw", "site", clock_state=lambda: ClockState(True, True, 0.001, 0.01),
                         detector=StepDetector(lambda: clocks.wall, lambda: clocks.mono),
                         monotonic=lambda: clocks.mono)
    energy.clocks = clocks  # type: ignore[attr-defined]
    return energy, published


async def test_live_state_is_published_at_most_once_a_second_and_at_once_when_an_alarm_changes(
        tmp_path: Path) -> None:
    """A meter polled every 100 ms: ten retained messages a second before; now one a second, plus one at the
    very poll where the alarm was raised."""
    start = window_start(T0, 900, SEOUL) + 900
    meter = SimMeter(Profile(T0, base=0.0, ramp=1.0), resolution=0.001)  # 450 kW at the edge, +1 kW/s
    spec = meter_spec(resolution=0.001, target_kw=500.0, levels_kw=(500.0,), hysteresis_kw=25.0)
    sink = Sink()
    energy, published = live_stage(tmp_path, EnergyPlan({"incomer-1": spec}, ()), sink)
    await energy.start()
    await run(energy, list(polls("incomer-1", meter, poll_times(start - 5, start + 120, 0.1))))
    raised = sink.stream("incomer-1/alarm")
    assert [value(a, "alarm") for a in raised] == ["raised"]
    times = [mono for mono, _ in published]
    assert 115 <= len(published) <= 125  # 1,250 polls in the window's first 125 s
    changes = [i for i in range(1, len(published)) if published[i][1]["alarms_kw"] != published[i - 1][1]["alarms_kw"]]
    assert len(changes) == 1
    change = changes[0]
    assert published[change][1]["alarms_kw"] == [500.0] and published[change][1]["ts"] == raised[0].ts
    assert all(b - a >= 1.0 - 1e-9 for i, (a, b) in enumerate(itertools.pairwise(times), 1)
               if i != change)


async def test_a_groups_live_demand_and_alarm_are_net_of_export_like_its_windows(tmp_path: Path) -> None:
    """A plant importing 500 kW on one incomer while the other exports 200 kW of solar draws 300 kW net: its
    projection must be 300, not 500, against a 400 kW target."""
    start = window_start(T0, 900, SEOUL) + 900
    grid = SimMeter(Profile(T0, base=500.0))
    solar = SimMeter(Profile(T0, base=200.0))
    plan = EnergyPlan(
        {"incomer-1": meter_spec("incomer-1"),
         "incomer-2": meter_spec("incomer-2", export_point="energy_active_export")},
        (GroupSpec(MeterSpec("plant", "", target_kw=400.0, levels_kw=(400.0,), hysteresis_kw=20.0),
                   ("incomer-1", "incomer-2"), True),))
    sink = Sink()
    energy, published = live_stage(tmp_path, plan, sink)
    await energy.start()
    for t in poll_times(T0, start + 905, 1.0):
        energy.clocks.at(t)  # type: ignore[attr-defined]
        await energy.submit(PollResult("incomer-1", t, (Reading("energy_active_import", grid.counter(t), "kWh"),)))
        await energy.submit(PollResult("incomer-2", t + 0.2, (Reading("energy_active_import", 5000.0, "kWh"),
                                                              Reading("energy_active_export",
                                                                      solar.counter(t + 0.2), "kWh"))))
    assert value(sink.stream("plant/demand")[0], "demand") == pytest.approx(300.0, abs=0.2)
    assert sink.stream("plant/alarm") == []
    plant = [payload for _, payload in published if payload["meter"] == "plant"]
    # In the first window the 7.5 minutes before the first reading are estimated from a power that is only
    # seconds old (counter steps of 0.01 kWh): the projection is near, not exact; from the next edge on it is.
    first = [p for p in plant if p["estimated_s"] > 0]
    read = [p for p in plant if p["estimated_s"] == 0]
    assert first and all(p["projected_kw"] == pytest.approx(300.0, abs=15.0) for p in first)
    assert all(p["projected_kw"] == pytest.approx(300.0, abs=2.0) for p in first[10:])
    assert read and all(p["projected_kw"] == pytest.approx(300.0, abs=1.0) for p in read[5:])


async def test_the_status_page_sees_live_demand_and_the_last_windows_of_each_meter_and_group(tmp_path: Path) -> None:
    """What /page.json shows of the stage (energy/wiring.py page_section): before the first edge why there is
    no live demand yet; then the open window's figures per meter and group, and the last windows (newest first,
    no more than WINDOWS_KEPT), which a restarted stage recalls from the local history before any poll."""
    from energy.stage import WINDOWS_KEPT
    from energy.windows import local_iso
    from energy.wiring import page_section

    first_edge = window_start(T0, 900, SEOUL) + 900
    one, two = SimMeter(Profile(T0, base=300.0)), SimMeter(Profile(T0, base=200.0))
    plan = EnergyPlan({"incomer-1": meter_spec("incomer-1", target_kw=400.0, levels_kw=(360.0, 400.0)),
                       "incomer-2": meter_spec("incomer-2")},
                      (GroupSpec(MeterSpec("plant", "", target_kw=450.0, levels_kw=(450.0,)),
                                 ("incomer-1", "incomer-2"), False),))
    sink = Sink()
    energy = stage(tmp_path, sink, plan, history=History(tmp_path / "energy-history.db"))
    await energy.start()

    async def poll(t: float) -> None:
        energy.clocks.at(t)  # type: ignore[attr-defined]
        await energy.submit(PollResult("incomer-1", t, (Reading("energy_active_import", one.counter(t), "kWh"),)))
        await energy.submit(PollResult("incomer-2", t, (Reading("energy_active_import", two.counter(t), "kWh"),)))

    await poll(T0)
    shown = {item["name"]: item for item in page_section(energy, T0)}
    assert shown["incomer-1"]["live"] is None and shown["incomer-1"]["waiting_until"] == local_iso(first_edge, SEOUL)
    assert shown["plant"]["live"] is None and shown["plant"]["members"] == ["incomer-1", "incomer-2"]

    end = first_edge + 6 * 900 + 300  # six windows closed, the seventh 300 s old
    for t in poll_times(T0 + 1, end, 1.0):
        await poll(t)
    shown = {item["name"]: item for item in page_section(energy, end + 0.5)}
    live = shown["incomer-1"]["live"]
    assert live["window_start"] == local_iso(end - 300, SEOUL) and live["left_s"] == pytest.approx(599.5, abs=0.6)
    # The last poll was a second before `end`: 299 s at 300 kW.
    assert live["energy_kwh"] == pytest.approx(300 * 299 / 3600, abs=0.03)
    assert live["projected_kw"] == pytest.approx(300, abs=1)
    assert live["alarms_kw"] == [] and not live["ended"] and shown["incomer-1"]["levels_kw"] == [360.0, 400.0]
    assert shown["plant"]["live"]["projected_kw"] == pytest.approx(500, abs=2)
    assert shown["plant"]["live"]["alarms_kw"] == [450.0]  # the sum is over the group's target
    windows = shown["incomer-1"]["windows"]
    assert len(windows) == WINDOWS_KEPT and windows[0]["start"] == local_iso(end - 1200, SEOUL)
    assert [w["start"] for w in windows] == sorted((w["start"] for w in windows), reverse=True)
    assert windows[0]["demand_kw"] == pytest.approx(300, abs=0.1) and windows[0]["flags"] == []
    assert shown["plant"]["windows"][0]["demand_kw"] == pytest.approx(500, abs=0.2)
    # Once its window has ended with no reading since (the meter stopped answering), the page is told.
    assert page_section(energy, end + 700)[0]["live"]["ended"] is True
    await energy.close()

    again = stage(tmp_path, Sink(), plan, history=History(tmp_path / "energy-history.db"))
    await again.start()
    recalled = {item["name"]: item for item in page_section(again, end + 1)}
    assert recalled["incomer-1"]["windows"] == windows and recalled["incomer-1"]["live"] is None
    assert recalled["plant"]["windows"] == shown["plant"]["windows"]
    await again.close()


async def test_the_retained_live_state_names_the_latest_window_also_after_a_restart(tmp_path: Path) -> None:
    """The live state's `latest_window` and the status page's windows are one thing: a restarted stage recalls
    its windows from the local history, so its first live state names the window closed before the restart
    (it said nothing of it until the next window closed, while the page showed it)."""
    first_edge = window_start(T0, 900, SEOUL) + 900
    meter = SimMeter(Profile(T0, base=480.0))
    plan = EnergyPlan({"incomer-1": meter_spec()}, ())
    energy, published = live_stage(tmp_path, plan, Sink(), History(tmp_path / "energy-history.db"))
    await energy.start()
    await run(energy, list(polls("incomer-1", meter, poll_times(T0, first_edge + 910, 1.0))))
    before = published[-1][1]["latest_window"]
    assert before["start"] == datetime.fromtimestamp(first_edge, SEOUL).isoformat()
    assert before["demand_kw"] == pytest.approx(480.0, abs=0.1) and before["flags"] == ""
    await energy.close()

    again, published = live_stage(tmp_path, plan, Sink(), History(tmp_path / "energy-history.db"),
                                  t=first_edge + 930)
    await again.start()
    await run(again, list(polls("incomer-1", meter, poll_times(first_edge + 930, first_edge + 932, 1.0))))
    assert published and published[0][1]["latest_window"] == before
    await again.close()


def test_a_group_decides_once_every_member_has_settled_by_its_own_account() -> None:
    """A group's alarm waits until every member's present power is a full-lookback slope. A member polled less
    often than the others said, at its last reading, when that would be; once that time has come the group
    decides, without waiting for the member to say so again."""
    group = GroupTracker(GroupSpec(MeterSpec("plant", "", target_kw=100.0, levels_kw=(100.0,)), ("a", "b"), False))
    start = window_start(T0, 900, SEOUL)

    def live(meter: str, ts: float, projected: float, settling: float) -> LiveDemand:
        return LiveDemand(meter, ts, start, start + 900, 1.0, projected, projected, (), settling_s=settling)

    assert group.observe(live("a", T0, 60.0, 30.0)) == []  # b has no live demand yet
    (early,) = group.observe(live("b", T0 + 1, 60.0, 0.0))  # a settles at T0 + 30: nothing decided
    assert isinstance(early, LiveDemand) and early.settling_s == pytest.approx(29.0)
    (still,) = group.observe(live("b", T0 + 20, 60.0, 0.0))
    assert still.settling_s == pytest.approx(10.0)
    raised, later = group.observe(live("b", T0 + 31, 60.0, 0.0))  # 120 kW, and a's time has come
    assert isinstance(raised, AlarmEvent) and raised.raised and later.settling_s == 0.0
