"""The energy stage: sits between the pollers and the buffer writer, passes every poll on unchanged, and
adds the windows and alarm events of the meters and groups it computes (energy/windows.py).

Flow, one way: scheduler -> `EnergyStage.submit(poll)` -> writer (the poll) -> writer (derived polls,
energy/records.py). A poll of a device without an energy table costs one dict lookup.

State and its invariants (`energy-state.json` beside the buffer, replaced atomically: written to a
temporary file, fsynced, renamed over the old one, the folder fsynced):
1. The state holds, per meter, the last good counter reading, the open window (its start edge's energy,
   coverage so far, flags) and the active alarm levels; per group, the member windows still waiting for
   the others; and the outbox: derived polls handed to the writer but not yet known to be committed.
2. A window or alarm event is decided exactly once: the state that contains its decision (the tracker past
   its edge, the record in the outbox) is on disk before the record is handed to the writer. A crash
   before that write loses nothing: the state on disk is from before the edge, so the window is decided
   again after the restart, and the first decision never reached the buffer.
3. The outbox is emptied once the writer has committed what was handed to it (`flush`); after a crash, what
   the outbox holds is handed to the writer again at start, byte for byte the same: a record may reach the
   platform twice (identified by stream and time), never with two different values.
4. Between decisions the state is saved every `save_interval` seconds: a restart resumes from the last
   counter reading saved, so a window open across an outage is completed from the counters at both ends
   (interpolated across the outage) and flagged `restart` and `edge_gap`.
5. A state file that cannot be read is moved aside and logged, and the stage starts afresh (the first
   window of each meter is then not emitted): the agent never crash-loops on it.

For the status page the stage keeps, per meter and group, its latest live demand and its last
`WINDOWS_KEPT` windows (`live`, `recent`): one dict assignment per live demand it computes anyway, one
bounded deque per meter; filled from the local history at start so the page shows windows at once, and the
retained live state's `latest_window` is the newest of them (the page and the platform see the same one).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.health import FailureLog
from agent.model import PollResult, Quality
from energy.clock import ClockState, ClockWatch, StepDetector, read_clock_state
from energy.config import EnergyPlan, GroupSpec
from energy.history import History, StoredWindow
from energy.records import alarm_poll, live_payload, live_poll, poll_from_json, poll_to_json, window_poll
from energy.windows import (
    EXPORT_ONLY,
    Alarm,
    AlarmEvent,
    Event,
    Flag,
    LiveDemand,
    MeterSpec,
    MeterTracker,
    WindowRecord,
    flag_text,
    local_iso,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1
SAVE_INTERVAL = 10.0
LIVE_INTERVAL = 1.0  # the retained live state of a meter or group is published at most this often ...
# ... and at once when its raised alarm levels change: a meter polled every 100 ms, or a group whose members
# each report, must not put ten retained messages a second on the broker that nobody reads that fast.
WINDOWS_KEPT = 4  # the latest windows of each meter and group kept in memory for the status page


@dataclass(frozen=True, slots=True)
class EnergyFigures:
    """For status and /metrics (the clock's figures are the agent's ClockWatch's, energy/wiring.py)."""

    meters: int
    windows: int
    alarms_active: int


class GroupTracker:
    """A sum of meters: its window closes when every member's window with that start has closed."""

    def __init__(self, group: GroupSpec) -> None:
        self.group = group
        self.spec = group.spec
        self.pending: dict[float, dict[str, WindowRecord]] = {}
        self.live: dict[str, LiveDemand] = {}
        self.alarm = Alarm(group.spec)

    def window(self, record: WindowRecord) -> WindowRecord | None:
        members = self.pending.setdefault(record.start, {})
        members[record.meter] = record
        if len(members) < len(self.group.meters):
            return None
        del self.pending[record.start]
        for older in [start for start in self.pending if start < record.start]:
            # A member that never closes this window (removed, or its first window after commissioning):
            # the others wait no longer than the next window's close.
            log.warning("group %s: window from %s lacks %s; not sent", self.spec.name,
                        local_iso(older, self.spec.zone),
                        ", ".join(sorted(set(self.group.meters) - set(self.pending[older]))))
            del self.pending[older]
        parts = [members[m] for m in self.group.meters]
        energy = sum(p.energy_kwh for p in parts)
        if self.group.minus_export:
            energy -= sum(p.export_kwh or 0.0 for p in parts)
        length = record.end - record.start
        flags = frozenset().union(*(p.flags for p in parts))
        if not self.group.minus_export:
            flags -= EXPORT_ONLY  # the members' export enters no figure of this group
        return WindowRecord(self.spec.name, record.start, record.end, local_iso(record.start, self.spec.zone),
                            record.window_s, energy, energy * 3600 / length, None,
                            min(p.coverage for p in parts), max(p.longest_gap_s for p in parts), flags)

    def observe(self, live: LiveDemand) -> list[Event]:
        """A member's live demand: the group's is the sum of its members' in the same window, net of their
        export with `minus_export`, as the group's windows are (a plant whose solar export offsets its
        import is not over its target)."""
        self.live[live.meter] = live
        current = [c for c in (self.live.get(m) for m in self.group.meters) if c is not None]
        if len(current) < len(self.group.meters) or any(c.start != live.start for c in current):
            return []
        net = self.group.minus_export
        total = sum(c.projected_kw - (c.export_projected_kw if net else 0.0) for c in current)
        energy = sum(c.energy_kwh - (c.export_kwh if net else 0.0) for c in current)
        # The group decides once every member does: by when each said it would (a member polled less often
        # than the others has settled by now if its time has come, though it has not said so since).
        settling_s = max(max(c.ts + c.settling_s for c in current) - live.ts, 0.0)
        events: list[Event] = list(self.alarm.update(live.ts, total, live.start)) if not settling_s else []
        events.append(LiveDemand(self.spec.name, live.ts, live.start, live.end, energy,
                                 sum(c.power_kw for c in current), total, tuple(sorted(self.alarm.active)),
                                 estimated_s=max(c.estimated_s for c in current), settling_s=settling_s))
        return events


class EnergyStage:
    def __init__(self, plan: EnergyPlan, state_path: Path, history: History | None,
                 submit: Callable[[PollResult], Awaitable[None]], flush: Callable[[], Awaitable[None]],
                 publish_live: Callable[[str, bytes, PollResult], None] | None = None, gateway: str = "",
                 site: str = "",
                 clock_state: Callable[[], ClockState] = read_clock_state,
                 detector: StepDetector | None = None, monotonic: Callable[[], float] = time.monotonic,
                 save_interval: float = SAVE_INTERVAL, clock: ClockWatch | None = None) -> None:
        """`clock`: the agent's clock watch (shared with the status message); without one the stage builds its
        own from `clock_state` and `detector`."""
        self.plan = plan
        self._state_path = state_path
        self._history = history
        self._submit, self._flush = submit, flush
        self._publish_live = publish_live
        self._gateway, self._site = gateway, site
        self._monotonic = monotonic
        self.clock = clock or ClockWatch(clock_state, detector or StepDetector(monotonic=monotonic), monotonic)
        self._steps_seen = self.clock.steps
        self._save_interval = save_interval
        self.trackers = {name: MeterTracker(spec) for name, spec in plan.meters.items()}
        self.groups = [GroupTracker(group) for group in plan.groups]
        self._group_of: dict[str, list[GroupTracker]] = {}
        for group in self.groups:
            for meter in group.group.meters:
                self._group_of.setdefault(meter, []).append(group)
        self._specs: dict[str, MeterSpec] = {**plan.meters, **{g.spec.name: g.spec for g in self.groups}}
        self._zones = {name: spec.zone for name, spec in self._specs.items()}
        self._outbox: list[dict[str, Any]] = []
        self._seen_mono: dict[str, float] = {}
        self._failing: set[str] = set()  # meters whose derivation raised (logged once until it works again)
        self._export_unread: set[str] = set()  # meters whose export counter is not being read (logged once)
        self._saved_at = 0.0
        self._live_sent: dict[str, tuple[float, tuple[float, ...]]] = {}  # (monotonic time, alarms) per name
        # For the status page (agent/webpage.py): the latest live demand and windows (newest first) per name.
        self.live: dict[str, LiveDemand] = {}
        self.recent: dict[str, deque[StoredWindow]] = {name: deque(maxlen=WINDOWS_KEPT) for name in self._specs}
        self.windows_closed = 0
        self._failures = FailureLog("energy state file", log)

    # --- start and stop ---

    async def start(self) -> None:
        """Load the state (invariant 5) and hand the writer what the outbox held (invariant 3)."""
        state = self._load()
        for name, snapshot in state.get("meters", {}).items():
            tracker = self.trackers.get(name)
            if tracker is not None and isinstance(snapshot, dict):
                tracker.restore(snapshot)
        groups = state.get("groups", {})
        for group in self.groups:
            saved = groups.get(group.spec.name, {})
            for start, members in saved.get("pending", {}).items():
                group.pending[float(start)] = {m: _record_from_json(r) for m, r in members.items()}
            group.alarm = Alarm(group.spec, tuple(saved.get("alarms", ())))
        outbox = [poll_from_json(item) for item in state.get("outbox", [])]
        if outbox:
            log.info("energy: handing %d window/alarm record(s) to the buffer again (the agent stopped before "
                     "they were known to be stored; a platform may see them twice, with the same values)",
                     len(outbox))
            self._outbox = [poll_to_json(p) for p in outbox]
            for poll in outbox:
                await self._submit(poll)
            await self._flush()
            self._outbox = []
        self._save()
        self._recall_windows()

    def _recall_windows(self) -> None:
        """The last windows from the local history, so the page has them before the next window closes."""
        if self._history is None:
            return
        try:
            stored = self._history.latest(WINDOWS_KEPT)
        except Exception as exc:  # noqa: BLE001 - the page's history must never stop the agent
            log.error("energy history: cannot read the last windows for the status page: %s", exc)
            return
        for window in stored:  # newest first per meter
            recent = self.recent.get(window.meter)
            if recent is not None and len(recent) < WINDOWS_KEPT:
                recent.append(window)

    async def close(self, committed: bool = True) -> None:
        """At shutdown, after the pollers stopped and the writer was stopped: `committed` says whether it dealt
        with everything handed to it. If not (the disk did not answer), the outbox stays in the saved state and
        is handed over again at the next start (invariant 3)."""
        if committed:
            self._outbox = []
        self._save()
        if self._history is not None:
            self._history.close()

    # --- the data path ---

    async def submit(self, result: PollResult) -> None:
        await self._submit(result)  # the poll is the writer's first: nothing below can lose it
        if result.device not in self.trackers:
            return
        try:
            derived = self._derive(result)
        except Exception:  # a bug here must cost windows, never the meter's poll task or its readings
            if result.device not in self._failing:
                self._failing.add(result.device)
                log.exception("energy: %s: demand windows stopped by an internal error (its readings are still "
                              "stored and sent); please report this with the lines above", result.device)
            return
        self._failing.discard(result.device)
        if derived:
            await self._hand_over(derived)  # the writer's own errors are the agent's to handle, as for a poll
        elif self._monotonic() - self._saved_at >= self._save_interval:
            self._save()

    def _derive(self, result: PollResult) -> list[PollResult]:
        """The windows and alarms this poll closes or raises, as polls of their own (none for most polls)."""
        tracker = self.trackers[result.device]
        counters = self._counters(tracker.spec, result)
        if counters is None:
            return []
        now_mono = self._monotonic()
        if self.clock.check() != self._steps_seen:  # found here or by the status message: flagged all the same
            self._steps_seen = self.clock.steps
            for each in self.trackers.values():
                each.note(Flag.CLOCK_STEP)
        clock = self.clock.state()
        if clock.known and not clock.synchronised:
            tracker.note(Flag.CLOCK_UNSYNCED)
        previous = self._seen_mono.get(result.device)
        self._seen_mono[result.device] = now_mono
        events = tracker.observe(result.ts, counters, None if previous is None else now_mono - previous)
        derived: list[PollResult] = []
        for event in events:
            self._handle(event, derived)
        return derived

    def _handle(self, event: Event, derived: list[PollResult]) -> None:
        if isinstance(event, WindowRecord):
            self._window(event, derived)
            for group in self._group_of.get(event.meter, ()):
                combined = group.window(event)
                if combined is not None:
                    self._window(combined, derived)
        elif isinstance(event, AlarmEvent):
            log.warning("demand alarm %s: %s projected %.1f kW at the end of the window from %s (level %.1f kW)",
                        "RAISED" if event.raised else "cleared", event.meter, event.projected_kw,
                        local_iso(event.window_start, self._zones[event.meter]), event.level_kw)
            derived.append(alarm_poll(event, self._zones))
        elif isinstance(event, LiveDemand):
            self._live(event)
            for group in self._group_of.get(event.meter, ()):
                for group_event in group.observe(event):
                    self._handle(group_event, derived)

    def _window(self, record: WindowRecord, derived: list[PollResult]) -> None:
        self.windows_closed += 1
        self.recent[record.meter].appendleft(StoredWindow(
            record.meter, record.start_local, record.energy_kwh, record.demand_kw, record.coverage,
            record.longest_gap_s, flag_text(record.flags)))
        derived.append(window_poll(record))
        if self._history is not None:
            try:
                self._history.add(record, self._zones[record.meter])
            except Exception as exc:  # noqa: BLE001 - the local history must never stop the data path
                log.error("energy history: cannot add the window of %s: %s", record.meter, exc)

    def _live(self, live: LiveDemand) -> None:
        self.live[live.meter] = live
        if self._publish_live is None:
            return
        now = self._monotonic()
        sent = self._live_sent.get(live.meter)
        if sent is not None and sent[1] == live.alarms and 0 <= now - sent[0] < LIVE_INTERVAL:
            return
        self._live_sent[live.meter] = (now, live.alarms)
        spec = self._specs[live.meter]
        recent = self.recent[live.meter]
        self._publish_live(live.meter, live_payload(live, self._gateway, self._site, spec.zone,
                                                    recent[0] if recent else None, spec.target_kw),
                           live_poll(live, spec.zone, spec.target_kw))

    async def _hand_over(self, derived: list[PollResult]) -> None:
        """Invariants 2 and 3: decided on disk, then handed over, then known stored."""
        self._outbox.extend(poll_to_json(p) for p in derived)
        self._save()
        for poll in derived:
            await self._submit(poll)
        await self._flush()
        self._outbox = []

    def _counters(self, spec: MeterSpec, result: PollResult) -> tuple[float | None, ...] | None:
        """The poll's counters (import, and export when configured), or None when the import was not read
        well: a missed poll, which the edges interpolate over. An export not read well is None on its own
        (energy/windows.py invariant 4), so a meter whose export register fails still gets its windows;
        logged once when it starts failing and once when it is read again."""
        found: dict[str, float] = {}
        why: dict[str, str] = {}
        for reading in result.readings:
            point = reading.point
            if point == spec.import_point or point == spec.export_point:
                value = reading.value
                if reading.quality is not Quality.GOOD or not isinstance(value, int | float) or \
                        isinstance(value, bool) or value != value or value in (float("inf"), float("-inf")):
                    why[point] = reading.reason or f"quality {reading.quality.value}"
                    continue
                found[point] = float(value)
        if spec.import_point not in found:
            return None
        if spec.export_point is None:
            return (found[spec.import_point],)
        export = found.get(spec.export_point)
        unread = export is None
        if unread != (spec.name in self._export_unread):
            if unread:
                self._export_unread.add(spec.name)
                log.warning("energy: %s export counter %s not read (%s); its windows carry export_unread and "
                            "their export energy is short until it is read again", spec.name, spec.export_point,
                            why.get(spec.export_point, "not in the poll"))
            else:
                self._export_unread.discard(spec.name)
                log.info("energy: %s export counter %s read again", spec.name, spec.export_point)
        return (found[spec.import_point], export)

    # --- state file ---

    def _load(self) -> dict[str, Any]:
        path = self._state_path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.error("energy: cannot read %s (%s); starting without it", path, exc.strerror or exc)
            return {}
        try:
            state = json.loads(text)
            if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
                raise ValueError(f"unknown state version {state.get('version') if isinstance(state, dict) else '?'}")
            return state
        except ValueError as exc:
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            os.replace(path, aside)
            log.error("energy: the state file %s is unreadable (%s); moved aside to %s and started afresh: the "
                      "window open at the restart is not sent", path, exc, aside)
            return {}

    def snapshot(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "saved": time.time(),
            "meters": {name: tracker.snapshot() for name, tracker in self.trackers.items()},
            "groups": {g.spec.name: {"alarms": sorted(g.alarm.active),
                                     "pending": {repr(start): {m: _record_to_json(r) for m, r in members.items()}
                                                 for start, members in g.pending.items()}}
                       for g in self.groups},
            "outbox": self._outbox,
        }

    def _save(self) -> None:
        self._saved_at = self._monotonic()
        try:
            write_atomically(self._state_path, json.dumps(self.snapshot(), separators=(",", ":")).encode())
        except OSError as exc:
            self._failures.failed(exc, "windows go on being computed; a restart would resume from an older state")
        else:
            self._failures.succeeded()

    def figures(self) -> EnergyFigures:
        active = sum(len(t.alarm.active) for t in self.trackers.values()) + \
            sum(len(g.alarm.active) for g in self.groups)
        return EnergyFigures(len(self.trackers), self.windows_closed, active)


def write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _record_to_json(record: WindowRecord) -> dict[str, Any]:
    return {"meter": record.meter, "start": record.start, "end": record.end, "start_local": record.start_local,
            "window_s": record.window_s, "energy_kwh": record.energy_kwh, "demand_kw": record.demand_kw,
            "export_kwh": record.export_kwh, "coverage": record.coverage, "longest_gap_s": record.longest_gap_s,
            "flags": sorted(f.value for f in record.flags)}


def _record_from_json(data: dict[str, Any]) -> WindowRecord:
    return WindowRecord(data["meter"], data["start"], data["end"], data["start_local"], data["window_s"],
                        data["energy_kwh"], data["demand_kw"], data["export_kwh"], data["coverage"],
                        data["longest_gap_s"], frozenset(Flag(f) for f in data["flags"]))
