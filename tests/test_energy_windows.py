"""Demand windows against a simulated meter whose power profile is known exactly (tests/energy_sim.py):
every window's energy equals the integral of the profile between its edges, to the counter's resolution,
whatever happens to polls, the counter or the clock."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from energy_sim import Profile, SimMeter, poll_times

from energy.windows import (
    AlarmEvent,
    Event,
    Flag,
    LiveDemand,
    MeterSpec,
    MeterTracker,
    WindowRecord,
    window_end,
    window_start,
)

SEOUL = ZoneInfo("Asia/Seoul")
BERLIN = ZoneInfo("Europe/Berlin")
T0 = datetime(2024, 5, 14, 9, 7, 30, tzinfo=SEOUL).timestamp()  # mid-window on purpose
RES = 0.01  # kWh: a uint32 register with scale 0.01


def spec(**changes: object) -> MeterSpec:
    base: dict[str, object] = {"name": "incomer-1", "import_point": "energy_active_import", "resolution": RES,
                               "wrap": (1 << 32) * RES, "max_kw": 5000.0, "max_gap_s": 10.0}
    base.update(changes)
    return MeterSpec(**base)  # type: ignore[arg-type]


def feed(tracker: MeterTracker, meter: SimMeter, times: Iterable[float],
         stamp: Callable[[float], float] = lambda t: t) -> list[Event]:
    """The readings at true times `times`, stamped by a wall clock `stamp` that may be stepped; a step is
    noted as the stage's step detector would (energy/clock.py), with the true elapsed time."""
    events: list[Event] = []
    previous: float | None = None
    for t in times:
        if previous is not None and abs((stamp(t) - stamp(previous)) - (t - previous)) > 1.0:
            tracker.note(Flag.CLOCK_STEP)
        events.extend(tracker.observe(stamp(t), (meter.counter(t),),
                                      None if previous is None else t - previous))
        previous = t
    return events


def windows(events: list[Event]) -> list[WindowRecord]:
    return [e for e in events if isinstance(e, WindowRecord)]


def assert_analytic(meter: SimMeter, records: list[WindowRecord], tolerance: float = 2 * RES) -> None:
    for record in records:
        expected = meter.analytic_kwh(record.start, record.end)
        assert record.energy_kwh == pytest.approx(expected, abs=tolerance), record
        assert record.demand_kw == pytest.approx(record.energy_kwh * 3600 / record.window_s)


def assert_contiguous(records: list[WindowRecord]) -> None:
    for before, after in itertools.pairwise(records):
        assert after.start == before.end, (before, after)
        assert after.end > after.start


def test_window_energy_and_demand_equal_the_integral_of_the_profile() -> None:
    meter = SimMeter(Profile(T0, base=420.0, swing=180.0, period=2000.0))
    tracker = MeterTracker(spec())
    records = windows(feed(tracker, meter, poll_times(T0, T0 + 3 * 3600, 2.0)))
    # 09:15 to 12:00; the first, entered mid-way, has no reading before its start edge and is not sent
    assert len(records) == 11
    assert_contiguous(records)
    assert_analytic(meter, records)
    for record in records:
        assert record.window_s == 900
        assert datetime.fromtimestamp(record.start, SEOUL).minute in (0, 15, 30, 45)
        assert record.flags == frozenset() and record.coverage == 1.0 and record.complete
        assert record.start_local.endswith("+09:00")


def test_missed_polls_inside_a_window_change_nothing() -> None:
    meter = SimMeter(Profile(T0, base=250.0, ramp=0.02))
    full = windows(feed(MeterTracker(spec()), meter, poll_times(T0, T0 + 3600, 1.0)))
    target = full[1]
    # Four minutes of polls lost in the middle of one window, and every other poll of another.
    lost = windows(feed(MeterTracker(spec()), meter, poll_times(
        T0, T0 + 3600, 1.0, skip=lambda t: (target.start + 300 < t < target.start + 540)
        or (full[2].start + 5 < t < full[2].end - 5 and int(t) % 2 == 0))))
    assert [r.energy_kwh for r in lost] == [r.energy_kwh for r in full]
    gapped = lost[1]
    assert gapped.flags == frozenset()  # edges had readings on both sides: nothing was interpolated across a gap
    assert gapped.coverage == pytest.approx(1 - 240 / 900, abs=0.01)
    assert gapped.longest_gap_s == pytest.approx(241, abs=1.5)
    assert lost[2].coverage == 1.0  # 2-second spacing is below max_gap


