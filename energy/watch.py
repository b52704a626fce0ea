"""The platform's view of the energy records (`edge-agent monitor`, agent/monitor.py): each meter's or group's
latest window, its live demand and alarm state, and whether its windows arrive as an unbroken sequence.

Windows and alarm events take their sequence numbers from the gateway's one gapless counter, so the monitor
accounts for them like readings (a monitor that skipped them would count every window as a lost reading).
On top of that, windows have their own sequence: each starts where the previous one ended. Checked per
(gateway, meter):
- `missing`: windows between two received ones that have not come (an agent that lost its state file, a
  window given up by the buffer's limits), whatever order they arrive in. Nothing before the first window
  seen is missing: the monitor may have joined late.
- `duplicates`: a window received again with the same values (allowed: at-least-once delivery, an outbox
  replayed after a crash); `conflicting`: received again with different values, which the agent promises
  never happens (docs/energy.md). Missing and conflicting windows make the monitor's report not ok.
Memory: the last `KEPT_WINDOWS` windows per meter, by start.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from energy.records import ALARM_STREAM, LIVE_SCHEMA, WINDOW_STREAM

KEPT_WINDOWS = 2000  # per meter: three weeks of 15-minute windows, to recognise late duplicates


@dataclass(frozen=True)
class MeterReport:
    meter: str
    windows: int               # distinct windows received
    missing: int               # windows between received ones that never arrived
    duplicates: int            # windows received again with the same values
    conflicting: int           # windows received again with different values
    latest_start: str | None   # the latest window: start (local, with offset) ...
    latest_demand_kw: float | None
    latest_flags: str | None
    alarm_events: int
    alarms_kw: tuple[float, ...]  # raised now: from the live state, else from the alarm events
    projected_kw: float | None    # live: projected demand at the open window's end
    live_energy_kwh: float | None
    live_window_start: str | None
    live_estimated_s: float = 0.0  # first window after commissioning: seconds before the first reading, estimated
    live_settling_s: float = 0.0  # after a start or restart: seconds until alarms are decided


@dataclass
class _Meter:
    windows: OrderedDict[float, tuple[Any, ...]] = field(default_factory=OrderedDict)  # start -> values
    ends: dict[float, float] = field(default_factory=dict)  # start -> end, for the kept windows
    newest_end: float | None = None
    missing: int = 0  # holes below the kept windows
    count: int = 0
    duplicates: int = 0
    conflicting: int = 0
    latest: tuple[str, float, str] | None = None  # start text, demand, flags of the newest window
    alarm_events: int = 0
    alarms: set[float] = field(default_factory=set)
    live: dict[str, Any] | None = None


class EnergyView:
    """Fed by the monitor's worker thread; asked by whoever reports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._meters: dict[tuple[str, str], _Meter] = {}

    def records(self, gateway: str, stream: str, polls: list[dict[str, Any]]) -> None:
        """The polls of `<meter>/demand` or `<meter>/alarm`, already validated against the payload schema."""
        meter, _, kind = stream.rpartition("/")
        with self._lock:
            state = self._meters.setdefault((gateway, meter), _Meter())
            for poll in polls:
                values = {r["point"]: r["value"] for r in poll["readings"]}
                if kind == WINDOW_STREAM:
                    self._window(state, poll["ts"], values)
                elif kind == ALARM_STREAM:
                    state.alarm_events += 1
                    level = values.get("level")
                    if isinstance(level, int | float):
                        (state.alarms.add if values.get("alarm") == "raised" else state.alarms.discard)(float(level))

    def live(self, gateway: str, meter: str, body: dict[str, Any]) -> bool:
        """The retained live state; False when it is not one (the caller counts it invalid)."""
        if body.get("schema") != LIVE_SCHEMA or not isinstance(body.get("alarms_kw"), list):
            return False
        with self._lock:
            self._meters.setdefault((gateway, meter), _Meter()).live = body
        return True

    def _window(self, state: _Meter, ts: str, values: dict[str, Any]) -> None:
        start = _epoch(str(values.get("window_start")))
        end = _epoch(ts)
        key = tuple(values.get(name) for name in ("energy", "demand", "export_energy", "coverage", "flags"))
        seen = state.windows.get(start)
        if seen is not None:
            if seen == key:
                state.duplicates += 1
            else:
                state.conflicting += 1
            return
        state.count += 1
        if state.newest_end is None or end > state.newest_end:
            state.newest_end = end
            state.latest = (str(values.get("window_start")), float(values.get("demand") or 0.0),
                            str(values.get("flags") or ""))
        state.windows[start] = key
        state.ends[start] = end
        if len(state.windows) > KEPT_WINDOWS:
            ordered = sorted(state.ends)
            oldest, following = ordered[0], ordered[1]
            state.missing += _holes(oldest, state.ends[oldest], following)  # remembered once forgotten
            del state.windows[oldest], state.ends[oldest]

    def report(self, gateway: str) -> tuple[MeterReport, ...]:
        with self._lock:
            return tuple(_report(meter, state) for (gw, meter), state in sorted(self._meters.items()) if gw == gateway)


def _report(meter: str, state: _Meter) -> MeterReport:
    live = state.live or {}
    alarms = live.get("alarms_kw") if state.live is not None else sorted(state.alarms)
    latest = state.latest
    # Holes between received windows, whatever order they came in: a backlog drains beside the live stream,
    # so a window missing a moment ago may have arrived since.
    ordered = sorted(state.ends)
    missing = state.missing + sum(_holes(a, state.ends[a], b) for a, b in itertools.pairwise(ordered))
    return MeterReport(meter, state.count, missing, state.duplicates, state.conflicting,
                       latest[0] if latest else None, latest[1] if latest else None, latest[2] if latest else None,
                       state.alarm_events, tuple(float(a) for a in alarms or ()), live.get("projected_kw"),
                       live.get("energy_kwh"), live.get("window_start"), float(live.get("estimated_s") or 0.0),
                       float(live.get("settling_s") or 0.0))


def _holes(start: float, end: float, following: float) -> int:
    """Windows that fit between one window and the next received (windows are equally long in UTC: the config
    requires zone offsets that are multiples of the window)."""
    return max(round((following - end) / max(end - start, 1.0)), 0)


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def meter_lines(meters: tuple[MeterReport, ...]) -> list[str]:
    """`edge-agent monitor --verbose`: one line per meter or group."""
    lines = []
    for m in meters:
        flags = f" [{m.latest_flags}]" if m.latest_flags else ""
        latest = "no window yet" if m.latest_start is None else \
            f"latest window {m.latest_start} {m.latest_demand_kw:g} kW{flags}"
        live = "" if m.projected_kw is None else f"  now {m.live_energy_kwh:g} kWh, projected {m.projected_kw:g} kW"
        if m.live_estimated_s:
            live += f" (first {m.live_estimated_s:.0f} s estimated)"
        alarm = f"  ALARM at {', '.join(f'{a:g}' for a in m.alarms_kw)} kW" if m.alarms_kw else \
            f"  alarms decided in {max(1, round(m.live_settling_s))} s" if m.live_settling_s else ""
        problems = f"  MISSING {m.missing}" if m.missing else ""
        problems += f"  CONFLICTING {m.conflicting}" if m.conflicting else ""
        lines.append(f"    {m.meter} demand: windows {m.windows} (dup {m.duplicates}){problems}  {latest}{live}{alarm}")
    return lines
