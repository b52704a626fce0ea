"""Start-up benchmark: how long a Modbus-only agent takes from process start to its first poll, and which
heavy packages it imports on the way.

Target 8 of issue 7: from process start to the first poll in 1 s or less for a Modbus-only config. The
simulator (bench devices, in this process on its own event loop in a thread) stamps the first request it
receives; mosquitto runs on a free port; the agent is started `--runs` times, each with a fresh buffer, and
told to notify readiness on a datagram socket this benchmark binds (NOTIFY_SOCKET, as systemd does).

Per run, on one monotonic clock shared by all processes:
- start -> READY: from just before the process is spawned to the READY=1 datagram (config validated,
  buffer open, device tasks started);
- start -> first request: to the first Modbus request the simulator receives;
- READY -> first request: connecting, sending, and the wait for the first tick if the first poll is held
  back to it. Polls are aligned to whole seconds of the wall clock; when the first request lands on the
  first whole second after READY, `tick_alignment_wait_ms` is the part of the figure spent waiting for it
  (by design, up to one interval), and `start_to_first_request_without_alignment_ms` the rest. When the
  agent polls at once on start, the alignment wait is 0.

One more run with `python -X importtime` gives the cumulative import time of the heavy top-level packages
(asyncua must be absent from a Modbus-only agent, jsonschema should be). Prints one JSON object.

    python -m bench.startup --runs 5 --devices 10 --points 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pymodbus.pdu import ModbusPDU

from agent.demo.mosquitto import MosquittoProcess, free_port
from bench.e2e import REPO, write_config
from drivers.modbus.simulator import BenchDevice, SimServer, SimServerGroup

INTERVAL = 1.0
HEAVY_PACKAGES = ("pydantic", "pymodbus", "paho", "aiosqlite", "asyncua", "jsonschema", "cryptography")
MUST_BE_ABSENT = ("asyncua",)
SHOULD_BE_ABSENT = ("jsonschema",)
READY_TIMEOUT = 20.0


class StampingServer(SimServer):
    """A simulator that remembers when the first request of all reached it (monotonic and wall time)."""

    def __init__(self, *args: object, first_request: threading.Event, stamp: list[float], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._first_request, self._stamp = first_request, stamp

    def _trace(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending and not self._first_request.is_set():
            self._stamp.extend((time.monotonic(), time.time()))
            self._first_request.set()
        return super()._trace(sending, pdu)


class Simulator:
    """Bench devices served from a thread with its own event loop, so this process can block on sockets."""

    def __init__(self, devices: int, points: int) -> None:
        self.first_request = threading.Event()
        self.stamps: list[float] = []
        self._group = SimServerGroup([
            StampingServer({1: BenchDevice(points, seed=n)}, first_request=self.first_request, stamp=self.stamps)
            for n in range(devices)])
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="modbus-simulator", daemon=True)

    @property
    def ports(self) -> list[int]:
        return self._group.ports

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._group.start(), self._loop).result(30)

    def rearm(self) -> None:
        self.stamps.clear()
        self.first_request.clear()

    def stop(self) -> None:
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._group.stop(), self._loop).result(30)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
        self._loop.close()


def wait_for_ready(notify: socket.socket, agent: subprocess.Popen[bytes], timeout: float) -> tuple[float, float]:
    """(monotonic, wall) time of the READY=1 datagram."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([notify], [], [], 0.05)
        if readable:
            message = notify.recv(4096).decode(errors="replace")
            if "READY=1" in message.splitlines():
                return time.monotonic(), time.time()
        elif agent.poll() is not None:
            raise RuntimeError(f"the agent exited with code {agent.returncode} before READY=1")
    raise TimeoutError(f"no READY=1 within {timeout} s")


