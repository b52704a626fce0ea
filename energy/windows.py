"""Demand windows from an energy counter: the arithmetic, with no I/O (energy/stage.py does the I/O).

A meter's counter is turned into a continuous energy series (kWh since the agent started watching it),
across wraps, resets and replacements; a window's energy is that series at its end edge minus at its start
edge, each edge interpolated linearly between the last good reading before it and the first after it. So
polls missed inside a window change nothing: only the readings around the two edges count.

Invariants:
1. Time seen by a tracker never goes back: a reading stamped before the latest one seen (the wall clock was
   stepped back) is taken at the latest time seen, so its energy is added to the open window, never to a
   closed one. Each window is closed exactly once, in order, and the next one starts at its end edge: no
   window is negative (the series never decreases), doubled (a closed edge is never crossed again) or
   skipped (every edge between two readings is closed, even across a long gap or a clock stepped forward).
2. The energy series never decreases: a counter decrease is a wrap (when the counter's modulus explains it
   with a plausible energy), a reset (the counter restarted from 0), or a meter replacement (neither: the
   energy between the two readings is unknown, estimated from the power just before, and the span counts
   as a gap). A rise no installation could draw (above `max_kw`) is a replacement too.
3. A window is emitted only when both its edges have readings on both sides. The first window a tracker
   ever sees has no reading before its start edge and is not emitted (its live demand is, with the part
   before the first reading estimated from the present power and marked `estimated_s`); after a restart the
   tracker resumes from its saved state (energy/stage.py) and the window open at the restart is completed
   and flagged.
4. An export counter not read well does not stop the import: its energy stays flat until it is read again
   (what it counted meanwhile is lost, never guessed), and every window that span touches is flagged
   `export_unread`; the import figures keep their own quality.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from zoneinfo import ZoneInfo


class Flag(StrEnum):
    """Why a window's figure is less than a complete, undisturbed measurement (docs/energy.md)."""

    EDGE_GAP = "edge_gap"  # an edge was interpolated between readings further apart than max_gap
    WRAP = "wrap"  # the counter wrapped inside the window (energy is right; flagged for audit)
    RESET = "reset"  # the counter restarted from 0 inside the window; energy before the restart is estimated
    REPLACEMENT = "replacement"  # a decrease no wrap explains, or a jump above max_kw: estimated energy
    CLOCK_UNSYNCED = "clock_unsynced"  # the kernel said the clock was not synchronised during the window
    CLOCK_STEP = "clock_step"  # the wall clock was stepped during the window: its length is not what it says
    RESTART = "restart"  # the agent was stopped during the window; completed from the counters at both ends
    # The export counter was not read well for part of the window: its export energy is short by what it
    # counted meanwhile (import, energy and demand, is not affected).
    EXPORT_UNREAD = "export_unread"


FLAG_ORDER = tuple(Flag)
EXPORT_ONLY = frozenset({Flag.EXPORT_UNREAD})  # flags that concern the export figure alone


def flag_text(flags: frozenset[Flag]) -> str:
    """Flags as one comma-separated text in a fixed order ("" for none), as the payload carries them."""
    return ",".join(flag.value for flag in FLAG_ORDER if flag in flags)


# --- window edges on the local wall clock -------------------------------------------------------------

def window_start(ts: float, window_s: int, zone: ZoneInfo) -> float:
    """The start edge (UTC epoch seconds) of the window holding `ts`: the last instant at or before `ts`
    whose local wall-clock time is a whole multiple of the window. Zones whose UTC offsets are multiples of
    the window (config checks it) make every edge a UTC multiple too, shifted by the offset: so a 23- or
    25-hour day simply has 4 windows fewer or more."""
    offset = _offset(ts, zone)
    local = ts + offset
    return local - (local % window_s) - offset


def window_end(start: float, window_s: int, zone: ZoneInfo) -> float:
    """The edge after `start`. With offsets that are multiples of the window it is `start + window_s`; the
    check keeps the edges right should an offset change inside a window all the same."""
    end = start + window_s
    later = window_start(end, window_s, zone)
    return later if start < later <= end else end


