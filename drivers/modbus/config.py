"""The `[[devices]]` entry of a Modbus device and its points. Imports pydantic only.

Addresses are 0-based protocol addresses with the register space named explicitly (`function`):
"holding" is read with function code 03 (vendor numbering 40001 = address 0), "input" with
function code 04 (30001 = address 0).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator

from agent.config import DeviceBase, Name, StrictModel

DataType = Literal["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]
WordOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]

REGISTER_COUNT: dict[str, int] = {
    "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2, "int64": 4, "uint64": 4, "float64": 4,
}
FUNCTION_CODE: dict[str, int] = {"holding": 3, "input": 4}
MAX_REGISTERS_PER_READ = 125  # Modbus application protocol v1.1b3, 6.3 / 6.4


class ModbusPoint(StrictModel):
    name: Name
    function: Literal["holding", "input"] = Field(
        description='"holding" (function code 03, 4xxxx) or "input" (function code 04, 3xxxx).')
    address: int = Field(ge=0, le=65535, description="0-based protocol address (40001 -> 0).")
    type: DataType
    word_order: WordOrder = Field(
        "ABCD", description="Byte order of the value, A = most significant byte: ABCD big-endian, "
        "CDAB word-swapped (low word first), BADC byte-swapped, DCBA little-endian.")
    scale: float = Field(1.0, description="value = raw * scale + offset")
    offset: float = 0.0
    unit: str | None = Field(None, max_length=32)

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

    @property
    def register_count(self) -> int:
        return REGISTER_COUNT[self.type]


class ModbusDevice(DeviceBase):
    driver: Literal["modbus"]
    transport: Literal["tcp"] = Field("tcp", description="Modbus TCP.")
    host: Annotated[str, Field(min_length=1)]
    port: int = Field(502, ge=1, le=65535)
    unit_id: int = Field(1, ge=0, le=255, description="Modbus unit id (slave id); 1-247 on serial lines, "
                                                      "often 1 or 255 for a TCP device.")
    points: list[ModbusPoint] = Field(min_length=1)

    def problems(self) -> list[tuple[str, str]]:
        return _point_problems(list(enumerate(self.points)))

    @classmethod
    def salvage(cls, raw: dict[str, Any]) -> list[tuple[str, str]]:
        points = raw.get("points")
        if not isinstance(points, list):
            return []
        valid = []
        for index, point in enumerate(points):
            try:
                valid.append((index, ModbusPoint.model_validate(point)))
            except ValidationError:
                continue  # reported with the device's own errors
        return _point_problems(valid)


def _point_problems(points: list[tuple[int, ModbusPoint]]) -> list[tuple[str, str]]:
    """Duplicate names, values running past the last address, and points sharing a register."""
    out: list[tuple[str, str]] = []
    seen_names: dict[str, int] = {}
    owner: dict[tuple[str, int], int] = {}
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
        for register in range(point.address, last + 1):
            other = owner.setdefault((point.function, register), index)
            if other != index:
                out.append((f"points[{index}].address", f"overlaps points[{other}] ({by_index[other].name!r}) "
                            f"at {point.function} register {register}"))
                break
    return out
