"""The energy configuration: a device's `energy` table and the plant's `[energy]` groups.

```toml
[[devices]]
name = "incomer-1"
profile = "abb_m4m30"            # has energy_active_import / energy_active_export
...
[devices.energy]                 # present: this device is a meter whose demand is computed
target_kw = 500                  # optional: alarm levels are percent of it
alarm_levels = [90, 100]         # percent of target_kw (default [100] with a target)

[[energy.groups]]                # optional: a plant-level sum
name = "plant"
meters = ["incomer-1", "incomer-2"]
minus_export = true
target_kw = 900
```

Everything is checked with the rest of the file (agent/config.py calls `problems`), each problem with its
dotted path, before anything starts. This module only knows a device's `points` by duck typing (`name`,
`unit`, and for Modbus `type` and `scale`), so it works for every driver.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from agent.names import Name, PointName
from energy.windows import MeterSpec, offsets_fit

_UNITS = {"wh": 0.001, "kwh": 1.0, "mwh": 1000.0}
# A register type's modulus: a counter held in it wraps to 0 (or to its minimum) past it.
_MODULUS = {"uint16": 1 << 16, "int16": 1 << 16, "uint32": 1 << 32, "int32": 1 << 32,
            "uint64": 1 << 64, "int64": 1 << 64}
WINDOWS_S = (60, 300, 900, 1800, 3600)
# 1 minute is for commissioning trials and the demo: a technician sees a window close and an alarm fire while
# standing at the cabinet. No tariff bills on it, and a 1 s poll moves its edges by up to 2 % of its energy.
TRIAL_WINDOW_S = 60


def _window(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError('expected "15m", "5m", "30m", "60m" or "1m"')
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*(m|min|h|s)?\s*", value)
        if not match:
            raise ValueError('expected "15m", "5m", "30m", "60m" or "1m"')
        return int(match.group(1)) * {"s": 1, "m": 60, "min": 60, "h": 3600, None: 60}[match.group(2)]
    return value


def _seconds(value: Any) -> Any:
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
        if not match:
            raise ValueError('expected a duration such as 10, "10s" or "2m"')
        return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return value


Window = Annotated[int, BeforeValidator(_window)]
Seconds = Annotated[float, BeforeValidator(_seconds), Field(gt=0, le=86400)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Demand(_Strict):
    window: Window = Field(900, description='Demand window: "5m", "15m" (default; Korean tariffs), "30m" or '
                                            '"60m", aligned to the local wall clock; "1m" for commissioning '
                                            'trials and the demo only, never for billing.')
    timezone: str = Field("Asia/Seoul", description="IANA time zone of the window edges (local wall clock).")
    target_kw: float | None = Field(None, gt=0, description="Target demand in kW; alarm levels are percent of it.")
    alarm_levels: list[Annotated[float, Field(gt=0, le=1000)]] | None = Field(
        None, description="Alarm levels in percent of target_kw, e.g. [90, 100]. Default [100] with a target.")
    hysteresis: float = Field(5.0, ge=0, le=100, description="An alarm clears when the projection falls this many "
                                                             "percent of target_kw below its level.")

    @field_validator("window")
    @classmethod
    def _allowed_window(cls, value: int) -> int:
        if value not in WINDOWS_S:
            raise ValueError('the window must be "5m", "15m", "30m" or "60m" ("1m" for commissioning trials)')
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}: expected an IANA name such as \"Asia/Seoul\"") from exc
        return value

    def demand_problems(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if self.alarm_levels is not None and self.target_kw is None:
            out.append(("alarm_levels", "alarm levels are percent of target_kw: set target_kw"))
        if not offsets_fit(self.window, ZoneInfo(self.timezone), time.time()):
            out.append(("timezone", f"{self.timezone} uses a UTC offset that is not a multiple of the "
                                    f"{self.window // 60}-minute window: choose a shorter window"))
        return out

    def levels_kw(self) -> tuple[float, ...]:
        if self.target_kw is None:
            return ()
        levels = self.alarm_levels if self.alarm_levels is not None else [100.0]
        return tuple(sorted({self.target_kw * level / 100 for level in levels}))


class EnergySection(_Demand):
    """A device's `energy` table: present, the device is a meter whose windows are computed."""

    import_point: PointName = Field(
        "energy_active_import", description="The point holding the active energy import counter.")
    export_point: PointName | Literal[False] | None = Field(
        None, description="The export counter; default energy_active_export when the device has it; false: none.")
    counter_unit: Literal["Wh", "kWh", "MWh"] | None = Field(
        None, description="Unit of the counters; default the import point's unit.")
    wrap: float | None = Field(None, gt=0, description="Counter value at which it wraps to 0 (in counter_unit); "
                                                       "default from the register type (uint32: 4294967296 x scale; "
                                                       "none for a point with carry_register).")
    max_kw: float | None = Field(None, gt=0, description="Largest power the installation can draw: a rise beyond it "
                                                         "is a meter replacement. Default 10 x target_kw.")
    max_gap: Seconds | None = Field(None, description="Readings further apart leave a gap (coverage, edge_gap). "
                                                      "Default 3 x poll_interval, at least 10 s.")


class GroupConfig(_Demand):
    name: Name = Field(description="The group's name; its records' topic level.")
    meters: list[Name] = Field(min_length=1, description="Devices with an energy "
                                                                                        "table, summed.")
    minus_export: bool = Field(False, description="Subtract the members' export energy (net import).")


class PlantEnergy(_Strict):
    """The top-level `[energy]` table."""

    groups: list[GroupConfig] = Field(default_factory=list)