def local_iso(ts: float, zone: ZoneInfo) -> str:
    """The local wall-clock time with its offset: unambiguous also in the repeated hour of a DST change."""
    return datetime.fromtimestamp(ts, zone).isoformat()


def _offset(ts: float, zone: ZoneInfo) -> float:
    delta = datetime.fromtimestamp(ts, zone).utcoffset()
    return delta.total_seconds() if delta is not None else 0.0


def offsets_fit(window_s: int, zone: ZoneInfo, around: float, years: int = 3) -> bool:
    """Whether every UTC offset the zone uses around `around` (monthly samples over some years) is a
    multiple of the window, so local edges are equally spaced in UTC."""
    step = 86400 * 30
    return all(_offset(around + i * step, zone) % window_s == 0 for i in range(-12 * years, 12 * years))


# --- the meter ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MeterSpec:
    """One meter (or group) as the tracker needs it; built from the config by energy/config.py."""

    name: str
    import_point: str
    export_point: str | None = None
    kwh_per_unit: float = 1.0  # counter unit -> kWh (Wh: 0.001)
    wrap: float | None = None  # the counter's modulus in its own unit; None: it does not wrap
    resolution: float = 0.0  # one counter step in its own unit (plausibility slack)
    window_s: int = 900
    zone: ZoneInfo = field(default_factory=lambda: ZoneInfo("Asia/Seoul"))
    max_kw: float | None = None  # above this a rise is a replacement; None: not checked
    max_gap_s: float = 10.0  # readings further apart than this leave a gap (coverage, edge_gap)
    target_kw: float | None = None
    levels_kw: tuple[float, ...] = ()  # alarm levels, ascending
    hysteresis_kw: float = 0.0
    lookback_s: float = 60.0  # present power: counter slope over at least this long; alarms wait for it


@dataclass(frozen=True, slots=True)
class WindowRecord:
    """A closed window. `energy_kwh` is import (minus nothing); `export_kwh` when the meter has export."""

    meter: str
    start: float  # UTC epoch seconds of the start edge
    end: float
    start_local: str  # ISO 8601 with offset
    window_s: int
    energy_kwh: float
    demand_kw: float
    export_kwh: float | None
    coverage: float  # share of the window between good readings no further apart than max_gap
    longest_gap_s: float  # longest stretch inside the window without a good reading
    flags: frozenset[Flag]
    counter_start: float | None = None  # the import counter at the edges (its own unit, interpolated);
    counter_end: float | None = None  # None when a wrap/reset/replacement makes the raw edges meaningless

    @property
    def energy_flags(self) -> frozenset[Flag]:
        """The flags that concern `energy_kwh` and `demand_kw`. A meter's `export_unread` concerns its export
        figure alone; a record without one (a group) keeps it only when its energy is net of that export
        (`minus_export`), and then the energy is too high by what the export counter missed."""
        return self.flags - EXPORT_ONLY if self.export_kwh is not None else self.flags

    @property
    def complete(self) -> bool:
        """The energy figures (energy, demand) are a complete, undisturbed measurement."""
        return not self.energy_flags and self.coverage >= 0.999

    @property
    def export_complete(self) -> bool:
        return self.complete and Flag.EXPORT_UNREAD not in self.flags


@dataclass(frozen=True, slots=True)
class LiveDemand:
    """The open window at one reading: energy so far and the demand projected to its end edge."""

    meter: str
    ts: float
    start: float
    end: float
    energy_kwh: float
    power_kw: float  # present power from the counter slope
    projected_kw: float
    alarms: tuple[float, ...]  # the alarm levels (kW) active now
    export_kwh: float = 0.0  # the export counter's energy so far (meters with export; 0 otherwise)
    export_projected_kw: float = 0.0  # the export demand projected to the end edge (a group's net import subtracts it)
    estimated_s: float = 0.0  # seconds at the window's start before the first reading, estimated from present power
    # Seconds until the present power is a slope over the full lookback (0: it is). Until then (after a start,
    # a restart) it is the counter's steps over a few readings, and the projection raises or clears no alarm.
    settling_s: float = 0.0


