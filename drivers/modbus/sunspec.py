"""SunSpec: the self-describing Modbus maps of solar inverters, meters and storage, turned into plain points.

A SunSpec device holds the marker "SunS" (0x53756e53) in two holding registers at base 0, 40000 or 50000,
then a chain of models, each a header (model id, length in registers) and its registers, ending with id
0xFFFF. `edge-agent modbus sunspec-scan` walks the chain once, at commissioning, and writes ordinary
`[[devices]]` entries: every point with its address, type, unit, "not implemented" value and, for integers,
`scale_register` (the model's `*_SF` exponent, read in the same poll; drivers/modbus/decode.py `Scaling`).
Discovery is not repeated at run time: the config says exactly what is polled, `edge-agent check` shows it,
and a gateway restart never depends on the inverter answering a scan first.

The model definitions come from the SunSpec Alliance's model files, as shipped in the `pysunspec2` package
(Apache License 2.0, Copyright SunSpec Alliance). They are compacted by `python -m drivers.modbus.sunspec
generate` into sunspec_models.json beside this file (the models the agent polls in full, and the labels of
all others), so that the agent needs no run-time dependency and no 1 MB of definitions on the gateway;
tests/test_sunspec.py checks that the table still matches the package.

Names follow docs/profiles.md where a quantity has one (W -> active_power_total in kW, TotWhImp ->
energy_active_import in kWh); other points keep SunSpec's name in snake case (StVnd -> st_vnd).
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

MARKER = (0x5375, 0x6E53)  # "SunS"
BASES = (40000, 0, 50000)  # the order the SunSpec specification lists them in, most common first
END = 0xFFFF
MAX_MODELS = 64  # a chain longer than this is a misread, not a device

# The models polled in full: common (identity only), inverters, MPPT, meters, storage.
POLLED = {
    "inverter": (101, 102, 103, 111, 112, 113),
    "mppt": (160,),
    "meter": (201, 202, 203, 204, 211, 212, 213, 214),
    "storage": (124, 713, 802),
}
KIND = {model: kind for kind, models in POLLED.items() for model in models}
TABLED = (1, *KIND)

# SunSpec types as the agent's: (agent type, SunSpec's "not implemented" value). Accumulators count from 1:
# an acc of 0 is "not implemented" in SunSpec, never a reading. A count (MPPT's N, the number of DC inputs)
# is a plain uint16, not an accumulator: 0 inputs is a count, 0xFFFF is "not implemented" (SunSpec's answer
# in sunspec/models issue 17, and what pysunspec2 does).
TYPES: dict[str, tuple[str, int | None]] = {
    "int16": ("int16", 0x8000), "uint16": ("uint16", 0xFFFF), "count": ("uint16", 0xFFFF),
    "acc16": ("uint16", 0), "enum16": ("uint16", 0xFFFF), "bitfield16": ("uint16", 0xFFFF),
    "int32": ("int32", 0x80000000), "uint32": ("uint32", 0xFFFFFFFF), "acc32": ("uint32", 0),
    "enum32": ("uint32", 0xFFFFFFFF), "bitfield32": ("uint32", 0xFFFFFFFF),
    "int64": ("int64", 0x8000000000000000), "uint64": ("uint64", 0xFFFFFFFFFFFFFFFF), "acc64": ("uint64", 0),
    "bitfield64": ("uint64", 0xFFFFFFFFFFFFFFFF),
    "float32": ("float32", None),  # NaN is "not implemented", and a NaN is always a bad reading
}

# docs/profiles.md names, per SunSpec point name (inverter and meter models share most of them).
NAMES = {
    "A": "current_total", "AphA": "current_l1", "AphB": "current_l2", "AphC": "current_l3",
    "PhV": "voltage_ln_avg", "PhVphA": "voltage_l1_n", "PhVphB": "voltage_l2_n", "PhVphC": "voltage_l3_n",
    "PPV": "voltage_ll_avg", "PPVphAB": "voltage_l1_l2", "PPVphBC": "voltage_l2_l3", "PPVphCA": "voltage_l3_l1",
    "PhVphAB": "voltage_l1_l2", "PhVphBC": "voltage_l2_l3", "PhVphCA": "voltage_l3_l1",
    "Hz": "frequency", "W": "active_power_total", "WphA": "active_power_l1", "WphB": "active_power_l2",
    "WphC": "active_power_l3", "VA": "apparent_power_total", "VAphA": "apparent_power_l1",
    "VAphB": "apparent_power_l2", "VAphC": "apparent_power_l3", "VAr": "reactive_power_total",
    "VAR": "reactive_power_total", "VARphA": "reactive_power_l1", "VARphB": "reactive_power_l2",
    "VARphC": "reactive_power_l3", "PF": "power_factor_total", "PFphA": "power_factor_l1",
    "PFphB": "power_factor_l2", "PFphC": "power_factor_l3",
    "TotWhImp": "energy_active_import", "TotWhExp": "energy_active_export",
    "TotVAhImp": "energy_apparent_import", "TotVAhExp": "energy_apparent_export",
    "TotVArhImpQ1": "energy_reactive_import_q1", "TotVArhImpQ2": "energy_reactive_import_q2",
    "TotVArhExpQ3": "energy_reactive_export_q3", "TotVArhExpQ4": "energy_reactive_export_q4",
    "DCA": "dc_current", "DCV": "dc_voltage", "DCW": "dc_power", "DCWH": "energy_dc",
    "TmpCab": "temperature_cabinet", "TmpSnk": "temperature_heatsink", "TmpTrns": "temperature_transformer",
    "TmpOt": "temperature_other", "Tmp": "temperature", "St": "operating_state", "DCSt": "operating_state",
    "Evt": "events", "Evt1": "events", "Evt2": "events_2", "DCEvt": "events", "ID": "module_id",
    "ChaState": "state_of_charge", "SoC": "state_of_charge", "SoH": "state_of_health", "InBatV": "battery_voltage",
}
# An inverter's lifetime energy (WH) is what it has delivered: export, from the inverter's side.
INVERTER_NAMES = {"WH": "energy_active_export"}

# SunSpec unit -> (unit sent, factor): the units of docs/profiles.md.
UNITS = {"W": ("kW", 0.001), "VA": ("kVA", 0.001), "var": ("kvar", 0.001), "VAr": ("kvar", 0.001),
         "Wh": ("kWh", 0.001), "VAh": ("kVAh", 0.001), "varh": ("kvarh", 0.001), "VArh": ("kvarh", 0.001),
         "C": ("°C", 1.0), "Secs": ("s", 1.0)}


@dataclass(frozen=True, slots=True)
class Point:
    name: str  # SunSpec's
    type: str  # SunSpec's
    size: int  # registers
    offset: int  # from the first register after the model header
    sf: str | int | None
    units: str | None


@dataclass(frozen=True, slots=True)
class Model:
    id: int
    name: str
    label: str
    points: tuple[Point, ...]  # the fixed part, header excluded
    group: tuple[Point, ...] = ()  # a repeating block (MPPT modules), offsets within one block
    group_name: str = ""

    @property
    def fixed_length(self) -> int:
        return sum(p.size for p in self.points)

    @property
    def group_length(self) -> int:
        return sum(p.size for p in self.group)


@dataclass(frozen=True, slots=True)
class Found:
    """One model in a device's chain: `address` is its header's."""

    id: int
    address: int
    length: int

    @property
    def start(self) -> int:
        """The first register after the header."""
        return self.address + 2


# --- the model table --------------------------------------------------------------------------------------

@cache
def table() -> dict[str, Any]:
    return json.loads(resources.files("drivers.modbus").joinpath("sunspec_models.json").read_text("utf-8"))


def model(model_id: int) -> Model | None:
    entry = table()["models"].get(str(model_id))
    if entry is None:
        return None
    return Model(model_id, entry["name"], entry["label"], _points(entry["points"]), _points(entry.get("group", [])),
                 entry.get("group_name", ""))


def label(model_id: int) -> str:
    if 64000 <= model_id <= 65534:
        return "vendor model"
    entry = table()["models"].get(str(model_id))
    return entry["label"] if entry else table()["labels"].get(str(model_id), "unknown model")


def _points(rows: list[list[Any]]) -> tuple[Point, ...]:
    out, offset = [], 0
    for name, sunspec_type, size, sf, units in rows:
        out.append(Point(name, sunspec_type, size, offset, sf, units))
        offset += size
    return tuple(out)


def build_table(definitions: Path) -> dict[str, Any]:
    """The compact table from the SunSpec model files (`model_<id>.json`)."""
    models: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for path in sorted(definitions.glob("model_*.json"), key=lambda p: int(p.stem.split("_")[1])):
        group = json.loads(path.read_text("utf-8"))["group"]
        model_id = int(path.stem.split("_")[1])
        labels[str(model_id)] = group.get("label", group["name"])
        if model_id not in TABLED:
            continue
        rows = [[p["name"], p["type"], p["size"], p.get("sf"), p.get("units")] for p in group["points"][2:]]
        entry: dict[str, Any] = {"name": group["name"], "label": group.get("label", group["name"]), "points": rows}
        subgroups = group.get("groups", [])
        if len(subgroups) > 1 or any(g.get("groups") for g in subgroups):
            raise ValueError(f"model {model_id}: more than one repeating block is not supported")
        if subgroups:
            entry["group_name"] = subgroups[0]["name"]
            entry["group"] = [[p["name"], p["type"], p["size"], p.get("sf"), p.get("units")]
                              for p in subgroups[0]["points"]]
        models[str(model_id)] = entry
    return {"notice": "SunSpec model definitions, from the pysunspec2 package's models/json. Copyright SunSpec "
                      "Alliance, Apache License 2.0 (http://www.apache.org/licenses/LICENSE-2.0). Generated by "
                      "`python -m drivers.modbus.sunspec generate`; do not edit by hand.",
            "models": models, "labels": labels}


# --- what a found model becomes ---------------------------------------------------------------------------

def snake(name: str) -> str:
    """SunSpec's camel case in snake case: StVnd -> st_vnd, TotVArhImpQ1PhA -> tot_varh_imp_q1_ph_a."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def point_name(kind: str, point: Point) -> str:
    if kind == "inverter" and point.name in INVERTER_NAMES:
        return INVERTER_NAMES[point.name]
    return NAMES.get(point.name) or snake(point.name)