def test_a_gap_across_an_edge_is_interpolated_and_flagged() -> None:
    meter = SimMeter(Profile(T0, base=600.0))  # constant power: interpolation is exact
    edge = window_start(T0, 900, SEOUL) + 2 * 900
    records = windows(feed(MeterTracker(spec()), meter, poll_times(T0, T0 + 3600, 1.0,
                                                                   skip=lambda t: edge - 200 < t < edge + 100)))
    assert_contiguous(records)
    assert_analytic(meter, records)
    before, after = (r for r in records if edge in (r.end, r.start))
    assert Flag.EDGE_GAP in before.flags and Flag.EDGE_GAP in after.flags
    assert before.coverage == pytest.approx(700 / 900, abs=0.01)
    assert after.coverage == pytest.approx(800 / 900, abs=0.01)
    assert all(Flag.EDGE_GAP not in r.flags for r in records if edge not in (r.end, r.start))


def test_a_uint32_wrap_gives_the_right_energy_and_is_flagged() -> None:
    wrap = (1 << 32) * RES  # 42,949,672.96 kWh
    meter = SimMeter(Profile(T0, base=800.0), start_kwh=wrap - 150.0, wrap=wrap)
    records = windows(feed(MeterTracker(spec()), meter, poll_times(T0, T0 + 3600, 1.0)))
    assert_analytic(meter, records)
    wrapped = [r for r in records if Flag.WRAP in r.flags]
    assert len(wrapped) == 1 and wrapped[0].energy_kwh == pytest.approx(200.0, abs=2 * RES)
    assert wrapped[0].counter_start is None  # raw edges across a wrap mean nothing; energy is still right


def test_a_wrap_without_a_power_limit_is_still_recognised() -> None:
    wrap = 65536 * 1.0  # a uint16 kWh counter
    meter = SimMeter(Profile(T0, base=800.0), start_kwh=wrap - 150.0, wrap=wrap, resolution=1.0)
    records = windows(feed(MeterTracker(spec(max_kw=None, wrap=wrap, resolution=1.0)), meter,
                           poll_times(T0, T0 + 3600, 1.0)))
    assert_analytic(meter, records, tolerance=2.0)
    assert sum(Flag.WRAP in r.flags for r in records) == 1


def test_a_counter_reset_counts_from_zero_and_is_flagged() -> None:
    profile = Profile(T0, base=500.0)
    reset_at = window_start(T0, 900, SEOUL) + 900 + 400
    meter = SimMeter(profile, jump_at=reset_at, jump_to=0.0)
    records = windows(feed(MeterTracker(spec()), meter, poll_times(T0, T0 + 3600, 1.0)))
    assert_contiguous(records)
    reset = [r for r in records if Flag.RESET in r.flags]
    assert len(reset) == 1
    # The energy between the last reading before the reset and the reset itself is unknown: one poll.
    assert reset[0].energy_kwh == pytest.approx(meter.analytic_kwh(reset[0].start, reset[0].end),
                                                abs=500 * 1.0 / 3600 + 2 * RES)
    assert_analytic(meter, [r for r in records if r is not reset[0]])