@dataclass(frozen=True, slots=True)
class AlarmEvent:
    meter: str
    ts: float
    level_kw: float
    raised: bool  # False: cleared
    projected_kw: float
    window_start: float
    target_kw: float | None


Event = WindowRecord | LiveDemand | AlarmEvent


@dataclass(slots=True)
class Sample:
    ts: float
    raw: tuple[float | None, ...]  # the counters as read (import, export)
    energy: tuple[float, ...]  # the continuous series, kWh


@dataclass(slots=True)
class OpenWindow:
    start: float
    end: float
    start_energy: tuple[float, ...] | None  # None: no reading before the start edge (not emitted)
    counter_start: float | None
    covered_s: float = 0.0
    longest_gap_s: float = 0.0
    flags: set[Flag] = field(default_factory=set)
    raw_ok: bool = True  # no wrap/reset/replacement inside: the raw counter edges mean something
    # Without start_energy: the first reading inside the window (time, energy). Live demand estimates the
    # part of the window before it from the present power; the window itself is still not emitted.
    first_seen: tuple[float, tuple[float, ...]] | None = None


class Alarm:
    """The alarm levels of one meter or group: raised once when the projection reaches a level, cleared
    once when it falls below the level minus the hysteresis. Its state outlives windows: a plant over its
    target across a window edge stays in alarm, it is not raised again."""

    def __init__(self, spec: MeterSpec, active: tuple[float, ...] = ()) -> None:
        self.spec = spec
        self.active: set[float] = set(active) & set(spec.levels_kw)

    def update(self, ts: float, projected_kw: float, window_start: float) -> list[AlarmEvent]:
        events = []
        for level in self.spec.levels_kw:
            if level not in self.active and projected_kw >= level:
                self.active.add(level)
                events.append(AlarmEvent(self.spec.name, ts, level, True, projected_kw, window_start,
                                         self.spec.target_kw))
            elif level in self.active and projected_kw < level - self.spec.hysteresis_kw:
                self.active.discard(level)
                events.append(AlarmEvent(self.spec.name, ts, level, False, projected_kw, window_start,
                                         self.spec.target_kw))
        return events


