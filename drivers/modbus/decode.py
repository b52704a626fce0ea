"""Request planning and block decoding, both computed once at start-up.

`plan()` turns a device's points into read requests: points of one register space are joined into one
request when the registers between them (at most `max_gap`) are not declared unreadable and the request
stays within the device's limit. `BlockDecoder` turns the registers of one response into readings in one
step: the registers are packed to bytes once, reordered once (when any point is not big-endian), and
unpacked by one precompiled `struct` format that covers every point of the block; bits, strings and
"not available" sentinels are resolved by per-point converters built at start-up.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from itertools import repeat
from operator import itemgetter
from typing import Any

from agent.floats import shortest_float32
from agent.model import Float32, Quality, Reading
from drivers.modbus.config import (
    BIT_FUNCTIONS,
    FUNCTION_CODE,
    MAX_BITS_PER_READ,
    MAX_REGISTERS_PER_READ,
    ModbusPoint,
    UnreadableRange,
)

_STRUCT_CODE = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "int64": "q", "uint64": "Q",
                "float32": "f", "float64": "d", "bool": "H"}
_BITS = {"int16": 16, "uint16": 16, "int32": 32, "uint32": 32, "int64": 64, "uint64": 64}
FUNCTIONS = ("coil", "discrete", "holding", "input")


@dataclass(frozen=True, slots=True)
class ReadRequest:
    function: str  # "coil" | "discrete" | "holding" | "input"
    address: int
    count: int
    decoder: BlockDecoder | BitDecoder

    @property
    def function_code(self) -> int:
        return FUNCTION_CODE[self.function]

    @property
    def points(self) -> tuple[ModbusPoint, ...]:
        return self.decoder.points


def plan(points: Sequence[ModbusPoint], max_registers: int = MAX_REGISTERS_PER_READ,
         max_gap: int = 0, unreadable: Iterable[UnreadableRange] = (),
         max_bits: int = MAX_BITS_PER_READ) -> tuple[ReadRequest, ...]:
    """The fewest requests that read every point, reading at most `max_gap` unused registers (or bits)
    between two points, never an address inside `unreadable`, never more than the limit per request.
    A point is never split across two requests."""
    unreadable = tuple(unreadable)
    requests: list[ReadRequest] = []
    for function in FUNCTIONS:
        group = sorted((p for p in points if p.function == function), key=lambda p: (p.address, p.bit or 0))
        limit = max_bits if function in BIT_FUNCTIONS else max_registers
        refused = [(r.first, r.last) for r in unreadable if r.function == function]
        block: list[ModbusPoint] = []
        end = 0
        for point in group:
            point_end = point.address + point.register_count
            if block:
                start = block[0].address
                shares = point.address < end  # bits of a register already in the block
                joins = shares or (point.address - end <= max_gap
                                   and not any(first < point.address and last >= end for first, last in refused))
                if not joins or max(end, point_end) - start > limit:
                    requests.append(_request(function, block))
                    block = []
            block.append(point)
            end = max(end, point_end) if len(block) > 1 else point_end
        if block:
            requests.append(_request(function, block))
    return tuple(requests)


def _request(function: str, block: list[ModbusPoint]) -> ReadRequest:
    start = block[0].address
    count = max(p.address + p.register_count for p in block) - start
    decoder = BitDecoder(start, count, block) if function in BIT_FUNCTIONS else BlockDecoder(start, count, block)
    return ReadRequest(function, start, count, decoder)


def split(request: ReadRequest) -> tuple[ReadRequest, ...]:
    """Smaller requests for the points of one the device refused: first the runs of adjacent points (no
    bridged gap), and a run that is refused in turn, one request per register (its bits stay together).
    A request for one register or one value comes back as it is: it cannot be split."""
    runs = plan(request.points, max_registers=request.count, max_bits=request.count)
    if len(runs) > 1:
        return runs
    by_register: dict[int, list[ModbusPoint]] = {}
    for point in request.points:
        by_register.setdefault(point.address, []).append(point)
    return tuple(_request(request.function, group) for group in by_register.values())


class BitDecoder:
    """Coils and discrete inputs: one bool per address."""

    def __init__(self, start: int, count: int, points: Sequence[ModbusPoint]) -> None:
        self.count = count
        self.points = tuple(points)
        self._offsets = [(p.name, p.unit, p.address - start) for p in points]

    def decode(self, bits: Sequence[bool]) -> list[Reading]:
        # pymodbus pads the bits of a response to a multiple of 8.
        if len(bits) < self.count:
            raise ValueError(f"expected {self.count} bits, got {len(bits)}")
        return [Reading(name, bool(bits[offset]), unit) for name, unit, offset in self._offsets]


class BlockDecoder:
    def __init__(self, start: int, count: int, points: Sequence[ModbusPoint]) -> None:
        self.count = count
        self.points = tuple(points)
        self._pack = struct.Struct(f">{count}H").pack
        # One struct field per register range; the bools of one register share its field.
        fields: dict[int, tuple[int, str, str]] = {}  # offset -> (width, code, word_order)
        for point in points:
            offset = 2 * (point.address - start)
            width = 2 * point.register_count
            code = f"{width}s" if point.type == "string" else _STRUCT_CODE[point.type]
            order = "ABCD" if point.type == "bool" else point.word_order
            fields.setdefault(offset, (width, code, order))
        fmt = ">"
        position = 0
        permutation = list(range(2 * count))
        reorder = False
        field_index: dict[int, int] = {}
        for index, (offset, (width, code, order)) in enumerate(sorted(fields.items())):
            field_index[offset] = index
            if offset > position:
                fmt += f"{offset - position}x"
            fmt += code
            if order != "ABCD":
                reorder = True
                permutation[offset:offset + width] = [offset + i for i in _byte_order(order, width)]
            position = offset + width
        self._unpack = struct.Struct(fmt).unpack_from
        self._reorder: Callable[[bytes], tuple[int, ...]] | None = itemgetter(*permutation) if reorder else None
        order_of_fields = [field_index[2 * (p.address - start)] for p in points]
        # The common case, one field per point in order: zip instead of indexing.
        self._direct = order_of_fields == list(range(len(fields)))
        # Commoner still, numbers as the meter sends them (no scale, offset or sentinel): no converter
        # per point at all, which is both faster and much smaller (a device of 100 points kept 90 KB of
        # closures and Decimals).
        self._plain: tuple[tuple[str, str | None, int], ...] | None = None
        self._block: _PlainBlock | None = None
        if self._direct and all(_is_plain(p) for p in points):
            self._plain = tuple((p.name, p.unit, _PLAIN_KIND[p.type]) for p in points)
            self._converters: list[tuple[int, Callable[[int | float | bytes], Reading]]] = []
            kinds = {kind for _, _, kind in self._plain}
            if kinds == {0} or kinds == {2}:  # all float32 or all integers: a block at a time
                self._block = _PlainBlock(self._plain, float32=kinds == {0})
        else:
            self._converters = [(index, _converter(p)) for index, p in zip(order_of_fields, points, strict=True)]

    def decode(self, registers: Sequence[int]) -> list[Reading]:
        if len(registers) != self.count:
            raise ValueError(f"expected {self.count} registers, got {len(registers)}")
        return self.decode_bytes(self._pack(*registers))

    def decode_bytes(self, raw: bytes) -> list[Reading]:
        """The readings of the registers as they came on the wire (2 bytes each, big-endian)."""
        if len(raw) != 2 * self.count:
            raise ValueError(f"expected {self.count} registers, got {len(raw) // 2}")
        if self._reorder is not None:
            raw = bytes(self._reorder(raw))
        values = self._unpack(raw)
        if self._block is not None:
            return self._block.readings(values)
        if self._plain is not None:
            return _plain_readings(self._plain, values)
        if self._direct:
            return [convert(value) for (_, convert), value in zip(self._converters, values, strict=True)]
        return [convert(values[index]) for index, convert in self._converters]


_PLAIN_KIND = {"float32": 0, "float64": 1, "int16": 2, "uint16": 2, "int32": 2, "uint32": 2, "int64": 2,
               "uint64": 2}


def _is_plain(point: ModbusPoint) -> bool:
    return point.type in _PLAIN_KIND and point.scale == 1.0 and point.offset == 0.0 and not point.not_available


def _plain_readings(plain: tuple[tuple[str, str | None, int], ...], values: Sequence[Any]) -> list[Reading]:
    out = []
    append = out.append
    for (name, unit, kind), raw in zip(plain, values, strict=True):
        if kind == 2:
            append(Reading(name, raw, unit))
        elif raw - raw == 0.0:  # finite
            append(Reading(name, Float32(raw) if kind == 0 else raw, unit))
        else:
            append(Reading(name, None, unit, Quality.BAD, "not a number (NaN)" if raw != raw else "infinite"))
    return out


_new_reading = partial(tuple.__new__, Reading)  # Reading._make without its Python frame: a reading per value


class _PlainBlock:
    """The readings of a block whose points are all plain float32 or all plain integers, made a block at a time
    in C loops instead of one Python step per value: the same readings as `_plain_readings` (a test holds
    them equal) in about half the time. Float32 values stay the exact values the meter sent, marked
    Float32: their shortest decimals are worked out where they are shown (agent/floats.py)."""

    def __init__(self, plain: tuple[tuple[str, str | None, int], ...], float32: bool) -> None:
        self._plain = plain
        self._names = tuple(name for name, _, _ in plain)
        self._units = tuple(unit for _, unit, _ in plain)
        self._float32 = float32

    def readings(self, values: tuple[Any, ...]) -> list[Reading]:
        if self._float32:
            if not all(map(math.isfinite, values)):  # the per-value path makes NaN and infinities bad readings
                return _plain_readings(self._plain, values)
            values = tuple(map(Float32, values))
        return list(map(_new_reading, zip(self._names, values, self._units, repeat(Quality.GOOD), repeat(None),
                                          repeat(None), repeat(None))))


def _byte_order(order: str, width: int) -> list[int]:
    """For each byte of the big-endian (ABCD) form, which byte of the wire form holds it."""
    if order == "DCBA":
        return list(range(width - 1, -1, -1))
    if order == "BADC":
        return [i ^ 1 for i in range(width)]
    # CDAB: words in reverse order, bytes within a word as sent.
    words = width // 2
    return [2 * (words - 1 - i // 2) + i % 2 for i in range(width)]


def _converter(point: ModbusPoint) -> Callable[[int | float | bytes], Reading]:
    name, unit = point.name, point.unit
    if point.type == "bool":
        mask = 1 << (point.bit or 0)
        return lambda raw: Reading(name, bool(raw & mask), unit)  # type: ignore[operator]
    if point.type == "string":
        return lambda raw: Reading(name, _text(raw), unit)  # type: ignore[arg-type]
    sentinels = frozenset(_as_raw(value, point.type) for value in point.not_available)
    convert = _number_converter(point)
    if not sentinels:
        return convert  # type: ignore[return-value]

    def convert_unless_sentinel(raw: int | float) -> Reading:  # type: ignore[misc]
        if raw in sentinels:
            return Reading(name, None, unit, Quality.BAD, f"not available (the meter sent {_show(raw, point.type)})")
        return convert(raw)

    return convert_unless_sentinel  # type: ignore[return-value]


def _number_converter(point: ModbusPoint) -> Callable[[int | float], Reading]:
    name, unit, scale, offset = point.name, point.unit, point.scale, point.offset
    scaled = scale != 1.0 or offset != 0.0
    if point.type in ("float32", "float64"):
        shorten = point.type == "float32"
        exact_scale, exact_offset = (Decimal(repr(scale)), Decimal(repr(offset))) if scaled else (None, None)

        def convert_float(raw: float) -> Reading:  # type: ignore[misc]
            if not math.isfinite(raw):
                return Reading(name, None, unit, Quality.BAD, "not a number (NaN)" if raw != raw else "infinite")
            if not scaled:
                return Reading(name, Float32(raw) if shorten else raw, unit)
            # In decimal, so that 16777216 x 0.001 is 16777.216 and 229.0 x 0.1 is 22.9: binary arithmetic
            # would add noise, rounding to fixed digits would cut real ones.
            shown = shortest_float32(raw) if shorten else raw
            value = float(Decimal(repr(shown)) * exact_scale + exact_offset)  # type: ignore[operator]
            return Reading(name, value, unit)

        return convert_float  # type: ignore[return-value]

    digits = min(12, max(_decimals(scale), _decimals(offset)))

    def convert_int(raw: int) -> Reading:  # type: ignore[misc]
        if scaled:
            return Reading(name, round(raw * scale + offset, digits), unit)
        return Reading(name, raw, unit)

    return convert_int  # type: ignore[return-value]


def _as_raw(value: int | float, data_type: str) -> int | float:
    """A sentinel as the decoder sees it: 0x8000 for an int16 is -32768, -1 for a uint16 is 65535."""
    bits = _BITS.get(data_type)
    if bits is None or not isinstance(value, int):
        return value
    value &= (1 << bits) - 1
    if data_type.startswith("int") and value >= 1 << (bits - 1):
        value -= 1 << bits
    return value


def _show(raw: int | float, data_type: str) -> str:
    bits = _BITS.get(data_type)
    if bits is None or not isinstance(raw, int):
        return repr(raw)
    return f"0x{raw & ((1 << bits) - 1):0{bits // 4}X}"


def _text(raw: bytes) -> str:
    """Meters pad strings with NULs or spaces; a NUL ends the text."""
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace").rstrip()


def _decimals(number: float) -> int:
    exponent = Decimal(repr(number)).as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0
