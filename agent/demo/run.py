"""`edge-agent demo`: the whole product on one machine with nothing else installed.

It starts simulated devices (a three-phase power meter and an environmental sensor behind one Modbus TCP
gateway), a broker (mosquitto when installed, otherwise the embedded Python broker), and the agent with a
real SQLite buffer on the embedded default config (`demo.toml`). It shows what reaches the broker, as the
platform sees it, and the buffer depth; it ends with a summary of readings polled, delivered and lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import tempfile
import textwrap
import time
import tomllib
from collections.abc import AsyncIterator
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from agent.config import AgentConfig, validate_config
from agent.daemon import Agent
from agent.demo.broker import EmbeddedBroker
from agent.demo.mosquitto import MosquittoProcess, find_mosquitto
from agent.monitor import Monitor
from buffer.store import Buffer
from drivers.modbus.simulator import EnvSensor, PowerMeter, SimServer

log = logging.getLogger("agent.demo")

DRAIN_TIMEOUT = 10.0
DEMO_MACHINES_START = (60.0, 90.0)  # seconds after the start: the press line, the compressor


def demo_config(modbus_port: int, mqtt_port: int, buffer_path: Path) -> AgentConfig:
    raw: dict[str, Any] = tomllib.loads(resources.files("agent.demo").joinpath("demo.toml").read_text("utf-8"))
    raw["buffer"]["path"] = str(buffer_path)
    raw["mqtt"]["port"] = mqtt_port
    for device in raw["devices"]:
        device["port"] = modbus_port
    return validate_config(raw, source="demo.toml (embedded)")


def run_demo(duration: float | None = None, broker: str = "auto", state_dir: Path | None = None,
             quiet: bool = False) -> int:
    try:
        return asyncio.run(_demo(duration, broker, state_dir, quiet))
    except KeyboardInterrupt:
        return 130


@contextlib.asynccontextmanager
async def _broker(kind: str, work_dir: Path) -> AsyncIterator[tuple[str, int]]:
    binary = find_mosquitto() if kind in ("auto", "mosquitto") else None
    if kind == "mosquitto" and binary is None:
        raise SystemExit("edge-agent demo: --broker mosquitto, but no mosquitto binary was found")
    if binary is not None:
        process = MosquittoProcess(work_dir=work_dir / "mosquitto", binary=binary)
        await asyncio.to_thread(process.start)
        try:
            yield f"mosquitto {binary}", process.port
        finally:
            await asyncio.to_thread(process.stop)
    else:
        embedded = EmbeddedBroker()
        await embedded.start()
        try:
            yield "embedded Python broker (install mosquitto for a real one)", embedded.port
        finally:
            await embedded.stop()


async def _demo(duration: float | None, broker_kind: str, state_dir: Path | None, quiet: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="edge-agent-demo-") as tmp:
        work = Path(tmp)
        state = state_dir or work
        state.mkdir(parents=True, exist_ok=True)
        # The press line starts a minute in and the compressor half a minute later: the load climbs over the
        # demand target while the newcomer watches (demo.toml), then falls back as they stop.
        meter = PowerMeter(machines_start_at=DEMO_MACHINES_START)
        async with SimServer({1: meter, 2: EnvSensor()}) as simulator, \
                _broker(broker_kind, work) as (broker_name, mqtt_port):
            config = demo_config(simulator.port, mqtt_port, state / "buffer.db")
            topic = f"{config.mqtt.topic_prefix}/{config.gateway.site}/{config.gateway.id}/#"
            view = _LiveView(quiet)
            monitor = Monitor("127.0.0.1", mqtt_port, topic, on_message=view.on_message)
            await asyncio.to_thread(monitor.start)
            try:
                _say(quiet, f"edge-agent demo: simulated Modbus TCP gateway at 127.0.0.1:{simulator.port} "
                            f"(power meter unit 1, environmental sensor unit 2)")
                _say(quiet, f"broker: {broker_name} on 127.0.0.1:{mqtt_port}; buffer: {config.buffer.path}")
                _say(quiet, f"platform view, subscribed to {topic}"
                            f"{'' if duration else ' (Ctrl-C to stop)'}:")
                _say(quiet, _demand_intro(config))
                return await _run_agent(config, monitor, view, duration, quiet)
            finally:
                await asyncio.to_thread(monitor.stop)


async def _run_agent(config: AgentConfig, monitor: Monitor, view: _LiveView, duration: float | None,
                     quiet: bool) -> int:
    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):  # stop cleanly and print the summary
        loop.add_signal_handler(signum, stop.set)
    started = time.monotonic()
    task = asyncio.create_task(agent.run(stop))
    await agent.started.wait()
    assert agent.buffer is not None
    first_seq = agent.buffer.next_seq
    try:
        while not stop.is_set() and not task.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await stop.wait()
            view.flush(agent, await agent.buffer.stats() if not task.done() else None, monitor)
            if duration is not None and time.monotonic() - started >= duration:
                stop.set()
        # Let the backlog drain before stopping the uplink, so the summary shows a settled state.
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while not task.done() and time.monotonic() < deadline and (await agent.buffer.stats()).rows:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await task
    last_seq = agent.buffer.next_seq - 1
    stream = monitor.stream(config.gateway.id, agent.buffer.buffer_id)
    monitor.wait_for(lambda: all(s in stream.seqs for s in range(first_seq, last_seq + 1)), 2.0)
    buffered = await _buffered_seqs(config)
    polled = last_seq - first_seq + 1
    delivered = sum(1 for s in range(first_seq, last_seq + 1) if s in stream.seqs)
    lost = sum(1 for s in range(first_seq, last_seq + 1) if s not in stream.seqs and s not in buffered)
    print(f"demo summary: {time.monotonic() - started:.0f} s, polled {polled} readings, delivered {delivered}, "
          f"still buffered {len(buffered & set(range(first_seq, last_seq + 1)))}, lost {lost}, "
          f"duplicates {stream.seqs.duplicates}", flush=True)
    return 0 if lost == 0 else 1


async def _buffered_seqs(config: AgentConfig) -> set[int]:
    buffer = await Buffer.open(config.buffer.path, config.buffer.max_bytes, config.buffer.durability)
    try:
        rows = await buffer.read_after(0, 1 << 30)
    finally:
        await buffer.close()
    return {seq for row in rows for seq in range(row.seq, row.seq + row.count)}


def _say(quiet: bool, line: str) -> None:
    if not quiet:
        print(line, flush=True)


class _LiveView:
    """Prints, once a second, the newest message of each device as the platform received it."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self._pending: dict[str, dict[str, Any]] = {}
        self._energy: list[dict[str, Any]] = []

    def on_message(self, topic: str, body: dict[str, Any]) -> None:  # paho's thread
        if body["device"].endswith(("/demand", "/alarm")):
            self._energy.append(body)  # every window and alarm event is worth a line of its own
        else:
            self._pending[body["device"]] = body

    def flush(self, agent: Agent, stats: Any, monitor: Monitor | None = None) -> None:
        if self.quiet:
            return
        energy, self._energy = self._energy, []
        for body in energy:
            for poll in body["polls"]:
                print(_energy_line(body["device"], {r["point"]: r["value"] for r in poll["readings"]}), flush=True)
        if monitor is not None:
            for gateway in monitor.report().gateways:
                for meter in gateway.meters:
                    if meter.projected_kw is not None:
                        alarm = f"  ALARM at {', '.join(f'{a:g}' for a in meter.alarms_kw)} kW" if meter.alarms_kw \
                            else f"  (alarms decided in {max(1, round(meter.live_settling_s))} s)" \
                            if meter.live_settling_s else ""
                        estimated = f" (its first {meter.live_estimated_s:.0f} s estimated: read from the next " \
                            "edge on)" if meter.live_estimated_s else ""
                        print(f"{'':9} {meter.meter:<12} demand now: {meter.live_energy_kwh:.3f} kWh so far in the "
                              f"window from {str(meter.live_window_start)[11:19]}{estimated}, projected "
                              f"{meter.projected_kw:.1f} kW{alarm}", flush=True)
        pending, self._pending = self._pending, {}
        width = max(60, shutil.get_terminal_size((120, 24)).columns)
        for device, body in sorted(pending.items()):
            poll = body["polls"][-1]  # the newest poll of the newest message
            readings = poll["readings"]
            head = f"{poll['ts'][11:19]}Z {device:<12} seq {readings[0]['seq']}..{readings[-1]['seq']}"
            values = textwrap.wrap("  ".join(_fmt(r) for r in readings), width - 10, break_on_hyphens=False)
            print(head, flush=True)
            for line in values:
                print(f"{'':10}{line}", flush=True)
        counters = agent.counters()
        depth = f"{stats.readings} readings in the buffer" if stats else "buffer closed"
        link = "connected" if counters.mqtt_connected else "DISCONNECTED"
        print(f"{'':9} {'agent':<12} broker {link}, {depth}, {counters.inflight} messages in flight, "
              f"polled {counters.readings_polled}, stored {counters.readings_committed} (with demand windows and "
              f"alarms), delivered {counters.readings_delivered}\n", flush=True)


