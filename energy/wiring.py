"""How the agent puts the energy stage between its pollers and its buffer writer (agent/daemon.py calls
`start_stage`; with no `energy` table in the config there is no stage and polls go to the writer directly).

The stage keeps two files beside the buffer: `energy-state.json` (what a restart needs, energy/stage.py)
and `energy-history.db` (14 months of windows, energy/history.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from energy.clock import ClockWatch
from energy.config import TRIAL_WINDOW_S, plan
from energy.history import History
from energy.stage import EnergyStage

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

    def publish_live(meter: str, payload: bytes) -> None:
        publish = getattr(uplink, "publish_state", None)
        if publish is not None:
            publish(DEMAND_TOPIC.format(meter=meter, **fields), payload)

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


def reload_note(old: Any, new: Any) -> str | None:
    """What a reload does not apply: the energy stage keeps the meters, windows and targets it started with,
    because an open window's edges, counter and state file are tied to them (docs/energy.md). None: nothing
    changed there."""
    if plan(old.devices, old.energy) == plan(new.devices, new.energy):
        return None
    return ("reload: energy tables or groups changed; they take effect at the next restart (demand windows go on "
            "with the running ones until then; docs/energy.md)")
