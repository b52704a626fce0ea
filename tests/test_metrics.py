"""The local metrics endpoint and `edge-agent status`, scraped from a running agent after real polls."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from agent.demo.mosquitto import MosquittoProcess, free_port
from drivers.modbus.simulator import SimServer
from tests.conftest import REPO, agent_config, meter_device
from tests.test_end_to_end import eventually, start_agent, stop_agent


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^edge_agent_{name}{re.escape(labels)} (\S+)$", text, re.M)
    assert match, f"no edge_agent_{name}{labels} in:\n{text}"
    return float(match.group(1))


async def test_metrics_after_real_polls_and_the_status_command(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer) -> None:
    port = free_port()
    devices = meter_device(modbus_sim.port, interval="100ms") + meter_device(free_port(), name="dead-meter")
    config = agent_config(tmp_path, mosquitto.port, devices)
    config.write_text(config.read_text().replace("port = 0  # a free port", f"port = {port}  # a free port"))
    agent, stop, task = await start_agent(config)
    try:
        assert agent.metrics is not None and agent.metrics.port == port
        await eventually(lambda: agent.health["power-meter"].polls_ok >= 5 and
                         agent.health["dead-meter"].polls_failed >= 1, 10, "polls")
        code, text = await asyncio.to_thread(get, port, "/metrics")
        assert code == 200
        assert sample(text, "device_polls_ok_total", '{device="power-meter"}') >= 5
        assert sample(text, "device_polls_failed_total", '{device="dead-meter"}') >= 1
        assert sample(text, "device_state", '{device="dead-meter",state="failing"}') == 1
        assert sample(text, "mqtt_connected") == 1
        line = f'{{line="tcp 127.0.0.1:{modbus_sim.port}"}}'
        assert sample(text, "line_requests_total", line) >= 5
        assert 0 < sample(text, "line_utilisation", line) <= 1
        assert sample(text, "buffer_lost_readings_total", '{reason="rejected"}') == 0
        code, body = await asyncio.to_thread(get, port, "/status.json")
        assert code == 200 and json.loads(body)["devices"]["power-meter"]["state"] == "ok"
        assert (await asyncio.to_thread(get, port, "/nothing"))[0] == 404
        human = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "agent", "status", "--config",
                                                        str(config)], cwd=REPO, capture_output=True, text=True,
                                        timeout=30)
    finally:
        await stop_agent(stop, task)
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert "broker connected" in lines[0]
    assert re.search(r"^line tcp 127\.0\.0\.1:\d+: \d+% busy, 1 device\(s\)", human.stdout, re.M)
    assert re.search(r"^power-meter +ok ", human.stdout, re.M)
    assert re.search(r"^dead-meter +failing .*cannot connect", human.stdout, re.M)
    # Once the agent has stopped, the command says so instead of failing obscurely.
    gone = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "agent", "status", "--config",
                                                    str(config)], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert gone.returncode == 1 and "is it running" in gone.stderr


async def test_a_taken_metrics_port_does_not_stop_the_agent(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port, interval="100ms"))
        config.write_text(config.read_text().replace("port = 0  # a free port",
                                                     f"port = {taken.getsockname()[1]}  # a taken port"))
        agent, stop, task = await start_agent(config)
        await eventually(lambda: agent.health["power-meter"].polls_ok >= 3, 10, "polling without metrics")
        await stop_agent(stop, task)
    assert agent.metrics is None
