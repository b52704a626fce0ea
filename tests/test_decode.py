"""Request planning and block decoding, checked against an encoder written here, independently, with `struct`.

The encoder lays a value out the way a meter would put it on the wire: the big-endian bytes A B C D ...,
then CDAB = the 16-bit words in reverse order, BADC = the two bytes of each word swapped, DCBA = every
byte reversed. A table of literal register values pins the encoder itself to the conventions.
"""

from __future__ import annotations

import math
import struct
from decimal import Decimal
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.floats import shortest_float32_many
from agent.model import Float32, Quality, Reading
from drivers.modbus.config import MAX_REGISTERS_PER_READ, REGISTER_COUNT, ModbusDevice, ModbusPoint, UnreadableRange
from drivers.modbus.decode import BlockDecoder, gaps, halves, line_cost, plan, shortest_float32


def shown(value: object) -> object:
    """A value as the JSON encoding shows it: a Float32 (the exact float32 a meter sent) by its shortest
    decimal, anything else as it is."""
    return float(repr(value)) if type(value) is Float32 else value

TYPES = ["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]
ORDERS = ["ABCD", "CDAB", "BADC", "DCBA"]
FLOAT32_SMALLEST_NORMAL = 2.0**-126
STRUCT_CODE = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "int64": "q", "uint64": "Q",
               "float32": "f", "float64": "d"}


def encode(value: float, data_type: str, word_order: str) -> list[int]:
    """The registers a meter sends for `value`."""
    big = struct.pack(">" + STRUCT_CODE[data_type], value)
    words = [big[i:i + 2] for i in range(0, len(big), 2)]
    if word_order == "ABCD":
        wire = big
    elif word_order == "CDAB":
        wire = b"".join(reversed(words))
    elif word_order == "BADC":
        wire = b"".join(word[::-1] for word in words)
    elif word_order == "DCBA":
        wire = big[::-1]
    else:
        raise AssertionError(word_order)
    return list(struct.unpack(f">{len(wire) // 2}H", wire))


def point(name: str = "p", data_type: str = "uint16", address: int = 0, word_order: str = "ABCD",
          function: str = "holding", **extra: object) -> ModbusPoint:
    return ModbusPoint(name=name, function=function, address=address, type=data_type, word_order=word_order,
                       **extra)


def decode_one(registers: list[int], data_type: str, word_order: str = "ABCD", **extra: object) -> Reading:
    p = point(data_type=data_type, word_order=word_order, **extra)
    [reading] = BlockDecoder(0, p.register_count, [p]).decode(registers)
    return reading


