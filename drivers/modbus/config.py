"""The `[[devices]]` entry of a Modbus device and its points. Imports pydantic only.

Addresses are 0-based protocol addresses with the register space named explicitly (`function`):
"coil" (FC01, 0xxxx), "discrete" (FC02, 1xxxx), "input" (FC04, 30001 = address 0), "holding" (FC03,
40001 = address 0). Profiles and the command-line tools also accept the vendor numbering; the device
config does not, so that one file never mixes two conventions.

Devices that share a physical line (one serial port, or one TCP endpoint) share one request queue at run
time; the line's settings are written on each device and must agree, which `line_problems` checks across
the whole file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, Strict, field_validator, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs

from agent.config import DeviceBase, Host, StrictModel, duration, echo, text, valid_entries
from agent.names import PointName

DataType = Literal["bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64",
                   "string"]
WordOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]
Function = Literal["coil", "discrete", "holding", "input"]

REGISTER_COUNT: dict[str, int] = {
    "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2, "int64": 4, "uint64": 4, "float64": 4,
    "bool": 1,
}
# Values a register-read exponent may scale: SunSpec applies its `*_SF` registers to integers only.
SCALED_TYPES = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64"})
# SunSpec's scale factors lie in -10..10; anything else is a misread register, never a real exponent.
SCALE_EXPONENT_RANGE = (-10, 10)
FUNCTION_CODE: dict[str, int] = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
BIT_FUNCTIONS = frozenset({"coil", "discrete"})
# Modbus application protocol v1.1b3, 6.1-6.4: the most one read may ask for.
MAX_REGISTERS_PER_READ = 125
MAX_BITS_PER_READ = 2000
# Vendor ("Modicon") numbering: the leading digit of each space as a manual writes it.
VENDOR_DIGIT: dict[str, int] = {"coil": 0, "discrete": 1, "input": 3, "holding": 4}


def vendor_address(function: str, address: int) -> str:
    """The manual's number for a 0-based address: 30001-style up to 9998, the six-digit form beyond
    (input register 10000 is 310001)."""
    if address <= 9998:
        return str(VENDOR_DIGIT[function] * 10000 + address + 1)
    return f"{VENDOR_DIGIT[function]}{address + 1:05d}"


# A plant's config holds thousands of points, each kept for the life of the process: as a frozen slotted
# dataclass a point costs about 150 bytes, as a pydantic model about 840 (its __dict__ and fields-set).
# Validation, the error messages and the JSON schema are still pydantic's.
# A pydantic dataclass cannot be strict as a whole (it would refuse the TOML table itself): each field is.
_Int = Annotated[int, Strict()]
_Number = Annotated[float, Strict()]  # a TOML integer or float; never a string or a boolean
_Text = Annotated[str, Strict()]
_RawValue = Annotated[int, Strict()] | Annotated[float, Strict()]


def _not_a_bool(value: Any) -> Any:
    # Literal[1, 2] alone would take `true` for 1: True == 1 in Python.
    if isinstance(value, bool):
        raise ValueError("expected an integer, not true or false")
    return value


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class ModbusPoint:
    name: PointName
    function: Function = Field(
        description='"coil" (FC01, 0xxxx), "discrete" (FC02, 1xxxx), "input" (FC04, 3xxxx) or "holding" (FC03, '
                    '4xxxx).')
    address: _Int = Field(ge=0, le=65535, description="0-based protocol address (40001 -> 0).")
    type: DataType = Field(description='The value\'s type; "bool" (the default) for coils and discrete inputs, and '
                                       'with `bit` for one bit of a register.')
    count: _Int | None = Field(None, ge=1, le=125, description="Registers the value spans: required for a string "
                                                              "(2 characters per register), implied for the others.")
    bit: _Int | None = Field(None, ge=0, le=15, description="For a bool in a register: the bit, 0 = least significant.")
    word_order: WordOrder = Field(
        "ABCD", description="Byte order of the value, A = most significant byte: ABCD big-endian, "
        "CDAB word-swapped (low word first), BADC byte-swapped, DCBA little-endian. Strings: ABCD or BADC.")
    scale: _Number = Field(1.0, description="value = raw * scale + offset")
    offset: _Number = 0.0
    scale_from: PointName | None = Field(
        None, description="Name of another point of the device, an int16 holding a power-of-ten exponent (a SunSpec "
        "`*_SF` register): value = raw * 10^exponent * scale + offset, with the exponent read in the same poll.")
    scale_register: _Int | None = Field(
        None, ge=0, le=65535, description="As `scale_from`, but the exponent's 0-based address in the point's own "
        "register space, read without being sent as a point.")
    carry_register: _Int | None = Field(
        None, ge=0, le=65535, description="0-based address, in the point's own register space, of a uint16 that "
        "counts how often the value rolled over (a meter's \"giga counter\"); read in the same poll, not sent: "
        "value = (raw + carry x carry_factor) x scale + offset.")
    carry_factor: _Number | None = Field(
        None, description="With `carry_register`: what one count is worth in the value's raw unit (1e9 for a Wh "
        "counter that restarts from 0 after 999,999,999.9 Wh).")
    not_available: Annotated[tuple[_RawValue, ...], BeforeValidator(_as_tuple)] = Field(
        (), description="Raw values the meter sends for 'no value' (0xFFFF = 65535, 0x8000 = "
        "32768, 0x7FFFFFFF ...), compared before scaling: such a reading is sent with quality bad.")
    unit: _Text | None = Field(None, max_length=32)
    description: _Text | None = Field(None, max_length=200, description="Free text for people; not sent.")

    @field_validator("scale", "offset")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("scale")
    @classmethod
    def _non_zero(cls, value: float) -> float:
        if value == 0:
            raise ValueError("must not be 0 (every value would read 0)")
        return value

    @field_validator("carry_factor")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError("expected a number greater than 0: what one count of carry_register is worth in the "
                             "value's raw unit")
        return value

    @model_validator(mode="before")
    @classmethod
    def _bits_are_bools(cls, data: Any) -> Any:
        if isinstance(data, ArgsKwargs) and data.kwargs is not None:  # ModbusPoint(name=..., ...) in Python
            return ArgsKwargs(data.args, cls._bits_are_bools(data.kwargs))
        if isinstance(data, dict) and "type" not in data and data.get("function") in BIT_FUNCTIONS:
            return {**data, "type": "bool"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModbusPoint:
        # Raised as errors of the point itself; the messages name the key to change.
        if self.function in BIT_FUNCTIONS:
            if self.type != "bool":
                raise ValueError(f"a {self.function} holds one bit: type must be \"bool\" (got {self.type!r})")
            if self.bit is not None:
                raise ValueError(f"bit applies to a bool inside a register, not to a {self.function}")
        elif self.type == "bool" and self.bit is None:
            raise ValueError(f"a bool in a {self.function} register needs `bit` (0-15); or use function "
                             "\"coil\"/\"discrete\" for a one-bit value")
        if self.bit is not None and self.type != "bool":
            raise ValueError(f"bit applies to type \"bool\" only (got {self.type!r})")
        if self.type == "string":
            if self.count is None:
                raise ValueError("a string needs its length: count = number of registers (2 characters each)")
            if self.word_order not in ("ABCD", "BADC"):
                raise ValueError('a string\'s word_order is "ABCD" (first character in the high byte) or "BADC" '
                                 '(bytes swapped)')
        elif self.count is not None and self.count != self.register_count:
            raise ValueError(f"a {self.type} spans {self.register_count} register(s); count = {self.count} "
                             "contradicts it (leave count out)")
        if self.type in ("bool", "string") and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError(f"scale and offset apply to numbers, not to a {self.type}")
        if self.scale_from is not None or self.scale_register is not None:
            key = "scale_from" if self.scale_from is not None else "scale_register"
            if self.scale_from is not None and self.scale_register is not None:
                raise ValueError("scale_from and scale_register both name the exponent: give one of them")
            if self.type not in SCALED_TYPES:
                # SunSpec scales integers only; a float carries its own exponent.
                raise ValueError(f"{key} applies to integer values, not to a {self.type}")
            if self.scale_from == self.name:
                raise ValueError("scale_from names the point itself; it must name the exponent's point")
        self._check_carry()
        return self

    def _check_carry(self) -> None:
        if self.carry_register is None:
            if self.carry_factor is not None:
                raise ValueError("carry_factor applies with carry_register (the register that counts the "
                                 "roll-overs): give both, or neither")
            return
        if self.carry_factor is None:
            raise ValueError("carry_register needs carry_factor: what one count is worth in the value's raw unit, "
                             "e.g. 1e9 for a Wh counter that restarts from 0 after 999,999,999.9 Wh")
        if self.type in ("bool", "string"):
            raise ValueError(f"carry_register applies to numbers, not to a {self.type}")
        if self.scaled_by_register:
            raise ValueError("carry_register together with scale_from or scale_register is not supported: no meter "
                             "known to the agent needs both; give one of them")

    @property
    def scaled_by_register(self) -> bool:
        """Whether the scale's exponent is read from a register (`scale_from` or `scale_register`) each poll."""
        return self.scale_from is not None or self.scale_register is not None

    @property
    def uses_other_register(self) -> bool:
        """Whether the value needs another register of the same poll (an exponent or a carry): its scale and
        offset are then applied once the whole poll is read (drivers/modbus/decode.py `Scaling`)."""
        return self.scaled_by_register or self.carry_register is not None

    @property
    def register_count(self) -> int:
        """Registers (or bits, for coils and discrete inputs) the value spans."""
        if self.function in BIT_FUNCTIONS:
            return 1
        if self.type == "string":
            return self.count or 1
        return REGISTER_COUNT[self.type]

    @property
    def function_code(self) -> int:
        return FUNCTION_CODE[self.function]