@pytest.mark.parametrize("jump_to", [12_345.0, 999_999.0], ids=["lower-not-zero", "impossible-jump-up"])
def test_a_meter_replacement_is_estimated_and_flagged(jump_to: float) -> None:
    profile = Profile(T0, base=500.0)
    replaced_at = window_start(T0, 900, SEOUL) + 900 + 400
    meter = SimMeter(profile, start_kwh=500_000.0, jump_at=replaced_at, jump_to=jump_to)
    records = windows(feed(MeterTracker(spec()), meter, poll_times(T0, T0 + 3600, 1.0)))
    assert_contiguous(records)
    replaced = [r for r in records if Flag.REPLACEMENT in r.flags]
    assert len(replaced) == 1
    # Estimated from the power before the replacement over the one poll interval it cost.
    assert replaced[0].energy_kwh == pytest.approx(meter.analytic_kwh(replaced[0].start, replaced[0].end),
                                                   abs=0.5)
    assert replaced[0].coverage < 1.0
    assert_analytic(meter, [r for r in records if r is not replaced[0]])


def test_clock_stepped_forward_gives_every_window_once_flagged() -> None:
    meter = SimMeter(Profile(T0, base=300.0))
    step_at, step = T0 + 1800, 3600.0
    records = windows(feed(MeterTracker(spec()), meter, poll_times(T0, T0 + 3 * 3600, 1.0),
                           stamp=lambda t: t + (step if t >= step_at else 0.0)))
    assert_contiguous(records)  # nothing skipped: the hour the clock jumped over has its windows
    assert all(r.energy_kwh >= 0 for r in records)
    stepped = [r for r in records if r.start < step_at + step and r.end > step_at]
    assert all(Flag.EDGE_GAP in r.flags and Flag.CLOCK_STEP in r.flags for r in stepped[:-1])
    # Energy is conserved: the windows add up to what the counter counted over their span.
    total = sum(r.energy_kwh for r in records)
    assert total == pytest.approx(meter.analytic_kwh(records[0].start, records[-1].end - step), abs=2 * RES)


def test_clock_stepped_back_gives_no_negative_or_doubled_window() -> None:
    meter = SimMeter(Profile(T0, base=300.0))
    step_at, step = T0 + 2400, -1200.0
    records = windows(feed(MeterTracker(spec()), meter, poll_times(T0, T0 + 3 * 3600, 1.0),
                           stamp=lambda t: t + (step if t >= step_at else 0.0)))
    assert_contiguous(records)
    starts = [r.start for r in records]
    assert len(set(starts)) == len(starts)  # no window twice
    assert all(r.energy_kwh >= 0 for r in records)
    assert sum(Flag.CLOCK_STEP in r.flags for r in records) >= 1
    # The repeated 20 minutes land in the window open at the step (flagged): nothing is lost or counted twice.
    total = sum(r.energy_kwh for r in records)
    assert total == pytest.approx(meter.analytic_kwh(records[0].start, records[-1].end - step), abs=2 * RES)


@pytest.mark.parametrize(("day", "hours"), [((2024, 3, 31), 23), ((2024, 10, 27), 25)], ids=["spring", "autumn"])
def test_a_zone_with_daylight_saving_gets_23_and_25_hour_days(day: tuple[int, int, int], hours: int) -> None:
    midnight = datetime(*day, tzinfo=BERLIN).timestamp()
    meter = SimMeter(Profile(midnight, base=240.0))
    tracker = MeterTracker(spec(zone=BERLIN))
    records = windows(feed(tracker, meter, poll_times(midnight - 1800, midnight + 26 * 3600, 5.0)))
    that_day = [r for r in records if r.start_local.startswith("{:04d}-{:02d}-{:02d}".format(*day))]
    assert len(that_day) == hours * 4
    assert_contiguous(that_day)
    assert all(r.demand_kw == pytest.approx(240.0, abs=0.1) for r in that_day)
    locals_ = [r.start_local for r in that_day]
    assert len(set(locals_)) == len(locals_)  # the repeated hour's windows are told apart by their offset
    assert all(datetime.fromtimestamp(r.start, BERLIN).minute % 15 == 0 for r in that_day)


def test_window_edges_follow_the_local_clock_for_hour_windows_in_a_45_minute_zone() -> None:
    nepal = ZoneInfo("Asia/Kathmandu")  # UTC+5:45: hour windows are not UTC hours there
    ts = datetime(2024, 5, 14, 10, 20, tzinfo=nepal).timestamp()
    start = window_start(ts, 900, nepal)
    assert datetime.fromtimestamp(start, nepal).strftime("%H:%M") == "10:15"
    assert window_end(start, 900, nepal) == start + 900