# --- resolution into specs ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class GroupSpec:
    spec: MeterSpec  # name, window, zone, target and levels of the group
    meters: tuple[str, ...]
    minus_export: bool


@dataclass(frozen=True, slots=True)
class EnergyPlan:
    meters: dict[str, MeterSpec]  # device name -> spec
    groups: tuple[GroupSpec, ...]

    @property
    def empty(self) -> bool:
        return not self.meters


def _point(device: Any, name: str) -> Any | None:
    for point in getattr(device, "points", ()):
        if point.name == name:
            return point
    return None


def _export_name(device: Any, section: EnergySection) -> str | None:
    if section.export_point is False:
        return None
    if section.export_point is None:
        return "energy_active_export" if _point(device, "energy_active_export") is not None else None
    return section.export_point


def device_problems(device: Any) -> list[tuple[str, str]]:
    """A device's `energy` table checked against its points, as (path inside the device, message)."""
    section: EnergySection | None = getattr(device, "energy", None)
    if section is None:
        return []
    out = [(f"energy.{where}", message) for where, message in section.demand_problems()]
    names = [point.name for point in getattr(device, "points", ())]
    for key, name in (("import_point", section.import_point), ("export_point", _export_name(device, section))):
        if name is not None and name not in names:
            out.append((f"energy.{key}", f"the device has no point {name!r}; its points: {', '.join(names)}"))
    point = _point(device, section.import_point)
    if point is not None and section.counter_unit is None and _unit_factor(getattr(point, "unit", None)) is None:
        out.append(("energy.counter_unit", f"the point {point.name!r} has unit {getattr(point, 'unit', None)!r}: "
                                           'say the counter\'s unit, "Wh", "kWh" or "MWh"'))
    kind = getattr(point, "type", None)
    if point is not None and kind is not None and kind not in _MODULUS and not kind.startswith("float"):
        out.append(("energy.import_point", f"a {kind} cannot hold an energy counter"))
    return out


def group_problems(plant: PlantEnergy, devices: list[Any]) -> list[tuple[str, str]]:
    """The groups checked against the devices, as (dotted path from the top, message)."""
    meters = {d.name: d.energy for d in devices if getattr(d, "energy", None) is not None}
    names = {d.name for d in devices}
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for index, group in enumerate(plant.groups):
        where = f"energy.groups[{index}]"
        if group.name in names or group.name in seen:
            out.append((f"{where}.name", f"{group.name!r} is already a device or group name: records would mix"))
        seen.add(group.name)
        out.extend((f"{where}.{sub}", message) for sub, message in group.demand_problems())
        for position, meter in enumerate(group.meters):
            section = meters.get(meter)
            if section is None:
                out.append((f"{where}.meters[{position}]", f"{meter!r} is not a device with an energy table"
                            + (f"; meters: {', '.join(sorted(meters))}" if meters else "")))
            elif section.window != group.window or section.timezone != group.timezone:
                out.append((f"{where}.meters[{position}]", f"{meter!r} has window {section.window // 60} min in "
                            f"{section.timezone}; the group has {group.window // 60} min in {group.timezone}: "
                            "they must agree"))
        if len(set(group.meters)) != len(group.meters):
            out.append((f"{where}.meters", "a meter is listed twice"))
    return out


def _unit_factor(unit: str | None) -> float | None:
    return None if unit is None else _UNITS.get(unit.strip().lower())


def meter_spec(device: Any, section: EnergySection) -> MeterSpec:
    point = _point(device, section.import_point)
    kind = getattr(point, "type", None)
    scale = abs(float(getattr(point, "scale", 1.0)))
    factor = _unit_factor(section.counter_unit) or _unit_factor(getattr(point, "unit", None)) or 1.0
    wrap = section.wrap
    # A counter completed by a roll-over counter (`carry_register`) does not wrap at its register's modulus.
    if wrap is None and kind in _MODULUS and getattr(point, "carry_register", None) is None:
        wrap = _MODULUS[kind] * scale
    poll = float(getattr(device, "poll_interval", 1.0))
    return MeterSpec(
        name=device.name, import_point=section.import_point, export_point=_export_name(device, section),
        kwh_per_unit=factor, wrap=wrap, resolution=scale if kind in _MODULUS else 0.0, window_s=section.window,
        zone=ZoneInfo(section.timezone),
        max_kw=section.max_kw or (10 * section.target_kw if section.target_kw else None),
        max_gap_s=section.max_gap or max(3 * poll, 10.0), target_kw=section.target_kw,
        levels_kw=section.levels_kw(), hysteresis_kw=(section.target_kw or 0.0) * section.hysteresis / 100,
        lookback_s=lookback(section.window))


def lookback(window_s: int) -> float:
    """How long a counter slope the present power is: a minute, a quarter of a 1-minute trial window (a
    minute's slope would lag it by half its length, and its alarm could not fire before its end)."""
    return min(60.0, window_s / 4)


def plan(devices: Any, plant: PlantEnergy) -> EnergyPlan:
    """The specs of a validated config's meters and groups."""
    meters = {d.name: meter_spec(d, d.energy) for d in devices if getattr(d, "energy", None) is not None}
    groups = tuple(GroupSpec(MeterSpec(
        name=g.name, import_point="", window_s=g.window, zone=ZoneInfo(g.timezone), target_kw=g.target_kw,
        levels_kw=g.levels_kw(), hysteresis_kw=(g.target_kw or 0.0) * g.hysteresis / 100,
        lookback_s=lookback(g.window)),
        tuple(g.meters), g.minus_export) for g in plant.groups)
    return EnergyPlan(meters, groups)
