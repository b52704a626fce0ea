"""Every shipped register map is checked as a device would use it: it loads, its points validate, nothing
overlaps, every address is in range, the plan fits the meter's request limit, and docs/profiles.md shows
the current requests-per-poll figures. Plus how a device uses a profile: select, overrides, its own points,
and the errors a technician gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import parse_config
from agent.errors import ConfigError
from drivers.modbus.config import MAX_REGISTERS_PER_READ, ModbusDevice
from drivers.modbus.decode import device_plan, planned_points
from drivers.modbus.profiles import available, expand_profile, load, modicon, requests_table, to_protocol

REPO = Path(__file__).resolve().parent.parent
UNITS = {"V", "A", "kW", "kvar", "kVA", "Hz", "kWh", "kvarh", "kVAh", "°C", "%RH", "ppm", "µg/m³", "hPa", "h", None}
REQUIRED_MODELS = {"ls_gimac1000", "rootech_accura2350", "schneider_pm5500", "eastron_sdm630", "abb_m4m30",
                   "elt_mb350uc",
                   "janitza_umg604", "carlo_gavazzi_em24", "carlo_gavazzi_em24_rs485", "generic_env_sensor",
                   "epluse_ee072", "epluse_ee872", "delta_ohm_pmsense", "vaisala_gmp252", "schneider_eocr_isem2",
                   "vaisala_hmdw110"}
GATEWAY = '[gateway]\nid = "gw-1"\nsite = "plant-a"\n'


def test_the_required_models_are_shipped() -> None:
    assert REQUIRED_MODELS <= set(available())


def as_device(profile_id: str) -> ModbusDevice:
    raw, problems = expand_profile({"name": "m", "driver": "modbus", "host": "10.0.0.5", "profile": profile_id})
    assert problems == []
    return ModbusDevice.model_validate(raw)


@pytest.mark.parametrize("profile_id", available())
def test_every_shipped_profile_is_a_valid_device(profile_id: str) -> None:
    profile = load(profile_id)
    assert profile.id == profile_id and profile.source.strip() and profile.manufacturer and profile.model
    if not profile.verified:
        assert profile.notes.strip(), "an unverified profile must say what is unconfirmed"
    device = as_device(profile_id)
    assert device.problems() == []  # no overlaps, no duplicate names, every value inside 0..65535
    assert {p.unit for p in device.points} <= UNITS
    requests = device_plan(device)
    assert all(r.count <= min(device.max_registers, MAX_REGISTERS_PER_READ) for r in requests)
    # every point once, and the registers read for them (Giga counters, exponents) once each
    assert sum(len(r.points) for r in requests) == len(planned_points(device))


def test_docs_show_the_current_requests_per_poll() -> None:
    text = (REPO / "docs" / "profiles.md").read_text(encoding="utf-8")
    assert requests_table() in text, "run: python -m drivers.modbus.profiles, and paste the table into " \
                                     "docs/profiles.md"
    for profile_id in available():
        assert f"`{profile_id}`" in text


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_docs_list_every_profile_once_with_its_verified_claim_and_point_count() -> None:
    """The "Shipped profiles" table is what a technician reads first: profiles written in parallel branches
    each edit it, so it is held to the files (a row per profile, verified and points as the file says)."""
    text = (REPO / "docs" / "profiles.md").read_text(encoding="utf-8")
    rows: dict[str, list[str]] = {}
    for line in _section(text, "Shipped profiles").splitlines():
        if line.startswith("| [`"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            profile_id = cells[0].split("`")[1]
            assert profile_id not in rows, f"{profile_id} listed twice"
            rows[profile_id] = cells
    assert set(rows) == set(available())
    for profile_id, cells in rows.items():
        profile = load(profile_id)
        assert cells[2] == ("**yes**" if profile.verified else "no"), profile_id
        assert cells[3] == str(len(profile.points)), profile_id


def test_docs_name_every_point_name_and_unit_the_profiles_use() -> None:
    """Every point name of a shipped profile is in "Point names" (a phase's siblings `_l2`, `_l3` go with the
    `_l1` listed there) and every unit in the "Units" table."""
    text = (REPO / "docs" / "profiles.md").read_text(encoding="utf-8")
    names = _section(text, "Point names")
    units = {unit.strip() for line in _section(text, "Units").splitlines() if line.startswith("| ")
             for unit in line.split("|")[2].replace(" / ", ",").split(",")}
    for profile_id in available():
        for point in as_device(profile_id).points:
            name = point.name.removesuffix("_l2").removesuffix("_l3")
            assert f"`{point.name}`" in names or f"`{name}_l1`" in names, (profile_id, point.name)
            assert point.unit is None or point.unit in units, (profile_id, point.unit)


@pytest.mark.parametrize(("number", "expected"), [
    (1, ("coil", 0)), (10001, ("discrete", 0)), (30001, ("input", 0)), (40001, ("holding", 0)),
    (40101, ("holding", 100)), (49999, ("holding", 9998)), (300001, ("input", 0)), (465536, ("holding", 65535)),
])
def test_modicon_numbers(number: int, expected: tuple[str, int]) -> None:
    assert modicon(number) == expected


@pytest.mark.parametrize("number", [0, 20001, 50000, 99999, 200001, 465537])
def test_numbers_outside_the_modicon_ranges_are_refused(number: int) -> None:
    with pytest.raises(ValueError, match="not a modicon register number"):
        modicon(number)


def test_one_based_and_protocol_numbering() -> None:
    assert to_protocol("one-based", 1201, "holding") == ("holding", 1200)
    assert to_protocol("protocol", 0, "input") == ("input", 0)
    with pytest.raises(ValueError, match="needs a function"):
        to_protocol("one-based", 5, None)
    with pytest.raises(ValueError, match="is a input in modicon numbering"):
        to_protocol("modicon", 30001, "holding")


def config(entry: str) -> str:
    return GATEWAY + '[[devices]]\nname = "main"\ndriver = "modbus"\nhost = "10.0.0.5"\n' + entry


def test_a_device_selects_overrides_and_adds_points() -> None:
    parsed = parse_config(config(
        'profile = "eastron_sdm630"\nselect = ["voltage_l1_n", "active_power_total"]\n'
        'points = [{ name = "tariff", function = "holding", address = 100, type = "uint16" }]\n'
        '[devices.overrides.active_power_total]\nscale = 1.0\nunit = "W"\n'), source="case.toml")
    [device] = parsed.devices
    by_name = {p.name: p for p in device.points}
    assert list(by_name) == ["tariff", "voltage_l1_n", "active_power_total"]  # own points keep their indices
    assert by_name["active_power_total"].scale == 1.0 and by_name["active_power_total"].unit == "W"
    assert by_name["voltage_l1_n"].function == "input" and by_name["voltage_l1_n"].address == 0
    assert device.max_registers == load("eastron_sdm630").max_registers


@pytest.mark.parametrize(("entry", "where", "fragment"), [
    ('profile = "eastron_sdm360"\n', "devices[0].profile", "did you mean 'eastron_sdm630'?"),
    ('profile = "no_such_meter"\n', "devices[0].profile", "Shipped profiles: abb_m4m30"),
    ('profile = "eastron_sdm630"\nselect = ["voltage_l1"]\n', "devices[0].select[0]", "did you mean 'voltage_l1_n'"),
    ('profile = "eastron_sdm630"\n[devices.overrides.voltage_l1_n]\nscale = "x"\n',
     "devices[0].overrides.voltage_l1_n.scale", "valid number"),
    ('profile = "eastron_sdm630"\n[devices.overrides.voltage_l1_n]\nsacle = 0.1\n',
     "devices[0].overrides.voltage_l1_n.sacle", "unknown key; did you mean 'scale'?"),
    ('profile = "eastron_sdm630"\n[devices.overrides.voltage_l1_n]\nname = "v1"\n',
     "devices[0].overrides.voltage_l1_n.name", "keeps its name"),
    ('profile = "eastron_sdm630"\npoints = [{ name = "frequency", function = "input", address = 900, '
     'type = "float32" }]\n', "devices[0].points[0].name", "change it with overrides.frequency"),
])
def test_profile_mistakes_are_named_with_their_path(entry: str, where: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config(entry), source="case.toml")
    problems = [(p.where, p.message) for p in caught.value.problems]
    assert [w for w, _ in problems] == [where], problems
    assert fragment in problems[0][1], problems
