"""Every shipped profile polled end to end against a meter built from the vendor's map.

The meter is a real pymodbus server whose registers are filled from tests/profile_maps.py, a table
transcribed by hand from each vendor's document (never from the profile under test). The agent reads it
through the profile with the real driver; every point must come back good, with the value the map's raw
registers mean after the map's conversion, and the map's unit. An address one register off, a swapped
word order, a wrong type or scale in a profile fails here, and so does a counter read without the register
that counts its roll-overs (the map's `Carry`, served above 0). The registers are encoded by this module
(struct, big-endian words) rather than by the driver's decoder, so the two cannot share a mistake.
"""

from __future__ import annotations

import math
import struct
from dataclasses import replace
from typing import Any

import pytest

from agent.model import Quality, Reading
from drivers.modbus.config import ModbusDevice
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.profiles import available, expand_profile, load
from drivers.modbus.simulator import SimServer
from tests.conftest import FixedRegisters
from tests.profile_maps import GIMAC1000_EX_ONLY, MAPS, MeterMap, Row

_STRUCT = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "int64": ">q", "uint64": ">Q",
           "float32": ">f", "float64": ">d"}
_FUNCTION = {3: "holding", 4: "input"}


def encode(row: Row) -> list[int]:
    """The registers the meter sends for `row.raw`: ABCD high word first, CDAB the words reversed."""
    if row.type == "bool":
        return [int(row.raw)]  # the register holding the bit
    raw: Any = row.raw if row.type.startswith("float") else int(row.raw)
    data = struct.pack(_STRUCT[row.type], raw)
    words = [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]
    if row.word_order == "CDAB":
        words.reverse()
    elif row.word_order != "ABCD":
        raise ValueError(f"{row.name}: the map table uses ABCD or CDAB only, got {row.word_order}")
    return words


def expected(row: Row) -> float:
    """What the reading must be: the raw value as the wire holds it, plus its carry, times the map's
    conversion (a bool: its bit, as 0 or 1)."""
    if row.type == "bool":
        assert row.bit is not None
        return float(int(row.raw) >> row.bit & 1)
    raw = struct.unpack(">f", struct.pack(">f", row.raw))[0] if row.type == "float32" else row.raw
    if row.carry is not None:
        raw += row.carry.count * row.carry.per_count
    return raw * row.factor


def meter(table: MeterMap) -> FixedRegisters:
    sizes = {3: 0, 4: 0}
    for row in table.rows:
        sizes[row.function] = max(sizes[row.function], row.address + len(encode(row)) + 1)
        if row.carry is not None:
            sizes[row.function] = max(sizes[row.function], row.carry.address + 2)
    # Unused registers hold a value no row expects, so a point read one register off reads nonsense.
    device = FixedRegisters(holding=[0x7A7A] * sizes[3], inputs=[0x7A7A] * sizes[4])
    written: dict[tuple[int, int], list[int]] = {}
    for row in table.rows:
        # Bools of one register share it: their rows must agree on what the register holds.
        assert written.setdefault((row.function, row.address), encode(row)) == encode(row), row.name
        device.set(row.function, row.address, encode(row))
        if row.carry is not None:
            device.set(row.function, row.carry.address, [row.carry.count])
    return device


def device_for(profile_id: str, port: int, **entry: Any) -> ModbusDevice:
    raw, problems = expand_profile({"name": "m", "driver": "modbus", "host": "127.0.0.1", "port": port,
                                    "unit_id": 1, "timeout": "2s", "profile": profile_id, **entry})
    assert problems == []
    return ModbusDevice.model_validate(raw)


async def polls(profile_id: str, device: FixedRegisters, count: int = 1,
                **entry: Any) -> list[tuple[list[Reading], int]]:
    """`count` polls of `device`, served by a real pymodbus server, through the shipped profile and the real
    driver: each poll's readings and the requests it sent."""
    async with SimServer({1: device}, update_interval=None) as server:
        driver = ModbusDriver(device_for(profile_id, server.port, **entry))
        try:
            return [(await driver.poll(), driver.sent_last_poll) for _ in range(count)]
        finally:
            await driver.close()


async def poll(profile_id: str, device: FixedRegisters, **entry: Any) -> list[Reading]:
    """One poll of `device` (see `polls`): its readings."""
    ((readings, _),) = await polls(profile_id, device, **entry)
    return readings


async def mismatches(profile_id: str, **entry: Any) -> dict[str, str]:
    """Points of the profile that disagree with the vendor's map, with what was read against what the map
    means; empty when the profile reads the map's meter correctly."""
    table = MAPS[profile_id]
    return disagreements(table, await poll(profile_id, meter(table), **entry))


