"""End-to-end benchmark: simulated Modbus TCP devices in their own process, a real mosquitto, the agent
as its own process, and a subscriber (this process) that counts every reading by sequence number.

Prints one JSON object: throughput, the agent's CPU per delivered reading and its memory, latency from
poll to arrival, and the accounting (polled, delivered, lost, duplicates), with the load shape.

    python -m bench.e2e --devices 50 --points 50 --interval 1 --duration 60
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.demo.mosquitto import MosquittoProcess
from agent.monitor import Monitor

REPO = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Simulators:
    """The simulator processes of a run, stopped together (each by its PID)."""

    def __init__(self, processes: list[subprocess.Popen[str]]) -> None:
        self.processes = processes

    def terminate(self) -> None:
        for process in self.processes:
            process.terminate()

    def kill(self) -> None:
        for process in self.processes:
            process.kill()

    def wait(self, timeout: float | None = None) -> None:
        for process in self.processes:
            process.wait(timeout)


def start_simulator(devices: int, points: int, processes: int = 1) -> tuple[Simulators, list[int]]:
    """`devices` simulated meters, each on its own port, spread over `processes` processes: a plant's meters
    answer in parallel, one Python process answers one request at a time (about 0.4 ms of CPU each)."""
    started: list[subprocess.Popen[str]] = []
    ports: list[int] = []
    try:
        for share in (devices // processes + (n < devices % processes) for n in range(processes)):
            process = subprocess.Popen(
                [sys.executable, "-m", "drivers.modbus.simulator", "--port", "0", "bench", "--devices", str(share),
                 "--points", str(points)], cwd=REPO, stdout=subprocess.PIPE, text=True)
            started.append(process)
            assert process.stdout is not None
            line = process.stdout.readline()
            if not line.startswith("READY"):
                raise RuntimeError(f"simulator did not start: {line!r}")
            listed = next(p for p in line.split() if p.startswith("ports=")).removeprefix("ports=")
            ports += [int(p) for p in listed.split(",")]
    except BaseException:
        Simulators(started).kill()
        raise
    return Simulators(started), ports


def write_config(path: Path, mqtt_port: int, ports: list[int], points: int, interval: float,
                 encoding: str = "json") -> None:
    point_lines = ",\n".join(
        f'  {{ name = "p{i}", function = "holding", address = {2 * i}, type = "float32" }}' for i in range(points))
    devices = "".join(f"""
[[devices]]
name = "dev{n:04d}"
driver = "modbus"
host = "127.0.0.1"
port = {port}
unit_id = 1
poll_interval = {interval}
timeout = 1.0
points = [
{point_lines}
]
""" for n, port in enumerate(ports))
    path.write_text(f"""
[gateway]
id = "bench-gw"
site = "bench"

[buffer]
path = "{path.parent / 'buffer.db'}"
durability = "power-loss"

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
max_inflight = 64
encoding = "{encoding}"
""" + devices)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(devices: int, points: int, interval: float, duration: float, warmup: float,
        percentiles: bool = False, encoding: str = "json", simulators: int = 1) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        work = Path(tmp)
        simulator, ports = start_simulator(devices, points, simulators)
        broker = MosquittoProcess(work_dir=work / "mosquitto")
        agent: subprocess.Popen[bytes] | None = None
        try:
            broker.start()
            config = work / "config.toml"
            write_config(config, broker.port, ports, points, interval, encoding)
            topics = "spBv1.0/#" if encoding == "sparkplug" else "edge/bench/bench-gw/#"
            monitor = Monitor("127.0.0.1", broker.port, topics, keep_latencies=2_000_000,
                              validate=False)  # schema checks in this process would skew the latency
            monitor.start()
            agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config),
                                      "--log-level", "warning"], cwd=REPO, stderr=open(work / "agent.log", "wb"))
            time.sleep(warmup)
            stream = monitor.stream("bench-gw")
            cpu0, delivered0, t0 = cpu_seconds(agent.pid), monitor.received("bench-gw"), time.monotonic()
            latencies_from = len(monitor.latencies)
            peak_rss = 0.0
            while time.monotonic() - t0 < duration:
                time.sleep(1.0)
                peak_rss = max(peak_rss, rss_mb(agent.pid))
            cpu1, delivered1, t1 = cpu_seconds(agent.pid), monitor.received("bench-gw"), time.monotonic()
            latencies = list(monitor.latencies)[latencies_from:]
            agent.terminate()
            agent.wait(30)
            time.sleep(1.0)  # let the last acknowledged messages reach the subscriber
            last_seq, buffered = _buffer_state(work / "buffer.db")
            stream = monitor.stream("bench-gw")
            monitor.stop()
            lost = sum(1 for s in range(1, last_seq + 1) if s not in stream.seqs and s not in buffered)
            window_readings = delivered1 - delivered0
            result: dict[str, object] = {
                "benchmark": "e2e",
                "load": {"devices": devices, "points_per_device": points, "interval_s": interval,
                         "offered_readings_per_s": devices * points / interval, "type": "float32",
                         "requests_per_poll": 1, "duration_s": round(t1 - t0, 1), "warmup_s": warmup,
                         "buffer_durability": "power-loss", "encoding": encoding,
                         "simulator_processes": simulators},
                "readings_per_s": round(window_readings / (t1 - t0), 1),
                "polled": last_seq,
                "delivered": stream.seqs.count,
                "still_buffered": len(buffered),
                "lost": lost,
                "duplicates": stream.seqs.duplicates,
                "agent_cpu_us_per_reading":
                    round((cpu1 - cpu0) / window_readings * 1e6, 2) if window_readings else None,
                "agent_cpu_percent_of_core": round((cpu1 - cpu0) / (t1 - t0) * 100, 1),
                "agent_rss_mb": round(peak_rss, 1),
                "latency_p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
                "latency_p95_ms": round(percentile(latencies, 0.95) * 1000, 1),
                "latency_mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()},
            }
            if percentiles:  # one latency per poll (message), as the p50/p95 above
                spread: dict[str, float | int | None] = {
                    f"p{round(q * 100)}": round(percentile(latencies, q) * 1000, 1) for q in (0.50, 0.90, 0.95, 0.99)}
                spread["max"] = round(max(latencies) * 1000, 1) if latencies else None
                spread["samples"] = len(latencies)
                result["latency_ms"] = spread
            return result
        finally:
            stop_processes(agent, simulator, broker)


def stop_processes(agent: subprocess.Popen[bytes] | None, simulator: Simulators,
                   broker: MosquittoProcess) -> None:
    """Stop what a benchmark started, by PID, whatever state the run ended in."""
    if agent is not None and agent.poll() is None:
        agent.kill()
        agent.wait()
    simulator.terminate()
    simulator.wait(10)
    broker.close()


def _buffer_state(path: Path) -> tuple[int, set[int]]:
    import sqlite3

    db = sqlite3.connect(path)
    try:
        (next_seq,), = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchall()
        rows = db.execute("SELECT seq, count FROM batches").fetchall()
    finally:
        db.close()
    return int(next_seq) - 1, {s for seq, count in rows for s in range(seq, seq + count)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--points", type=int, default=50)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--percentiles", action="store_true",
                        help="add latency_ms: p50, p90, p95, p99 and max of poll to broker")
    parser.add_argument("--encoding", choices=("json", "cbor", "sparkplug"), default="json")
    parser.add_argument("--simulators", type=int, default=1, help="simulator processes to spread the devices over")
    args = parser.parse_args()
    print(json.dumps(run(args.devices, args.points, args.interval, args.duration, args.warmup, args.percentiles,
                         args.encoding, args.simulators)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