def test_the_alarm_fires_before_the_window_ends_on_a_ramp_exactly_once_and_clears_once() -> None:
    target = 1000.0
    start = window_start(T0, 900, SEOUL) + 900
    # 700 kW rising 1 kW every 2 s from the window's start: the window would average 925 kW; the projection
    # crosses the 90 % level (900 kW) minutes before the end, and never reaches 100 %.
    ramp = Profile(start, base=700.0, ramp=0.5)
    meter = SimMeter(ramp, resolution=0.001)
    tracker = MeterTracker(spec(target_kw=target, levels_kw=(900.0, 1000.0), hysteresis_kw=50.0,
                                resolution=0.001, lookback_s=30.0))
    shed_at = start + 840  # the plant acts on the alarm: a minute before the edge it sheds load
    events = feed(tracker, meter, poll_times(T0, shed_at, 1.0))
    alarms = [e for e in events if isinstance(e, AlarmEvent)]
    raised_900 = [a for a in alarms if a.level_kw == 900.0 and a.raised]
    assert len(raised_900) == 1 and raised_900[0].ts < start + 900 - 120  # minutes before the edge
    assert raised_900[0].window_start == start
    assert not any(a.level_kw == 1000.0 for a in alarms)  # the window never heads over 1000 kW
    live = [e for e in events if isinstance(e, LiveDemand) and e.start == start]
    assert live[-1].energy_kwh == pytest.approx(meter.analytic_kwh(start, live[-1].ts), abs=0.01)
    # The load is shed: 200 kW from now on. Clears once, never raised again.
    after = SimMeter(Profile(shed_at, base=200.0), start_kwh=meter.counter(shed_at), resolution=0.001)
    later = feed(tracker, after, poll_times(shed_at, shed_at + 1800, 1.0))
    alarms += [e for e in later if isinstance(e, AlarmEvent)]
    window = next(r for r in windows(later) if r.start == start)
    # Without shedding the window would have averaged 925 kW; with it, under the 900 kW level.
    expected = (meter.analytic_kwh(start, shed_at) + after.analytic_kwh(shed_at, start + 900)) * 4
    assert window.demand_kw == pytest.approx(expected, abs=0.1)
    assert 850 < window.demand_kw < 900
    assert [(a.level_kw, a.raised) for a in alarms] == [(900.0, True), (900.0, False)]


def test_the_first_window_after_commissioning_has_an_estimated_live_demand_but_is_not_sent() -> None:
    """Commissioned at 09:07:30, mid-window: nothing was read before 09:00. From the second reading on, live
    demand is the energy read since 09:07:30 plus the 7.5 minutes before it estimated from the present power,
    marked as estimated; the alarm may fire on it. The window itself is still never sent (its energy rests
    on an estimate), and a restart inside it keeps estimating from the same first reading."""
    start = window_start(T0, 900, SEOUL)
    meter = SimMeter(Profile(start, base=960.0), resolution=0.001)  # a steady 960 kW over a 900 kW level
    tracker = MeterTracker(spec(target_kw=1000.0, levels_kw=(900.0,), resolution=0.001, lookback_s=30.0))
    times = list(poll_times(T0, T0 + 60, 1.0))
    events = feed(tracker, meter, times)
    live = [e for e in events if isinstance(e, LiveDemand)]
    assert live and live[0].ts == times[1]  # one reading is not enough to estimate from; the second is
    assert all(e.estimated_s == pytest.approx(times[0] - start) for e in live)
    last = live[-1]
    assert last.energy_kwh == pytest.approx(meter.analytic_kwh(start, last.ts), abs=0.05)
    assert last.projected_kw == pytest.approx(960.0, abs=1.0)
    assert [(a.level_kw, a.raised) for a in events if isinstance(a, AlarmEvent)] == [(900.0, True)]

    resumed = MeterTracker(tracker.spec)
    resumed.restore(tracker.snapshot())
    later = feed(resumed, meter, poll_times(T0 + 61, start + 1200, 1.0))
    assert not any(isinstance(e, AlarmEvent) for e in later)  # still raised from before the restart
    inside = [e for e in later if isinstance(e, LiveDemand) and e.start == start]
    assert inside and inside[-1].estimated_s == pytest.approx(times[0] - start)
    assert inside[-1].energy_kwh == pytest.approx(meter.analytic_kwh(start, inside[-1].ts), abs=0.05)
    assert [r.start for r in windows(later)] == []  # the first window is not sent, even estimated
    nxt = [e for e in later if isinstance(e, LiveDemand) and e.start == start + 900]
    assert nxt and all(e.estimated_s == 0.0 for e in nxt)  # the next window is read from its edge


