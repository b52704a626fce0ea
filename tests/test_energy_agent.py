"""The whole agent, as a process, against a real mosquitto and a real pymodbus meter whose counter is the
exact integral of a known power profile: the demand window reaches the broker with the analytic value, the
alarm fires before the window ends, and an agent SIGKILLed mid-window and restarted completes it once.

Time cannot be hurried here: window edges are the wall clock's, the shortest window is one minute ("1m",
for commissioning trials), and the first window after a start is never sent (nothing was read before its
start edge). So this test runs a clean agent and a killed-and-restarted one side by side through the same
window, starting a few seconds before a minute edge: about 65 to 125 s, depending on when it starts. The
arithmetic itself (wraps, resets, gaps, clock steps, daylight saving, a week of windows) is tested in
accelerated time in test_energy_windows.py and test_energy_stage.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from agent.demo.mosquitto import MosquittoProcess
from agent.monitor import Monitor
from drivers.modbus.simulator import RegisterPoint, SimServer, SimulatedDevice
from energy.clock import read_clock_state
from tests.conftest import AgentProcess, agent_config
from tests.energy_sim import Profile, SimMeter

POLL = "200ms"


class ProfileMeter(SimulatedDevice):
    """A meter whose uint32 Wh counter is read at the instant of each request: the profile's integral."""

    kind = "profile_meter"

    def __init__(self, meter: SimMeter) -> None:
        super().__init__((RegisterPoint("energy_wh", 3, 0, "uint32", "ABCD", 1.0, "Wh"),), holding_registers=8,
                         input_registers=0, seed=0)
        self.meter = meter

    def update(self, now: float) -> None:
        self._store({"energy_wh": round(self.meter.counter(time.time()) * 1000)})

    async def _answer(self, *args: Any) -> Any:
        self.update(0.0)
        return await super()._answer(*args)


def meter_config(port: int, target_kw: float) -> str:
    return f"""
        [[devices]]
        name = "power-meter"
        driver = "modbus"
        host = "127.0.0.1"
        port = {port}
        unit_id = 1
        poll_interval = "{POLL}"
        timeout = "500ms"
        points = [
          {{ name = "energy_active_import", function = "holding", address = 0, type = "uint32", unit = "Wh" }},
        ]
        energy = {{ window = "1m", target_kw = {target_kw} }}
        """


@pytest.mark.timeout(240)
async def test_the_window_arrives_with_the_analytic_value_and_a_killed_agent_completes_it_once(
        tmp_path: Path, mosquitto: MosquittoProcess, agent_process: type[AgentProcess]) -> None:
    now = time.time()
    first_edge = now - now % 60 + 60  # Asia/Seoul's minute edges are UTC's
    if first_edge - now < 4:  # the agents must read the counter before the edge
        first_edge += 60
    t0 = now
    profile = Profile(t0, base=60.0, ramp=0.5)  # kW: 60 now, rising 30 kW a minute
    meter = SimMeter(profile, start_kwh=1_000_000.0, resolution=0.001)
    # The projection (slope over 15 s, the 1-minute window's lookback) crosses it ~13 s in; alarms are decided
    # from 15 s after the agents' first reading.
    target = profile.power_kw(first_edge) + 3
    async with SimServer({1: ProfileMeter(meter)}, update_interval=None) as simulator:
        agents = {}
        for gateway in ("gw-clean", "gw-killed"):
            folder = tmp_path / gateway
            folder.mkdir()
            config = agent_config(folder, mosquitto.port, meter_config(simulator.port, target), gateway=gateway)
            agents[gateway] = agent_process(config, folder / "agent.log")
        records: list[tuple[str, str, dict[str, Any]]] = []  # (gateway, stream, poll) of the energy streams

        def on_message(topic: str, body: dict[str, Any]) -> None:
            if "/" in body["device"]:
                records.extend((body["gateway"], body["device"], poll) for poll in body["polls"])

        with Monitor("127.0.0.1", mosquitto.port, "edge/#", gap_grace=1.0, on_message=on_message) as monitor:
            # Not before the edge ahead of `first_edge` (it is less than 4 s away when `first_edge` was moved on):
            # an agent reading the counter before it would close that window first, a minute early, and the
            # checks below would take it for the window from `first_edge` (the energy of the minute before).
            await _sleep_until(first_edge - 60 + 0.5)
            for agent in agents.values():
                agent.start()
            killed = agents["gw-killed"]
            # Mid-window, after a state save (every 10 s) that holds the open window: SIGKILL, a pause, restart.
            await _sleep_until(first_edge + 22)
            killed.kill()
            await _sleep_until(first_edge + 35)  # longer than max_gap (10 s) after the last saved reading
            killed.start()
            end = first_edge + 60
            # Waited for in the event loop, where the simulated meter answers.
            while not all(_windows(records, gw) for gw in agents) and time.time() < end + 15:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            assert all(_windows(records, gw) for gw in agents), "\n".join(a.log()[-3000:] for a in agents.values())
            await _sleep_until(time.time() + 2)  # anything sent twice would have come by now
            report = {g.gateway: g for g in monitor.report().gateways}
    for agent in agents.values():
        assert agent.terminate() == 0

    expected_kwh = meter.analytic_kwh(first_edge, end)
    unsynced = read_clock_state().known and not read_clock_state().synchronised
    for gateway, flags in (("gw-clean", set()), ("gw-killed", {"restart"})):
        (window,) = _windows(records, gateway)  # exactly once, the killed one too
        values = {r["point"]: r["value"] for r in window["readings"]}
        # Counter resolution 1 Wh at both edges; the polls' own timing a few ms at most.
        assert values["energy"] == pytest.approx(expected_kwh, abs=0.004), (gateway, values)
        assert values["demand"] == pytest.approx(expected_kwh * 60, abs=0.25), (gateway, values)
        assert values["window_s"] == 60
        assert set(filter(None, values["flags"].split(","))) == flags | ({"clock_unsynced"} if unsynced else set())
        meters = report[gateway].meters
        assert report[gateway].lost == 0 and report[gateway].invalid == 0
        assert [(m.meter, m.windows, m.missing, m.conflicting) for m in meters] == [("power-meter", 1, 0, 0)]
        assert meters[0].projected_kw is not None  # the retained live state arrived
    restarted = {r["point"]: r["value"] for r in _windows(records, "gw-killed")[0]["readings"]}
    assert restarted["coverage"] < 0.9 and restarted["longest_gap"] >= 10  # the outage shows
    alarms = [p for p in records if p[0] == "gw-clean" and p[1] == "power-meter/alarm"]
    assert [a[2]["readings"][0]["value"] for a in alarms] == ["raised"]
    assert alarms[0][2]["ts"] < window["ts"]


async def _sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.time()))


def _windows(records: list[tuple[str, str, dict[str, Any]]], gateway: str) -> list[dict[str, Any]]:
    return [p[2] for p in records if p[0] == gateway and p[1] == "power-meter/demand"]