def disagreements(table: MeterMap, readings: list[Reading]) -> dict[str, str]:
    rows = {row.name: row for row in table.rows}
    problems: dict[str, str] = {}
    for reading in readings:
        row = rows[reading.point]
        want = expected(row)
        if reading.quality is not Quality.GOOD:
            problems[reading.point] = f"bad reading: {reading.reason}"
        elif not isinstance(reading.value, int | float) or not math.isclose(reading.value, want, rel_tol=1e-6,
                                                                             abs_tol=1e-9):
            problems[reading.point] = f"read {reading.value!r}, the map means {want!r} ({row.register})"
        elif reading.unit != row.unit:
            problems[reading.point] = f"unit {reading.unit!r}, expected {row.unit!r}"
    return problems


def test_every_shipped_profile_has_a_map_and_every_map_a_profile() -> None:
    assert set(MAPS) == set(available())


@pytest.mark.parametrize("profile_id", sorted(MAPS))
def test_the_profile_has_exactly_the_maps_points_with_the_maps_types(profile_id: str) -> None:
    table = MAPS[profile_id]
    device = device_for(profile_id, 502)
    points = {p.name: p for p in device.points}
    assert set(points) == {row.name for row in table.rows}
    for row in table.rows:
        point = points[row.name]
        where = f"{profile_id}.{row.name} ({row.register})"
        assert (point.function, point.address, point.type) == (_FUNCTION[row.function], row.address, row.type), where
        assert point.bit == row.bit, where
        if len(encode(row)) > 1:  # the order of the words of a one-register value is meaningless
            assert point.word_order == row.word_order, where
        carry = (row.carry.address, row.carry.per_count) if row.carry else (None, None)
        assert (point.carry_register, point.carry_factor) == carry, where


@pytest.mark.parametrize("profile_id", sorted(MAPS))
def test_a_verified_profile_rests_on_the_vendors_document_alone(profile_id: str) -> None:
    table = MAPS[profile_id]
    unconfirmed = [row.name for row in table.rows if row.source != "vendor"]
    if load(profile_id).verified:
        assert unconfirmed == [], f"{profile_id} is marked verified but these rest on other sources"
    else:
        notes = load(profile_id).notes
        assert notes.strip(), f"{profile_id}: say in notes what is unconfirmed"


@pytest.mark.parametrize("profile_id", sorted(MAPS))
async def test_the_profile_reads_its_vendors_meter_correctly(profile_id: str) -> None:
    assert await mismatches(profile_id) == {}