def test_no_alarm_on_the_slope_of_a_few_readings_after_a_start() -> None:
    """CI run of stop 18: commissioned with 200 ms polls of a 1 Wh counter, the slope of the first two
    readings was 3 or 4 Wh over 0.2 s (54 or 72 kW for a steady 61 kW), and with a jittered poll more: the
    projection of the first window crossed a 65 kW level, raised, then cleared as the slope settled. An alarm
    is raised or cleared only on a present power measured over the full lookback; before that the projection
    is sent (live demand) but decides nothing. The same after a restart: the slope back to the last reading
    before the stop is the outage's average, not the power now."""
    start = window_start(T0, 900, SEOUL)
    meter = SimMeter(Profile(start, base=61.0), resolution=0.001)
    tracker = MeterTracker(spec(target_kw=65.0, levels_kw=(65.0,), hysteresis_kw=3.25, resolution=0.001))
    # Polls 200 ms apart with a scheduler's jitter (some 250 ms, some 150 ms), the first where the counter's
    # 1 Wh steps make the first slope 72 kW.
    times = [T0 + 0.17 + 0.2 * i + (0.05 if i % 2 else 0.0) for i in range(5 * 60 * 5)]
    events = feed(tracker, meter, times)
    live = [e for e in events if isinstance(e, LiveDemand)]
    assert max(e.projected_kw for e in live[:5]) > 65.0  # the few readings' slope does overshoot...
    assert not [e for e in events if isinstance(e, AlarmEvent)]  # ...and decides nothing
    settled = next(i for i, e in enumerate(live) if e.ts - times[0] >= 60)
    assert all(e.settling_s > 0 for e in live[:settled]) and live[settled].settling_s == 0
    assert live[0].settling_s == pytest.approx(60 - (live[0].ts - times[0]))  # counts down to the decision
    # A steady 70 kW is over the level: raised once the slope is a minute long, not at the first reading.
    high = SimMeter(Profile(start, base=70.0), resolution=0.001)
    tracker = MeterTracker(tracker.spec)
    alarms = [e for e in feed(tracker, high, times) if isinstance(e, AlarmEvent)]
    assert [(a.raised, a.ts - times[0] >= 60) for a in alarms] == [(True, True)]
    # 90 kW from the next edge, raised; the agent stops for 3 minutes while the plant is off, and restarts at
    # 90 kW. The window still heads over 65 kW (72 kW), but the slope back to the last reading before the
    # stop is near 0 kW: decided on it, the alarm would clear at the restart and rise again a minute later.
    second = start + 900
    before = SimMeter(Profile(second, base=90.0), resolution=0.001)
    tracker = MeterTracker(tracker.spec)
    run = [second + 0.17 + 0.2 * i for i in range(600)]
    assert [a.raised for a in feed(tracker, before, run) if isinstance(a, AlarmEvent)] == [True]
    resumed = MeterTracker(tracker.spec)
    resumed.restore(tracker.snapshot())
    again = run[-1] + 180
    back = SimMeter(Profile(again, base=90.0), start_kwh=before.counter(run[-1]), resolution=0.001)
    later = feed(resumed, back, [again + 0.2 * i for i in range(900)])
    assert not [e for e in later if isinstance(e, AlarmEvent)]  # still raised, never cleared and raised again
    live = [e for e in later if isinstance(e, LiveDemand)]
    assert live[0].projected_kw < 65.0 - 3.25  # what the outage's slope says at the first reading
    assert all(e.settling_s > 0 for e in live if e.ts - again < 59.9) and live[-1].settling_s == 0
    assert all(e.alarms == (65.0,) for e in live) and live[-1].projected_kw == pytest.approx(72.0, abs=0.5)