def layout(definition: Model, found: Found) -> list[tuple[str, Point, int, dict[str, int]]]:
    """(name prefix, point, address, scale factor addresses by name) for every register of the model as
    found: the fixed part, then as many repeating blocks as its length holds."""
    fixed_sf = {p.name: found.start + p.offset for p in definition.points if p.type == "sunssf"}
    out = [("", p, found.start + p.offset, fixed_sf) for p in definition.points]
    if definition.group and definition.group_length:
        repeats = max(0, (found.length - definition.fixed_length) // definition.group_length)
        for index in range(repeats):
            base = found.start + definition.fixed_length + index * definition.group_length
            sfs = {**fixed_sf, **{p.name: base + p.offset for p in definition.group if p.type == "sunssf"}}
            out += [(f"{definition.group_name}{index + 1}_", p, base + p.offset, sfs) for p in definition.group]
    return out


def points(found: Found) -> tuple[list[dict[str, Any]], list[str]]:
    """The config points of a found model (as TOML-ready dicts), and the SunSpec points left out (and why)."""
    definition = model(found.id)
    kind = KIND.get(found.id)
    if definition is None or kind is None:
        return [], []
    out: list[dict[str, Any]] = []
    skipped: list[str] = []
    used: set[str] = set()
    for prefix, point, address, sfs in layout(definition, found):
        if point.type == "sunssf" or point.type == "pad":
            continue
        if point.type not in TYPES:
            skipped.append(f"{point.name} ({point.type})")
            continue
        if address + point.size - 1 >= found.start + found.length:
            skipped.append(f"{point.name} (beyond the model's length)")
            continue
        agent_type, sentinel = TYPES[point.type]
        name = prefix + point_name(kind, point)
        if name in used:
            name = prefix + snake(point.name)
        used.add(name)
        entry: dict[str, Any] = {"name": name, "function": "holding", "address": address, "type": agent_type}
        unit, factor = UNITS.get(point.units or "", (point.units, 1.0))
        if point.name.startswith("PF") and point.units == "Pct":
            unit, factor = None, 0.01  # docs/profiles.md: power factor without unit, -1..1
        if isinstance(point.sf, str):
            if point.sf not in sfs:
                skipped.append(f"{point.name} (its scale factor {point.sf} is not in the model)")
                continue
            entry["scale_register"] = sfs[point.sf]
        elif isinstance(point.sf, int):
            factor *= 10.0 ** point.sf
        if factor != 1.0:
            entry["scale"] = factor
        if unit:
            entry["unit"] = unit.strip()
        if sentinel is not None:
            entry["not_available"] = [sentinel]
        out.append(entry)
    return out, skipped


def text(registers: list[int]) -> str:
    raw = b"".join(r.to_bytes(2, "big") for r in registers)
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()


def identity(registers: list[int]) -> dict[str, str]:
    """Manufacturer, model, options, version and serial number from the registers of common model 1."""
    definition = model(1)
    assert definition is not None
    out = {}
    for point in definition.points:
        if point.type == "string" and point.offset + point.size <= len(registers):
            out[point.name] = text(registers[point.offset:point.offset + point.size])
    return out


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(f"0x{v:X}" if isinstance(v, int) and v > 9 else _toml(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def snippet(device_name: str, line: dict[str, Any], unit_id: int, base: int, chain: list[Found],
            ident: dict[str, str], where: str) -> str:
    """`[[devices]]` entries for the polled models of one SunSpec device: one device per model, all on one
    line (they share its request queue), so that the same quantity keeps the same name in each."""
    lines = [f"# SunSpec device found by `edge-agent modbus sunspec-scan` on {where}, unit {unit_id}: marker at "
             f"holding register {base}.",
             f"# {ident.get('Mn', '?')} {ident.get('Md', '?')}, serial {ident.get('SN', '?')}, version "
             f"{ident.get('Vr', '?')}."]
    counts = Counter(KIND[found.id] for found in chain if found.id in KIND)  # numbered only when repeated
    seen: dict[str, int] = {}
    for found in chain:
        kind = KIND.get(found.id)
        if kind is None:
            continue
        seen[kind] = seen.get(kind, 0) + 1
        name = f"{device_name}-{kind}" + (f"-{seen[kind]}" if counts[kind] > 1 else "")
        entries, skipped = points(found)
        lines += ["", f"# model {found.id} {label(found.id)}, holding {found.start}..{found.start + found.length - 1}",
                  "[[devices]]", f'name = "{name}"', 'driver = "modbus"']
        lines += [f"{key} = {_toml(value)}" for key, value in line.items()]
        lines += [f"unit_id = {unit_id}", 'poll_interval = "5s"', "points = ["]
        for entry in entries:
            lines.append("  { " + ", ".join(f"{k} = {_toml(v)}" for k, v in entry.items()) + " },")
        lines.append("]")
        if skipped:
            lines.append(f"# not polled: {', '.join(skipped)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """`python -m drivers.modbus.sunspec generate [DIR]`: rebuild sunspec_models.json from pysunspec2's models."""
    if argv[:1] != ["generate"]:
        print("usage: python -m drivers.modbus.sunspec generate [MODELS_JSON_DIR]", file=sys.stderr)
        return 2
    if len(argv) > 1:
        definitions = Path(argv[1])
    else:
        definitions = Path(str(resources.files("sunspec2"))) / "models" / "json"
    out = Path(__file__).with_name("sunspec_models.json")
    out.write_text(json.dumps(build_table(definitions), separators=(",", ":"), ensure_ascii=False) + "\n", "utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
