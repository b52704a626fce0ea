"""Clock health belongs to the gateway: the kernel's synchronisation state and the steps seen are in the status
message on the broker, /status.json, /metrics and `edge-agent status`, with or without energy tables; a step
found by any of them flags the energy windows it crosses."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.demo.mosquitto import MosquittoProcess, free_port
from drivers.modbus.simulator import SimServer
from energy.clock import ClockState, ClockWatch, StepDetector, read_clock_state
from energy.config import EnergyPlan
from energy.stage import EnergyStage
from tests.conftest import REPO, agent_config, meter_device
from tests.energy_sim import Profile, SimMeter, poll_times, polls
from tests.test_end_to_end import eventually, start_agent, stop_agent
from tests.test_energy_stage import T0, Clocks, Sink, meter_spec, run
from tests.test_metrics import get, sample


def retained_status(port: int, topic: str) -> dict[str, object]:
    got: list[bytes] = []
    arrived = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)

    def on_message(c: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        got.append(message.payload)
        arrived.set()

    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert arrived.wait(10), "no status message"
    finally:
        client.disconnect()
        client.loop_stop()
    return json.loads(got[-1])


async def test_the_clock_is_in_the_status_message_metrics_and_status_command_without_energy_tables(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer) -> None:
    kernel = read_clock_state()
    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port, interval="100ms"))
    config.write_text(config.read_text().replace("port = 0  # a free port", f"port = {free_port()}  # a free port"))
    agent, stop, task = await start_agent(config)
    try:
        assert agent.energy is None  # no energy table: the clock is reported all the same
        await eventually(lambda: agent.health["power-meter"].polls_ok >= 2, 10, "polls")
        status = await asyncio.to_thread(retained_status, mosquitto.port, "edge/test-site/gw-test/status")
        assert agent.metrics is not None
        code, text = await asyncio.to_thread(get, agent.metrics.port, "/metrics")
        _, body = await asyncio.to_thread(get, agent.metrics.port, "/status.json")
        human = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "agent", "status", "--config",
                                                        str(config)], cwd=REPO, capture_output=True, text=True,
                                        timeout=30)
    finally:
        await stop_agent(stop, task)
    for clock in (status["clock"], json.loads(body)["clock"]):
        assert isinstance(clock, dict)
        assert clock["known"] == kernel.known and clock["synchronised"] == kernel.synchronised
        assert clock["steps"] == 0 and clock["last_step_s"] is None
        if kernel.known:
            assert isinstance(clock["esterror_s"], float) and isinstance(clock["maxerror_s"], float)
    assert "energy" not in status
    assert code == 200 and sample(text, "clock_steps_total") == 0
    if kernel.known:
        assert sample(text, "clock_synchronised") == float(kernel.synchronised)
        assert sample(text, "clock_maximum_error_seconds") >= 0
    assert human.returncode == 0, human.stderr
    expected = "clock   synchronised, estimated error" if kernel.synchronised else \
        "clock   NOT SYNCHRONISED" if kernel.known else "clock   synchronisation unknown"
    assert expected in human.stdout, human.stdout


def test_checks_an_hour_apart_do_not_take_slewing_for_a_step() -> None:
    """The status message may be the only caller (no meter): an NTP slew of 280 ppm over two hours moves the wall
    clock 2 s against the monotonic one without any step; a real 5 s step a minute later is still found."""
    wall, mono = [1_700_000_000.0], [100.0]
    detector = StepDetector(lambda: wall[0], lambda: mono[0])
    detector.check()
    wall[0] += 7202.0
    mono[0] += 7200.0
    assert detector.check() == 0.0 and detector.steps == 0
    wall[0] += 65.0
    mono[0] += 60.0
    assert detector.check() == 5.0 and detector.steps == 1


async def test_a_step_found_by_the_status_message_still_flags_the_open_window(tmp_path: Path) -> None:
    """The agent has one clock watch: the status message may find a step before the next meter poll does."""

    clocks = Clocks(T0)
    watch = ClockWatch(lambda: ClockState(True, True, 0.001, 0.01),
                       StepDetector(lambda: clocks.wall, lambda: clocks.mono), lambda: clocks.mono)
    sink = Sink()
    energy = EnergyStage(EnergyPlan({"incomer-1": meter_spec()}, ()), tmp_path / "energy-state.json", None,
                         sink.submit, sink.flush, monotonic=lambda: clocks.mono, clock=watch)
    energy.clocks = clocks  # type: ignore[attr-defined]
    await energy.start()
    meter = SimMeter(Profile(T0, 300.0))
    await run(energy, list(polls("incomer-1", meter, poll_times(T0 + 1, T0 + 960, 1.0))))
    clocks.at(clocks.wall + 3.0, step=3.0)
    watch.figures()  # the status message looks first, and finds the step
    await run(energy, list(polls("incomer-1", meter, poll_times(T0 + 964, T0 + 1900, 1.0))))
    windows = [p for p in sink.polls if p.device == "incomer-1/demand"]
    flags = [dict((r.point, r.value) for r in w.readings)["flags"] for w in windows]
    assert flags[-1] == "clock_step" and flags.count("clock_step") == 1, flags