@pytest.mark.parametrize("added", [True, False])
def test_a_state_saved_before_the_export_counter_was_added_or_removed_resumes(added: bool) -> None:
    """The energy table changed between two runs: an export counter added (profile ls_gimac1000 replaced by
    ls_gimac1000_ex) or removed (`export_point = false` for the EX profile on a basic model). The import goes
    on from the saved state, its window completed across the restart; an export added has nothing to count
    from before the restart, so that window carries export_unread, and the next one is read from its edge."""
    start = window_start(T0, 900, SEOUL) + 900
    grid, pv = SimMeter(Profile(T0, base=400.0)), SimMeter(Profile(T0, base=40.0))
    before = MeterTracker(spec(export_point=None if added else "energy_active_export"))
    for t in poll_times(T0, start + 880, 1.0):
        before.observe(t, (grid.counter(t),) if added else (grid.counter(t), pv.counter(t)))
    after = MeterTracker(spec(export_point="energy_active_export" if added else None))
    after.restore(before.snapshot())
    events: list[Event] = []
    for t in poll_times(start + 910, start + 2705, 1.0):  # stopped across the edge at start + 900
        events += after.observe(t, (grid.counter(t), pv.counter(t)) if added else (grid.counter(t),))
    records = windows(events)
    assert [r.start for r in records] == [start, start + 900, start + 1800]
    assert_analytic(grid, records, tolerance=0.5)  # the outage's 30 s are interpolated at the edge
    assert_analytic(grid, records[2:])
    unread = {Flag.EXPORT_UNREAD} if added else set()
    assert [r.flags for r in records] == [{Flag.RESTART, Flag.EDGE_GAP} | unread, {Flag.EDGE_GAP} | unread, set()]
    if added:
        assert records[2].export_kwh == pytest.approx(pv.analytic_kwh(start + 1800, start + 2700), abs=2 * RES)
    else:
        assert all(r.export_kwh is None for r in records)


def test_the_alarm_does_not_flap_around_its_level() -> None:
    start = window_start(T0, 900, SEOUL) + 900
    # Power oscillating +-20 kW around the 1000 kW level every 40 s: hysteresis 50 kW keeps one alarm.
    meter = SimMeter(Profile(start, base=1000.0, swing=20.0, period=40.0), resolution=0.001)
    tracker = MeterTracker(spec(target_kw=1000.0, levels_kw=(1000.0,), hysteresis_kw=50.0, resolution=0.001,
                                lookback_s=10.0))
    events = feed(tracker, meter, poll_times(T0, start + 1800, 1.0))
    assert [a.raised for a in events if isinstance(a, AlarmEvent)] == [True]


def test_a_week_of_windows_in_accelerated_time_equals_the_analytic_values() -> None:
    monday = datetime(2024, 6, 3, tzinfo=SEOUL).timestamp()
    # A daily load curve: 600 kW +- 400 kW over the day, plus a slow drift.
    meter = SimMeter(Profile(monday, base=600.0, ramp=0.0001, swing=400.0, period=86400.0))
    tracker = MeterTracker(spec())
    records = windows(feed(tracker, meter, poll_times(monday - 60, monday + 7 * 86400 + 60, 10.0)))
    assert len(records) == 7 * 96
    assert_contiguous(records)
    assert_analytic(meter, records)
    peak = max(records, key=lambda r: r.demand_kw)
    assert math.isclose(peak.demand_kw, max(meter.analytic_kwh(r.start, r.end) * 4 for r in records),
                        abs_tol=8 * RES)