def _demand_intro(config: AgentConfig) -> str:
    """What the newcomer is about to see of demand, and when."""
    meters = [d for d in config.devices if d.energy is not None]
    if not meters:
        return "demand: no device has an energy table"
    energy = meters[0].energy
    assert energy is not None
    now = time.time()
    first = now - now % energy.window + 2 * energy.window  # the first window is the first one read from its start
    closes = datetime.fromtimestamp(first, ZoneInfo(energy.timezone)).strftime("%H:%M:%S")
    return (f"demand: {meters[0].name}, {energy.window // 60}-minute windows (demo only: 15 minutes on a real "
            f"plant) in {energy.timezone}, target {energy.target_kw:g} kW; the first full window closes at "
            f"{closes}, in {first - now:.0f} s (the window open now started before the agent: its projection is "
            f"estimated in part until the first edge, in {first - energy.window - now:.0f} s); the press line "
            f"starts in {DEMO_MACHINES_START[0]:.0f} s and "
            f"the compressor in {DEMO_MACHINES_START[1]:.0f} s: watch the alarm")


def _energy_line(stream: str, values: dict[str, Any]) -> str:
    meter, _, kind = stream.rpartition("/")
    if kind == "demand":
        flags = f", flags {values['flags']}" if values.get("flags") else ""
        return (f"{'':9} {meter:<12} WINDOW from {str(values['window_start'])[11:19]} closed: {values['demand']:.1f} "
                f"kW ({values['energy']:.3f} kWh, coverage {values['coverage']:.0%}{flags})")
    return (f"{'':9} {meter:<12} ALARM {str(values['alarm']).upper()}: projected {values['projected_demand']:.1f} kW "
            f"against the {values['level']:g} kW level")


def _fmt(reading: dict[str, Any]) -> str:
    value = reading["value"]
    if reading["quality"] != "good":
        return f"{reading['point']}=BAD({reading.get('reason', '')})"
    shown = f"{value:.2f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
    # A no-break space keeps a value and its unit on one line when the view wraps.
    return f"{reading['point']}={shown}{reading.get('unit', '') and chr(0xA0) + reading['unit']}"


if __name__ == "__main__":
    sys.exit(run_demo(duration=10))
