"""Request planning and block decoding, both computed once at start-up.

`plan()` turns a device's points into read requests: points of one register space are joined into one
request when the registers between them (at most `max_gap`) are not declared unreadable (nor learned to be
refused, nor across a learned break) and the request stays within the device's limit. Over TCP it makes the
fewest requests; on a serial line (`LineCost`, from the baud rate, character format and turnaround) it
makes the requests that take the least line time, and the default `max_gap` is the most unused registers
worth reading there instead of one more request. `halves()` splits a request a meter refused, to find by
bisection what it refuses (drivers/modbus/driver.py keeps what it learns). `BlockDecoder` turns the
registers of one response into readings in one step: the registers are packed to bytes once, reordered once
(when any point is not big-endian), and unpacked by one precompiled `struct` format that covers every point
of the block; bits, strings and "not available" sentinels are resolved by per-point converters built at
start-up.
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
from typing import Any, Protocol

from agent.floats import shortest_float32
from agent.model import Float32, Quality, Reading
from drivers.modbus.config import (
    BIT_FUNCTIONS,
    FUNCTION_CODE,
    MAX_BITS_PER_READ,
    MAX_REGISTERS_PER_READ,
    SCALE_EXPONENT_RANGE,
    ModbusDevice,
    ModbusPoint,
    carry_point,
    scale_point,
    vendor_address,
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


class Span(Protocol):
    """An address range of one register space that a request must not read (`UnreadableRange` from the
    config, or a `Refused` range the meter taught the driver)."""

    @property
    def function(self) -> str: ...
    @property
    def first(self) -> int: ...
    @property
    def last(self) -> int: ...


def plan(points: Sequence[ModbusPoint], max_registers: int = MAX_REGISTERS_PER_READ,
         max_gap: int = 0, unreadable: Iterable[Span] = (),
         max_bits: int = MAX_BITS_PER_READ, *, max_bit_gap: int | None = None,
         breaks: Iterable[tuple[str, int]] = (), cost: LineCost | None = None) -> tuple[ReadRequest, ...]:
    """Requests that read every point, reading at most `max_gap` unused registers (`max_bit_gap` unused bits,
    `max_gap` unless given) between two points, never an address inside `unreadable`, never more than the
    limit per request, and never across a break (`(function, address)`: no request reads both address - 1
    and address). A point is never split across two requests.

    Without `cost`, the fewest requests (each as long as the rules allow, in address order). With the cost
    of a serial line, the requests that take the least line time: one more request against the registers
    read through, where the request limit makes that a real choice (a longer first request can push the
    next one past an unused stretch it would otherwise have had to read)."""
    unreadable = tuple(unreadable)
    breaks = frozenset(breaks)
    requests: list[ReadRequest] = []
    for function in FUNCTIONS:
        group = sorted((p for p in points if p.function == function), key=lambda p: (p.address, p.bit or 0))
        if not group:
            continue
        is_bits = function in BIT_FUNCTIONS
        limit = max_bits if is_bits else max_registers
        gap_limit = (max_gap if max_bit_gap is None else max_bit_gap) if is_bits else max_gap
        refused = [(r.first, r.last) for r in unreadable if r.function == function]
        walls = sorted(address for f, address in breaks if f == function)

        def joins(end: int, address: int, gap_limit: int = gap_limit, refused: list[tuple[int, int]] = refused,
                  walls: list[int] = walls) -> bool:
            """May a request that reads up to `end` (exclusive) go on to a point at `address`?"""
            if address < end:
                return True  # bits of a register already read
            return (address - end <= gap_limit and not any(first < address and last >= end for first, last in refused)
                    and not any(end <= wall <= address for wall in walls))

        if cost is None:
            blocks = _fewest(group, limit, joins)
        else:
            blocks = _cheapest(group, limit, joins, cost.per_request,
                               cost.character / 8 if is_bits else cost.per_register)
        requests.extend(_request(function, block) for block in blocks)
    return tuple(requests)


def _fewest(group: list[ModbusPoint], limit: int, joins: Callable[[int, int], bool]) -> list[list[ModbusPoint]]:
    """Each request as long as it may be, in address order: the fewest requests."""
    blocks: list[list[ModbusPoint]] = []
    block: list[ModbusPoint] = []
    end = 0
    for point in group:
        point_end = point.address + point.register_count
        if block and (not joins(end, point.address) or max(end, point_end) - block[0].address > limit):
            blocks.append(block)
            block = []
        block.append(point)
        end = max(end, point_end) if len(block) > 1 else point_end
    if block:
        blocks.append(block)
    return blocks


def _cheapest(group: list[ModbusPoint], limit: int, joins: Callable[[int, int], bool], per_request: float,
              per_unit: float) -> list[list[ModbusPoint]]:
    """The requests of least total cost (`per_request` each, `per_unit` per register or bit read), by dynamic
    programming over the points in address order: best[j] is the cheapest way to read the first j points."""
    # Points that start at one address (the bits of a register) always travel together.
    units: list[list[ModbusPoint]] = []
    for point in group:
        if units and units[-1][0].address == point.address:
            units[-1].append(point)
        else:
            units.append([point])
    starts = [u[0].address for u in units]
    ends = [max(p.address + p.register_count for p in u) for u in units]
    best: list[tuple[float, int]] = [(0.0, 0)]  # (cost, requests) of the first j units
    cut: list[int] = [0]  # where the last request of best[j] starts
    for j in range(len(units)):
        choice: tuple[float, int] | None = None
        chosen = j
        end = ends[j]
        for i in range(j, -1, -1):
            if i < j:
                end = max(end, ends[i])
                if not joins(ends[i], starts[i + 1]):
                    break
            if end - starts[i] > limit:
                break
            total = (best[i][0] + per_request + (end - starts[i]) * per_unit, best[i][1] + 1)
            if choice is None or total < choice:
                choice, chosen = total, i
        assert choice is not None  # a unit alone always fits: the config keeps a value within one request
        best.append(choice)
        cut.append(chosen)
    blocks: list[list[ModbusPoint]] = []
    j = len(units)
    while j > 0:
        i = cut[j]
        blocks.append([p for u in units[i:j] for p in u])
        j = i
    blocks.reverse()
    return blocks


def _request(function: str, block: Sequence[ModbusPoint]) -> ReadRequest:
    start = block[0].address
    count = max(p.address + p.register_count for p in block) - start
    decoder = BitDecoder(start, count, block) if function in BIT_FUNCTIONS else BlockDecoder(start, count, block)
    return ReadRequest(function, start, count, decoder)


def halves(request: ReadRequest) -> tuple[ReadRequest, ReadRequest] | None:
    """The request's points in two requests of about as many points each, to find by bisection what a
    meter refused in it; None for a request of one value (or of the bits of one register): that cannot be
    split. Each half reads from its first point to its last, so the registers between the halves (if the
    request bridged a gap there) are read by neither."""
    by_register: dict[int, list[ModbusPoint]] = {}
    for point in request.points:
        by_register.setdefault(point.address, []).append(point)
    groups = [by_register[address] for address in sorted(by_register)]
    if len(groups) < 2:
        return None
    middle = len(groups) // 2
    left = [p for g in groups[:middle] for p in g]
    right = [p for g in groups[middle:] for p in g]
    return _request(request.function, left), _request(request.function, right)


# --- what a request costs on a line -----------------------------------------------------------------------

# A read request frame is 8 bytes on RTU (unit, function, address, count, CRC); an answer is 5 bytes
# (unit, function, byte count, CRC) plus the data.
_REQUEST_BYTES = 8
_ANSWER_OVERHEAD_BYTES = 5
# Modbus over serial line v1.02, 2.5.1.1: above 19200 baud the 3.5-character silence is a fixed 1.75 ms.
_FIXED_SILENCE_S = 0.00175
# Over TCP a request costs a round trip and an unused register nearly nothing, but the device may be a
# serial meter behind a gateway whose baud rate the agent cannot see: a moderate default.
TCP_MAX_GAP = 10
MAX_GAP = MAX_REGISTERS_PER_READ - 1


@dataclass(frozen=True, slots=True)
class LineCost:
    """What a serial line spends, in seconds, on one more request and on one more register read through.
    A request costs its frame, the answer's fixed part, the two 3.5-character silences that end them, and
    the turnaround pause after it; a register costs its two bytes in the answer. Reading `gap` unused
    registers is cheaper than a second request while `gap * per_register < per_request`."""

    baudrate: int
    bits_per_character: int
    per_request: float
    per_register: float

    @property
    def character(self) -> float:
        return self.bits_per_character / self.baudrate

    @property
    def max_gap(self) -> int:
        """The most unused registers worth reading to save a request on this line."""
        return min(MAX_GAP, math.floor(self.per_request / self.per_register))

    @property
    def max_bit_gap(self) -> int:
        """The same for coils and discrete inputs: eight bits travel in one byte."""
        return min(MAX_BITS_PER_READ - 1, math.floor(self.per_request / (self.character / 8)))


def line_cost(device: ModbusDevice) -> LineCost | None:
    """The cost model of the device's serial line; None over TCP (including RTU over TCP: the serial line
    is behind a device server, its baud rate is not in the config)."""
    if device.transport != "rtu":
        return None
    bits = 1 + device.data_bits + (0 if device.parity == "N" else 1) + device.stop_bits
    character = bits / device.baudrate
    silence = _FIXED_SILENCE_S if device.baudrate > 19200 else 3.5 * character
    per_request = (_REQUEST_BYTES + _ANSWER_OVERHEAD_BYTES) * character + 2 * silence + device.effective_turnaround
    return LineCost(device.baudrate, bits, per_request, 2 * character)


@dataclass(frozen=True, slots=True)
class Gaps:
    """The gaps the planner may read through for one device, and where they came from."""

    registers: int
    bits: int
    derived: bool  # from the line's cost model (no `max_gap` in the config)
    cost: LineCost | None


def gaps(device: ModbusDevice) -> Gaps:
    """`max_gap` as configured; unset, derived from the serial line's cost model, or `TCP_MAX_GAP`."""
    if device.max_gap is not None:
        return Gaps(device.max_gap, device.max_gap, False, line_cost(device))
    cost = line_cost(device)
    if cost is None:
        return Gaps(TCP_MAX_GAP, TCP_MAX_GAP, True, None)
    return Gaps(cost.max_gap, cost.max_bit_gap, True, cost)


