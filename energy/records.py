"""How windows and alarm events travel: as polls of their own streams, through the same buffer as readings.

A window of meter `incomer-1` is a poll of the stream `incomer-1/demand`, time-stamped at its end edge,
whose readings are the window's figures; an alarm event is a poll of `incomer-1/alarm`. So they get the
same gapless sequence numbers, are deleted only after PUBACK, and are encoded in JSON or the compact
encoding by the same encoders, with no change to the writer or the uplink. The stream name becomes the
`{device}` of the data topic: `edge/<site>/<gateway>/data/incomer-1/demand`, one level below the meter's
readings, so `data/+` subscribers see readings only and `data/+/demand` windows only (docs/payload.md).

Live demand is not buffered: it is out of date a second later. It is published, retained, on the demand
state topic by the uplink when connected (`live_payload`); with Sparkplug also as metrics of the meter's
device in the folder "demand/live" (`live_poll`: the same figures, rounded alike).
"""

from __future__ import annotations

import json
import math
from typing import Any

from agent.model import PollResult, Quality, Reading
from agent.sparkplug import LIVE_FOLDER  # a stream below the windows': "incomer-1/demand/live"
from energy.history import StoredWindow
from energy.windows import AlarmEvent, LiveDemand, WindowRecord, flag_text, local_iso

WINDOW_STREAM = "demand"
ALARM_STREAM = "alarm"
LIVE_SCHEMA = "edge-agent/demand-state/v1"


def window_stream(meter: str) -> str:
    return f"{meter}/{WINDOW_STREAM}"


def alarm_stream(meter: str) -> str:
    return f"{meter}/{ALARM_STREAM}"


def window_poll(record: WindowRecord) -> PollResult:
    """The window as a poll at its end edge. Energy and demand are "good" for a complete window, else
    "uncertain" with the reason (its flags and coverage), as a reading from a doubtful source would be."""
    flags = flag_text(record.flags)
    if record.complete:
        quality, reason = Quality.GOOD, None
    else:
        quality = Quality.UNCERTAIN
        reason = ", ".join(part for part in (flag_text(record.energy_flags), f"coverage {record.coverage:.3f}"
                                             if record.coverage < 0.999 else "") if part)
    readings = [
        Reading("window_start", record.start_local),
        Reading("window_s", record.window_s, "s"),
        Reading("energy", round(record.energy_kwh, 6), "kWh", quality, reason),
        Reading("demand", round(record.demand_kw, 4), "kW", quality, reason),
    ]
    if record.export_kwh is not None:
        if record.export_complete:
            readings.append(Reading("export_energy", round(record.export_kwh, 6), "kWh"))
        else:  # a lower bound when the export counter went unread (the import may still be complete)
            why = ", ".join(part for part in (flags, f"coverage {record.coverage:.3f}"
                                              if record.coverage < 0.999 else "") if part)
            readings.append(Reading("export_energy", round(record.export_kwh, 6), "kWh", Quality.UNCERTAIN, why))
    readings += [Reading("coverage", record.coverage), Reading("longest_gap", record.longest_gap_s, "s"),
                 Reading("flags", flags)]
    if record.counter_start is not None and record.counter_end is not None:
        readings += [Reading("counter_start", round(record.counter_start, 6)),
                     Reading("counter_end", round(record.counter_end, 6))]
    return PollResult(window_stream(record.meter), record.end, tuple(readings))


def alarm_poll(event: AlarmEvent, zone_of: dict[str, Any]) -> PollResult:
    readings = [
        Reading("alarm", "raised" if event.raised else "cleared"),
        Reading("level", round(event.level_kw, 3), "kW"),
        Reading("projected_demand", round(event.projected_kw, 3), "kW"),
        Reading("window_start", local_iso(event.window_start, zone_of[event.meter])),
    ]
    if event.target_kw is not None:
        readings.append(Reading("target", event.target_kw, "kW"))
    return PollResult(alarm_stream(event.meter), event.ts, tuple(readings))


def settling(live: LiveDemand) -> float:
    """`settling_s` as sent: rounded up to 0.1 s, so that it reads 0 only when alarms are being decided."""
    return math.ceil(live.settling_s * 10) / 10


def live_payload(live: LiveDemand, gateway: str, site: str, zone: Any, latest: StoredWindow | None,
                 target_kw: float | None) -> bytes:
    """The retained current state of a meter or group: the open window so far, its projection, the alarm
    levels active, and the latest closed window."""
    state: dict[str, Any] = {
        "schema": LIVE_SCHEMA, "gateway": gateway, "site": site, "meter": live.meter,
        "ts": live.ts, "window_start": local_iso(live.start, zone), "window_end": local_iso(live.end, zone),
        "energy_kwh": round(live.energy_kwh, 6), "power_kw": round(live.power_kw, 3),
        "projected_kw": round(live.projected_kw, 3), "target_kw": target_kw,
        "alarms_kw": list(live.alarms), "estimated_s": round(live.estimated_s, 1),
        "settling_s": settling(live),
    }
    if latest is not None:
        state["latest_window"] = {"start": latest.start_local, "demand_kw": round(latest.demand_kw, 4),
                                  "energy_kwh": round(latest.energy_kwh, 6), "coverage": latest.coverage,
                                  "flags": latest.flags}
    return json.dumps(state, separators=(",", ":")).encode()


def live_poll(live: LiveDemand, zone: Any, target_kw: float | None) -> PollResult:
    """The live state as readings of the stream "<meter>/demand/live", never buffered: what a Sparkplug host
    charts and alarms on (docs/payload.md, "Sparkplug B"). A host keeps one value per metric, so the alarm
    levels raised are two numbers rather than a list: how many are raised, and the highest (0 when none);
    each keeps its type whatever the alarms do. Rounded as `live_payload` rounds the same figures."""
    readings = [
        Reading("energy_kwh", round(live.energy_kwh, 6), "kWh"),
        Reading("power_kw", round(live.power_kw, 3), "kW"),
        Reading("projected_kw", round(live.projected_kw, 3), "kW"),
        Reading("alarms_raised", len(live.alarms)),
        Reading("alarm_level_kw", float(max(live.alarms, default=0.0)), "kW"),
        Reading("estimated_s", round(live.estimated_s, 1), "s"),
        Reading("settling_s", settling(live), "s"),
        Reading("window_start", local_iso(live.start, zone)),
    ]
    if target_kw is not None:
        readings.append(Reading("target_kw", float(target_kw), "kW"))
    return PollResult(f"{window_stream(live.meter)}/{LIVE_FOLDER}", live.ts, tuple(readings))


def poll_to_json(result: PollResult) -> dict[str, Any]:
    """A derived poll as JSON values, to keep it in the state file's outbox (energy/stage.py)."""
    return {"device": result.device, "ts": result.ts,
            "readings": [[r.point, r.value, r.unit, r.quality.value, r.reason] for r in result.readings]}


def poll_from_json(data: dict[str, Any]) -> PollResult:
    return PollResult(str(data["device"]), float(data["ts"]),
                      tuple(Reading(p, v, u, Quality(q), why) for p, v, u, q, why in data["readings"]))