@pytest.mark.parametrize(("profile_id", "point", "change"), [
    ("eastron_sdm630", "energy_active_import", {"word_order": "CDAB"}),
    ("elt_mb350uc", "co2", {"address": 0x4F}),  # 0x0050 taken for a one-based number: the manual prints addresses
    ("elt_mb350uc", "temperature", {"type": "uint16"}),  # -10.3 ℃ read unsigned is 6543.3 ℃
    ("carlo_gavazzi_em24", "active_power_total", {"word_order": "ABCD"}),
    ("carlo_gavazzi_em24_rs485", "energy_active_import", {"word_order": "ABCD"}),
    # 0042h is kWh(+) PAR, the resettable partial counter (V4R0 p.8, p.13), which public drivers read as the total
    ("carlo_gavazzi_em24_rs485", "energy_active_import", {"address": 0x42}),
    ("carlo_gavazzi_em24_rs485", "frequency", {"address": 0x33}),  # the E1 layout's frequency address
    ("ls_gimac1000", "current_l1", {"address": 2}),      # 30003 (average) instead of 30005: a classic slip
    ("ls_gimac1000", "energy_active_import", {"carry_register": None, "carry_factor": None}),  # Giga counter left out
    ("ls_gimac1000", "energy_apparent", {"carry_register": 530}),  # the active energy's Giga counter
    ("ls_gimac1000_ex", "energy_active_export", {"carry_factor": 1e6}),
    ("ls_gimac1000", "ex_model", {"bit": 3}),  # the RS485 flag
    ("schneider_pm5500", "energy_active_import", {"type": "uint32"}),
    ("schneider_pm5500", "demand_active_power", {"address": 3766}),  # the register number, not the address
    ("abb_m4m30", "voltage_l1_n", {"scale": 1.0}),
    ("abb_m4m30", "voltage_l1_n", {"address": 0x5B00}),  # ABB's EQ-meter address: the M4M's system voltage
    ("rootech_accura2350", "active_power_total", {"address": 11267}),  # the register number, not the address
    # the 2300S serves its map as holding registers (guide rev 1.41 p.29), not input registers
    ("rootech_accura2350", "active_power_total", {"function": "input"}),
    ("delta_ohm_pmsense", "pm2_5", {"address": 1}),  # PM2.5 as a particle count (N°/ml), not µg/m³ (V1.3 p.15)
    ("delta_ohm_pmsense", "pm10", {"address": 6}),   # the register number (V1.0), not the address
    ("vaisala_gmp252", "co2", {"word_order": "ABCD"}),  # Vaisala sends the low word first (p.118)
    ("vaisala_gmp252", "co2", {"address": 1}),          # register number 1 used as the address
    ("vaisala_hmdw110", "humidity", {"word_order": "ABCD"}),  # low word first (M211726EN-D p.78)
    ("vaisala_hmdw110", "dew_frost_point", {"address": 9}),   # register number 9 used as the address (p.79)
    # the newer HMD60/HMD65's map (M212243EN-C) has Dew/frost point at 0006hex; the HMDW110 has it at 0008hex
    ("vaisala_hmdw110", "dew_frost_point", {"address": 6}),
    # 302 is "L1 Current (Trip n-0)", the record of the last trip, which a public program reads as the live current
    ("schneider_eocr_isem2", "current_l1", {"address": 302}),
    ("schneider_eocr_isem2", "energy_active_import", {"address": 142}),  # the map's numbers taken as one-based
    ("schneider_eocr_isem2", "energy_active_import", {"word_order": "CDAB"}),
    ("schneider_eocr_isem2", "motor_trip", {"bit": 4}),  # "System Tripped" (a stopped motor's trip) for System Fault
])
async def test_a_mistake_in_a_profile_fails_against_the_map(profile_id: str, point: str,
                                                           change: dict[str, Any]) -> None:
    """The check above is not vacuous: one wrong key in one point is caught, and only that point."""
    problems = await mismatches(profile_id, overrides={point: change})
    assert list(problems) == [point], problems


async def test_the_mb350uc_is_read_in_one_request_within_its_limits() -> None:
    """ELT Sensor's MB-350U-C as its Modbus chapter describes it (printed p.10): holding registers only (code 03),
    no read longer than 4 registers (exception 03, "Exception of Quantity of Registers"), nothing outside
    0x0050-0x0053 (exception 02, "Exception of Starting Address"). The profile must get all four values, a
    temperature below 0 ℃ included, in one request."""
    table = MAPS["elt_mb350uc"]
    device = meter(table)
    device.longest_read = 4
    device.refuse(3, 0, 0x004F)
    device.refuse(3, 0x0054, len(device.registers(3)) - 1)
    ((readings, sent),) = await polls("elt_mb350uc", device)
    assert disagreements(table, readings) == {}
    assert len(readings) == len(table.rows) and sent == 1


async def test_abb_m4m_no_value_marks_are_sent_bad_not_as_numbers() -> None:
    """ABB's M4M manual (2CSG445050D0201 V1.05, p.12): a quantity missing in the connected meter answers
    normally, with FFFF in every register if the table types it unsigned, the largest positive number if
    signed. Every point of the profile must send that as a bad reading, never as 429496729.5 V or as a
    counter of 1.8e17 kWh."""
    table = MAPS["abb_m4m30"]

    def no_value(row: Row) -> Row:
        bits = 16 * len(encode(row))
        return replace(row, raw=(1 << (bits - 1)) - 1 if row.type.startswith("int") else (1 << bits) - 1)

    invalid = MeterMap(table.profile, table.document, tuple(no_value(row) for row in table.rows))
    readings = await poll("abb_m4m30", meter(invalid))
    assert {r.point for r in readings} == {row.name for row in table.rows}
    sent_as_numbers = {r.point: r.value for r in readings
                       if r.quality is not Quality.BAD or not (r.reason or "").startswith("not available")}
    assert sent_as_numbers == {}


async def test_an_energy_the_pm5500_marks_not_available_is_sent_bad_not_as_a_huge_negative_count() -> None:
    """Schneider's register list ("Data Types" sheet) gives 0x8000000000000000 as the INT64 'no value' code; read
    as a number it is -9.2e15 kWh, which a platform would take for a counter reset."""
    table = MAPS["schneider_pm5500"]
    device = meter(table)
    device.set(3, 3203, [0x8000, 0, 0, 0])  # Active Energy Delivered (Into Load), register 3204
    readings = {reading.point: reading for reading in await poll("schneider_pm5500", device)}
    assert readings["energy_active_import"].quality is Quality.BAD
    assert readings["energy_active_import"].value is None
    assert readings["energy_active_export"].quality is Quality.GOOD


