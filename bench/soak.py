"""Memory soak: the agent's resident memory while it polls for a long time, and through a broker outage.

Target 4 of issue 7: RSS 60 MB or less while polling 100 devices x 100 points at 1 s; flat (under 5 %
growth) over a one-hour soak and through a ten-minute broker outage (the backlog lives on disk, not in
memory). The same processes as bench/e2e.py (the simulator in its own process, a private mosquitto, the
agent, a subscriber here that accounts for every sequence number), run for `--duration` seconds after a
warm-up, with the broker stopped for `--outage` seconds in the middle of the run and then started again on
the same port. The broker keeps the subscriber's session on disk (persistence), so what the agent sends
after the restart reaches the subscriber even if the agent reconnects first.

The agent's RSS is sampled every 5 s; its buffer depth comes from its own /status.json. Prints one JSON
object: RSS at the end of the warm-up, its peak, at the end, growth (end against end of warm-up), the peak
during the outage and during the drain, the buffer depth when the broker comes back, how long the backlog
took to drain, the accounting (polled, delivered, still buffered, lost, duplicates, as in bench/e2e.py)
and the agent's CPU per reading polled.

    python -m bench.soak --devices 100 --points 100 --duration 300 --outage 60
    python -m bench.soak --hour --outage 600      # the issue's shape: one hour, a ten-minute outage
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from agent.demo.mosquitto import MosquittoProcess, free_port
from agent.monitor import Monitor
from bench.e2e import REPO, _buffer_state, cpu_seconds, rss_mb, start_simulator, stop_processes, write_config

SAMPLE_EVERY = 5.0
GATEWAY = "bench-gw"


class Agent:
    """The agent process and its status endpoint."""

    def __init__(self, config: Path, log: Path, metrics_port: int) -> None:
        self.metrics_port = metrics_port
        with log.open("wb") as stderr:
            self.process = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config),
                                             "--log-level", "warning"], cwd=REPO, stderr=stderr)

    @property
    def pid(self) -> int:
        return self.process.pid

    def status(self) -> dict[str, object] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/status.json", timeout=5) as answer:
                return json.loads(answer.read())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def buffered_readings(self) -> int | None:
        status = self.status()
        buffer = status.get("buffer") if status else None
        return int(buffer["readings"]) if isinstance(buffer, dict) else None

    def next_seq(self) -> int | None:
        status = self.status()
        buffer = status.get("buffer") if status else None
        return int(buffer["next_seq"]) if isinstance(buffer, dict) else None


class Samples:
    """RSS (MB) and buffer depth every SAMPLE_EVERY seconds, each tagged with the phase of the run."""

    def __init__(self, agent: Agent, started: float) -> None:
        self.agent, self.started = agent, started
        self.rows: list[dict[str, object]] = []
        self._next = time.monotonic() + SAMPLE_EVERY

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def take(self, phase: str) -> dict[str, object]:
        self._next = max(self._next + SAMPLE_EVERY, time.monotonic() + 0.5)
        if self.agent.process.poll() is not None:
            raise RuntimeError(f"the agent exited with code {self.agent.process.returncode} during the soak")
        row: dict[str, object] = {"t_s": round(time.monotonic() - self.started, 1), "phase": phase,
                                  "rss_mb": round(rss_mb(self.agent.pid), 1),
                                  "buffered": self.agent.buffered_readings()}
        self.rows.append(row)
        return row

    def rss(self, *phases: str) -> list[float]:
        return [float(row["rss_mb"]) for row in self.rows if row["phase"] in phases]  # type: ignore[arg-type]


def wait_sampling(samples: Samples, seconds: float, phase: str) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if samples.due():
            samples.take(phase)
        time.sleep(min(0.2, max(0.0, until - time.monotonic())))


def run(devices: int, points: int, duration: float, outage: float, warmup: float,
        encoding: str = "json") -> dict[str, object]:
    if outage >= duration:
        raise ValueError(f"the outage ({outage} s) must be shorter than the run ({duration} s)")
    offered = devices * points
    drain_done_below = 2 * offered  # at most two poll cycles waiting: the backlog is gone
    with tempfile.TemporaryDirectory(prefix="edge-bench-soak-") as tmp:
        work = Path(tmp)
        simulator, ports = start_simulator(devices, points)
        broker = MosquittoProcess(work_dir=work / "mosquitto", extra_config=[
            "persistence true", f"persistence_location {work / 'mosquitto'}/", "autosave_interval 1"])
        agent: Agent | None = None
        monitor: Monitor | None = None
        try:
            broker.start()
            config = work / "config.toml"
            write_config(config, broker.port, ports, points, 1.0, encoding)
            metrics_port = free_port()
            with config.open("a") as f:
                f.write(f"\n[metrics]\nport = {metrics_port}\n")
            # A persistent session: the broker keeps our subscription and queues for us across its restart.
            monitor = Monitor("127.0.0.1", broker.port, f"edge/bench/{GATEWAY}/#", keep_latencies=1,
                              session="bench-soak", validate=False)
            monitor.start()
            time.sleep(1.5)  # the session autosaved
            agent = Agent(config, work / "agent.log", metrics_port)
            started = time.monotonic()
            samples = Samples(agent, started)
            wait_sampling(samples, warmup, "warmup")
            at_warmup_end = samples.take("warmup")
            cpu0, seq0, t0 = cpu_seconds(agent.pid), agent.next_seq(), time.monotonic()

            before_outage = (duration - outage) / 2
            wait_sampling(samples, before_outage, "polling")
            broker.stop()
            outage_started = time.monotonic()
            wait_sampling(samples, outage, "outage")
            depth_at_outage_end = agent.buffered_readings()
            at_outage_end = samples.take("outage")
            broker.start()
            restarted = time.monotonic()
            reconnect_seconds: float | None = None  # until the buffer depth first goes down
            drain_seconds: float | None = None  # until at most two poll cycles are left in it
            run_until = t0 + duration
            while time.monotonic() < run_until:
                if drain_seconds is None:
                    depth = agent.buffered_readings()
                    if reconnect_seconds is None and depth is not None and depth_at_outage_end is not None \
                            and depth < depth_at_outage_end:
                        reconnect_seconds = time.monotonic() - restarted
                    if depth is not None and depth <= drain_done_below:
                        drain_seconds = time.monotonic() - restarted
                        samples.take("drain")
                if samples.due():
                    samples.take("drain" if drain_seconds is None else "after")
                time.sleep(1.0 if drain_seconds is None else 0.2)
            at_end = samples.take("after" if drain_seconds is not None else "drain")
            cpu1, seq1, t1 = cpu_seconds(agent.pid), agent.next_seq(), time.monotonic()

            agent.process.terminate()
            agent.process.wait(60)
            time.sleep(1.0)  # the last acknowledged messages reach the subscriber
            last_seq, buffered = _buffer_state(work / "buffer.db")
            monitor.stop()
            stream = monitor.stream(GATEWAY)
            lost = sum(1 for s in range(1, last_seq + 1) if s not in stream.seqs and s not in buffered)
            polled_in_window = (seq1 - seq0) if seq0 is not None and seq1 is not None else None
            warm, end = float(at_warmup_end["rss_mb"]), float(at_end["rss_mb"])  # type: ignore[arg-type]
            return {
                "benchmark": "soak",
                "load": {"devices": devices, "points_per_device": points, "interval_s": 1.0, "type": "float32",
                         "offered_readings_per_s": offered, "warmup_s": warmup, "duration_s": round(t1 - t0, 1),
                         "outage_s": round(restarted - outage_started, 1),
                         "outage_starts_after_s": round(before_outage, 1), "rss_sampled_every_s": SAMPLE_EVERY,
                         "buffer_durability": "power-loss", "encoding": encoding,
                         "broker": "mosquitto, stopped (SIGTERM) and started again on the same port"},
                "rss_mb_at_warmup_end": warm,
                "rss_mb_peak": max(samples.rss("polling", "outage", "drain", "after")),
                "rss_mb_at_end": end,
                "rss_growth_percent": round((end - warm) / warm * 100, 1),
                "rss_mb_peak_during_outage": max(samples.rss("outage")),
                "rss_mb_at_outage_end": at_outage_end["rss_mb"],
                "rss_mb_peak_during_drain": max(samples.rss("drain"), default=None),
                "buffered_readings_at_outage_end": depth_at_outage_end,
                "first_backlog_delivered_after_s": round(reconnect_seconds, 1) if reconnect_seconds is not None
                else None,  # the agent's reconnect backoff is in it
                "drain_seconds_after_broker_back": round(drain_seconds, 1) if drain_seconds is not None else None,
                "drain_done_when_buffered_at_most": drain_done_below,
                "polled": last_seq,
                "delivered": stream.seqs.count,
                "still_buffered": len(buffered),
                "lost": lost,
                "duplicates": stream.seqs.duplicates,
                "agent_cpu_us_per_reading": round((cpu1 - cpu0) / polled_in_window * 1e6, 2)
                if polled_in_window else None,
                "agent_cpu_percent_of_core": round((cpu1 - cpu0) / (t1 - t0) * 100, 1),
                "samples": samples.rows,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()},
            }
        finally:
            if monitor is not None:
                monitor.stop()
            stop_processes(agent.process if agent is not None else None, simulator, broker)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds measured after the warm-up")
    parser.add_argument("--hour", action="store_const", const=3600.0, dest="duration",
                        help="a one-hour soak (--duration 3600)")
    parser.add_argument("--outage", type=float, default=60.0,
                        help="seconds the broker is down, in the middle of the run (the issue's shape: 600)")
    parser.add_argument("--warmup", type=float, default=30.0)
    parser.add_argument("--encoding", choices=("json", "cbor"), default="json", help="the agent's data messages")
    args = parser.parse_args()
    if not 0 < args.outage < args.duration:
        parser.error("--outage must be positive and shorter than --duration")
    print(json.dumps(run(args.devices, args.points, args.duration, args.outage, args.warmup, args.encoding)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
