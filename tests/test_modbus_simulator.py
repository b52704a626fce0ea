"""The Modbus simulator answers over real TCP with the values it claims, and they behave like a plant's.

Registers are decoded here with `struct`, independently of the simulator's own decoder, at the addresses
and encodings the register map promises (0-based protocol addresses).
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import struct
import sys
import time
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from drivers.modbus.simulator import (
    ENV_SENSOR_REGISTERS,
    POWER_METER_REGISTERS,
    BenchDevice,
    EnvSensor,
    PowerMeter,
    SimServer,
    serve,
    serve_many,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def float32(registers: list[int], offset: int) -> float:
    return struct.unpack(">f", struct.pack(">HH", registers[offset], registers[offset + 1]))[0]


def decode_power_meter(inputs: list[int], holdings: list[int]) -> dict[str, float]:
    """`inputs` = input registers 0..33, `holdings` = holding registers 100..108."""
    names = ["voltage_avg", "current_l1", "current_l2", "current_l3"]
    values = {name: float32(inputs, 2 * i) for i, name in enumerate(names)}
    for name, address in [("power_factor", 22), ("active_power", 24), ("reactive_power", 26),
                          ("apparent_power", 28), ("frequency", 30), ("active_energy", 32)]:
        values[name] = float32(inputs, address)
    low, high = holdings[0], holdings[1]  # CDAB: low word first
    values["active_energy_wh"] = (high << 16) | low
    for i in range(3):
        values[f"voltage_l{i + 1}"] = holdings[2 + i] * 0.1
    values["frequency_int"] = struct.unpack(">h", struct.pack(">H", holdings[5]))[0] * 0.01
    values["active_power_w"] = struct.unpack(">i", struct.pack(">HH", holdings[6], holdings[7]))[0]
    values["power_factor_int"] = struct.unpack(">h", struct.pack(">H", holdings[8]))[0] * 0.001
    return values


def decode_env_sensor(holdings: list[int]) -> dict[str, float]:
    return {
        "temperature": struct.unpack(">h", struct.pack(">H", holdings[0]))[0] * 0.1,
        "humidity": holdings[1] * 0.1,
        "co2": holdings[2],
        "pm2_5": holdings[3] * 0.1,
    }


async def read(client: AsyncModbusTcpClient, function_code: int, address: int, count: int, unit_id: int):
    if function_code == 3:
        response = await client.read_holding_registers(address, count=count, device_id=unit_id)
    else:
        response = await client.read_input_registers(address, count=count, device_id=unit_id)
    assert not response.isError(), response
    return response.registers


async def read_power_meter(client: AsyncModbusTcpClient, unit_id: int = 1) -> dict[str, float]:
    inputs = await read(client, 4, 0, 34, unit_id)
    holdings = await read(client, 3, 100, 9, unit_id)
    return decode_power_meter(inputs, holdings)


def assert_plausible_power_meter(v: dict[str, float]) -> None:
    assert 220 * 0.98 <= v["voltage_avg"] <= 220 * 1.02
    for phase in (1, 2, 3):
        assert 220 * 0.98 - 0.05 <= v[f"voltage_l{phase}"] <= 220 * 1.02 + 0.05
        assert 10 < v[f"current_l{phase}"] < 500
    currents = [v["current_l1"], v["current_l2"], v["current_l3"]]
    assert max(currents) != min(currents), "phases should be slightly unbalanced"
    assert max(currents) / min(currents) < 1.15
    assert 0.85 <= v["power_factor"] <= 0.97
    assert 59.97 <= v["frequency"] <= 60.03
    pf = v["power_factor"]
    per_phase_kw = sum(v[f"voltage_l{p}"] * v[f"current_l{p}"] * pf for p in (1, 2, 3)) / 1000
    assert v["active_power"] == pytest.approx(per_phase_kw, rel=1e-3)
    assert v["reactive_power"] == pytest.approx(v["active_power"] * math.tan(math.acos(pf)), rel=1e-4)
    assert v["apparent_power"] == pytest.approx(math.hypot(v["active_power"], v["reactive_power"]), rel=1e-5)
    # The integer holding registers carry the same quantities as the float input registers.
    assert v["active_energy_wh"] / 1000 == pytest.approx(v["active_energy"], abs=0.2)
    assert v["active_power_w"] == pytest.approx(v["active_power"] * 1000, abs=1)
    assert v["frequency_int"] == pytest.approx(v["frequency"], abs=0.006)
    assert v["power_factor_int"] == pytest.approx(pf, abs=0.0006)


def assert_matches(wire: dict[str, float], expected: dict[str, float]) -> None:
    assert set(wire) == set(expected)
    for name, value in expected.items():
        assert wire[name] == pytest.approx(value, rel=1e-9, abs=1e-9), name


@pytest.fixture
async def plant():
    async with SimServer({1: PowerMeter(seed=1), 2: EnvSensor(seed=2)}, update_interval=None) as server:
        yield server


@pytest.fixture
async def client(plant: SimServer):
    client = AsyncModbusTcpClient("127.0.0.1", port=plant.port, timeout=2, retries=0)
    assert await client.connect()
    yield client
    client.close()


async def test_power_meter_registers_decode_to_the_simulated_values(plant: SimServer, client):
    meter = plant.devices[1]
    for step in range(3):
        wire = await read_power_meter(client)
        assert_matches(wire, meter.decoded_values())
        assert_plausible_power_meter(wire)
        plant.update_all(time.monotonic() + step)


async def test_env_sensor_registers_decode_to_the_simulated_values(plant: SimServer, client):
    sensor = plant.devices[2]
    for step in range(3):
        wire = decode_env_sensor(await read(client, 3, 0, 4, unit_id=2))
        assert_matches(wire, sensor.decoded_values())
        assert 18 <= wire["temperature"] <= 32
        assert 30 <= wire["humidity"] <= 70
        assert 400 <= wire["co2"] <= 1500
        assert 0 <= wire["pm2_5"] < 100
        plant.update_all(time.monotonic() + step)


async def test_register_maps_are_what_the_wire_carries():
    assert {p.name for p in POWER_METER_REGISTERS} == set(decode_power_meter([0] * 34, [0] * 9))
    assert {p.name for p in ENV_SENSOR_REGISTERS} == set(decode_env_sensor([0] * 4))
    energy = next(p for p in POWER_METER_REGISTERS if p.name == "active_energy_wh")
    assert (energy.function_code, energy.address, energy.type) == (3, 100, "uint32")
    assert energy.word_order == "CDAB"


async def test_unused_registers_read_zero_and_mistakes_get_modbus_exceptions(plant: SimServer, client):
    assert await read(client, 4, 8, 14, unit_id=1) == [0] * 14  # between the currents and the power factor
    assert await read(client, 3, 0, 100, unit_id=1) == [0] * 100
    past_the_map = await client.read_input_registers(60, count=10, device_id=1)
    assert past_the_map.exception_code == 2
    no_input_registers = await client.read_input_registers(0, count=2, device_id=2)
    assert no_input_registers.exception_code == 1
    no_such_unit = await client.read_holding_registers(100, count=2, device_id=9)
    assert no_such_unit.exception_code == 0x0B  # gateway target device failed to respond
    # The agent must never write to a meter; the simulator refuses and counts attempts.
    assert (await client.write_register(100, 0, device_id=1)).exception_code == 2
    assert plant.devices[1].write_attempts == 1


async def test_energy_counter_never_decreases_while_serving():
    async with SimServer({1: PowerMeter(seed=3)}, update_interval=0.02) as server:
        client = AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=2, retries=0)
        assert await client.connect()
        try:
            readings = []
            for _ in range(12):
                wire = await read_power_meter(client)
                readings.append((wire["active_energy_wh"], wire["active_energy"]))
                await asyncio.sleep(0.03)
        finally:
            client.close()
    assert readings == sorted(readings)
    assert readings[-1][0] > readings[0][0]  # ~60 kW for 0.3 s is several Wh


def test_power_meter_follows_a_load_profile_and_integrates_energy():
    meter = PowerMeter(seed=4, energy_wh=1_234_567.0)
    start = 1000.0
    powers, factors, energies = [], [], []
    for step in range(361):  # 30 simulated minutes, every 5 s
        meter.update(start + 5 * step)
        values = meter.decoded_values()
        powers.append(values["active_power"])
        factors.append(values["power_factor"])
        energies.append(values["active_energy_wh"])
    assert energies == sorted(energies)
    assert energies[0] == 1_234_567
    gained_wh = energies[-1] - energies[0]
    assert min(powers) * 1800 / 3.6 - 1 <= gained_wh <= max(powers) * 1800 / 3.6 + 1
    assert max(powers) - min(powers) > 0.3 * (sum(powers) / len(powers)), "machines should cycle"
    assert all(0.85 <= pf <= 0.97 for pf in factors)
    assert factors[powers.index(max(powers))] > factors[powers.index(min(powers))], "PF rises with load"
    meter.update(start)  # a clock that steps back must not take energy away
    assert meter.decoded_values()["active_energy_wh"] == energies[-1]


def test_energy_counter_wraps_like_a_uint32_register_pair():
    meter = PowerMeter(seed=5, energy_wh=2**32 - 10)
    meter.update(0.0)
    meter.update(3600.0)
    values = meter.decoded_values()
    assert values["active_energy_wh"] < 2**32 - 10  # wrapped
    assert values["active_energy"] > (2**32 - 10) / 1000  # the float counter keeps going


def test_env_sensor_temperature_is_signed():
    sensor = EnvSensor(seed=6, mean_temperature=-15.0)  # a cold store
    sensor.update(0.0)
    raw = sensor.registers(3)[0]
    assert raw >= 0x8000
    temperature = sensor.decoded_values()["temperature"]
    assert temperature == pytest.approx(struct.unpack(">h", raw.to_bytes(2, "big"))[0] / 10)
    assert -22 <= temperature < 0


def test_bench_device_changes_every_point_every_update():
    device = BenchDevice(50, seed=7)
    device.update(10.0)
    before = device.decoded_values()
    device.update(10.5)
    after = device.decoded_values()
    assert len(after) == 50
    assert all(before[name] != after[name] for name in after)
    registers = device.registers(3)
    assert len(registers) == 100
    assert float32(registers, 2 * 17) == after["point_17"]


async def test_many_servers_in_one_process_stop_without_leftover_tasks():
    tasks_before = asyncio.all_tasks()
    group = await serve_many([{1: BenchDevice(10, seed=i)} for i in range(5)], update_interval=0.05)
    assert len(set(group.ports)) == 5
    async with group:
        for server in group.servers:
            client = AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=2, retries=0)
            assert await client.connect()
            server.update_all()  # the background task may also update; compare right after the read
            registers = await read(client, 3, 0, 20, unit_id=1)
            client.close()
            expected = server.devices[1].decoded_values()
            assert [float32(registers, 2 * i) for i in range(10)] == list(expected.values())
    single = await serve({1: EnvSensor(seed=8)})
    await single.stop()
    await single.stop()  # idempotent
    await asyncio.sleep(0)
    assert asyncio.all_tasks() <= tasks_before


async def run_cli(*args: str) -> str:
    """Start the CLI, wait for READY, read unit 1 on the first port, SIGTERM it, expect exit 0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "drivers.modbus.simulator", "--port", "0", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=10)).decode()
        assert line.startswith("READY "), line + (await process.stderr.read()).decode()
        port = int(line.split()[1])
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
        assert await client.connect()
        assert len(await read(client, 3, 0, 4, unit_id=1)) == 4
        client.close()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=5) == 0
        assert (await process.stderr.read()).decode() == ""
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return line


@pytest.mark.timeout(30)
async def test_cli_plant_prints_ready_and_exits_cleanly_on_sigterm():
    line = await run_cli("plant")
    assert "units=1:power_meter,2:env_sensor" in line


@pytest.mark.timeout(30)
async def test_cli_bench_serves_one_port_per_device():
    line = await run_cli("bench", "--devices", "3", "--points", "5")
    ports = next(field for field in line.split() if field.startswith("ports=")).removeprefix("ports=")
    assert len(set(ports.split(","))) == 3
