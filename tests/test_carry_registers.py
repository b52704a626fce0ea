"""Counters split over two registers (`carry_register`, `carry_factor`): a value and, elsewhere in the map, a
uint16 that counts its roll-overs (the LS ELECTRIC GIMAC1000's "Giga counter"). The carry is planned into the
same poll, added before the value is stored, never sent as a point; a carry that cannot be trusted makes its
value bad, and a pair read either side of a roll-over is sent bad once instead of one carry too much."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from agent.model import Float32, Quality, Reading
from drivers.modbus import describe
from drivers.modbus.config import ModbusDevice
from drivers.modbus.decode import Scaling, device_plan
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.profiles import ProfileError, parse
from drivers.modbus.simulator import INPUT_REGISTERS, SimServer
from tests.conftest import FixedRegisters, point_config_error

pytestmark = pytest.mark.timeout(30)
GIGA = 1e9

# As the GIMAC1000 lays them out: a float32 in Wh at 30033 (address 32), its Giga counter at 30531 (530).
WH = {"name": "energy_active_import", "function": "input", "address": 32, "type": "float32", "carry_register": 530,
      "carry_factor": GIGA, "scale": 0.001, "unit": "kWh"}
VOLTS = {"name": "voltage", "function": "input", "address": 0, "type": "float32", "unit": "V"}


def device(points: list[dict[str, Any]], **extra: Any) -> ModbusDevice:
    return ModbusDevice.model_validate({"name": "m", "driver": "modbus", "host": "127.0.0.1", "points": points,
                                        **extra})


def float32(value: float) -> list[int]:
    high, low = struct.unpack(">HH", struct.pack(">f", value))
    return [high, low]


# --- planning ---------------------------------------------------------------------------------------------

def test_the_carry_is_read_in_the_same_poll_and_joined_with_its_neighbours() -> None:
    near = {**WH, "carry_register": 34}
    requests = device_plan(device([near, VOLTS]))
    assert [(r.function, r.address, r.count) for r in requests] == [("input", 0, 2), ("input", 32, 3)]
    assert [p.name for p in requests[1].points] == ["energy_active_import", "carry.input.34"]


def test_a_carry_far_away_costs_one_request_more_and_is_read_once_for_several_values() -> None:
    varh = {**WH, "name": "energy_reactive_import", "address": 34, "unit": "kvarh"}
    requests = device_plan(device([WH, varh, VOLTS]))
    assert [(r.address, r.count) for r in requests] == [(0, 2), (32, 4), (530, 1)]
    assert [p.name for p in requests[2].points] == ["carry.input.530"]


def test_check_shows_the_carry_beside_the_point() -> None:
    lines = describe(device([WH]))
    shown = "float32 ABCD +carry(530)x1e+09 x0.001 kWh"
    assert any("energy_active_import" in line and shown in line for line in lines), lines
    assert any("carry.input.530" in line and "uint16" in line for line in lines), lines


# --- the arithmetic, without a server -----------------------------------------------------------------------

def readings(value: float | int, carry: int | None, *, point: str = "energy_active_import",
             unit: str | None = "kWh") -> list[Reading]:
    out = [Reading(point, Float32(value) if isinstance(value, float) else value, unit)]
    if carry is not None:
        out.append(Reading("carry.input.530", carry, None))
    return out


def test_value_is_the_raw_value_plus_the_carry_times_its_factor_then_scaled() -> None:
    scaling = Scaling(device([WH]))
    # 123,456,790 Wh in the float (its shortest decimal: the float32 holds 123,456,792), 7 roll-overs of 1e9 Wh:
    # 7,123,456,790 Wh = 7,123,456.79 kWh, in decimal.
    assert scaling.apply(readings(123456790.0, 7)) == [Reading("energy_active_import", 7123456.79, "kWh")]


def test_a_zero_carry_gives_the_raw_value_scaled() -> None:
    assert Scaling(device([WH])).apply(readings(229.5, 0)) == [Reading("energy_active_import", 0.2295, "kWh")]


def test_an_integer_with_a_whole_factor_stays_an_integer() -> None:
    # A uint16 low word counted in 65536s by another register, sent unscaled: an exact integer.
    low = {"name": "pulses", "function": "input", "address": 10, "type": "uint16", "carry_register": 530,
           "carry_factor": 65536}
    out = Scaling(device([low])).apply(readings(1234, 3, point="pulses", unit=None))
    assert out == [Reading("pulses", 3 * 65536 + 1234, None)] and isinstance(out[0].value, int)


@pytest.mark.parametrize(("carry", "reason"), [
    (None, "carry (input register 530, 30531) was not read in this poll"),
    (Reading("carry.input.530", None, None, Quality.BAD, "the meter refuses it: Modbus exception 2"),
     "carry (input register 530, 30531) unavailable: the meter refuses it: Modbus exception 2"),
])
def test_a_carry_that_is_bad_or_missing_makes_the_value_bad_never_wrong(carry: Reading | None, reason: str) -> None:
    given = [Reading("energy_active_import", Float32(5.0), "kWh"), *([carry] if carry else [])]
    assert Scaling(device([WH])).apply(given) == [
        Reading("energy_active_import", None, "kWh", Quality.BAD, reason)]


def test_a_bad_value_stays_bad_with_its_own_reason() -> None:
    bad = Reading("energy_active_import", None, "kWh", Quality.BAD, "not a number (NaN)")
    assert Scaling(device([WH])).apply([bad, Reading("carry.input.530", 3, None)]) == [bad]


def test_a_carry_that_is_a_point_of_the_device_is_sent_and_used() -> None:
    giga = {"name": "giga_wh", "function": "input", "address": 530, "type": "uint16"}
    out = Scaling(device([WH, giga])).apply([Reading("energy_active_import", Float32(1.0), "kWh"),
                                             Reading("giga_wh", 2, None)])
    assert out == [Reading("energy_active_import", 2000000.001, "kWh"), Reading("giga_wh", 2, None)]


TORN = ("read either side of a roll-over: {raw} with carry (input register 530, 30531) = {count}, after "
        "{last_raw} with {last_count} in the last poll (the counter and its carry are read in separate requests); "
        "sent bad once, the next poll is taken as read")


def values(scaling: Scaling, polls: list[tuple[float, int]]) -> list[float | str | None]:
    """What each poll sends: the value, or the reason it is bad."""
    out: list[float | str | None] = []
    for raw, carry in polls:
        (reading,) = scaling.apply(readings(raw, carry))
        out.append(reading.value if reading.quality is Quality.GOOD else reading.reason)
    return out


def test_the_old_value_with_the_new_carry_is_sent_bad_once_not_one_gwh_too_much() -> None:
    # The float is read first (lower address), the meter rolls over, the carry is read: 999,999,900 Wh with 3.
    sent = values(Scaling(device([WH])), [(999999000.0, 2), (999999900.0, 3), (64.0, 3), (128.0, 3)])
    assert sent == [2999999.0, TORN.format(raw="999999900.0", count=3, last_raw="999999000.0", last_count=2),
                    3000000.064, 3000000.128]


def test_the_new_value_with_the_old_carry_is_sent_bad_once_not_one_gwh_too_little() -> None:
    # The other order (a carry at a lower address than its value): the carry is read before the roll-over.
    sent = values(Scaling(device([WH])), [(999999000.0, 2), (64.0, 2), (128.0, 3), (192.0, 3)])
    assert sent == [2999999.0, TORN.format(raw="64.0", count=2, last_raw="999999000.0", last_count=2),
                    3000000.128, 3000000.192]


@pytest.mark.parametrize(("polls", "expected"), [
    pytest.param([(500.0, 2), (0.0, 0), (64.0, 0)], [2000000.5, 0.0, 0.064], id="reset: both back to 0"),
    pytest.param([(5000.0, 0), (0.0, 0), (64.0, 0)],
                 [5.0, TORN.format(raw="0.0", count=0, last_raw="5000.0", last_count=0), 0.064],
                 id="reset while the carry is 0: one reading lost"),
    pytest.param([(5e8, 2), (6e8, 3), (6.5e8, 3)],
                 [2500000.0, TORN.format(raw="600000000.0", count=3, last_raw="500000000.0", last_count=2), 3650000.0],
                 id="a whole GWh between two polls (a long outage): one reading lost"),
    pytest.param([(100.0, 1), (100.0, 1), (164.0, 1)], [1000000.1, 1000000.1, 1000000.164], id="no change"),
])
def test_a_disagreement_costs_one_reading_never_more(polls: list[tuple[float, int]],
                                                     expected: list[float | str]) -> None:
    assert values(Scaling(device([WH])), polls) == expected


# --- end to end against a real Modbus server ----------------------------------------------------------------

def gimac_like(energy_wh: float, giga: int) -> FixedRegisters:
    inputs = [0] * 540
    inputs[0:2] = float32(230.5)
    inputs[32:34] = float32(energy_wh)
    inputs[530] = giga
    return FixedRegisters(inputs=inputs)


async def poll_once(driver: ModbusDriver) -> dict[str, Reading]:
    return {r.point: r for r in await driver.poll()}


async def test_a_real_meter_is_read_with_its_carry_and_the_carry_is_not_sent() -> None:
    meter = gimac_like(123456790.0, 7)
    async with SimServer({1: meter}, update_interval=None) as server:
        driver = ModbusDriver(device([WH, VOLTS], port=server.port))
        try:
            first = await poll_once(driver)
            assert driver.sent_last_poll == 3  # the voltage, the float, and the carry far away
            # The meter rolls over between two polls: the float restarts, the counter counts one more.
            meter.set(INPUT_REGISTERS, 32, float32(64.0))
            meter.set(INPUT_REGISTERS, 530, [8])
            second = await poll_once(driver)
        finally:
            await driver.close()
    assert first == {"energy_active_import": Reading("energy_active_import", 7123456.79, "kWh"),
                     "voltage": Reading("voltage", Float32(230.5), "V")}
    assert second["energy_active_import"] == Reading("energy_active_import", 8000000.064, "kWh")


async def test_a_carry_the_meter_refuses_makes_only_its_value_bad() -> None:
    meter = gimac_like(123456790.0, 7)
    meter.refuse(INPUT_REGISTERS, 530, 530)
    async with SimServer({1: meter}, update_interval=None) as server:
        driver = ModbusDriver(device([WH, VOLTS], port=server.port))
        try:
            polls = [await poll_once(driver) for _ in range(2)]
        finally:
            await driver.close()
    for readings_of_poll in polls:
        assert readings_of_poll["voltage"] == Reading("voltage", Float32(230.5), "V")
        bad = readings_of_poll["energy_active_import"]
        assert (bad.value, bad.quality) == (None, Quality.BAD)
        assert bad.reason is not None and bad.reason.startswith(
            "carry (input register 530, 30531) unavailable: the meter refuses it: Modbus exception 2 (illegal data "
            "address) for FC04 530 (30531)")


async def test_a_roll_over_between_the_two_requests_is_sent_bad_once() -> None:
    meter = gimac_like(999999000.0, 2)
    async with SimServer({1: meter}, update_interval=None) as server:
        driver = ModbusDriver(device([WH], port=server.port))
        try:
            sent = [await poll_once(driver)]
            # What the two requests of one poll see when the meter rolls over between them: the old float,
            # then the new counter.
            meter.set(INPUT_REGISTERS, 32, float32(999999900.0))
            meter.set(INPUT_REGISTERS, 530, [3])
            sent.append(await poll_once(driver))
            meter.set(INPUT_REGISTERS, 32, float32(64.0))
            sent.append(await poll_once(driver))
        finally:
            await driver.close()
    assert [r["energy_active_import"].value for r in sent] == [2999999.0, None, 3000000.064]
    assert sent[1]["energy_active_import"].reason == TORN.format(raw="999999900.0", count=3, last_raw="999999000.0",
                                                                 last_count=2)


# --- config errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("point", "where", "message"), [
    ({"carry_register": 530}, "points[0]", "carry_register needs carry_factor: what one count is worth in the "
                                           "value's raw unit, e.g. 1e9"),
    ({"carry_factor": 1e9}, "points[0]", "carry_factor applies with carry_register (the register that counts the "
                                         "roll-overs): give both, or neither"),
    ({"carry_register": 530, "carry_factor": 0}, "points[0].carry_factor", "expected a number greater than 0"),
    ({"carry_register": 530, "carry_factor": -1e9}, "points[0].carry_factor", "expected a number greater than 0"),
    ({"carry_register": 70000, "carry_factor": 1e9}, "points[0].carry_register", "less than or equal to 65535"),
    ({"carry_register": 6, "carry_factor": 1e9}, "points[0].carry_register",
     "input register 6 belongs to points[1] ('hz'), which is not an unscaled uint16 starting there (a roll-over "
     "counter)"),
    ({"carry_register": 33, "carry_factor": 1e9}, "points[0].carry_register",
     "input register 33 is the point's own (it spans 32..33); the carry is another register"),
    ({"type": "string", "count": 2, "carry_register": 530, "carry_factor": 1e9}, "points[0]",
     "carry_register applies to numbers, not to a string"),
    ({"type": "uint32", "carry_register": 530, "carry_factor": 1e9, "scale_register": 40}, "points[0]",
     "carry_register together with scale_from or scale_register is not supported"),
])
def test_bad_carry_settings_name_the_dotted_path(tmp_path: Path, point: dict[str, Any], where: str,
                                                 message: str) -> None:
    path, rendered = point_config_error(tmp_path, "input", {"name": "wh", "address": 32, "type": "float32", **point},
                                        '{ name = "hz", function = "input", address = 6, type = "float32" }')
    assert f"{path}: devices[0].{where}" in rendered and message in rendered, rendered


def test_the_carry_must_not_lie_in_an_unreadable_range() -> None:
    problems = device([WH], unreadable=[{"function": "input", "first": 500, "last": 599}]).problems()
    assert problems == [("points[0].carry_register", "input register 530 lies in a range declared unreadable")]


def test_a_point_must_not_take_the_name_of_a_carry_the_agent_reads() -> None:
    clash = {"name": "carry.input.530", "function": "input", "address": 100, "type": "float32"}
    assert ("points[1].name", "'carry.input.530' is the name the agent gives a carry_register it reads; choose "
            "another name") in device([WH, clash]).problems()


# --- in a profile: the manual's numbering -------------------------------------------------------------------

def profile(point: dict[str, Any], numbering: str = "modicon") -> dict[str, Any]:
    return {"profile": {"id": "t", "manufacturer": "m", "model": "m", "source": "s", "verified": False,
                        "numbering": numbering},
            "defaults": {"type": "float32"}, "points": [{"name": "energy_active_import", **point}]}


def test_a_profile_writes_the_carry_as_the_manual_prints_it() -> None:
    parsed = parse(profile({"address": 30033, "carry_register": 30531, "carry_factor": 1e9}), "t")
    assert (parsed.points[0]["address"], parsed.points[0]["carry_register"]) == (32, 530)
    one_based = parse(profile({"address": 33, "function": "input", "carry_register": 531, "carry_factor": 1e9},
                              "one-based"), "t")
    assert one_based.points[0]["carry_register"] == 530


def test_a_profile_carry_in_another_register_space_is_refused() -> None:
    with pytest.raises(ProfileError, match=r"points\[0\] \(energy_active_import\)\.carry_register: address 40531 is "
                                           r"a holding in modicon numbering, but function says 'input' \(it must be "
                                           r"in the point's own register space\)"):
        parse(profile({"address": 30033, "carry_register": 40531, "carry_factor": 1e9}), "t")
