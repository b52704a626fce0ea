"""Scale factors read from registers (`scale_from`, `scale_register`): planned into the same poll as their
points, applied before a value is stored, and an exponent that cannot be trusted makes its points bad."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.model import Quality, Reading
from drivers.modbus.config import ModbusDevice
from drivers.modbus.decode import device_plan
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.simulator import HOLDING_REGISTERS, SimServer
from tests.conftest import FixedRegisters, point_config_error

pytestmark = pytest.mark.timeout(30)


def device(points: list[dict[str, Any]], **extra: Any) -> ModbusDevice:
    return ModbusDevice.model_validate({"name": "inv", "driver": "modbus", "host": "127.0.0.1", "points": points,
                                        **extra})


W = {"name": "active_power_total", "function": "holding", "address": 4, "type": "int16", "scale_register": 5,
     "scale": 0.001, "unit": "kW"}


def test_the_planner_reads_the_exponent_in_the_same_request_as_its_neighbours() -> None:
    hz = {"name": "frequency", "function": "holding", "address": 6, "type": "uint16", "scale_from": "hz_sf"}
    hz_sf = {"name": "hz_sf", "function": "holding", "address": 7, "type": "int16"}
    requests = device_plan(device([W, hz, hz_sf]))
    assert [(r.address, r.count) for r in requests] == [(4, 4)]
    assert [p.name for p in requests[0].points] == ["active_power_total", "sf.holding.5", "frequency", "hz_sf"]


def test_an_exponent_far_away_is_still_read_in_the_same_poll() -> None:
    far = {**W, "scale_register": 100}
    requests = device_plan(device([far], max_gap=0))
    assert [(r.address, r.count) for r in requests] == [(4, 1), (100, 1)]


async def poll(dev: ModbusDevice, registers: list[int], refuse: tuple[int, int] | None = None) -> dict[str, Reading]:
    meter = FixedRegisters(holding=registers)
    if refuse:
        meter.refuse(HOLDING_REGISTERS, *refuse)
    async with SimServer({1: meter}, update_interval=None) as server:
        driver = ModbusDriver(dev.model_copy(update={"port": server.port}))
        try:
            return {r.point: r for r in await driver.poll()}
        finally:
            await driver.close()


POINTS = [W, {"name": "energy_active_import", "function": "holding", "address": 0, "type": "uint32",
              "scale_from": "wh_sf", "scale": 0.001, "unit": "kWh"},
          {"name": "wh_sf", "function": "holding", "address": 2, "type": "int16"},
          {"name": "frequency", "function": "holding", "address": 6, "type": "uint16", "scale_register": 7}]


async def test_values_are_scaled_by_the_exponent_read_in_the_same_poll() -> None:
    readings = await poll(device(POINTS), [1, 0xE240, 1, 0, 12345, (-1) & 0xFFFF, 5001, (-2) & 0xFFFF])
    assert {n: (r.value, r.unit) for n, r in readings.items()} == {
        "active_power_total": (1.2345, "kW"),  # 12345 x 10^-1 W
        "energy_active_import": (1234.56, "kWh"),  # 0x1E240 = 123456 x 10^1 Wh
        "wh_sf": (1, None),  # a named exponent is a point like any other
        "frequency": (50.01, None)}  # the exponent of a scale_register is read, not sent


@pytest.mark.parametrize(("exponent", "reason"), [
    (0x8000, "scale factor (holding register 5) not implemented (the meter sent 0x8000)"),
    (11, "scale factor (holding register 5) = 11 is outside -10..10: not a power-of-ten exponent"),
    ((-11) & 0xFFFF, "scale factor (holding register 5) = -11 is outside -10..10: not a power-of-ten exponent"),
])
async def test_an_unusable_exponent_makes_its_points_bad_never_wrong(exponent: int, reason: str) -> None:
    readings = await poll(device(POINTS), [0, 10, 0, 0, 12345, exponent, 5001, 0])
    assert readings["active_power_total"] == Reading("active_power_total", None, "kW", Quality.BAD, reason)
    assert readings["energy_active_import"].value == 0.01 and readings["frequency"].value == 5001


async def test_an_exponent_the_meter_refuses_makes_its_points_bad_with_the_reason() -> None:
    readings = await poll(device(POINTS), [0, 10, 0, 0, 12345, 0, 5001, 0], refuse=(5, 5))
    bad = readings["active_power_total"]
    assert bad.quality is Quality.BAD and bad.value is None
    assert bad.reason is not None and bad.reason.startswith(
        "scale factor (holding register 5) unavailable: the meter refuses it: Modbus exception 2")
    assert readings["frequency"].value == 5001 and readings["energy_active_import"].value == 0.01


async def test_a_named_exponent_marked_not_available_makes_its_points_bad() -> None:
    points = [{**POINTS[1]}, {**POINTS[2], "not_available": [0x8000]}]
    readings = await poll(device(points), [0, 10, 0x8000])
    assert readings["energy_active_import"].reason == \
        "scale factor wh_sf unavailable: not available (the meter sent 0x8000)"


@pytest.mark.parametrize(("point", "where", "message"), [
    ({"scale_from": "nothing"}, "points[0].scale_from", "names no point of this device ('nothing')"),
    ({"scale_from": "hz"}, "points[0].scale_from", "'hz' must be an int16 holding or input point"),
    ({"scale_register": 6}, "points[0].scale_register", "holding register 6 belongs to points[1] ('hz')"),
    ({"scale_register": 4}, "points[0].scale_register",
     "holding register 4 is the point's own (it spans 4..4); the exponent is another register"),
    ({"type": "float32", "scale_register": 9}, "points[0]", "scale_register applies to integer values, not to a "
                                                            "float32"),
    ({"scale_register": 9, "scale_from": "hz"}, "points[0]", "scale_from and scale_register both name the exponent"),
    ({"scale_register": 70000}, "points[0].scale_register", "less than or equal to 65535"),
])
def test_bad_scale_settings_name_the_dotted_path(tmp_path: Path, point: dict[str, Any], where: str,
                                                 message: str) -> None:
    path, rendered = point_config_error(tmp_path, "holding", {"name": "w", "address": 4, "type": "int16", **point},
                                        '{ name = "hz", function = "holding", address = 6, type = "uint16" }')
    assert f"{path}: devices[0].{where}" in rendered and message in rendered, rendered


def test_the_exponent_register_must_not_lie_in_an_unreadable_range() -> None:
    problems = device([W], unreadable=[{"function": "holding", "first": 5, "last": 9}]).problems()
    assert problems == [("points[0].scale_register", "holding register 5 lies in a range declared unreadable")]
