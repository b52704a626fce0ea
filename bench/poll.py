"""The Modbus polling path alone, beside the raw pymodbus client, in one process and one run: CPU per
reading of `ModbusDriver.poll()` (line queue, request, decode to readings) against CPU per value of the
raw client reading the same registers and decoding each float32 with `convert_from_registers`.

No buffer, no MQTT and no scheduler: the figure isolates what the driver adds over the library, with
less noise than the end-to-end benchmark (the simulator runs in its own process; CPU is this process's).
The two loops alternate in rounds so that a load change on the machine hits both alike.

    python -m bench.poll --devices 50 --points 50 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import e2e


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def agent_round(drivers: list, seconds: float) -> tuple[float, int]:
    values = 0
    cpu0, t0 = cpu_now(), time.monotonic()
    while time.monotonic() - t0 < seconds:
        for driver in drivers:
            values += len(await driver.poll())
    return cpu_now() - cpu0, values


async def raw_round(clients: list, points: int, seconds: float) -> tuple[float, int]:
    float32 = clients[0].DATATYPE.FLOAT32
    values = 0
    cpu0, t0 = cpu_now(), time.monotonic()
    while time.monotonic() - t0 < seconds:
        for client in clients:
            registers = (await client.read_holding_registers(0, count=2 * points, device_id=1)).registers
            for i in range(0, 2 * points, 2):
                client.convert_from_registers(registers[i:i + 2], float32)
            values += points
    return cpu_now() - cpu0, values


async def measure(ports: list[int], points: int, duration: float, rounds: int) -> dict[str, object]:
    from pymodbus.client import AsyncModbusTcpClient

    from agent.config import load_config
    from drivers.modbus import create

    with tempfile.TemporaryDirectory(prefix="edge-bench-poll-") as tmp:
        config = Path(tmp) / "config.toml"
        e2e.write_config(config, 1883, ports, points, 1.0)
        devices = load_config(config).devices
    drivers = [create(device) for device in devices]  # type: ignore[arg-type]
    clients = [AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0) for port in ports]
    for client in clients:
        if not await client.connect():
            raise RuntimeError(f"raw client cannot connect to port {client.comm_params.port}")
    agent_us: list[float] = []
    raw_us: list[float] = []
    try:
        await agent_round(drivers, 1.0)  # connect and warm up
        await raw_round(clients, points, 1.0)
        for _ in range(rounds):
            cpu, values = await agent_round(drivers, duration / rounds / 2)
            agent_us.append(cpu / values * 1e6)
            cpu, values = await raw_round(clients, points, duration / rounds / 2)
            raw_us.append(cpu / values * 1e6)
    finally:
        for driver in drivers:
            await driver.close()
        for client in clients:
            client.close()
    agent = statistics.median(agent_us)
    raw = statistics.median(raw_us)
    return {"benchmark": "poll", "load": {"devices": len(ports), "points_per_device": points, "type": "float32",
                                          "duration_s": duration, "rounds": rounds},
            "driver_cpu_us_per_reading": round(agent, 3), "raw_cpu_us_per_value": round(raw, 3),
            "driver_over_raw": round(raw / agent, 3),
            "rounds_us": {"driver": [round(x, 3) for x in agent_us], "raw": [round(x, 3) for x in raw_us]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--points", type=int, default=50)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    simulator, ports = e2e.start_simulator(args.devices, args.points)
    try:
        result = asyncio.run(measure(ports, args.points, args.duration, args.rounds))
    finally:
        simulator.terminate()
        simulator.wait(10)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