class UnreadableRange(StrictModel):
    function: Function
    first: int = Field(ge=0, le=65535, description="0-based")
    last: int = Field(ge=0, le=65535, description="0-based, inclusive")

    @model_validator(mode="after")
    def _ordered(self) -> UnreadableRange:
        if self.last < self.first:
            raise ValueError(f"last ({self.last}) is before first ({self.first})")
        return self


Parity = Literal["N", "E", "O"]
# 0 is right on TCP; past 10 s a pause no longer spares a slow meter, it stalls the line.
Turnaround = duration(0.0, 10.0, minimum_included=True)
SerialPort = text(4095)


class ModbusDevice(DeviceBase):
    driver: Literal["modbus"]
    transport: Literal["tcp", "rtu", "rtu_over_tcp"] = Field(
        "tcp", description='"tcp" (Modbus TCP), "rtu" (RS-485/RS-232 serial port), "rtu_over_tcp" (RTU frames '
                           'through a serial device server in transparent mode).')
    host: Host | None = Field(None, description="tcp and rtu_over_tcp: the device or gateway address.")
    port: int = Field(502, ge=1, le=65535, description="tcp and rtu_over_tcp: the TCP port.")
    serial_port: SerialPort | None = Field(
        None, description='rtu: the serial device, e.g. "/dev/ttyUSB0" or "/dev/serial/by-id/...".')
    baudrate: int = Field(9600, ge=300, le=921600, description="rtu: bits per second (300 to 921600).")
    parity: Parity = Field("N", description='rtu: "N" none, "E" even, "O" odd.')
    data_bits: Literal[7, 8] = 8
    stop_bits: Annotated[Literal[1, 2], BeforeValidator(_not_a_bool)] = 1
    turnaround: Turnaround | None = Field(
        None, description="Pause after every request on the line before the next one (bus turnaround). Default: "
                          "20ms on a serial line, 0 on TCP.")
    unit_id: int = Field(1, ge=0, le=255, description="Modbus unit id (slave id): 1-247 on a serial line (also "
                                                      "behind rtu_over_tcp); 0-255 on Modbus TCP, often 1 or 255.")
    max_registers: int = Field(MAX_REGISTERS_PER_READ, ge=1, le=MAX_REGISTERS_PER_READ,
                               description="Largest register read sent to this device (some meters accept fewer "
                                           "than the protocol's 125).")
    max_bits: int = Field(MAX_BITS_PER_READ, ge=1, le=MAX_BITS_PER_READ)
    max_gap: int | None = Field(None, ge=0, le=124, description="Unused registers (or bits) a request may read to "
                                "join two points into one request. Default: what is cheaper on the line (from the "
                                "baud rate and turnaround on a serial line; 10 over TCP).")
    unreadable: list[UnreadableRange] = Field(
        default_factory=list, description="Address ranges the device refuses: never read, never bridged.")
    profile: PointName | None = Field(None, description="A register map shipped with the agent (docs/profiles.md); "
                                                   "`points` then adds to it.")
    select: list[str] | None = Field(None, description="With a profile: keep only these points.")
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="With a profile: per point name, keys that replace the profile's "
                                          "(e.g. scale, unit).")
    points: list[ModbusPoint] = Field(default_factory=list)

    @model_validator(mode="after")
    def _transport_fields(self) -> ModbusDevice:
        serial_only = sorted({"baudrate", "parity", "data_bits", "stop_bits"} & self.model_fields_set)
        if self.transport != "rtu" and serial_only:
            raise ValueError(f"{', '.join(serial_only)}: serial line settings, but transport is "
                             f'"{self.transport}" (the serial device server holds them)')
        if self.transport == "rtu":
            if self.serial_port is None:
                raise ValueError('transport "rtu" needs serial_port, e.g. serial_port = "/dev/ttyUSB0"')
            if self.host is not None:
                raise ValueError('host is for transport "tcp" or "rtu_over_tcp"; a serial line has serial_port')
        else:
            if self.host is None:
                raise ValueError(f'transport "{self.transport}" needs host (the device or gateway address)')
            if self.serial_port is not None:
                raise ValueError(f'serial_port is for transport "rtu"; transport is "{self.transport}"')
        if not self.points:
            raise ValueError("no points: give `points`, or a `profile`")
        return self

    @property
    def line_key(self) -> str:
        """Which physical line the device is on: devices with the same key share one request queue."""
        if self.transport == "rtu":
            return f"serial {self.serial_port}"
        return f"tcp {self.host}:{self.port}"  # one endpoint is one line, whatever framing it is given

    @property
    def line_settings(self) -> tuple[Any, ...]:
        """What every device on one line must agree on."""
        if self.transport == "rtu":
            return (self.baudrate, self.parity, self.data_bits, self.stop_bits, self.effective_turnaround)
        return (self.transport, self.effective_turnaround)

    @property
    def effective_turnaround(self) -> float:
        if self.turnaround is not None:
            return self.turnaround
        return 0.02 if self.transport == "rtu" else 0.0

    @property
    def line_label(self) -> str:
        """The line as a person reads it: with its framing when that is not the port's usual one."""
        if self.transport == "rtu_over_tcp":
            return f"rtu-over-tcp {self.host}:{self.port}"
        return self.line_key

    @property
    def endpoint(self) -> str:
        return f"{self.line_label} unit {self.unit_id}"

    def problems(self) -> list[tuple[str, str]]:
        out = _point_problems(list(enumerate(self.points)), self.unreadable)
        out += _scale_problems(self.points, self.unreadable)
        out += _carry_problems(self.points, self.unreadable)
        # Modbus over serial line v1.02, 2.2: 0 is broadcast (no meter answers it), 248-255 are reserved. On
        # TCP (Modbus messaging on TCP/IP v1.0b, 4.4.2) 0 and 255 address the device itself.
        if self.transport != "tcp" and not 1 <= self.unit_id <= 247:
            out.append(("unit_id", f"expected 1 to 247 on a serial line (0 is broadcast, which no meter answers; "
                                   f"248-255 are reserved) (got {echo(self.unit_id)})"))
        return out

    @classmethod
    def expand(cls, raw: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """Resolve `profile`, `select` and `overrides` into plain points before validation. The device's own
        points come first, so their indices in error messages are the ones in the file."""
        if "profile" not in raw:
            if "word_order" in raw:  # a profile's key: say so rather than "unknown key"
                return {k: v for k, v in raw.items() if k != "word_order"}, [
                    ("word_order", "a device's word_order applies to the points of its profile; without a profile, "
                                   "set word_order on each point")]
            return raw, []
        from drivers.modbus.profiles import expand_profile

        return expand_profile(raw)

    @classmethod
    def salvage(cls, raw: dict[str, Any]) -> list[tuple[str, str]]:
        return _point_problems(valid_entries(raw.get("points"), ModbusPoint), [])

    @classmethod
    def across(cls, devices: list[tuple[int, ModbusDevice]]) -> list[tuple[int, str, str]]:
        """Checks across devices: those on one line must agree on the line's settings."""
        out: list[tuple[int, str, str]] = []
        first: dict[str, tuple[int, ModbusDevice]] = {}
        for index, device in devices:
            key = device.line_key
            if key not in first:
                first[key] = (index, device)
                continue
            other_index, other = first[key]
            if device.line_settings != other.line_settings:
                field = "transport" if device.transport != other.transport else \
                    "turnaround" if device.transport != "rtu" else _first_difference(device, other)
                out.append((index, field, f"{key} is one line, shared with devices[{other_index}] "
                            f"({other.name!r}), which sets {field} = {getattr(other, field)!r}; every device on a "
                            "line must use the same line settings"))
        return out


def _first_difference(a: ModbusDevice, b: ModbusDevice) -> str:
    for field in ("baudrate", "parity", "data_bits", "stop_bits", "turnaround"):
        if getattr(a, field) != getattr(b, field):
            return field
    return "turnaround"


def _point_problems(points: list[tuple[int, ModbusPoint]],
                    unreadable: list[UnreadableRange]) -> list[tuple[str, str]]:
    """Duplicate names, values running past the last address, points sharing a register (bits of one
    register excepted) and points inside a range declared unreadable."""
    out: list[tuple[str, str]] = []
    seen_names: dict[str, int] = {}
    owner: dict[tuple[str, int], int] = {}
    bits: dict[tuple[str, int, int], int] = {}
    by_index = dict(points)
    for index, point in points:
        if point.name in seen_names:
            out.append((f"points[{index}].name", f"duplicate point name {point.name!r} "
                        f"(already used by points[{seen_names[point.name]}])"))
        seen_names.setdefault(point.name, index)
        last = point.address + point.register_count - 1
        if last > 65535:
            out.append((f"points[{index}].address", f"a {point.type} needs {point.register_count} registers: "
                        f"{point.address}..{last} runs past the last address 65535"))
            continue
        for rng in unreadable:
            if rng.function == point.function and rng.first <= last and point.address <= rng.last:
                out.append((f"points[{index}].address", f"{point.function} {point.address}..{last} lies in a "
                            f"range declared unreadable ({rng.first}..{rng.last})"))
        if point.bit is not None:
            # Several bools may share a register; one bit belongs to one point, and a register with bits
            # belongs to no number.
            other = bits.setdefault((point.function, point.address, point.bit), index)
            if other != index:
                out.append((f"points[{index}].bit", f"bit {point.bit} of {point.function} register "
                            f"{point.address} is already points[{other}] ({by_index[other].name!r})"))
                continue
            marker = owner.setdefault((point.function, point.address), -1)
            if marker >= 0:
                out.append((f"points[{index}].address", f"overlaps points[{marker}] ({by_index[marker].name!r}) "
                            f"at {point.function} register {point.address}"))
            continue
        for register in range(point.address, last + 1):
            other = owner.setdefault((point.function, register), index)
            if other != index:
                whom = "bit points" if other < 0 else f"points[{other}] ({by_index[other].name!r})"
                out.append((f"points[{index}].address", f"overlaps {whom} at {point.function} register {register}"))
                break
    return out


def _register_point(prefix: str, type_: str, function: str, address: int) -> ModbusPoint:
    """A register another point reads beside its own, as the planner reads it when no point of the device is
    that register: a point of its own, read in the same poll as its dependants and never sent."""
    return ModbusPoint(name=f"{prefix}.{function}.{address}", function=function, address=address,  # type: ignore[arg-type]
                       type=type_)  # type: ignore[arg-type]


def _read_as_is(point: ModbusPoint, type_: str) -> bool:
    """A register point of `type_` taken as the device sends it (no scale, offset or register of its own to
    apply): what an exponent (int16) or a roll-over counter (uint16) must be to serve another point."""
    return point.type == type_ and point.function not in BIT_FUNCTIONS and point.scale == 1.0 \
        and point.offset == 0.0 and not point.uses_other_register


def scale_point(function: str, address: int) -> ModbusPoint:
    """The exponent register a `scale_register` names: an int16."""
    return _register_point("sf", "int16", function, address)


def _is_exponent(point: ModbusPoint) -> bool:
    return _read_as_is(point, "int16")


def _scale_problems(points: list[ModbusPoint], unreadable: list[UnreadableRange]) -> list[tuple[str, str]]:
    """`scale_from` must name an int16 point that is itself unscaled; `scale_register` must be a register that
    is free or is such a point, and readable."""
    out: list[tuple[str, str]] = []
    by_name = {p.name: p for p in points}
    for index, point in enumerate(points):
        if point.scale_from is not None:
            source = by_name.get(point.scale_from)
            if source is None:
                out.append((f"points[{index}].scale_from", f"names no point of this device ({point.scale_from!r}); "
                            "add the exponent register as an int16 point, or use scale_register"))
            elif not _is_exponent(source):
                out.append((f"points[{index}].scale_from", f"{point.scale_from!r} must be an int16 holding or input "
                            "point without scale, offset or a scale of its own (a power-of-ten exponent)"))
    return out + _companion_problems(points, unreadable, "scale_register", scale_point, _is_exponent,
                                     "an unscaled int16 starting there", "the exponent")


def _companion_problems(points: list[ModbusPoint], unreadable: list[UnreadableRange], key: str,
                        companion: Callable[[str, int], ModbusPoint], fits: Callable[[ModbusPoint], bool],
                        wanted: str, noun: str) -> list[tuple[str, str]]:
    """A register another point reads beside its own (`scale_register`, `carry_register`) must be another
    register than the point's, free or a point of the kind the reader needs (`fits`) starting there, and
    readable; the name the agent gives it when it reads it itself must be free."""
    out: list[tuple[str, str]] = []
    starts = {(p.function, p.address): p for p in points}
    covered: dict[tuple[str, int], int] = {}
    for index, point in enumerate(points):
        for register in range(point.address, point.address + point.register_count):
            covered.setdefault((point.function, register), index)
    hidden: set[str] = set()
    for index, point in enumerate(points):
        register = getattr(point, key)
        if register is None:
            continue
        where = (point.function, register)
        path = f"points[{index}].{key}"
        if covered.get(where) == index:
            out.append((path, f"{point.function} register {register} is the point's own (it spans "
                        f"{point.address}..{point.address + point.register_count - 1}); {noun} is another register"))
            continue
        if where in covered:
            owner = points[covered[where]]
            if starts.get(where) is not owner or not fits(owner):
                out.append((path, f"{point.function} register {register} belongs to points[{covered[where]}] "
                            f"({owner.name!r}), which is not {wanted}"))
            continue
        if any(r.function == point.function and r.first <= register <= r.last for r in unreadable):
            out.append((path, f"{point.function} register {register} lies in a range declared unreadable"))
            continue
        hidden.add(companion(point.function, register).name)
    for index, point in enumerate(points):
        if point.name in hidden:
            out.append((f"points[{index}].name", f"{point.name!r} is the name the agent gives a {key} it "
                        "reads; choose another name"))
    return out


def carry_point(function: str, address: int) -> ModbusPoint:
    """The roll-over counter a `carry_register` names: a uint16."""
    return _register_point("carry", "uint16", function, address)


def _is_carry(point: ModbusPoint) -> bool:
    return _read_as_is(point, "uint16")


def _carry_problems(points: list[ModbusPoint], unreadable: list[UnreadableRange]) -> list[tuple[str, str]]:
    """`carry_register` must be a register that is free or is an unscaled uint16 point starting there, and
    readable."""
    return _companion_problems(points, unreadable, "carry_register", carry_point, _is_carry,
                               "an unscaled uint16 starting there (a roll-over counter)", "the carry")
