"""Request planning and block decoding, both computed once at start-up.

`plan()` turns a device's points into read requests. `BlockDecoder` turns the registers of one response
into readings in one step: the registers are packed to bytes once, reordered once (when any point is not
big-endian), and unpacked by one precompiled `struct` format that covers every point of the block.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from operator import itemgetter

from agent.model import Quality, Reading
from drivers.modbus.config import FUNCTION_CODE, MAX_REGISTERS_PER_READ, ModbusPoint

_STRUCT_CODE = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "int64": "q", "uint64": "Q",
                "float32": "f", "float64": "d"}


@dataclass(frozen=True, slots=True)
class ReadRequest:
    function: str  # "holding" | "input"
    address: int
    count: int
    decoder: BlockDecoder

    @property
    def function_code(self) -> int:
        return FUNCTION_CODE[self.function]


def plan(points: Sequence[ModbusPoint], max_registers: int = MAX_REGISTERS_PER_READ) -> tuple[ReadRequest, ...]:
    """Coalesce adjacent points of the same register space into as few reads as the protocol allows.

    Only registers that belong to configured points are read: bridging gaps could hit addresses a meter
    refuses (an exception response for the whole block).
    """
    requests: list[ReadRequest] = []
    for function in ("holding", "input"):
        group = sorted((p for p in points if p.function == function), key=lambda p: p.address)
        block: list[ModbusPoint] = []
        for point in group:
            if block:
                start = block[0].address
                end = block[-1].address + block[-1].register_count
                if point.address != end or point.address + point.register_count - start > max_registers:
                    requests.append(_request(function, block))
                    block = []
            block.append(point)
        if block:
            requests.append(_request(function, block))
    return tuple(requests)


def _request(function: str, block: list[ModbusPoint]) -> ReadRequest:
    start = block[0].address
    count = block[-1].address + block[-1].register_count - start
    return ReadRequest(function, start, count, BlockDecoder(start, count, block))


class BlockDecoder:
    def __init__(self, start: int, count: int, points: Sequence[ModbusPoint]) -> None:
        self.count = count
        self.points = tuple(points)
        self._pack = struct.Struct(f">{count}H").pack
        fmt = ">"
        position = 0
        permutation = list(range(2 * count))
        reorder = False
        for point in points:
            offset = 2 * (point.address - start)
            width = 2 * point.register_count
            if offset > position:
                fmt += f"{offset - position}x"
            fmt += _STRUCT_CODE[point.type]
            if point.word_order != "ABCD":
                reorder = True
                permutation[offset:offset + width] = [offset + i for i in _byte_order(point.word_order, width)]
            position = offset + width
        self._unpack = struct.Struct(fmt).unpack_from
        self._reorder: Callable[[bytes], tuple[int, ...]] | None = itemgetter(*permutation) if reorder else None
        self._converters = [_converter(point) for point in points]

    def decode(self, registers: Sequence[int]) -> list[Reading]:
        if len(registers) != self.count:
            raise ValueError(f"expected {self.count} registers, got {len(registers)}")
        raw = self._pack(*registers)
        if self._reorder is not None:
            raw = bytes(self._reorder(raw))
        return [convert(value) for convert, value in zip(self._converters, self._unpack(raw), strict=True)]


def _byte_order(order: str, width: int) -> list[int]:
    """For each byte of the big-endian (ABCD) form, which byte of the wire form holds it."""
    if order == "DCBA":
        return list(range(width - 1, -1, -1))
    if order == "BADC":
        return [i ^ 1 for i in range(width)]
    # CDAB: words in reverse order, bytes within a word as sent.
    words = width // 2
    return [2 * (words - 1 - i // 2) + i % 2 for i in range(width)]


def _converter(point: ModbusPoint) -> Callable[[int | float], Reading]:
    name, unit, scale, offset = point.name, point.unit, point.scale, point.offset
    scaled = scale != 1.0 or offset != 0.0
    if point.type in ("float32", "float64"):
        shorten = point.type == "float32"
        exact_scale, exact_offset = Decimal(repr(scale)), Decimal(repr(offset))

        def convert_float(raw: float) -> Reading:  # type: ignore[misc]
            if not math.isfinite(raw):
                return Reading(name, None, unit, Quality.BAD, "not a number (NaN)" if raw != raw else "infinite")
            value = shortest_float32(raw) if shorten else raw
            if scaled:
                # In decimal, so that 16777216 x 0.001 is 16777.216 and 229.0 x 0.1 is 22.9: binary
                # arithmetic would add noise, rounding to fixed digits would cut real ones.
                value = float(Decimal(repr(value)) * exact_scale + exact_offset)
            return Reading(name, value, unit)

        return convert_float  # type: ignore[return-value]

    digits = min(12, max(_decimals(scale), _decimals(offset)))

    def convert_int(raw: int) -> Reading:  # type: ignore[misc]
        if scaled:
            return Reading(name, round(raw * scale + offset, digits), unit)
        return Reading(name, raw, unit)

    return convert_int  # type: ignore[return-value]


def _decimals(number: float) -> int:
    exponent = Decimal(repr(number)).as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


_F32 = struct.Struct(">f")


def shortest_float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32: a register holding 229.8 gives 229.8,
    not 229.8000030517578 (the exact binary value, which no meter means)."""
    pack, unpack = _F32.pack, _F32.unpack
    exact = pack(value)
    for digits in (6, 7, 8, 9):  # 9 digits always identify a normal float32
        candidate = float(f"{value:.{digits}g}")
        if pack(candidate) == exact:
            return candidate
    return unpack(exact)[0]