def float32_shortest(value: float) -> float:
    """Reference: the shortest decimal string that packs to the same float32 (tried digit by digit)."""
    exact = struct.pack(">f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        try:
            if struct.pack(">f", candidate) == exact:
                return candidate
        except OverflowError:  # rounded up past the largest float32
            continue
    raise AssertionError(value)


# --- the encoder itself, against literal register values ----------------------------------------------

@pytest.mark.parametrize(("data_type", "value", "expected"), [
    ("uint32", 0x12345678, {"ABCD": [0x1234, 0x5678], "CDAB": [0x5678, 0x1234],
                            "BADC": [0x3412, 0x7856], "DCBA": [0x7856, 0x3412]}),
    ("uint64", 0x0102030405060708, {"ABCD": [0x0102, 0x0304, 0x0506, 0x0708],
                                    "CDAB": [0x0708, 0x0506, 0x0304, 0x0102],
                                    "BADC": [0x0201, 0x0403, 0x0605, 0x0807],
                                    "DCBA": [0x0807, 0x0605, 0x0403, 0x0201]}),
    ("uint16", 0x1234, {"ABCD": [0x1234], "CDAB": [0x1234], "BADC": [0x3412], "DCBA": [0x3412]}),
    ("float32", 229.8, {"ABCD": [0x4365, 0xCCCD], "CDAB": [0xCCCD, 0x4365], "DCBA": [0xCDCC, 0x6543]}),
])
def test_reference_encoder_matches_literal_registers(data_type: str, value: float,
                                                     expected: dict[str, list[int]]) -> None:
    for word_order, registers in expected.items():
        assert encode(value, data_type, word_order) == registers, word_order
        assert shown(decode_one(registers, data_type, word_order).value) == value


# --- every type in every word order ---------------------------------------------------------------------

KNOWN_VALUES: dict[str, list[float]] = {
    "int16": [-32768, -1, 0, 1, 1234, 32767],
    "uint16": [0, 1, 2205, 0x8000, 65535],
    "int32": [-(2**31), -123456789, -1, 0, 0x01020304, 2**31 - 1],
    "uint32": [0, 1, 0x12345678, 0x80000000, 2**32 - 1],
    "int64": [-(2**63), -1234567890123, -1, 0, 0x0102030405060708, 2**63 - 1],
    "uint64": [0, 0x0102030405060708, 2**63, 2**64 - 1],
    "float32": [0.0, -0.0, 1.0, -12.5, 229.8, 0.001, 50.02, 123456.7, 3.4028235e38, -1.1754944e-38, 1.0000001],
    "float64": [0.0, -0.0, 229.8, math.pi, -1e300, 5e-324, 1.7976931348623157e308],
}


@pytest.mark.parametrize("word_order", ORDERS)
@pytest.mark.parametrize("data_type", TYPES)
def test_known_values_decode_in_every_word_order(data_type: str, word_order: str) -> None:
    for value in KNOWN_VALUES[data_type]:
        reading = decode_one(encode(value, data_type, word_order), data_type, word_order)
        assert reading.quality is Quality.GOOD
        assert reading.reason is None
        assert shown(reading.value) == value, (value, reading)
        # A float32 is marked as one (the compact encoding sends its 4 bytes); it is a float to everything else.
        assert type(reading.value) is (Float32 if data_type == "float32" else type(value)), reading
        assert math.copysign(1, reading.value) == math.copysign(1, value)


def values_of(data_type: str) -> st.SearchStrategy[float]:
    if data_type == "float32":
        return st.floats(width=32, allow_nan=False, allow_infinity=False)
    if data_type == "float64":
        return st.floats(allow_nan=False, allow_infinity=False)
    bits = 16 * REGISTER_COUNT[data_type]
    if data_type.startswith("u"):
        return st.integers(0, 2**bits - 1)
    return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@pytest.mark.parametrize("word_order", ORDERS)
@pytest.mark.parametrize("data_type", TYPES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_value_round_trips(data_type: str, word_order: str, data: st.DataObject) -> None:
    value = data.draw(values_of(data_type))
    reading = decode_one(encode(value, data_type, word_order), data_type, word_order)
    assert reading.quality is Quality.GOOD
    if data_type == "float32":
        # The same float32 on the wire, written as the shortest decimal that says so. (Subnormals, below
        # 1.2e-38, carry fewer digits than 6 and may come back longer than the shortest: no meter sends them.)
        assert struct.pack(">f", reading.value) == struct.pack(">f", value)
        if value == 0 or abs(value) >= FLOAT32_SMALLEST_NORMAL:
            assert shown(reading.value) == float32_shortest(value)
    else:
        assert reading.value == value
        assert math.copysign(1, reading.value) == math.copysign(1, value)


# --- a block of mixed points ----------------------------------------------------------------------------

MIXED = [  # (type, word order, value), laid out back to back from address 10
    ("int16", "ABCD", -1234), ("uint32", "CDAB", 0x12345678), ("float32", "BADC", 229.8),
    ("int64", "DCBA", -1234567890123), ("uint16", "BADC", 0xBEEF), ("float64", "CDAB", -0.125),
    ("int32", "DCBA", -7), ("uint64", "ABCD", 2**64 - 2), ("float32", "DCBA", 50.02), ("float32", "CDAB", 1e-3),
]


def test_a_block_of_mixed_types_and_orders_is_one_request_decoded_in_one_call() -> None:
    points, registers, address = [], [], 10
    for index, (data_type, word_order, value) in enumerate(MIXED):
        points.append(point(f"p{index}", data_type, address, word_order))
        registers += encode(value, data_type, word_order)
        address += REGISTER_COUNT[data_type]
    [request] = plan(points)
    assert (request.function, request.address, request.count) == ("holding", 10, len(registers))
    readings = request.decoder.decode(registers)
    assert [(r.point, shown(r.value)) for r in readings] == [(f"p{i}", v) for i, (_, _, v) in enumerate(MIXED)]


def test_a_decoder_skips_the_registers_between_points() -> None:
    points, registers, address = [], [], 0
    for index, (data_type, word_order, value) in enumerate(MIXED):
        gap = index % 3  # 0, 1 or 2 registers nobody configured
        registers += [0xDEAD] * gap
        address += gap
        points.append(point(f"p{index}", data_type, address, word_order))
        registers += encode(value, data_type, word_order)
        address += REGISTER_COUNT[data_type]
    readings = BlockDecoder(0, len(registers), points).decode(registers)
    assert [shown(r.value) for r in readings] == [v for _, _, v in MIXED]


layouts = st.lists(st.tuples(st.sampled_from(TYPES), st.sampled_from(ORDERS), st.integers(0, 3), st.data()),
                   min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(layout=layouts, function=st.sampled_from(["holding", "input"]))
def test_planned_requests_decode_every_point_of_a_random_layout(
        layout: list[tuple[str, str, int, st.DataObject]], function: str) -> None:
    image: dict[int, int] = {}  # the device's register space
    points, expected, address = [], {}, 0
    for index, (data_type, word_order, gap, data) in enumerate(layout):
        address += gap
        value = data.draw(values_of(data_type))
        p = point(f"p{index}", data_type, address, word_order, function=function)
        points.append(p)
        expected[p.name] = value
        if data_type == "float32":
            expected[p.name] = struct.unpack(">f", struct.pack(">f", value))[0]
        for offset, register in enumerate(encode(value, data_type, word_order)):
            image[address + offset] = register
        address += p.register_count
    decoded: dict[str, object] = {}
    for request in plan(points):
        registers = [image[a] for a in range(request.address, request.address + request.count)]
        for reading in request.decoder.decode(registers):
            assert reading.point not in decoded
            decoded[reading.point] = reading.value
            if points[int(reading.point[1:])].type == "float32":  # compare the float32, not its decimal form
                decoded[reading.point] = struct.unpack(">f", struct.pack(">f", reading.value))[0]
    assert decoded == expected


def test_a_response_of_the_wrong_length_is_refused() -> None:
    decoder = BlockDecoder(0, 2, [point(data_type="float32")])
    with pytest.raises(ValueError, match="expected 2 registers, got 1"):
        decoder.decode([0x435B])


# --- scale, offset and printable numbers ------------------------------------------------------------------

def test_scale_gives_the_decimal_a_technician_expects() -> None:
    reading = decode_one([2205], "uint16", scale=0.1, unit="V")
    assert reading == Reading("p", 220.5, "V")
    assert repr(reading.value) == "220.5"


@pytest.mark.parametrize(("data_type", "raw", "scale", "offset", "expected"), [
    ("int16", 629, 0.1, -40.0, "22.9"),       # 62.9 - 40 in floats is 22.900000000000006
    ("int16", -400, 0.1, -40.0, "-80.0"),
    ("int16", 0, 1.0, -40.0, "-40.0"),
    ("uint16", 229, 0.1, 0.0, "22.9"),         # 229 * 0.1 in floats is 22.900000000000002
    ("uint16", 5003, 0.01, 0.0, "50.03"),
    ("uint16", 1, 0.001, 0.0, "0.001"),
    ("int32", -1234567, 0.001, 0.0, "-1234.567"),
    ("uint32", 4294967295, 0.01, 0.5, "42949673.45"),
    ("uint16", 7, 0.25, 0.0, "1.75"),
])
def test_scaled_integers_print_without_float_noise(data_type: str, raw: int, scale: float, offset: float,
                                                   expected: str) -> None:
    registers = encode(raw, data_type, "ABCD")
    assert repr(decode_one(registers, data_type, scale=scale, offset=offset).value) == expected


@settings(max_examples=200, deadline=None)
@given(raw=st.integers(-(2**31), 2**31 - 1), scale=st.sampled_from([0.1, 0.01, 0.001, 0.5, 0.25, 2.0, -0.1]),
       offset=st.sampled_from([0.0, -40.0, 0.5, 273.15, -0.05]))
def test_scaled_integer_is_the_exact_decimal_result(raw: int, scale: float, offset: float) -> None:
    reading = decode_one(encode(raw, "int32", "CDAB"), "int32", "CDAB", scale=scale, offset=offset)
    exact = Decimal(raw) * Decimal(repr(scale)) + Decimal(repr(offset))
    assert reading.value == float(exact)


def test_float32_comes_back_as_the_shortest_decimal() -> None:
    exact = struct.unpack(">f", struct.pack(">f", 229.8))[0]
    assert exact == 229.8000030517578  # what a naive decoder reports
    reading = decode_one(encode(229.8, "float32", "CDAB"), "float32", "CDAB")
    assert repr(reading.value) == "229.8"


@pytest.mark.parametrize(("raw", "scale", "offset", "expected"), [
    (2205.0, 0.1, 0.0, "220.5"), (229.8, 1.0, -40.0, "189.8"), (1.5, 1000.0, 0.0, "1500.0"),
])
def test_scaled_float32_prints_without_float_noise(raw: float, scale: float, offset: float, expected: str) -> None:
    reading = decode_one(encode(raw, "float32", "ABCD"), "float32", scale=scale, offset=offset)
    assert repr(reading.value) == expected


def test_scaling_a_float32_keeps_the_precision_of_its_register() -> None:
    unscaled = decode_one(encode(16777216.0, "float32", "ABCD"), "float32")
    assert unscaled.value == 16777216.0
    scaled = decode_one(encode(16777216.0, "float32", "ABCD"), "float32", scale=0.001)
    assert scaled.value == 16777.216


def test_scaled_float64_prints_without_float_noise() -> None:
    reading = decode_one(encode(229.0, "float64", "ABCD"), "float64", scale=0.1)
    assert repr(reading.value) == "22.9"


NOT_A_NUMBER = [  # (type, big-endian bytes, what the reason names)
    ("float32", bytes.fromhex("7fc00000"), "NaN"), ("float32", bytes.fromhex("ffc00001"), "NaN"),
    ("float32", bytes.fromhex("7f800001"), "NaN"),  # signalling NaN
    ("float32", bytes.fromhex("7f800000"), "infinite"), ("float32", bytes.fromhex("ff800000"), "infinite"),
    ("float64", bytes.fromhex("7ff8000000000000"), "NaN"), ("float64", bytes.fromhex("7ff0000000000001"), "NaN"),
    ("float64", bytes.fromhex("7ff0000000000000"), "infinite"),
    ("float64", bytes.fromhex("fff0000000000000"), "infinite"),
]


@pytest.mark.parametrize("word_order", ORDERS)
@pytest.mark.parametrize(("data_type", "big_endian", "reason"), NOT_A_NUMBER)
@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_nan_and_infinity_are_bad_readings_never_numbers(data_type: str, big_endian: bytes, reason: str,
                                                         word_order: str, scale: float) -> None:
    value = struct.unpack(">" + STRUCT_CODE[data_type], big_endian)[0]
    # The neighbour in the same block stays good.
    points = [point("bad", data_type, 0, word_order, scale=scale, unit="V"),
              point("good", "uint16", REGISTER_COUNT[data_type])]
    registers = [*encode(value, data_type, word_order), 42]
    bad, good = BlockDecoder(0, len(registers), points).decode(registers)
    assert bad.quality is Quality.BAD
    assert bad.value is None
    assert bad.reason is not None and reason in bad.reason
    assert bad.unit == "V"
    assert good == Reading("good", 42)


# --- plan() ------------------------------------------------------------------------------------------------

def span(request: object) -> tuple[str, int, int]:
    return request.function, request.address, request.count  # type: ignore[attr-defined]


def test_adjacent_points_merge_into_one_request() -> None:
    points = [point("a", "uint16", 0), point("b", "uint16", 1), point("c", "float32", 2), point("d", "int64", 4)]
    [request] = plan(points)
    assert span(request) == ("holding", 0, 8)
    assert request.function_code == 3
    assert request.decoder.points == tuple(points)
    assert request.decoder.count == 8


def test_a_gap_splits_the_request() -> None:
    points = [point("a", "uint16", 0), point("b", "float32", 1), point("c", "uint16", 4)]
    assert [span(r) for r in plan(points)] == [("holding", 0, 3), ("holding", 4, 1)]


def test_holding_and_input_registers_never_merge() -> None:
    points = [point("h0", "uint16", 0, function="holding"), point("i1", "uint16", 1, function="input"),
              point("i0", "uint16", 0, function="input"), point("h1", "uint16", 1, function="holding")]
    requests = plan(points)
    assert [span(r) for r in requests] == [("holding", 0, 2), ("input", 0, 2)]
    assert [r.function_code for r in requests] == [3, 4]
    assert [[p.name for p in r.decoder.points] for r in requests] == [["h0", "h1"], ["i0", "i1"]]


def test_points_in_any_order_are_planned_by_address() -> None:
    points = [point("c", "uint16", 3), point("a", "float32", 0), point("b", "uint16", 2)]
    [request] = plan(points)
    assert span(request) == ("holding", 0, 4)
    assert [p.name for p in request.decoder.points] == ["a", "b", "c"]


def test_one_hundred_adjacent_float32_need_two_requests() -> None:
    points = [point(f"f{i}", "float32", 2 * i, function="input") for i in range(100)]
    requests = plan(points)
    assert [span(r) for r in requests] == [("input", 0, 124), ("input", 124, 76)]
    assert sum(len(r.decoder.points) for r in requests) == 100


@pytest.mark.parametrize(("count", "expected"), [(125, [(0, 125)]), (126, [(0, 125), (125, 1)]),
                                                 (250, [(0, 125), (125, 125)])])
def test_the_register_limit_is_exactly_125(count: int, expected: list[tuple[int, int]]) -> None:
    requests = plan([point(f"r{i}", "uint16", i) for i in range(count)])
    assert [(r.address, r.count) for r in requests] == expected


@st.composite
def point_sets(draw: st.DrawFn) -> list[ModbusPoint]:
    points, index = [], 0
    for function in ("holding", "input"):
        address = draw(st.integers(0, 200))
        for _ in range(draw(st.integers(0, 150))):
            address += draw(st.sampled_from([0, 0, 0, 0, 1, 5]))
            data_type = draw(st.sampled_from(TYPES))
            if address + REGISTER_COUNT[data_type] > 65536:
                break
            points.append(point(f"p{index}", data_type, address, function=function))
            index += 1
            address += REGISTER_COUNT[data_type]
    return draw(st.permutations(points))


@settings(max_examples=100, deadline=None)
@given(points=point_sets())
def test_plan_invariants(points: list[ModbusPoint]) -> None:
    requests = plan(points)
    planned = [p for r in requests for p in r.decoder.points]
    assert sorted(p.name for p in planned) == sorted(p.name for p in points)  # every point exactly once
    for request in requests:
        block = request.decoder.points
        assert 1 <= request.count <= MAX_REGISTERS_PER_READ
        assert request.decoder.count == request.count
        assert all(p.function == request.function for p in block)
        assert block[0].address == request.address
        for before, after in pairwise(block):
            assert after.address == before.address + before.register_count  # no gap is ever read
        assert block[-1].address + block[-1].register_count == request.address + request.count
    for before, after in pairwise(requests):
        if before.function == after.function:
            end = before.address + before.count
            # Split only where a gap is, or where merging would pass the limit.
            assert after.address > end or before.count + after.decoder.points[0].register_count > 125


@st.composite
def spread_points(draw: st.DrawFn) -> list[ModbusPoint]:
    """Points of one register space with gaps around what a serial line's cost makes worth reading."""
    points, address = [], draw(st.integers(0, 50))
    for index in range(draw(st.integers(1, 40))):
        address += draw(st.sampled_from([0, 0, 1, 5, 14, 19, 20, 25, 60]))
        data_type = draw(st.sampled_from(["uint16", "float32", "uint64"]))
        points.append(point(f"p{index}", data_type, address, function="input"))
        address += REGISTER_COUNT[data_type]
    return points


@settings(max_examples=150, deadline=None)
@given(points=spread_points(), limit=st.sampled_from([8, 40, 125]), baudrate=st.sampled_from([2400, 9600, 38400]),
       hole=st.integers(0, 600), wall=st.integers(0, 600))
def test_the_cheapest_plan_keeps_every_rule_and_never_costs_more_than_the_fewest(
        points: list[ModbusPoint], limit: int, baudrate: int, hole: int, wall: int) -> None:
    cost = line_cost(serial(baudrate=baudrate))
    assert cost is not None
    # A hole and a break only where no point is: they stand for what a meter was found to refuse.
    taken = {a for p in points for a in range(p.address, p.address + p.register_count)}
    unreadable = [] if hole in taken else [UnreadableRange(function="input", first=hole, last=hole)]
    breaks = [("input", wall)]
    rules = {"max_registers": limit, "max_gap": cost.max_gap, "unreadable": unreadable, "breaks": breaks}
    cheapest, fewest = plan(points, **rules, cost=cost), plan(points, **rules)  # type: ignore[arg-type]

    def seconds(requests: tuple[Any, ...]) -> float:
        return sum(cost.per_request + r.count * cost.per_register for r in requests)

    assert seconds(cheapest) <= seconds(fewest) + 1e-9
    assert sorted(p.name for r in cheapest for p in r.points) == sorted(p.name for p in points)
    for request in cheapest:
        assert request.count <= limit
        assert not any(request.address <= r.first <= request.address + request.count - 1 for r in unreadable)
        assert not request.address < wall < request.address + request.count or \
            any(p.address < wall < p.address + p.register_count for p in request.points)  # inside one value
        for before, after in pairwise(request.points):
            assert after.address - (before.address + before.register_count) <= cost.max_gap


# --- gaps, limits, unreadable ranges, splitting ------------------------------------------------------------

def test_gaps_up_to_max_gap_are_bridged() -> None:
    points = [point("a", "uint16", 0), point("b", "uint16", 5), point("c", "uint16", 20)]
    assert [span(r) for r in plan(points, max_gap=4)] == [("holding", 0, 6), ("holding", 20, 1)]
    assert [span(r) for r in plan(points, max_gap=3)] == [("holding", 0, 1), ("holding", 5, 1), ("holding", 20, 1)]
    assert [span(r) for r in plan(points, max_gap=14)] == [("holding", 0, 21)]


def test_a_gap_is_never_bridged_into_an_unreadable_range() -> None:
    points = [point("a", "uint16", 0), point("b", "uint16", 5)]
    refused = [UnreadableRange(function="holding", first=2, last=3)]
    assert [span(r) for r in plan(points, max_gap=10, unreadable=refused)] == [("holding", 0, 1), ("holding", 5, 1)]
    other_space = [UnreadableRange(function="input", first=2, last=3)]
    assert [span(r) for r in plan(points, max_gap=10, unreadable=other_space)] == [("holding", 0, 6)]


def test_a_device_limit_below_125_is_honoured() -> None:
    points = [point(f"f{i}", "float32", 2 * i, function="input") for i in range(50)]
    assert [r.count for r in plan(points, max_registers=40)] == [40, 40, 20]


def test_bits_coalesce_up_to_2000() -> None:
    coils = [point(f"c{i}", "bool", i, function="coil") for i in range(0, 2100, 3)]
    requests = plan(coils, max_gap=2)
    assert [span(r) for r in requests] == [("coil", 0, 1999), ("coil", 2001, 97)]
    assert all(r.function_code == 1 for r in requests)


def test_bits_of_one_register_share_it() -> None:
    points = [point("alarm", "bool", 7, bit=0), point("trip", "bool", 7, bit=15), point("v", "uint16", 8)]
    [request] = plan(points)
    assert span(request) == ("holding", 7, 2)
    readings = request.decoder.decode([0x8001 ^ 0x8000, 42])
    assert [(r.point, r.value) for r in readings] == [("alarm", True), ("trip", False), ("v", 42)]


def test_halves_bisect_by_points_and_keep_the_bits_of_a_register_together() -> None:
    points = [point("a", "uint16", 0), point("b", "uint16", 1), point("x", "bool", 4, bit=0),
              point("y", "bool", 4, bit=1), point("c", "uint16", 9)]
    [bridged] = plan(points, max_gap=10)
    left, right = halves(bridged)  # type: ignore[misc]
    assert (span(left), span(right)) == (("holding", 0, 2), ("holding", 4, 6))  # 2..3 read by neither
    assert [p.name for p in right.points] == ["x", "y", "c"]
    [bits_only] = plan(points[2:4])
    assert halves(bits_only) is None  # one register: what is refused, it cannot be split
    assert halves(plan([point("f", "float32", 0)])[0]) is None


def test_a_break_keeps_two_adjacent_runs_apart() -> None:
    points = [point(f"p{i}", "uint16", i) for i in range(6)]
    assert [span(r) for r in plan(points, breaks=[("holding", 3)])] == [("holding", 0, 3), ("holding", 3, 3)]
    assert [span(r) for r in plan(points, breaks=[("input", 3)])] == [("holding", 0, 6)]
    gapped = [point("a", "uint16", 0), point("b", "uint16", 8)]
    assert len(plan(gapped, max_gap=10, breaks=[("holding", 5)])) == 2  # a break inside a gap: not bridged


def serial(**keys: object) -> ModbusDevice:
    return ModbusDevice.model_validate({"name": "m", "driver": "modbus", "transport": "rtu",
                                        "serial_port": "/dev/ttyUSB0", "points": [{"name": "v", "function": "input",
                                                                                   "address": 0, "type": "uint16"}],
                                        **keys})


def test_a_request_at_9600_baud_costs_about_41_ms_and_a_register_about_2_ms() -> None:
    cost = line_cost(serial())
    assert cost is not None
    # 8 request + 5 answer bytes, two 3.5-character silences, 20 ms turnaround; 10 bits a character (8N1).
    assert cost.per_request == pytest.approx((13 + 7) * 10 / 9600 + 0.020)
    assert round(cost.per_request * 1000) == 41 and round(cost.per_register * 1000, 1) == 2.1
    assert cost.max_gap == 19  # 19 unused registers (39.6 ms) still cost less than one more request
    assert gaps(serial()).registers == 19 and gaps(serial()).derived


@pytest.mark.parametrize(("keys", "expected"), [
    ({"baudrate": 19200}, 29),  # the turnaround weighs more against faster characters
    ({"baudrate": 2400}, 12),
    ({"baudrate": 9600, "parity": "E"}, 18),  # 11 bits a character: the turnaround weighs a little less
    ({"baudrate": 115200}, 124),  # silences fixed at 1.75 ms: read through anything rather than ask twice
    ({"baudrate": 9600, "turnaround": "5ms"}, 12),
])
def test_the_derived_gap_follows_the_line(keys: dict[str, object], expected: int) -> None:
    assert gaps(serial(**keys)).registers == expected


def test_an_explicit_max_gap_wins_and_tcp_keeps_its_default() -> None:
    assert gaps(serial(max_gap=3)).registers == 3 and not gaps(serial(max_gap=3)).derived
    tcp = ModbusDevice.model_validate({"name": "m", "driver": "modbus", "host": "h",
                                       "points": [{"name": "v", "function": "input", "address": 0, "type": "uint16"}]})
    assert line_cost(tcp) is None and gaps(tcp).registers == 10


# --- bits, strings, sentinels ------------------------------------------------------------------------------

def test_coils_decode_by_offset() -> None:
    points = [point("r1", "bool", 10, function="coil"), point("r3", "bool", 12, function="coil")]
    [request] = plan(points, max_gap=1)
    bits = [False, False, True] + [False] * 5  # pymodbus pads to a multiple of 8
    assert [(r.point, r.value) for r in request.decoder.decode(bits)] == [("r1", False), ("r3", True)]


@pytest.mark.parametrize(("registers", "order", "text"), [
    ([0x4C53, 0x2045, 0x4C45, 0x4354], "ABCD", "LS ELECT"),
    ([0x534C, 0x4520, 0x454C, 0x5443], "BADC", "LS ELECT"),
    ([0x4142, 0x4300, 0x5858, 0x5858], "ABCD", "ABC"),       # a NUL ends the text
    ([0x4142, 0x2020, 0x2020, 0x2020], "ABCD", "AB"),        # space padding trimmed
    ([0x0000, 0x0000, 0x0000, 0x0000], "ABCD", ""),
])
def test_strings(registers: list[int], order: str, text: str) -> None:
    reading = decode_one(registers, "string", order, count=4)
    assert reading == Reading("p", text)


def test_a_string_between_numbers_in_one_block() -> None:
    points = [point("a", "uint16", 0), point("name", "string", 1, count=2, word_order="BADC"),
              point("b", "float32", 3, word_order="CDAB")]
    [request] = plan(points)
    registers = [7, 0x4241, 0x0043, *encode(1.5, "float32", "CDAB")]
    assert [(r.point, r.value) for r in request.decoder.decode(registers)] == [("a", 7), ("name", "ABC"),
                                                                               ("b", 1.5)]


@pytest.mark.parametrize(("data_type", "sentinel", "registers"), [
    ("uint16", 0xFFFF, [0xFFFF]), ("int16", 0x8000, [0x8000]), ("int16", -32768, [0x8000]),
    ("uint32", 0xFFFFFFFF, [0xFFFF, 0xFFFF]), ("int32", 0x7FFFFFFF, [0x7FFF, 0xFFFF]),
    ("int32", 0x80000000, [0x8000, 0x0000]), ("uint64", 0xFFFFFFFFFFFFFFFF, [0xFFFF] * 4),
    ("float32", -1, encode(-1.0, "float32", "ABCD")),
])
def test_not_available_sentinels_become_bad(data_type: str, sentinel: int, registers: list[int]) -> None:
    reading = decode_one(registers, data_type, not_available=[sentinel], scale=0.1 if data_type != "float32" else 1)
    assert reading.quality is Quality.BAD and reading.value is None
    assert reading.reason is not None and reading.reason.startswith("not available (the meter sent ")


def test_a_sentinel_is_compared_before_scaling_and_only_for_its_point() -> None:
    assert decode_one([0xFFFE], "uint16", not_available=[0xFFFF], scale=0.1) == Reading("p", 6553.4)
    assert decode_one([0xFFFF], "uint16") == Reading("p", 65535)


@settings(max_examples=200, deadline=None)
@given(data_type=st.sampled_from([t for t in TYPES if not t.startswith("float")]), order=st.sampled_from(ORDERS),
       data=st.data())
def test_a_sentinel_matches_in_every_word_order(data_type: str, order: str, data: st.DataObject) -> None:
    bits = 8 * struct.calcsize(STRUCT_CODE[data_type])
    raw = data.draw(st.integers(0, 2**bits - 1))
    signed = raw - 2**bits if data_type.startswith("int") and raw >= 2 ** (bits - 1) else raw
    registers = encode(signed, data_type, order)
    assert decode_one(registers, data_type, order, not_available=[raw]).quality is Quality.BAD
    other = (raw + 1) % 2**bits
    assert decode_one(registers, data_type, order, not_available=[other]).quality is Quality.GOOD


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=30))
def test_shortest_float32_many_is_shortest_float32_of_each(patterns: list[int]) -> None:
    """The batch (the JSON encoding's path for a poll's float32 values) against the value-by-value search."""
    values = [struct.unpack(">f", struct.pack(">I", bits))[0] for bits in patterns]
    got = shortest_float32_many(values)
    assert [repr(v) for v in got] == [repr(shortest_float32(v)) for v in values]


@settings(max_examples=3000, deadline=None)
@given(bits=st.integers(0, 2**32 - 1))
def test_shortest_float32_matches_the_digit_by_digit_search_for_any_bit_pattern(bits: int) -> None:
    value = struct.unpack(">f", bits.to_bytes(4, "big"))[0]
    if not math.isfinite(value) or (value != 0 and abs(value) < FLOAT32_SMALLEST_NORMAL):
        return
    assert shortest_float32(value) == float32_shortest(value)


@pytest.mark.parametrize("value", [-9.76709948486662e-19, 9.13664052896231e-16, -9.762419495018548e-07,
                                   -9.775060535316404e-13])
def test_where_seven_digits_are_not_the_shortest(value: float) -> None:
    """Values where half an ulp is wider than half a step of the seventh digit (found by a million random
    bit patterns): a shorter form reads back too and is the one to send."""
    assert shortest_float32(value) == float32_shortest(value)
    assert len(repr(shortest_float32(value)).partition("e")[0].replace("-", "").replace(".", "")) < 7


def test_a_block_decodes_the_bytes_of_an_answer_as_it_decodes_its_registers() -> None:
    points, registers = [], []
    for index, (data_type, word_order, value) in enumerate(MIXED):
        points.append(point(f"p{index}", data_type, len(registers), word_order))
        registers += encode(value, data_type, word_order)
    decoder = BlockDecoder(0, len(registers), points)
    assert decoder.decode_bytes(struct.pack(f">{len(registers)}H", *registers)) == decoder.decode(registers)
    with pytest.raises(ValueError, match=f"expected {len(registers)} registers, got 1"):
        decoder.decode_bytes(b"\x43\x5b")


def meter_float32() -> st.SearchStrategy[int]:
    """float32 bit patterns: any at all, and the short decimals meters mostly send (229.8, 49.99, 0.001)."""
    short = st.builds(lambda value, digits: round(value, digits), st.floats(-1e6, 1e6), st.integers(0, 6))
    as_bits = short.map(lambda value: int.from_bytes(struct.pack(">f", value), "big"))
    return st.one_of(st.integers(0, 2**32 - 1), as_bits, st.sampled_from([0x7FC00000, 0x7F800000, 0xFF800000,
                                                                          0x80000000, 0x00000001, 0x7F7FFFFF]))


@settings(max_examples=300, deadline=None)
@given(patterns=st.lists(meter_float32(), min_size=1, max_size=62))
def test_a_block_of_float32_gives_what_each_value_gives_alone(patterns: list[int]) -> None:
    """Blocks of plain float32 are decoded a block at a time: value for value what shortest_float32 gives,
    NaN and infinity bad."""
    points = [point(f"p{i}", "float32", 2 * i) for i in range(len(patterns))]
    registers = [word for bits in patterns for word in (bits >> 16, bits & 0xFFFF)]
    readings = BlockDecoder(0, len(registers), points).decode(registers)
    for reading, bits in zip(readings, patterns, strict=True):
        value = struct.unpack(">f", bits.to_bytes(4, "big"))[0]
        if math.isfinite(value):
            assert reading == (reading.point, value, None, Quality.GOOD, None, None, None)
            assert type(reading.value) is Float32 and repr(reading.value) == repr(shortest_float32(value))
            assert math.copysign(1, reading.value) == math.copysign(1, value)  # type: ignore[arg-type]
        else:
            assert reading.quality is Quality.BAD and reading.value is None


def test_a_block_of_integers_gives_plain_readings() -> None:
    points = [point("a", "int16", 0, unit="W"), point("b", "uint32", 1), point("c", "int64", 3, word_order="CDAB")]
    registers = encode(-5, "int16", "ABCD") + encode(70000, "uint32", "ABCD") + encode(-2**40, "int64", "CDAB")
    readings = BlockDecoder(0, len(registers), points).decode(registers)
    assert readings == [Reading("a", -5, "W"), Reading("b", 70000), Reading("c", -2**40)]
    assert all(type(r) is Reading for r in readings)