class MeterTracker:
    """Feeds on one meter's counter readings, yields closed windows, live demand and alarm events."""

    def __init__(self, spec: MeterSpec) -> None:
        self.spec = spec
        self.last: Sample | None = None
        self.window: OpenWindow | None = None
        self.alarm = Alarm(spec)
        self._recent: deque[tuple[float, float, float]] = deque()  # (ts, import kWh, export kWh) over the lookback
        self._pending_flags: set[Flag] = set()
        # Alarms are decided on a slope of readings taken since this time (None: any). After a restart the
        # power is still the slope from the last reading before the stop (the energy counted across the outage
        # is real), but an average over an outage is not present power: alarms wait a lookback of new readings.
        self._settle_from: float | None = None
        self._settle_on_next = False

    # --- inputs ---

    def note(self, *flags: Flag) -> None:
        """Flags for the window open at the next reading (clock state, a restart)."""
        self._pending_flags.update(flags)

    def observe(self, ts: float, counters: tuple[float | None, ...], elapsed: float | None = None) -> list[Event]:
        """One good reading of the counters (import, and export when configured) at wall time `ts`.
        `elapsed`: the time since the previous reading by a clock that is never stepped (monotonic), when
        known; it bounds what the counter can plausibly have counted when the wall clock was stepped."""
        spec = self.spec
        last = self.last
        if last is None or self.window is None:
            self._begin(ts, counters)
            return []
        if ts <= last.ts:  # the clock went back (invariant 1): the energy joins the open window
            if ts < last.ts:
                self._pending_flags.add(Flag.CLOCK_STEP)
                elapsed = elapsed if elapsed is not None else math.inf  # unknown: no plausibility bound
            ts = last.ts
        dt = ts - last.ts
        # A wall clock stepped forward makes dt too long, one stepped back too short: the longer of the two
        # is never shorter than the truth, so plausibility never calls counted energy a replacement.
        span = dt if elapsed is None else max(dt, elapsed)
        energy = []
        kinds: set[Flag] = set()
        for index, raw in enumerate(counters):
            previous = last.raw[index]
            if raw is None or previous is None:
                energy.append(last.energy[index])
                continue
            delta, kind = self._delta(previous, raw, span, index)
            if kind is not None:
                kinds.add(kind)
            energy.append(last.energy[index] + delta)
        sample = Sample(ts, tuple(counters), tuple(energy))
        events: list[Event] = []
        window = self.window
        noted = set(self._pending_flags)  # a clock step or restart concerns every window this span crosses
        self._pending_flags.clear()
        if len(counters) > 1 and (counters[1] is None or last.raw[1] is None):
            noted.add(Flag.EXPORT_UNREAD)  # what export counted over this span is not known (invariant 4)
        gap = dt > spec.max_gap_s or Flag.REPLACEMENT in kinds
        while True:
            window.flags |= noted
            self._account(window, last.ts, ts, gap)
            if kinds:
                window.flags |= kinds
                window.raw_ok = False
            if ts < window.end:
                break
            edge = window.end
            at_edge = _interpolate(last, sample, edge)
            if gap:
                window.flags.add(Flag.EDGE_GAP)
            record = self._close(window, at_edge)
            if record is not None:
                events.append(record)
            kinds_after = kinds if sample.ts > edge else set()
            window = self.window = OpenWindow(edge, window_end(edge, spec.window_s, spec.zone), at_edge,
                                              _counter_at(last, sample, edge) if not kinds_after else None,
                                              flags={Flag.EDGE_GAP} if gap else set())
            kinds = kinds_after
        self.last = sample
        events.extend(self._live(sample))
        return events

    # --- internals ---

    def _begin(self, ts: float, counters: tuple[float | None, ...]) -> None:
        k = self.spec.kwh_per_unit
        energy = tuple((raw or 0.0) * k for raw in counters)
        self.last = Sample(ts, tuple(counters), energy)
        start = window_start(ts, self.spec.window_s, self.spec.zone)
        self.window = OpenWindow(start, window_end(start, self.spec.window_s, self.spec.zone), None, None,
                                 flags=set(self._pending_flags), first_seen=(ts, energy))
        self._pending_flags.clear()
        self._recent.clear()
        self._recent.append((ts, energy[0], energy[1] if len(energy) > 1 else 0.0))

    def _delta(self, previous: float, raw: float, dt: float, index: int) -> tuple[float, Flag | None]:
        """kWh between two readings of one counter and what happened to it (None: it just counted)."""
        spec = self.spec
        k = spec.kwh_per_unit
        slack = spec.resolution + 1e-9 * max(abs(previous), abs(raw), 1.0)
        limit = None if spec.max_kw is None or math.isinf(dt) else spec.max_kw * dt / 3600 / k + slack

        def plausible(units: float) -> bool:
            return units >= 0 and (limit is None or units <= limit)

        rise = raw - previous
        if rise >= -slack:
            rise = max(rise, 0.0)
            if plausible(rise):
                return rise * k, None
            return self._estimate(dt, index), Flag.REPLACEMENT
        if spec.wrap is not None:
            wrapped = rise + spec.wrap
            near = previous >= spec.wrap / 2 and raw < spec.wrap / 2
            if wrapped >= 0 and (plausible(wrapped) if limit is not None else near):
                return wrapped * k, Flag.WRAP
        if plausible(raw) and (limit is not None or raw <= previous / 2):
            return raw * k, Flag.RESET
        return self._estimate(dt, index), Flag.REPLACEMENT

    def _estimate(self, dt: float, index: int) -> float:
        """Energy over `dt` at the power seen just before (import only; export counts nothing)."""
        if index != 0:
            return 0.0
        return max(self._power_kw(), 0.0) * dt / 3600

    def _account(self, window: OpenWindow, t0: float, t1: float, gap: bool) -> None:
        a, b = max(t0, window.start), min(t1, window.end)
        if b <= a:
            return
        if not gap:
            window.covered_s += b - a
        window.longest_gap_s = max(window.longest_gap_s, b - a)

    def _close(self, window: OpenWindow, at_edge: tuple[float, ...]) -> WindowRecord | None:
        if window.start_energy is None:
            return None  # invariant 3: nothing before the start edge was seen
        spec = self.spec
        length = window.end - window.start
        energy = max(at_edge[0] - window.start_energy[0], 0.0)
        export = max(at_edge[1] - window.start_energy[1], 0.0) if len(at_edge) > 1 else None
        coverage = min(window.covered_s / length, 1.0) if length > 0 else 0.0
        counter_end = None
        if window.raw_ok and window.counter_start is not None and self.last is not None:
            counter_end = window.counter_start + energy / spec.kwh_per_unit
        return WindowRecord(spec.name, window.start, window.end, local_iso(window.start, spec.zone),
                            round(length), energy, energy * 3600 / length, export, round(coverage, 4),
                            round(window.longest_gap_s, 3), frozenset(window.flags),
                            window.counter_start if counter_end is not None else None, counter_end)

    def _power_kw(self, index: int = 0) -> float:
        """Present power of the import (0) or export (1) counter: its slope over the lookback."""
        recent = self._recent
        if len(recent) < 2:
            return 0.0
        first, last = recent[0], recent[-1]
        t0, t1 = first[0], last[0]
        return (last[1 + index] - first[1 + index]) * 3600 / (t1 - t0) if t1 > t0 else 0.0

    def _live(self, sample: Sample) -> list[Event]:
        recent = self._recent
        exported = len(sample.energy) > 1
        recent.append((sample.ts, sample.energy[0], sample.energy[1] if exported else 0.0))
        horizon = sample.ts - self.spec.lookback_s
        while len(recent) > 2 and recent[1][0] <= horizon:
            recent.popleft()
        window = self.window
        assert window is not None
        power = max(self._power_kw(), 0.0)
        export_power = max(self._power_kw(1), 0.0) if exported else 0.0
        estimated_s = 0.0
        if window.start_energy is not None:
            base = window.start_energy
            so_far = max(sample.energy[0] - base[0], 0.0)
            export_so_far = max(sample.energy[1] - base[1], 0.0) if exported else 0.0
        elif window.first_seen is not None and len(recent) >= 2:
            # The first window after commissioning: nothing was read before its start edge. What it drew
            # before the first reading is estimated from the present power, and says so (estimated_s).
            first_ts, base = window.first_seen
            estimated_s = max(first_ts - window.start, 0.0)
            so_far = max(sample.energy[0] - base[0], 0.0) + power * estimated_s / 3600
            export_so_far = (max(sample.energy[1] - base[1], 0.0) + export_power * estimated_s / 3600
                             if exported else 0.0)
        else:
            return []  # one reading only: no power yet to estimate from
        spec = self.spec
        length = window.end - window.start
        left_h = max(window.end - sample.ts, 0.0) / 3600
        projected = (so_far + power * left_h) * 3600 / length
        export_projected = (export_so_far + export_power * left_h) * 3600 / length if exported else 0.0
        # A slope over a few readings is the counter's steps, not power (a 1 Wh counter read 200 ms apart
        # steps by 54 or 72 kW at 61 kW): the alarm decides on a slope the full lookback long.
        if self._settle_on_next:
            self._settle_from, self._settle_on_next = sample.ts, False
        since = recent[0][0] if self._settle_from is None else max(recent[0][0], self._settle_from)
        settling_s = max(spec.lookback_s - (sample.ts - since), 0.0)
        events: list[Event] = list(self.alarm.update(sample.ts, projected, window.start)) if not settling_s else []
        events.append(LiveDemand(spec.name, sample.ts, window.start, window.end, so_far, power, projected,
                                 tuple(sorted(self.alarm.active)), export_so_far, export_projected, estimated_s,
                                 settling_s))
        return events

    # --- state (saved by energy/stage.py) ---

    def snapshot(self) -> dict[str, object]:
        """What a restart needs, as JSON-able values."""
        last, window = self.last, self.window
        return {
            "last": None if last is None else {"ts": last.ts, "raw": list(last.raw), "energy": list(last.energy)},
            "window": None if window is None else {
                "start": window.start, "end": window.end,
                "start_energy": None if window.start_energy is None else list(window.start_energy),
                "counter_start": window.counter_start, "covered_s": window.covered_s,
                "longest_gap_s": window.longest_gap_s, "flags": sorted(f.value for f in window.flags),
                "raw_ok": window.raw_ok,
                "first_seen": None if window.first_seen is None else [window.first_seen[0],
                                                                      list(window.first_seen[1])]},
            "alarms": sorted(self.alarm.active),
        }

    def restore(self, state: dict[str, object]) -> None:
        """Resume from a snapshot: the open window is completed at the next reading after its end edge
        and flagged `restart` (the readings of the outage are missing)."""
        last, window = state.get("last"), state.get("window")
        if isinstance(last, dict) and isinstance(window, dict):
            # The counters as this spec reads them (import, and export when configured): a state saved before
            # an export counter was added gets one that was never read, so the spans until it is read carry
            # export_unread (invariant 4); one saved with an export counter since removed drops it.
            n = 1 if self.spec.export_point is None else 2

            def fit(values: Sequence[float | None], fill: float | None) -> tuple[float | None, ...]:
                return (*values[:n], *(fill,) * (n - len(values[:n])))

            self.last = Sample(float(last["ts"]), fit(last["raw"], None),
                               fit([float(e) for e in last["energy"]], 0.0))
            start_energy = window["start_energy"]
            first_seen = _first_seen(window.get("first_seen"))
            self.window = OpenWindow(
                float(window["start"]), float(window["end"]),
                None if start_energy is None else fit([float(e) for e in start_energy], 0.0),
                window["counter_start"], float(window["covered_s"]), float(window["longest_gap_s"]),
                {Flag(f) for f in window["flags"]} | {Flag.RESTART}, bool(window["raw_ok"]),
                None if first_seen is None else (first_seen[0], fit(first_seen[1], 0.0)))
            self._recent.clear()
            energy = self.last.energy
            self._recent.append((self.last.ts, energy[0], energy[1] if len(energy) > 1 else 0.0))
            self._settle_on_next = True  # alarms wait for a lookback of readings after the restart
        alarms = state.get("alarms")
        if isinstance(alarms, list):
            self.alarm = Alarm(self.spec, tuple(float(a) for a in alarms))


def _first_seen(saved: object) -> tuple[float, tuple[float, ...]] | None:
    """A saved `first_seen` (absent in state files written before it existed)."""
    if not isinstance(saved, list) or len(saved) != 2:
        return None
    return float(saved[0]), tuple(float(e) for e in saved[1])


def _interpolate(before: Sample, after: Sample, edge: float) -> tuple[float, ...]:
    if after.ts <= before.ts:
        return after.energy
    share = (edge - before.ts) / (after.ts - before.ts)
    share = min(max(share, 0.0), 1.0)
    return tuple(e0 + (e1 - e0) * share for e0, e1 in zip(before.energy, after.energy, strict=True))


def _counter_at(before: Sample, after: Sample, edge: float) -> float | None:
    r0, r1 = before.raw[0], after.raw[0]
    if r0 is None or r1 is None or after.ts <= before.ts:
        return r1
    return r0 + (r1 - r0) * min(max((edge - before.ts) / (after.ts - before.ts), 0.0), 1.0)

