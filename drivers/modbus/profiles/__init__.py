"""Register maps of meter models, one TOML data file per model (format and list: docs/profiles.md).

A device uses one with `profile = "<id>"`: the profile's points are turned into plain 0-based points here,
before the device is validated, so a profile point is checked exactly like a point written by hand. The
device may keep only some points (`select`), change keys of a point (`overrides.<name>`) and add its own
points. Profiles are written in the numbering of their source manual ("modicon" 30001/40001, "one-based"
register numbers, or "protocol" 0-based addresses) and converted once.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

if TYPE_CHECKING:
    from drivers.modbus.decode import LineCost, ReadRequest

PROFILE_DIR = Path(__file__).parent
NUMBERINGS = ("modicon", "one-based", "protocol")
_PROFILE_KEYS = {"id", "manufacturer", "model", "description", "source", "verified", "notes", "numbering", "serial",
                 "max_registers", "unreadable"}
_REQUIRED = ("id", "manufacturer", "model", "source", "verified", "numbering")
# Point keys that hold another register of the point's own space: written in the profile's numbering, like
# `address`, so that the file reads like the manual (carry_register = 30531 beside address = 30033).
_REGISTER_KEYS = ("scale_register", "carry_register")


class ProfileError(ValueError):
    """A profile file that cannot be used, with where in the file and why."""


@dataclass(frozen=True, slots=True)
class Profile:
    id: str
    manufacturer: str
    model: str
    description: str
    source: str
    verified: bool
    notes: str
    numbering: str
    serial: dict[str, Any]
    max_registers: int | None
    unreadable: tuple[dict[str, Any], ...]
    points: tuple[dict[str, Any], ...]  # 0-based, function explicit, defaults applied: ModbusPoint input

    @property
    def point_names(self) -> list[str]:
        return [point["name"] for point in self.points]


WORD_ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
# Values spanning two or four registers: a device's `word_order` (for meters whose word order is a setting,
# such as the GIMAC1000's SWAP) applies to these; a 16-bit value has no word order, a string its own.
MULTI_REGISTER_NUMBERS = frozenset({"int32", "uint32", "float32", "int64", "uint64", "float64"})

def available() -> list[str]:
    return sorted(path.stem for path in PROFILE_DIR.glob("*.toml"))


@cache
def load(profile_id: str) -> Profile:
    path = PROFILE_DIR / f"{profile_id}.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"no profile {profile_id!r}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path.name}: not valid TOML: {exc}") from exc
    return parse(data, path.name)


def parse(data: dict[str, Any], where: str) -> Profile:
    header = data.get("profile")
    if not isinstance(header, dict):
        raise ProfileError(f"{where}: missing the [profile] table")
    unknown = set(header) - _PROFILE_KEYS
    if unknown:
        raise ProfileError(f"{where}: profile: unknown key(s) {', '.join(sorted(unknown))}")
    for key in _REQUIRED:
        if key not in header:
            raise ProfileError(f"{where}: profile.{key}: missing required key")
    if f"{header['id']}.toml" != where and where.endswith(".toml"):
        raise ProfileError(f"{where}: profile.id {header['id']!r} must equal the file name's stem")
    numbering = header["numbering"]
    if numbering not in NUMBERINGS:
        raise ProfileError(f"{where}: profile.numbering: expected one of {', '.join(NUMBERINGS)}, got {numbering!r}")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ProfileError(f"{where}: defaults: expected a table")
    raw_points = data.get("points")
    if not isinstance(raw_points, list) or not raw_points:
        raise ProfileError(f"{where}: points: expected [[points]] tables")
    unknown_tables = set(data) - {"profile", "defaults", "points"}
    if unknown_tables:
        raise ProfileError(f"{where}: unknown table(s) {', '.join(sorted(unknown_tables))}")
    points = []
    for index, point in enumerate(raw_points):
        if not isinstance(point, dict) or "address" not in point or "name" not in point:
            raise ProfileError(f"{where}: points[{index}]: expected a table with name and address")
        merged = {**defaults, **point}
        try:
            merged["function"], merged["address"] = to_protocol(numbering, merged["address"], merged.get("function"))
        except ValueError as exc:
            raise ProfileError(f"{where}: points[{index}] ({point['name']}): {exc}") from None
        for key in _REGISTER_KEYS:
            if key in merged:
                try:
                    merged[key] = to_protocol(numbering, merged[key], merged["function"])[1]
                except ValueError as exc:
                    raise ProfileError(f"{where}: points[{index}] ({point['name']}).{key}: {exc} (it must be in the "
                                       "point's own register space)") from None
        points.append(merged)
    return Profile(
        id=header["id"], manufacturer=header["manufacturer"], model=header["model"],
        description=header.get("description", ""), source=header["source"], verified=bool(header["verified"]),
        notes=header.get("notes", ""), numbering=numbering, serial=dict(header.get("serial", {})),
        max_registers=header.get("max_registers"), unreadable=tuple(header.get("unreadable", ())),
        points=tuple(points))


def to_protocol(numbering: str, address: Any, function: str | None) -> tuple[str, int]:
    """(function, 0-based address) for an address written in `numbering`."""
    if not isinstance(address, int) or isinstance(address, bool):
        raise ValueError(f"address must be an integer, got {address!r}")
    if numbering == "protocol":
        if function is None:
            raise ValueError("with protocol numbering, every point needs a function")
        return function, address
    if numbering == "one-based":
        if function is None:
            raise ValueError("with one-based numbering, every point needs a function")
        if address < 1:
            raise ValueError(f"one-based register numbers start at 1, got {address}")
        return function, address - 1
    implied, protocol = modicon(address)
    if function is not None and function != implied:
        raise ValueError(f"address {address} is a {implied} in modicon numbering, but function says {function!r}")
    return implied, protocol


def modicon(number: int) -> tuple[str, int]:
    """30001 -> ("input", 0); 400101 -> ("holding", 100). Five digits up to 49999, six digits beyond."""
    for function, low, high in (("coil", 1, 9999), ("discrete", 10001, 19999), ("input", 30001, 39999),
                                ("holding", 40001, 49999), ("discrete", 100001, 165536),
                                ("input", 300001, 365536), ("holding", 400001, 465536)):
        if low <= number <= high:
            return function, number - low
    raise ValueError(f"{number} is not a modicon register number (0xxxx coil, 1xxxx discrete input, 3xxxx input "
                     "register, 4xxxx holding register; six digits for addresses above 9999)")


def expand_profile(raw: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A device entry with `profile` turned into one with plain points (its own first, then the profile's),
    or the problems that prevent it, as (path inside the entry, message)."""
    from drivers.modbus.config import ModbusPoint

    profile_id = raw["profile"]
    known = available()
    if not isinstance(profile_id, str) or profile_id not in known:
        close = difflib.get_close_matches(str(profile_id), known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return raw, [("profile", f"unknown profile {profile_id!r}{hint} Shipped profiles: {', '.join(known)}")]
    try:
        profile = load(profile_id)
    except ProfileError as exc:
        return raw, [("profile", f"the shipped profile cannot be read: {exc}")]

    problems: list[tuple[str, str]] = []
    names = profile.point_names
    selected = names
    select = raw.get("select")
    if select is not None:
        if not isinstance(select, list) or not all(isinstance(s, str) for s in select):
            return raw, [("select", "expected a list of point names")]
        for index, name in enumerate(select):
            if name not in names:
                problems.append((f"select[{index}]", _no_point(name, profile)))
        selected = [name for name in names if name in select]

    overrides = raw.get("overrides", {})
    if not isinstance(overrides, dict):
        return raw, [("overrides", "expected a table of point names, e.g. [devices.overrides.active_power]")]
    for name, change in overrides.items():
        if name not in names:
            problems.append((f"overrides.{name}", _no_point(name, profile)))
        elif name not in selected:
            problems.append((f"overrides.{name}", f"{name!r} is not among the selected points"))
        elif not isinstance(change, dict):
            problems.append((f"overrides.{name}", "expected a table of point keys, e.g. { scale = 0.1 }"))
        elif "name" in change:
            problems.append((f"overrides.{name}.name", "a profile point keeps its name (add your own point instead)"))

    order = raw.get("word_order")
    if order is not None and order not in WORD_ORDERS:
        problems.append(("word_order", f"expected one of {', '.join(map(repr, WORD_ORDERS))} (the order of the "
                                       f"profile's 32- and 64-bit values on this meter), got {order!r}"))

    own = raw.get("points", [])
    if not isinstance(own, list):
        return raw, problems  # the device's validation names this
    for index, point in enumerate(own):
        if isinstance(point, dict) and point.get("name") in names:
            problems.append((f"points[{index}].name", f"{point['name']!r} is already a point of profile "
                             f"{profile.id!r}: change it with overrides.{point['name']}, or leave it out with "
                             "select"))
    if problems:
        return raw, problems

    merged_points = list(own)
    point_adapter = TypeAdapter(ModbusPoint)
    point_keys = list(ModbusPoint.__pydantic_fields__)
    for point in profile.points:
        if point["name"] not in selected:
            continue
        change = overrides.get(point["name"], {})
        merged = {**point, **change}
        if order is not None and point.get("type") in MULTI_REGISTER_NUMBERS and "word_order" not in change:
            merged["word_order"] = order  # the meter's setting, for every value that has a word order
        if change:
            try:
                point_adapter.validate_python(merged)
            except ValidationError as exc:
                for error in exc.errors(include_url=False):
                    key = ".".join(str(part) for part in error["loc"])
                    path = f"overrides.{point['name']}" + (f".{key}" if key else "")
                    problems.append((path, _override_message(error, point_keys)))
                continue
        merged_points.append(merged)
    expanded = {**{k: v for k, v in raw.items() if k != "word_order"}, "points": merged_points}
    if profile.max_registers is not None and "max_registers" not in raw:
        expanded["max_registers"] = profile.max_registers
    if profile.unreadable:
        expanded["unreadable"] = [*raw.get("unreadable", []), *profile.unreadable]
    return expanded, problems


def _override_message(error: ErrorDetails, point_keys: list[str]) -> str:
    if error["type"] == "unexpected_keyword_argument":  # a key a point does not have
        close = difflib.get_close_matches(str(error["loc"][-1]), point_keys, n=1, cutoff=0.6)
        return "unknown key" + (f"; did you mean {close[0]!r}?" if close else
                                f"; expected one of: {', '.join(point_keys)}")
    return error["msg"].removeprefix("Value error, ")


def _no_point(name: str, profile: Profile) -> str:
    close = difflib.get_close_matches(name, profile.point_names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; it has: {', '.join(profile.point_names)}"
    return f"profile {profile.id!r} has no point {name!r}{hint}"


def requests_table() -> str:
    """The table in docs/profiles.md: requests per poll cycle with the default settings, over TCP and on an
    RS-485 line at 9600 baud 8N1 (where the gaps worth reading come from the line's cost), against the fewest
    possible (every gap bridged, only the device's request limit and unreadable ranges respected), and
    against one request per point (what a gateway without coalescing sends)."""
    from drivers.modbus.config import ModbusDevice
    from drivers.modbus.decode import TCP_MAX_GAP, device_plan, line_cost, plan, planned_points

    line = {"transport": "rtu", "serial_port": "/dev/ttyUSB0", "baudrate": 9600}
    rows = [f"| Profile | Points | Requests per poll, TCP (max_gap {TCP_MAX_GAP}) | RS-485 9600 baud, derived max_gap "
            f"| Line time a poll at 9600 baud | The same with max_gap {TCP_MAX_GAP} | Fewest possible "
            "| One per point |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for profile_id in available():
        devices = []
        for where in ({"host": "h"}, line, {**line, "max_gap": TCP_MAX_GAP}):
            raw, problems = expand_profile({"name": "x", "driver": "modbus", "profile": profile_id, **where})
            if problems:
                raise ProfileError(f"{profile_id}: {problems}")
            devices.append(ModbusDevice.model_validate(raw))
        tcp, rtu, fixed = devices
        cost = line_cost(rtu)
        assert cost is not None
        on_rtu = device_plan(rtu)

        def line_ms(requests: tuple[ReadRequest, ...], cost: LineCost = cost) -> str:
            seconds = sum(cost.per_request + r.count * cost.per_register for r in requests)
            return f"{seconds * 1000:.0f} ms"

        read = planned_points(tcp)  # the points, and the registers read for them (Giga counters, exponents)
        fewest = plan(read, tcp.max_registers, 65535, tcp.unreadable, tcp.max_bits)
        rows.append(f"| `{profile_id}` | {len(tcp.points)} | {len(device_plan(tcp))} | {len(on_rtu)} "
                    f"(max_gap {cost.max_gap}) | {line_ms(on_rtu)} | {len(device_plan(fixed))}, "
                    f"{line_ms(device_plan(fixed))} | {len(fewest)} | {len(read)} |")
    return "\n".join(rows)
