"""The energy tables are checked with the rest of the file: every problem with its dotted path, exit 78."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.errors import EX_CONFIG, ConfigError
from energy.config import plan

GATEWAY = '[gateway]\nid = "gw-1"\nsite = "plant-a"\n'
POINTS = ('{ name = "active_power", function = "input", address = 0, type = "float32", unit = "kW" }, '
          '{ name = "energy_active_import", function = "input", address = 2, type = "uint32", scale = 0.01, '
          'unit = "kWh" }')


def meter(name: str, energy: str, points: str = POINTS, interval: str = "1s") -> str:
    return (f'[[devices]]\nname = "{name}"\ndriver = "modbus"\nhost = "10.0.0.5"\npoll_interval = "{interval}"\n'
            f'points = [{points}]\nenergy = {{ {energy} }}\n')


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return [(p.where, p.message) for p in caught.value.problems]


def test_a_meter_gets_its_wrap_unit_and_alarm_levels_from_its_point_and_target() -> None:
    config = parse_config(GATEWAY + meter("incomer-1", 'target_kw = 500, alarm_levels = [90, 100]'))
    spec = plan(config.devices, config.energy).meters["incomer-1"]
    assert spec.wrap == pytest.approx((1 << 32) * 0.01) and spec.resolution == 0.01 and spec.kwh_per_unit == 1.0
    assert spec.window_s == 900 and str(spec.zone) == "Asia/Seoul"
    assert spec.levels_kw == (450.0, 500.0) and spec.hysteresis_kw == 25.0 and spec.max_kw == 5000.0
    assert spec.max_gap_s == 10.0 and spec.export_point is None
    assert spec.lookback_s == 60.0  # present power: a minute's slope


def test_a_profile_meter_uses_its_energy_points_by_default() -> None:
    text = GATEWAY + ('[[devices]]\nname = "incomer-1"\ndriver = "modbus"\nhost = "10.0.0.5"\nprofile = "abb_m4m30"\n'
                      '[devices.energy]\nwindow = "30m"\ntimezone = "Europe/Berlin"\n'
                      '[[energy.groups]]\nname = "plant"\nmeters = ["incomer-1"]\nminus_export = true\n'
                      'window = "30m"\ntimezone = "Europe/Berlin"\ntarget_kw = 100\n')
    config = parse_config(text)
    energy = plan(config.devices, config.energy)
    spec = energy.meters["incomer-1"]
    assert spec.export_point == "energy_active_export" and spec.window_s == 1800
    assert spec.wrap == pytest.approx((1 << 64) * 0.01)  # uint64
    assert energy.groups[0].meters == ("incomer-1",) and energy.groups[0].spec.levels_kw == (100.0,)


def test_the_em24_rs485_profile_gives_its_total_counters_and_their_int32_wrap() -> None:
    """kWh(+) TOT and kWh(-) TOT of the RS-485 EM24 are INT32 in 0.1 kWh (V4R0 p.8): the energy stage must take
    those two by default and know where a 32-bit counter of 0.1 kWh steps wraps."""
    text = GATEWAY + ('[[devices]]\nname = "em24"\ndriver = "modbus"\nhost = "10.0.0.5"\nunit_id = 3\n'
                      'profile = "carlo_gavazzi_em24_rs485"\n[devices.energy]\n')
    config = parse_config(text)
    spec = plan(config.devices, config.energy).meters["em24"]
    assert (spec.import_point, spec.export_point) == ("energy_active_import", "energy_active_export")
    assert spec.wrap == pytest.approx((1 << 32) * 0.1) and spec.resolution == pytest.approx(0.1)
    assert spec.kwh_per_unit == 1.0


@pytest.mark.parametrize(("profile", "export", "wrap"), [
    ("ls_gimac1000", None, None),  # a float32 with its Giga counter: no register modulus applies
    ("ls_gimac1000_ex", "energy_active_export", None),
])
def test_a_gimac1000_meter_reads_energy_with_its_giga_counter_and_no_wrap(profile: str, export: str | None,
                                                                           wrap: float | None) -> None:
    text = GATEWAY + ('[[devices]]\nname = "incomer-1"\ndriver = "modbus"\nhost = "10.0.0.5"\n'
                      f'profile = "{profile}"\n[devices.energy]\ntarget_kw = 500\n')
    config = parse_config(text)
    spec = plan(config.devices, config.energy).meters["incomer-1"]
    assert (spec.import_point, spec.export_point, spec.wrap, spec.kwh_per_unit) == (
        "energy_active_import", export, wrap, 1.0)
    assert spec.max_kw == 5000.0  # what tells a torn read after a restart from real energy (docs/config.md)


def test_a_carried_integer_counter_gets_no_wrap_from_its_register() -> None:
    points = ('{ name = "energy_active_import", function = "input", address = 2, type = "uint32", '
              'carry_register = 10, carry_factor = 4294967296, scale = 0.01, unit = "kWh" }')
    config = parse_config(GATEWAY + meter("incomer-1", "target_kw = 500", points))
    assert plan(config.devices, config.energy).meters["incomer-1"].wrap is None


def test_the_eocr_isem2_profile_gives_its_consumption_counter_and_no_export() -> None:
    """A motor feeder's relay counts consumption only: 'Active Power Consumption', two u16 words of 0.01 kWh
    (EOCR-iSEM2 register map 1.4.0, Map rows 51-52). The energy stage takes it by default, knows where a 32-bit
    counter of 0.01 kWh steps wraps, and looks for no export counter."""
    text = GATEWAY + ('[[devices]]\nname = "pump-3"\ndriver = "modbus"\nhost = "10.0.0.5"\nunit_id = 3\n'
                      'profile = "schneider_eocr_isem2"\n[devices.energy]\n')
    config = parse_config(text)
    spec = plan(config.devices, config.energy).meters["pump-3"]
    assert (spec.import_point, spec.export_point) == ("energy_active_import", None)
    assert spec.wrap == pytest.approx((1 << 32) * 0.01) and spec.resolution == pytest.approx(0.01)
    assert spec.kwh_per_unit == 1.0


def test_an_energy_table_on_the_accura2350_profile_is_refused_until_its_counters_are_confirmed() -> None:
    """The Accura 2350 profile has no energy counter: Rootech's measurement-data pages could not be read, so no
    register is known to hold one (docs/profiles.md). An energy table on it is a configuration error naming the
    missing point, not a meter whose demand is silently never computed."""
    text = GATEWAY + ('[[devices]]\nname = "feeder-7"\ndriver = "modbus"\nhost = "10.0.0.5"\n'
                      'profile = "rootech_accura2350"\n[devices.energy]\ntarget_kw = 50\n')
    ((where, message),) = problems(text)
    assert where == "devices[0].energy.import_point"
    assert "no point 'energy_active_import'" in message and "active_power_total" in message


@pytest.mark.parametrize(("energy", "points", "expected"), [
    ('import_point = "energy_total"', POINTS, [("devices[0].energy.import_point", "no point 'energy_total'")]),
    ('window = "10m"', POINTS, [("devices[0].energy.window", '"5m", "15m", "30m" or "60m"')]),
    ('timezone = "Seoul"', POINTS, [("devices[0].energy.timezone", "unknown time zone 'Seoul'")]),
    ("alarm_levels = [90]", POINTS, [("devices[0].energy.alarm_levels", "set target_kw")]),
    ("target_kw = -5", POINTS, [("devices[0].energy.target_kw", "greater than 0")]),
    ("windw = 15", POINTS, [("devices[0].energy.windw", "did you mean 'window'")]),
    ("", '{ name = "energy_active_import", function = "input", address = 2, type = "uint32" }',
     [("devices[0].energy.counter_unit", "Wh")]),
    ('window = "60m", timezone = "Asia/Kathmandu"', POINTS,
     [("devices[0].energy.timezone", "not a multiple of the 60-minute window")]),
], ids=["unknown-point", "window", "zone", "levels-without-target", "negative-target", "typo", "no-unit",
        "zone-offset"])
def test_a_bad_energy_table_names_its_path(energy: str, points: str, expected: list[tuple[str, str]]) -> None:
    found = problems(GATEWAY + meter("incomer-1", energy, points))
    assert [where for where, _ in found] == [where for where, _ in expected], found
    for (_, message), (_, fragment) in zip(found, expected, strict=True):
        assert fragment in message, found


def test_groups_must_name_meters_that_agree_and_not_clash_with_devices() -> None:
    text = GATEWAY + meter("incomer-1", "") + meter("incomer-2", 'window = "5m"') + \
        '[[energy.groups]]\nname = "incomer-1"\nmeters = ["incomer-1", "incomer-2", "boiler"]\n'
    found = dict(problems(text))
    assert "already a device" in found["energy.groups[0].name"]
    assert "must agree" in found["energy.groups[0].meters[1]"]
    assert "not a device with an energy table" in found["energy.groups[0].meters[2]"]


def test_a_bad_energy_table_exits_78_from_the_command_line(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(GATEWAY + meter("incomer-1", 'window = "7m"'))
    result = subprocess.run([sys.executable, "-m", "agent", "check", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EX_CONFIG, result
    assert f"{config}: devices[0].energy.window:" in result.stderr + result.stdout


@pytest.mark.parametrize("window", ['"1m"', '"60s"', "60"])
def test_a_one_minute_window_is_accepted_for_commissioning_trials(window: str) -> None:
    config = parse_config(GATEWAY + meter("incomer-1", f"window = {window}, target_kw = 50"))
    spec = plan(config.devices, config.energy).meters["incomer-1"]
    assert spec.window_s == 60 and spec.lookback_s == 15.0  # a minute's slope would lag it by half its length


@pytest.mark.parametrize("window", ['"2m"', '"10s"', '"90s"'])
def test_other_short_windows_are_refused(window: str) -> None:
    ((where, message),) = problems(GATEWAY + meter("incomer-1", f"window = {window}"))
    assert where == "devices[0].energy.window"
    assert message.startswith('the window must be "5m", "15m", "30m" or "60m" ("1m" for commissioning trials)')


def test_wrong_types_and_names_are_refused_as_everywhere_else() -> None:
    # Strict like the rest of the file: a quoted number is a mistake, not a number; a group's name is a topic
    # level and gets the same rename advice as a device's.
    found = problems(GATEWAY + meter("incomer-1", 'target_kw = "500", window = true')
                     + '[[energy.groups]]\nname = "plant.total"\nmeters = ["incomer-1"]\n')
    where = dict(found)
    assert "Input should be a valid number" in where["devices[0].energy.target_kw"]
    assert where["devices[0].energy.window"].startswith('expected "15m"')
    assert "rename it to 'plant-total'" in where["energy.groups[0].name"]