def device_plan(device: ModbusDevice, unreadable: Iterable[Span] = (), breaks: Iterable[tuple[str, int]] = (),
                leave_out: frozenset[str] = frozenset()) -> tuple[ReadRequest, ...]:
    """The device's requests: its points (less `leave_out`, by name) with its limits and gaps, never
    reading its `unreadable` ranges nor the extra ones given."""
    chosen = gaps(device)
    points = planned_points(device)
    if leave_out:
        points = [p for p in points if p.name not in leave_out]
    return plan(points, device.max_registers, chosen.registers, (*device.unreadable, *unreadable),
                device.max_bits, max_bit_gap=chosen.bits, breaks=breaks, cost=chosen.cost)


def planned_points(device: ModbusDevice) -> list[ModbusPoint]:
    """The device's points, then the registers its `scale_register`s (exponents) and `carry_register`s
    (roll-over counters) name that no point reads already, so that the planner reads each in the same poll as
    its dependants, joined to its neighbours."""
    points = list(device.points)
    taken = {(p.function, p.address) for p in points}
    for point in device.points:
        for register, make in ((point.scale_register, scale_point), (point.carry_register, carry_point)):
            if register is not None and (point.function, register) not in taken:
                taken.add((point.function, register))
                points.append(make(point.function, register))
    return points


