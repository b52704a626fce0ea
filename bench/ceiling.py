"""The protocol library's own ceiling beside the agent, in one run: how many float32 values per CPU-second
the raw pymodbus client decodes, reading the same requests in a tight loop, against how many readings per
CPU-second the whole agent delivers (poll, decode, durable buffer, MQTT QoS 1, acknowledged).

The raw client does the least a program must do to get the values: one read of 124 registers, then
pymodbus's own `convert_from_registers` per float32. The agent does that and everything the product
promises. Target (issue 7): agent readings per CPU-second >= 0.7 x the raw client's values per CPU-second.

    python -m bench.ceiling --devices 50 --points 62 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time

from bench import e2e


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def raw_loop(ports: list[int], points: int, duration: float) -> dict[str, float]:
    from pymodbus.client import AsyncModbusTcpClient

    clients = [AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0) for port in ports]
    for client in clients:
        if not await client.connect():
            raise RuntimeError(f"raw client cannot connect to port {client.comm_params.port}")
    float32 = AsyncModbusTcpClient.DATATYPE.FLOAT32
    values = requests = 0
    try:
        cpu0, t0 = cpu_now(), time.monotonic()
        while time.monotonic() - t0 < duration:
            for client in clients:  # round robin, one request at a time: the library, not concurrency
                response = await client.read_holding_registers(0, count=2 * points, device_id=1)
                registers = response.registers
                for i in range(0, 2 * points, 2):
                    client.convert_from_registers(registers[i:i + 2], float32)
                values += points
                requests += 1
        cpu1, t1 = cpu_now(), time.monotonic()
    finally:
        for client in clients:
            client.close()
    cpu = cpu1 - cpu0
    return {"values_per_s": round(values / (t1 - t0)), "requests": requests,
            "cpu_us_per_value": round(cpu / values * 1e6, 2), "cpu_us_per_request": round(cpu / requests * 1e6, 1),
            "values_per_cpu_s": round(values / cpu)}


def run(devices: int, points: int, duration: float, interval: float, encoding: str = "json") -> dict[str, object]:
    simulator, ports = e2e.start_simulator(devices, points)
    try:
        raw = asyncio.run(raw_loop(ports, points, duration))
    finally:
        simulator.terminate()
        simulator.wait(10)
    agent = e2e.run(devices, points, interval, duration, warmup=5.0, encoding=encoding)
    per_reading = agent["agent_cpu_us_per_reading"]
    agent_per_cpu_s = round(1e6 / per_reading) if isinstance(per_reading, int | float) and per_reading else None
    return {
        "benchmark": "ceiling",
        "load": {"devices": devices, "points_per_device": points, "registers_per_request": 2 * points,
                 "type": "float32", "duration_s": duration, "agent_interval_s": interval, "encoding": encoding},
        "raw_pymodbus": raw,
        "agent": {"readings_per_s": agent["readings_per_s"], "cpu_us_per_reading": per_reading,
                  "readings_per_cpu_s": agent_per_cpu_s, "lost": agent["lost"], "rss_mb": agent["agent_rss_mb"]},
        "agent_over_raw": round(agent_per_cpu_s / raw["values_per_cpu_s"], 2) if agent_per_cpu_s else None,
        "machine": agent["machine"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--points", type=int, default=62, help="float32 per device: 62 = 124 registers")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=1.0, help="the agent's poll interval")
    parser.add_argument("--encoding", choices=("json", "cbor"), default="json", help="the agent's data messages")
    args = parser.parse_args()
    print(json.dumps(run(args.devices, args.points, args.duration, args.interval, args.encoding)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