async def test_a_meter_set_to_swap_words_is_read_right_with_one_device_key() -> None:
    """The GIMAC1000's word order is a setting of the meter (SWAP, holding 41009). A meter set to send the low
    word first is read wrong by the profile as shipped, every float; `word_order = "CDAB"` on the device puts
    all of them right, and leaves the 16-bit points (Giga counters, settings) alone."""
    table = MAPS["ls_gimac1000"]
    swapped = MeterMap(table.profile, table.document, tuple(
        replace(row, word_order="CDAB") if len(encode(row)) > 1 else row for row in table.rows))
    floats = {row.name for row in table.rows if row.type == "float32"}
    wrong = set(disagreements(swapped, await poll("ls_gimac1000", meter(swapped))))
    assert wrong == floats
    assert disagreements(swapped, await poll("ls_gimac1000", meter(swapped), word_order="CDAB")) == {}


def no_model(table: MeterMap) -> FixedRegisters:
    """A GIMAC1000 NO (basic) model: the map's meter, refusing what the map marks "EX Model만 지원" with
    exception 02 (ILLEGAL DATA ADDRESS), as it says a meter answers for an address it does not define."""
    device = meter(table)
    for function, first, last in GIMAC1000_EX_ONLY:
        device.refuse(function, first, last)
    device.longest_read = 124  # "MAX register read count : 124" (p.16): exception 03 beyond
    return device


async def test_the_ex_profile_on_a_basic_no_model_loses_only_the_ex_points() -> None:
    """What a technician gets who picks ls_gimac1000_ex for a NO model: every point both models have reads
    right in every poll, the first one included; the EX points come back bad, each with the refusal as the
    reason, and the polls after the first leave them out (fewer requests)."""
    table = MAPS["ls_gimac1000_ex"]
    ex_only = {row.name for row in table.rows
               if any(f == row.function and first <= row.address <= last for f, first, last in GIMAC1000_EX_ONLY)}
    assert ex_only == {"energy_active_export", "energy_reactive_export", "active_power_l1", "active_power_l2",
                       "active_power_l3", "demand_active_power", "demand_active_power_max"}
    (first, sent_first), (second, sent_second) = await polls("ls_gimac1000_ex", no_model(table), count=2)
    for readings in (first, second):
        problems = disagreements(table, readings)
        assert set(problems) == ex_only, problems
        reasons = {r.point: r.reason for r in readings if r.point in ex_only}
        assert reasons["energy_active_export"] is not None and reasons["energy_active_export"].startswith(
            "the meter refuses it: Modbus exception 2 (illegal data address) for FC04 44..45 (30045)")
        assert reasons["demand_active_power_max"] is not None and reasons["demand_active_power_max"].startswith(
            "the meter refuses it: Modbus exception 2 (illegal data address) for FC04 146..147 (30147)")
    assert sent_second == 3 < sent_first  # 30001-30038, the three Giga counters, 41001-41009


async def test_the_basic_profile_reads_a_no_model_whole() -> None:
    table = MAPS["ls_gimac1000"]
    ((readings, sent),) = await polls("ls_gimac1000", no_model(table))
    assert disagreements(table, readings) == {}
    assert sent == 3 and len(readings) == len(table.rows)


@pytest.mark.parametrize(("profile_id", "missing", "present"), [
    ("vaisala_gmp252", "co2", "temperature"),      # GMP252 guide M211897EN-D p.113
    ("vaisala_hmdw110", "humidity", "temperature"),  # HMDW110 guide M211726EN-D p.79
])
async def test_a_value_a_vaisala_device_marks_unavailable_is_sent_bad_not_as_a_number(
        profile_id: str, missing: str, present: str) -> None:
    """Vaisala's guides: a temporarily missing measurement answers normally, with a quiet NaN (7FC00000h) in the
    float registers. It must reach the platform as a bad reading, and the other values stay good."""
    table = MAPS[profile_id]
    row = next(row for row in table.rows if row.name == missing)
    device = meter(table)
    device.set(row.function, row.address, encode(replace(row, raw=math.nan)))
    readings = {reading.point: reading for reading in await poll(profile_id, device)}
    assert readings[missing].quality is Quality.BAD
    assert readings[missing].value is None
    assert readings[present].quality is Quality.GOOD
