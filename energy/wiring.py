"""How the agent puts the energy stage between its pollers and its buffer writer (agent/daemon.py calls
`start_stage`; with no `energy` table in the config there is no stage and polls go to the writer directly).

The stage keeps two files beside the buffer: `energy-state.json` (what a restart needs, energy/stage.py)
and `energy-history.db` (14 months of windows, energy/history.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from agent.model import PollResult
from agent.payload import iso_utc
from energy.clock import ClockWatch
from energy.config import TRIAL_WINDOW_S, plan
from energy.history import History
from energy.records import settling
from energy.stage import EnergyStage
from energy.windows import MeterSpec, local_iso

STATE_FILE = "energy-state.json"
HISTORY_FILE = "energy-history.db"
DEMAND_TOPIC = "{prefix}/{site}/{gateway}/demand/{meter}"

log = logging.getLogger("energy")


def state_dir(config: Any) -> Path:
    return Path(config.buffer.path).parent


async def start_stage(config: Any, writer: Any, uplink: Any, clock: ClockWatch | None = None) -> EnergyStage | None:
    energy = plan(config.devices, config.energy)
    if energy.empty:
        return None
    trials = sorted(name for name, spec in energy.meters.items() if spec.window_s == TRIAL_WINDOW_S)
    if trials:
        log.warning("%s use(s) the 1-minute window, for commissioning trials and demos; no tariff bills "
                    "on it (docs/energy.md)", ", ".join(trials))
    folder = state_dir(config)
    fields = {"prefix": config.mqtt.topic_prefix, "site": config.gateway.site, "gateway": config.gateway.id}

    def publish_live(meter: str, payload: bytes, state: PollResult) -> None:
        # The retained JSON state, and with Sparkplug the same figures as metrics of the meter's device
        # (a group's: the device named like the group, which its windows already are).
        publish = getattr(uplink, "publish_state", None)
        if publish is not None:
            publish(DEMAND_TOPIC.format(meter=meter, **fields), payload, state)

    stage = EnergyStage(energy, folder / STATE_FILE, History(folder / HISTORY_FILE), writer.submit, writer.flush,
                        publish_live, config.gateway.id, config.gateway.site,
                        clock=clock)
    await stage.start()
    return stage


def status_sections(clock: ClockWatch, stage: EnergyStage | None) -> dict[str, Any]:
    """What the status message, /status.json and /metrics carry of the clock (always: every timestamp comes
    from it) and of the energy stage (when there is one): docs/payload.md, "The status topic"."""
    sections: dict[str, Any] = {"clock": clock.figures()}
    if stage is not None:
        figures = stage.figures()
        sections["energy"] = {"meters": figures.meters, "windows": figures.windows,
                              "alarms_active": figures.alarms_active}
    return sections


def page_section(stage: EnergyStage, now: float) -> list[dict[str, Any]]:
    """What the status page shows of each meter and group (agent/webpage.py): its live demand (energy so far
    in the open window, present power, projected demand at the window's end, the alarm levels raised, time
    left), or why there is none yet, and its latest windows, newest first. Built only when a browser asks."""
    shown: list[dict[str, Any]] = []
    for name, tracker in stage.trackers.items():
        item = _page_item(stage, tracker.spec, "meter", now)
        if name not in stage.live and tracker.window is not None and tracker.window.start_energy is None:
            # The first window after commissioning: nothing was read before its start edge (docs/energy.md).
            item["waiting_until"] = local_iso(tracker.window.end, tracker.spec.zone)
        shown.append(item)
    for group in stage.groups:
        item = _page_item(stage, group.spec, "group", now)
        item["members"] = list(group.group.meters)
        shown.append(item)
    return shown


def _page_item(stage: EnergyStage, spec: MeterSpec, kind: str, now: float) -> dict[str, Any]:
    live = stage.live.get(spec.name)
    item: dict[str, Any] = {"name": spec.name, "kind": kind, "window_s": spec.window_s, "target_kw": spec.target_kw,
                            "levels_kw": list(spec.levels_kw), "live": None, "waiting_until": None}
    if live is not None:
        item["live"] = {"ts": iso_utc(live.ts), "window_start": local_iso(live.start, spec.zone),
                        "window_end": local_iso(live.end, spec.zone), "left_s": round(max(live.end - now, 0.0), 1),
                        "ended": now >= live.end, "energy_kwh": round(live.energy_kwh, 4),
                        "power_kw": round(live.power_kw, 2), "projected_kw": round(live.projected_kw, 2),
                        "alarms_kw": list(live.alarms), "estimated_s": round(live.estimated_s, 1),
                        "settling_s": settling(live)}
    item["windows"] = [{"start": w.start_local, "demand_kw": round(w.demand_kw, 3),
                        "energy_kwh": round(w.energy_kwh, 4), "coverage": w.coverage, "longest_gap_s": w.longest_gap_s,
                        "flags": [f for f in w.flags.split(",") if f]}
                       for w in stage.recent.get(spec.name, ())]
    return item


def reload_note(old: Any, new: Any) -> str | None:
    """What a reload does not apply: the energy stage keeps the meters, windows and targets it started with,
    because an open window's edges, counter and state file are tied to them (docs/energy.md). None: nothing
    changed there."""
    if plan(old.devices, old.energy) == plan(new.devices, new.energy):
        return None
    return ("reload: energy tables or groups changed; they take effect at the next restart (demand windows go on "
            "with the running ones until then; docs/energy.md)")