@dataclass(frozen=True, slots=True)
class _Carry:
    source: str  # the roll-over counter's point name (a hidden `carry.<function>.<address>` or the device's own)
    what: str  # the counter as the reason names it
    factor: Decimal  # raw units per count
    float32: bool  # the raw value is a float32: taken as its shortest decimal
    integral: bool  # an integer value with a whole factor: the result stays an integer when unscaled


@dataclass(frozen=True, slots=True)
class _Pair:
    """What a carried point read in its last poll, to tell a roll-over read in two halves."""

    count: int
    raw: float
    rejected: bool  # that reading was sent bad as torn: the next one is taken as it comes


class Scaling:
    """Completes, once every request of a poll is decoded, the values that need another register of the same
    poll, and drops the registers read only for that (`scale_register`, `carry_register`) from the readings:

    - an exponent (`scale_from`, `scale_register`): value = raw * 10^exponent * scale + offset, in decimal. An
      exponent that is bad, missing, 0x8000 (SunSpec's "not implemented") or outside -10..10 makes its
      dependants bad with the reason.
    - a carry (`carry_register`, a meter's roll-over counter, e.g. the GIMAC1000's "Giga counter"): value =
      (raw + carry * carry_factor) * scale + offset, in decimal. A carry that is bad or missing makes its
      dependants bad with the reason.

    A reading is sent bad, never with a guessed scale or a wrong carry. A counter and its carry are often far
    apart (two requests): when the counter rolls over between the two, one poll reads the old value with the
    new carry (one carry_factor too much) or the new value with the old carry (one too little). Such a pair
    disagrees with the last poll's (the carry rose while the value did not restart, or the value fell while the
    carry stayed): it is sent bad once, and the next reading is taken as it comes, so a reset of the counter or
    a long outage costs one reading, never more. The first poll has no last pair to compare with."""

    def __init__(self, device: ModbusDevice) -> None:
        by_start = {(p.function, p.address): p.name for p in device.points}
        self._source: dict[str, str] = {}  # dependant -> exponent's point name
        self._carry: dict[str, _Carry] = {}  # dependant -> its roll-over counter
        self._scale: dict[str, tuple[Decimal, Decimal, bool]] = {}
        for point in device.points:
            if point.scale_from is not None:
                self._source[point.name] = point.scale_from
            elif point.scale_register is not None:
                key = (point.function, point.scale_register)
                self._source[point.name] = by_start.get(key) or scale_point(*key).name
            elif point.carry_register is not None and point.carry_factor is not None:
                key = (point.function, point.carry_register)
                named = by_start.get(key)
                where = f"{point.function} register {point.carry_register}, " \
                        f"{vendor_address(point.function, point.carry_register)}"
                factor = Decimal(repr(point.carry_factor))
                integral = not point.type.startswith("float") and factor == factor.to_integral()
                self._carry[point.name] = _Carry(
                    named or carry_point(*key).name, f"carry {named} ({where})" if named else f"carry ({where})",
                    factor, point.type == "float32", integral)
            else:
                continue
            self._scale[point.name] = (Decimal(repr(point.scale)), Decimal(repr(point.offset)),
                                       point.scale == 1.0 and point.offset == 0.0)
        self._inputs = frozenset(self._source.values()) | {c.source for c in self._carry.values()}
        self._hidden = frozenset(p.name for p in planned_points(device)[len(device.points):])
        self._last: dict[str, _Pair] = {}

    def __bool__(self) -> bool:
        return bool(self._source or self._carry)

    def apply(self, readings: list[Reading]) -> list[Reading]:
        inputs = {r.point: r for r in readings if r.point in self._inputs}
        out: list[Reading] = []
        for reading in readings:
            if reading.point in self._hidden:
                continue
            if reading.quality is not Quality.GOOD:
                out.append(reading)
                continue
            source = self._source.get(reading.point)
            if source is not None:
                out.append(self._scaled(reading, source, inputs.get(source)))
                continue
            carry = self._carry.get(reading.point)
            out.append(reading if carry is None else self._carried(reading, carry, inputs.get(carry.source)))
        return out

    def _scaled(self, reading: Reading, source: str, exponent_reading: Reading | None) -> Reading:
        problem, exponent = _exponent(source, exponent_reading)
        if problem is not None:
            return Reading(reading.point, None, reading.unit, Quality.BAD, problem)
        scale, offset, plain = self._scale[reading.point]
        value = Decimal(reading.value).scaleb(exponent) * scale + offset  # type: ignore[arg-type]
        return Reading(reading.point, int(value) if plain and exponent >= 0 else float(value), reading.unit)

    def _carried(self, reading: Reading, carry: _Carry, counter: Reading | None) -> Reading:
        name, raw = reading.point, reading.value
        if counter is None:
            return Reading(name, None, reading.unit, Quality.BAD, f"{carry.what} was not read in this poll")
        count = counter.value
        if counter.quality is not Quality.GOOD or not isinstance(count, int) or isinstance(count, bool):
            return Reading(name, None, reading.unit, Quality.BAD, f"{carry.what} unavailable: {counter.reason}")
        assert isinstance(raw, int | float)  # a good reading of a number (the config allows nothing else)
        last = self._last.get(name)
        if last is not None and not last.rejected and (
                (count > last.count and raw >= last.raw) or (count == last.count and raw < last.raw)):
            self._last[name] = _Pair(last.count, last.raw, True)
            return Reading(name, None, reading.unit, Quality.BAD,
                           f"read either side of a roll-over: {_show_raw(raw, carry)} with {carry.what} = {count}, "
                           f"after {_show_raw(last.raw, carry)} with {last.count} in the last poll (the counter "
                           "and its carry are read in separate requests); sent bad once, the next poll is taken "
                           "as read")
        self._last[name] = _Pair(count, raw, False)
        exact = Decimal(repr(shortest_float32(raw))) if carry.float32 else Decimal(repr(raw)) \
            if isinstance(raw, float) else Decimal(raw)
        scale, offset, plain = self._scale[name]
        value = (exact + count * carry.factor) * scale + offset
        return Reading(name, int(value) if plain and carry.integral else float(value), reading.unit)