def start_agent(config: Path, notify_path: Path, log: Path, *python_options: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    with log.open("wb") as stderr:
        return subprocess.Popen([sys.executable, *python_options, "-m", "agent", "run", "--config", str(config),
                                 "--log-level", "warning"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=stderr)


def stop_agent(agent: subprocess.Popen[bytes] | None) -> None:
    if agent is None or agent.poll() is not None:
        return
    agent.terminate()
    try:
        agent.wait(15)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()


def one_run(work: Path, broker_port: int, simulator: Simulator, points: int, notify: socket.socket,
            notify_path: Path, python_options: tuple[str, ...] = ()) -> dict[str, float]:
    work.mkdir()
    config = work / "config.toml"
    write_config(config, broker_port, simulator.ports, points, INTERVAL)
    with config.open("a") as f:  # the default metrics port may be taken on a shared machine
        f.write(f"\n[metrics]\nport = {free_port()}\n")
    simulator.rearm()
    agent: subprocess.Popen[bytes] | None = None
    try:
        started = time.monotonic()
        agent = start_agent(config, notify_path, work / "agent.log", *python_options)
        try:
            ready, ready_wall = wait_for_ready(notify, agent, READY_TIMEOUT)
            if not simulator.first_request.wait(READY_TIMEOUT):
                raise TimeoutError(f"no Modbus request within {READY_TIMEOUT} s of READY=1")
        except (RuntimeError, TimeoutError) as exc:
            log = (work / "agent.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{exc}; agent log:\n{log}") from exc
        first, first_wall = simulator.stamps[0], simulator.stamps[1]
    finally:
        stop_agent(agent)
    # Was the first poll held back to the first tick after READY? Then that wait is by design, not start-up.
    tick = math.floor(ready_wall / INTERVAL + 1) * INTERVAL
    aligned = tick <= first_wall < tick + 0.25 * INTERVAL
    alignment_wait = tick - ready_wall if aligned else 0.0
    return {"start_to_ready_ms": round((ready - started) * 1000, 1),
            "start_to_first_request_ms": round((first - started) * 1000, 1),
            "ready_to_first_request_ms": round((first - ready) * 1000, 1),
            "tick_alignment_wait_ms": round(alignment_wait * 1000, 1),
            "start_to_first_request_without_alignment_ms": round((first - started - alignment_wait) * 1000, 1)}


def import_table(log: str) -> dict[str, object]:
    """Cumulative import time (ms) of each heavy package, from `-X importtime` lines: for every module of the
    package imported by something outside it, its cumulative time (its own dependencies included)."""
    rows: list[tuple[int, int, str]] = []  # (cumulative us, depth, module)
    for line in log.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        _, cumulative, name = line.removeprefix("import time:").split("|", 2)
        depth = (len(name) - len(name.lstrip(" "))) // 2
        rows.append((int(cumulative), depth, name.strip()))
    # -X importtime prints a module after everything it imported; read backwards to find each importer.
    parent: dict[int, int | None] = {}
    stack: list[int] = []
    for index in range(len(rows) - 1, -1, -1):
        depth = rows[index][1]
        while stack and rows[stack[-1]][1] >= depth:
            stack.pop()
        parent[index] = stack[-1] if stack else None
        stack.append(index)

    def package(name: str) -> str:
        return name.split(".", 1)[0]

    def inside_an_importer_of(index: int, wanted: str) -> bool:
        above = parent[index]
        while above is not None:
            if package(rows[above][2]) == wanted:
                return True
            above = parent[above]
        return False

    table: dict[str, object] = {}
    for wanted in HEAVY_PACKAGES:
        cumulative = sum(rows[i][0] for i in range(len(rows))
                         if package(rows[i][2]) == wanted and not inside_an_importer_of(i, wanted))
        modules = sum(1 for _, _, name in rows if package(name) == wanted)
        table[wanted] = {"imported": modules > 0, "modules": modules, "cumulative_ms": round(cumulative / 1000, 1)}
    total = sum(c for c, depth, _ in rows if depth == 1)
    table["all_imports_ms"] = round(total / 1000, 1)
    return table


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "max": round(max(values), 1),
            "min": round(min(values), 1)}


def run(runs: int, devices: int, points: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="edge-bench-startup-") as tmp:
        work = Path(tmp)
        simulator = Simulator(devices, points)
        broker = MosquittoProcess(work_dir=work / "mosquitto")
        notify_path = work / "notify.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            notify.bind(str(notify_path))
            simulator.start()
            broker.start()
            results = [one_run(work / f"run{n}", broker.port, simulator, points, notify, notify_path)
                       for n in range(runs)]
            profiled = one_run(work / "importtime", broker.port, simulator, points, notify, notify_path,
                               ("-X", "importtime"))
            imports = import_table((work / "importtime" / "agent.log").read_text(errors="replace"))
        finally:
            notify.close()
            broker.close()
            simulator.stop()
    figures = {key: summary([r[key] for r in results]) for key in results[0]}
    absent_ok = all(not imports[p]["imported"] for p in MUST_BE_ABSENT)  # type: ignore[index]
    return {
        "benchmark": "startup",
        "load": {"devices": devices, "points_per_device": points, "type": "float32", "driver": "modbus (TCP)",
                 "poll_interval_s": INTERVAL, "runs": runs, "buffer": "fresh file per run, power-loss",
                 "process_start": "just before the process is spawned (fork and exec included)"},
        **figures,
        "runs": results,
        "imports": imports,
        "imports_run": {"note": "one extra run under python -X importtime (slower; not in the figures above)",
                        **profiled},
        "asyncua_absent": absent_ok,
        "jsonschema_absent": all(not imports[p]["imported"] for p in SHOULD_BE_ABSENT),  # type: ignore[index]
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--points", type=int, default=50)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    print(json.dumps(run(args.runs, args.devices, args.points)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
