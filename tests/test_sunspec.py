"""SunSpec end to end: a simulated inverter (integer model 103, MPPT 160) and meter (203), laid out from the
SunSpec model files themselves (tests/sunspec_simulator.py), found by `edge-agent modbus sunspec-scan` over
TCP and over RTU on a pseudo-terminal, its config accepted by `edge-agent check`, and polled through the
driver with the scale factors applied; "not implemented" values and scale factors come back bad."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.model import Quality, Reading
from drivers.modbus import sunspec
from drivers.modbus.config import ModbusDevice
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.simulator import PtyLink, SimServer
from tests.conftest import EDGE_AGENT, edge_agent
from tests.sunspec_simulator import DEFINITIONS, SunSpecDevice

pytestmark = pytest.mark.timeout(60)
GATEWAY = '[gateway]\nid = "gw-1"\nsite = "plant-a"\n'


def plant() -> SunSpecDevice:
    """An inverter with two MPPT inputs and a meter behind it, each implementing part of its model."""
    device = SunSpecDevice([1, 103, 160, 203], repeats={160: 2})
    for point, value in (("Mn", "Acme Solar"), ("Md", "SOL-10K"), ("SN", "A1234567"), ("Vr", "1.2.3")):
        device.set(1, point, value)
    inverter = {"A": 1000, "AphA": 333, "AphB": 334, "AphC": 333, "A_SF": -2, "PhVphA": 2301, "V_SF": -1,
                "W": 12345, "W_SF": -1, "Hz": 5002, "Hz_SF": -2, "PF": -9876, "PF_SF": -2, "WH": 123456789,
                "WH_SF": 0, "TmpCab": 452, "Tmp_SF": -1, "St": 4, "VA": 1250, "VA_SF": 1}
    for point, value in inverter.items():
        device.set(103, point, value)
    for point, value in {"DCW_SF": 0, "module1.DCW": 6100, "module2.DCW": 6300, "module1.ID": 1}.items():
        device.set(160, point, value)
    meter = {"W": -5000, "W_SF": 0, "TotWhImp": 987654, "TotWh_SF": 1, "Hz": 4998, "Hz_SF": -2,
             "PhVphA": 2299, "V_SF": -1, "VAR": 1200}  # VAR_SF stays 0x8000: reactive power is unavailable
    for point, value in meter.items():
        device.set(203, point, value)
    return device


async def cli(*args: str) -> tuple[int, str, str]:
    return await edge_agent(*args, timeout=30)


async def poll(device: ModbusDevice) -> dict[str, Reading]:
    driver = ModbusDriver(device)
    try:
        return {r.point: r for r in await driver.poll()}
    finally:
        await driver.close()


def test_the_shipped_table_is_the_sunspec_model_files_compacted() -> None:
    shipped = json.loads(Path(sunspec.__file__).with_name("sunspec_models.json").read_text("utf-8"))
    assert shipped == sunspec.build_table(DEFINITIONS)
    assert "Apache License 2.0" in shipped["notice"]


@pytest.fixture
def pty_link() -> Iterator[PtyLink]:
    with PtyLink() as link:
        yield link


async def test_scan_over_tcp_writes_a_config_that_check_accepts_and_polls_scaled(tmp_path: Path) -> None:
    device = plant()
    snippet = tmp_path / "sunspec.toml"
    async with SimServer({1: device}, update_interval=None) as server:
        code, out, err = await cli("modbus", "sunspec-scan", "--host", "127.0.0.1", "--port", str(server.port),
                                   "--write-config", str(snippet))
        assert code == 0, err
        assert "SunSpec marker at holding register 40000" in out
        assert "manufacturer 'Acme Solar', model 'SOL-10K', serial 'A1234567', version '1.2.3'" in out
        for model_id in (1, 103, 160, 203):
            assert f"model {model_id:>5}" in out
        assert f"end of the chain at holding register {device.end_address}" in out
        assert "wrote 3 device(s)" in err

        config = tmp_path / "config.toml"
        config.write_text(GATEWAY + snippet.read_text("utf-8"), encoding="utf-8")
        code, out, err = await cli("check", "--config", str(config))
        assert code == 0, out + err
        assert "device sunspec-inverter:" in out and "x10^40076" in out

        devices = {d.name: d for d in load_config(config).devices}
        assert sorted(devices) == ["sunspec-inverter", "sunspec-meter", "sunspec-mppt"]
        inverter = await poll(devices["sunspec-inverter"])
        meter = await poll(devices["sunspec-meter"])
        mppt = await poll(devices["sunspec-mppt"])

    def good(readings: dict[str, Reading]) -> dict[str, tuple[object, str | None]]:
        return {n: (r.value, r.unit) for n, r in readings.items() if r.quality is Quality.GOOD}

    assert good(inverter) == {
        "current_total": (10.0, "A"), "current_l1": (3.33, "A"), "current_l2": (3.34, "A"), "current_l3": (3.33, "A"),
        "voltage_l1_n": (230.1, "V"), "active_power_total": (1.2345, "kW"), "frequency": (50.02, "Hz"),
        "apparent_power_total": (12.5, "kVA"), "power_factor_total": (-0.9876, None),
        "energy_active_export": (123456.789, "kWh"), "temperature_cabinet": (45.2, "°C"),
        "operating_state": (4, None)}
    # Implemented by the model, not by this inverter: bad, never a number.
    assert inverter["voltage_l2_n"].reason == "not available (the meter sent 0xFFFF)"
    assert inverter["temperature_heatsink"].reason == "not available (the meter sent 0x8000)"
    assert inverter["events"].reason == "not available (the meter sent 0xFFFFFFFF)"
    assert inverter["reactive_power_total"].quality is Quality.BAD  # its value and its scale factor: 0x8000
    assert len(inverter) == 31 and "sf.holding.40087" not in inverter  # exponents are read, not sent

    assert good(meter)["active_power_total"] == (-5.0, "kW")
    assert good(meter)["energy_active_import"] == (9876.54, "kWh")
    assert good(meter)["frequency"] == (49.98, "Hz")
    assert good(meter)["voltage_l1_n"] == (229.9, "V")
    assert meter["energy_active_export"].reason == "not available (the meter sent 0x00000000)"  # acc32 0
    var_sf = device.points[(203, "VAR_SF")].address
    assert meter["reactive_power_total"].reason == \
        f"scale factor (holding register {var_sf}) not implemented (the meter sent 0x8000)"

    assert good(mppt)["module1_dc_power"] == (6.1, "kW") and good(mppt)["module2_dc_power"] == (6.3, "kW")
    assert good(mppt)["module1_module_id"] == (1, None)


async def test_scan_over_rtu_on_a_serial_line(pty_link: PtyLink) -> None:
    device = SunSpecDevice([1, 203], base=0)
    device.set(1, "Mn", "Meterco")
    async with SimServer({3: device}, serial_port=pty_link.server_path, baudrate=19200, update_interval=None):
        code, out, err = await cli("modbus", "sunspec-scan", "--serial-port", pty_link.client_path, "--baudrate",
                                   "19200", "--unit", "3", "--timeout", "0.5", "--write-config", "-")
    assert code == 0, err
    assert "SunSpec marker at holding register 0 of serial" in out  # 40000 answered "illegal address" first
    assert 'serial_port = "' + pty_link.client_path + '"' in out and "baudrate = 19200" in out
    assert 'name = "sunspec-meter"' in out and "unit_id = 3" in out


async def test_no_marker_says_so_and_fails() -> None:
    device = SunSpecDevice([1], base=40000)
    device.set(1, "Mn", "x")
    device._images[3][40000] = 0  # the marker overwritten
    async with SimServer({1: device}, update_interval=None) as server:
        code, _, err = await cli("modbus", "sunspec-scan", "--host", "127.0.0.1", "--port", str(server.port))
    assert code == 1
    assert "no SunSpec marker" in err and "40000, 0, 50000" in err


def test_snippet_names_scale_registers_from_the_model_definition() -> None:
    found = sunspec.Found(103, 40070, 50)
    entries = {e["name"]: e for e in sunspec.points(found)[0]}
    definition = json.loads((DEFINITIONS / "model_103.json").read_text("utf-8"))["group"]["points"]
    offsets, at = {}, 40070
    for p in definition:
        offsets[p["name"]] = at
        at += p["size"]
    assert entries["active_power_total"]["address"] == offsets["W"]
    assert entries["active_power_total"]["scale_register"] == offsets["W_SF"]
    assert entries["energy_active_export"] == {"name": "energy_active_export", "function": "holding",
                                               "address": offsets["WH"], "type": "uint32",
                                               "scale_register": offsets["WH_SF"], "scale": 0.001, "unit": "kWh",
                                               "not_available": [0]}


def test_check_rejects_a_snippet_whose_scale_register_overlaps_a_value(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(GATEWAY + '[[devices]]\nname = "inv"\ndriver = "modbus"\nhost = "127.0.0.1"\npoints = [\n'
                      '  { name = "w", function = "holding", address = 40084, type = "int16",'
                      ' scale_register = 40093 },\n'
                      '  { name = "wh", function = "holding", address = 40092, type = "uint32" },\n]\n',
                      encoding="utf-8")
    result = subprocess.run([EDGE_AGENT, "check", "--config", str(config)], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 78
    assert f"{config}: devices[0].points[0].scale_register: holding register 40093 belongs to points[1] ('wh')" \
        in result.stderr


@pytest.mark.parametrize("model_id", sorted(sunspec.KIND))
def test_every_polled_model_becomes_a_device_the_config_accepts(model_id: int) -> None:
    definition = sunspec.model(model_id)
    assert definition is not None
    found = sunspec.Found(model_id, 40002, definition.fixed_length + 2 * definition.group_length)
    entries, _ = sunspec.points(found)
    device = ModbusDevice.model_validate({"name": "d", "driver": "modbus", "host": "127.0.0.1", "points": entries})
    assert device.problems() == []
    assert all(entry["address"] < 40004 + found.length for entry in entries)