def _show_raw(raw: float, carry: _Carry) -> str:
    return repr(shortest_float32(raw)) if carry.float32 else repr(raw)


def _exponent(source: str, reading: Reading | None) -> tuple[str | None, int]:
    """The exponent in `reading`, or why there is none."""
    what = f"scale factor {source}"
    if source.startswith("sf."):  # an exponent read for `scale_register`: say where it is
        _, function, address = source.split(".")
        what = f"scale factor ({function} register {address})"
    if reading is None:
        return f"{what} was not read in this poll", 0
    if reading.quality is not Quality.GOOD or not isinstance(reading.value, int):
        return f"{what} unavailable: {reading.reason}", 0
    if reading.value == -0x8000:
        return f"{what} not implemented (the meter sent 0x8000)", 0
    low, high = SCALE_EXPONENT_RANGE
    if not low <= reading.value <= high:
        return f"{what} = {reading.value} is outside {low}..{high}: not a power-of-ten exponent", 0
    return None, reading.value


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
    # A point that needs another register (an exponent, a carry) is decoded raw here and completed by
    # `Scaling` once the whole poll is read.
    return point.type in _PLAIN_KIND and (point.uses_other_register or (point.scale == 1.0 and point.offset == 0.0)) \
        and not point.not_available


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
    scaled = (scale != 1.0 or offset != 0.0) and not point.uses_other_register  # those are completed by `Scaling`
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
