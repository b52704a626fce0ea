"""OPC-UA benchmark: the agent's OPC-UA driver in this process against the simulator (a real asyncua
server) in its own process.

- Read mode: a device of N nodes (Double), polled back to back for the duration: nodes read per second
  and this process's CPU per poll (one batched Read request, decode to readings).
- Subscribe mode: the same N nodes monitored; the server changes `--changes` values a second (spread over
  10 ticks a second); CPU microseconds of this process per value change received, from the wire to a
  PollResult (what the agent's writer is handed; buffer and MQTT cost come on top, see bench/e2e.py).

Prints one JSON object.

    python -m bench.opcua --nodes 1000 --duration 10 --changes 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.demo.mosquitto import free_port
from agent.model import PollResult
from drivers.opcua import DeviceConfig, create
from drivers.opcua.driver import OpcuaReader, OpcuaSubscriber
from drivers.opcua.simulator import PLANT

REPO = Path(__file__).resolve().parent.parent
TICK = 0.1


def start_simulator(port: int, nodes: int, changes_per_tick: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "drivers.opcua.simulator", "--port", str(port), "--bulk", str(nodes),
         "--bulk-changes", str(changes_per_tick), "--tick", str(TICK)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("READY"):
        process.kill()
        raise RuntimeError(f"simulator did not start: {line!r}")
    return process


def device(url: str, nodes: int, **settings: object) -> DeviceConfig:
    return DeviceConfig.model_validate({
        "name": "bench", "driver": "opcua", "endpoint": url, "timeout": "5s",
        "points": [{"name": f"v{i:04d}", "node_id": f"nsu={PLANT};s=Bulk.{i:04d}"} for i in range(nodes)],
        **settings})


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def read_mode(url: str, nodes: int, duration: float, state: Path) -> dict[str, object]:
    driver = create(device(url, nodes), state_dir=state)
    assert isinstance(driver, OpcuaReader)
    try:
        await driver.poll()  # connect and resolve outside the window
        polls, bad = 0, 0
        cpu0, t0 = time.process_time(), time.monotonic()
        while time.monotonic() - t0 < duration:
            readings = await driver.poll()
            bad += sum(1 for r in readings if r.quality.value != "good")
            polls += 1
        cpu1, t1 = time.process_time(), time.monotonic()
    finally:
        await driver.close()
    return {"polls": polls, "bad_readings": bad, "nodes_per_s": round(polls * nodes / (t1 - t0)),
            "poll_ms": round((t1 - t0) / polls * 1000, 2),
            "cpu_ms_per_poll": round((cpu1 - cpu0) / polls * 1000, 2),
            "cpu_us_per_node": round((cpu1 - cpu0) / (polls * nodes) * 1e6, 2),
            "cpu_percent_of_core_at_1s_interval": round((cpu1 - cpu0) / polls * 100, 1)}


async def subscribe_mode(url: str, nodes: int, duration: float, changes: int, state: Path) -> dict[str, object]:
    driver = create(device(url, nodes, mode="subscribe", poll_interval="100ms", sampling_interval="50ms"),
                    state_dir=state)
    assert isinstance(driver, OpcuaSubscriber)
    received = {"readings": 0, "results": 0}

    async def emit(result: PollResult) -> None:
        received["readings"] += len(result.readings)
        received["results"] += 1

    task = asyncio.create_task(driver.run(emit))
    try:
        deadline = time.monotonic() + 20
        while received["readings"] < nodes:  # the initial values: the subscription is up
            if task.done() or time.monotonic() > deadline:
                raise RuntimeError(f"subscription did not start: {task.exception() if task.done() else 'timeout'}")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        r0, n0 = received["readings"], received["results"]
        cpu0, t0 = time.process_time(), time.monotonic()
        await asyncio.sleep(duration)
        cpu1, t1 = time.process_time(), time.monotonic()
        r1, n1 = received["readings"], received["results"]
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        await driver.close()
    changes_seen = r1 - r0
    return {"offered_changes_per_s": changes, "changes_per_s": round(changes_seen / (t1 - t0), 1),
            "results_per_s": round((n1 - n0) / (t1 - t0), 1),
            "cpu_us_per_change": round((cpu1 - cpu0) / changes_seen * 1e6, 1) if changes_seen else None,
            "cpu_percent_of_core": round((cpu1 - cpu0) / (t1 - t0) * 100, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--changes", type=int, default=1000, help="value changes a second in subscribe mode")
    args = parser.parse_args()
    changes_per_tick = max(1, round(args.changes * TICK))
    port = free_port()
    simulator = start_simulator(port, args.nodes, changes_per_tick)
    url = f"opc.tcp://127.0.0.1:{port}/edge-agent/"
    try:
        with tempfile.TemporaryDirectory(prefix="edge-bench-opcua-") as tmp:
            read = asyncio.run(read_mode(url, args.nodes, args.duration, Path(tmp)))
            subscribe = asyncio.run(subscribe_mode(url, args.nodes, args.duration, round(changes_per_tick / TICK),
                                                   Path(tmp)))
    finally:
        stop(simulator)
    print(json.dumps({
        "benchmark": "opcua",
        "load": {"nodes": args.nodes, "type": "Double", "duration_s": args.duration, "server": "asyncua simulator, "
                 "own process, loopback, no security", "read": "polled back to back, one batched Read per poll",
                 "subscribe": f"{changes_per_tick} nodes changed every {TICK} s, publishing 100 ms, sampling 50 ms"},
        "read_mode": read, "subscribe_mode": subscribe,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
