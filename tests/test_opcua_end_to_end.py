"""The agent end to end with OPC-UA devices: the simulator (in-process) -> the agent (read mode and
subscribe mode devices) -> a real mosquitto -> a subscriber that validates every message against the
payload schema and accounts for every sequence number, as the platform does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.demo.mosquitto import MosquittoProcess, free_port
from agent.monitor import Monitor
from drivers.opcua.simulator import PLANT, start
from tests.conftest import agent_config, requires_mosquitto
from tests.test_end_to_end import GATEWAY, eventually, nothing_lost, start_agent, stop_agent

pytestmark = [requires_mosquitto, pytest.mark.timeout(60)]


def devices(url: str) -> str:
    points = f"""[
          {{ name = "temperature", node_id = "nsu={PLANT};s=Boiler.Temperature", unit = "°C" }},
          {{ name = "counter", browse_path = "plant:Plant/plant:Boiler/plant:Counter" }},
          {{ name = "running", node_id = "nsu={PLANT};s=Boiler.Running" }},
          {{ name = "mode", node_id = "nsu={PLANT};s=Boiler.Mode" }},
          {{ name = "curve", node_id = "nsu={PLANT};s=Boiler.Curve" }},
        ]"""
    return f"""
        [[devices]]
        name = "boiler-read"
        driver = "opcua"
        endpoint = "{url}"
        poll_interval = "200ms"
        namespaces = {{ plant = "{PLANT}" }}
        points = {points}

        [[devices]]
        name = "boiler-subscribe"
        driver = "opcua"
        endpoint = "{url}"
        mode = "subscribe"
        poll_interval = "100ms"
        namespaces = {{ plant = "{PLANT}" }}
        points = {points}
        """


async def test_opcua_readings_reach_the_platform_with_their_timestamps(
        tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    sim = await start(free_port(), padding=1, tick=0.1)
    bodies: list[dict[str, Any]] = []
    try:
        config = agent_config(tmp_path, mosquitto.port, devices(sim.url))
        with Monitor("127.0.0.1", mosquitto.port, f"edge/test-site/{GATEWAY}/#",
                     on_message=lambda topic, body: bodies.append(body)) as monitor:
            agent, stop, task = await start_agent(config)

            def counters(device: str) -> set[Any]:
                return {r["value"] for b in bodies if b.get("device") == device for p in b["polls"]
                        for r in p["readings"] if r["point"] == "counter"}

            await eventually(lambda: len(counters("boiler-read")) >= 3 and len(counters("boiler-subscribe")) >= 5,
                             15, "counter values from both devices")
            await stop_agent(stop, task)
            stream, last, still_buffered = await nothing_lost(monitor, tmp_path / "buffer.db")
    finally:
        await sim.stop()
    assert monitor.invalid == 0, "every message matches docs/payload.schema.json"
    assert [s for s in stream.seqs.missing(1, last) if s not in still_buffered] == []
    latest = monitor.latest
    for device in ("boiler-read", "boiler-subscribe"):
        assert latest[device]["mode"].value == "auto" and latest[device]["running"].value is True
        assert latest[device]["temperature"].unit == "°C" and latest[device]["curve"].quality == "bad"
    readings = [r for b in bodies for p in b["polls"] for r in p["readings"]]
    good = [r for r in readings if r["quality"] == "good"]
    assert good and all(r["source_ts"].endswith("Z") and "server_ts" in r for r in good)
    # Subscribe mode sends changes: the counter changes every tick, the mode string never does.
    sub_modes = [r for b in bodies if b["device"] == "boiler-subscribe" for p in b["polls"] for r in p["readings"]
                 if r["point"] == "mode"]
    assert len(sub_modes) == 1
    assert agent.health["boiler-subscribe"].state == "ok" and agent.health["boiler-read"].state == "ok"
