"""Drain benchmark: after an outage, how fast the backlog reaches the broker while live polling goes on,
and what the live stream's latency is meanwhile.

The buffer is prefilled with `--backlog` readings (as after an outage: polls of 50 float32 points), then
the simulator, mosquitto, a counting subscriber and the agent (polling `--devices` x `--points` every
second) start. Prints one JSON object: backlog drain rate, live readings delivered during the drain and
their latency, the agent's CPU, and the accounting (lost, duplicates).

    python -m bench.drain --backlog 500000 --devices 50 --points 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.demo.mosquitto import MosquittoProcess
from agent.model import PollResult
from agent.monitor import Monitor
from agent.payload import Encoder
from bench.buffer import POINTS, polls
from bench.e2e import (
    REPO,
    _buffer_state,
    cpu_seconds,
    percentile,
    rss_mb,
    start_simulator,
    stop_processes,
    write_config,
)
from buffer.store import Buffer, StoredBatch


async def prefill(path: Path, readings: int) -> None:
    buffer = await Buffer.open(path, max_bytes=8 << 30)
    encoder = Encoder("bench-gw", "bench", buffer.buffer_id)
    results = polls(readings // POINTS, devices=50)
    for first in range(0, len(results), 500):
        seq, batches = buffer.next_seq, []
        for result in results[first:first + 500]:
            backlog = PollResult("backlog-" + result.device, result.ts, result.readings)
            batches.append(StoredBatch(seq, POINTS, backlog.device, backlog.ts, encoder.encode(backlog, seq)))
            seq += POINTS
        await buffer.append(batches)
    await buffer.close()


def run(backlog: int, devices: int, points: int, inflight: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="edge-bench-drain-") as tmp:
        work = Path(tmp)
        asyncio.run(prefill(work / "buffer.db", backlog))
        simulator, ports = start_simulator(devices, points)
        broker = MosquittoProcess(work_dir=work / "mosquitto")
        agent: subprocess.Popen[bytes] | None = None
        live_arrivals: list[tuple[float, float]] = []  # (arrival, latency)
        backlog_done: list[float] = []
        try:
            broker.start()
            config = work / "config.toml"
            write_config(config, broker.port, ports, points, 1.0)
            config.write_text(config.read_text().replace("max_inflight = 64", f"max_inflight = {inflight}"))

            def on_message(topic: str, body: dict[str, object]) -> None:
                if not str(body["device"]).startswith("backlog-"):
                    live_arrivals.append((time.monotonic(), 0.0))

            monitor = Monitor("127.0.0.1", broker.port, "edge/bench/bench-gw/#", keep_latencies=2_000_000,
                              on_message=on_message, validate=False)  # schema checks would skew latency
            monitor.start()
            started = time.monotonic()
            agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config),
                                      "--log-level", "warning"], cwd=REPO, stderr=open(work / "agent.log", "wb"))
            stream = monitor.stream("bench-gw")
            while time.monotonic() - started < 600:
                stream = monitor.stream("bench-gw")
                if stream.seqs.count and all(s in stream.seqs for s in range(1, backlog + 1, POINTS)):
                    backlog_done.append(time.monotonic())
                    break
                time.sleep(0.2)
            drain_seconds = backlog_done[0] - started if backlog_done else float("nan")
            cpu = cpu_seconds(agent.pid)
            peak_rss = rss_mb(agent.pid)
            live_during = [a for a, _ in live_arrivals if backlog_done and a < backlog_done[0]]
            latencies = list(monitor.latencies)
            time.sleep(2)
            agent.terminate()
            agent.wait(30)
            time.sleep(1)
            last_seq, buffered = _buffer_state(work / "buffer.db")
            stream = monitor.stream("bench-gw")
            monitor.stop()
            lost = sum(1 for s in range(1, last_seq + 1) if s not in stream.seqs and s not in buffered)
            return {
                "benchmark": "drain",
                "load": {"backlog_readings": backlog, "live_devices": devices, "live_points_per_device": points,
                         "live_interval_s": 1.0, "max_inflight": inflight, "backlog_message_readings": POINTS},
                "backlog_drain_readings_per_s": round(backlog / drain_seconds) if backlog_done else None,
                "drain_seconds_incl_agent_start": round(drain_seconds, 2),
                "live_messages_during_drain": len(live_during),
                "live_latency_p95_ms_whole_run": round(percentile([x for x in latencies if x < 3600], 0.95) * 1000, 1),
                "agent_cpu_s": round(cpu, 2),
                "agent_rss_mb": round(peak_rss, 1),
                "lost": lost,
                "duplicates": stream.seqs.duplicates,
                "still_buffered": len(buffered),
            }
        finally:
            stop_processes(agent, simulator, broker)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=500_000)
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--points", type=int, default=50)
    parser.add_argument("--max-inflight", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps(run(args.backlog, args.devices, args.points, args.max_inflight)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
