"""Reload (SIGHUP, systemctl reload): only the devices that changed restart; the buffer, its numbering
and the MQTT session are untouched; a config with errors is refused and the running one stays."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import pytest

from agent.demo.mosquitto import MosquittoProcess
from agent.monitor import Monitor
from drivers.modbus.simulator import SimServer
from tests.conftest import AgentProcess, agent_config, meter_device
from tests.test_end_to_end import GATEWAY, eventually, nothing_lost, start_agent, stop_agent


async def test_reload_restarts_only_the_changed_device_and_keeps_the_buffer(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer, caplog: pytest.LogCaptureFixture) -> None:
    stable = meter_device(modbus_sim.port, name="meter-a", interval="100ms")
    config = agent_config(tmp_path, mosquitto.port, stable + meter_device(modbus_sim.port, name="meter-b",
                                                                          interval="100ms"))
    with Monitor("127.0.0.1", mosquitto.port, f"edge/test-site/{GATEWAY}/#") as monitor:
        agent, stop, task = await start_agent(config)
        assert agent.buffer is not None and agent.uplink is not None
        await eventually(lambda: agent.health["meter-b"].polls_ok >= 3, 10, "both devices polling")
        a_task, a_health, b_task = agent._pollers["meter-a"], agent.health["meter-a"], agent._pollers["meter-b"]
        a_model = agent.config.devices[0]
        buffer_id, connected_before = agent.buffer.buffer_id, agent.uplink.messages_delivered

        # meter-b gets a new interval, meter-c is added, meter-a stays as it was.
        head, tail = config.read_text().split('name = "meter-b"', 1)
        tail = tail.replace('poll_interval = "100ms"', 'poll_interval = "200ms"', 1)
        config.write_text(head + 'name = "meter-b"' + tail + meter_device(modbus_sim.port, name="meter-c"))
        agent.request_reload()
        await eventually(lambda: agent.reloads == 1, 10, "the reload")
        await eventually(lambda: "meter-c" in agent.health and agent.health["meter-c"].polls_ok >= 2, 10,
                         "the added device polling")
        assert agent._pollers["meter-a"] is a_task and agent.health["meter-a"] is a_health  # untouched
        # ... and so is its model: the reloaded equal copy is not kept beside the one its driver holds.
        assert agent.config.devices[0] is a_model and agent._drivers["meter-a"].config is a_model
        assert agent._pollers["meter-b"] is not b_task and b_task.done()  # restarted with its new interval
        assert agent.buffer.buffer_id == buffer_id

        # A broken file is refused; everything keeps running as it was.
        good = config.read_text()
        config.write_text(good.replace('driver = "modbus"', 'driver = "modbis"', 1))
        with caplog.at_level(logging.ERROR, logger="agent"):
            agent.request_reload()
            await eventually(lambda: any("reload rejected" in r.getMessage() for r in caplog.records), 10,
                             "the rejection")
        assert "devices[0].driver: unknown driver 'modbis'" in caplog.text
        assert agent.reloads == 1 and set(agent._pollers) == {"meter-a", "meter-b", "meter-c"}
        polled = agent.health["meter-a"].polls_ok
        await eventually(lambda: agent.health["meter-a"].polls_ok > polled + 2, 10, "polling after the rejection")
        assert agent.uplink.connected and agent.uplink.messages_delivered > connected_before
        await stop_agent(stop, task)
        await nothing_lost(monitor, tmp_path / "buffer.db")  # one numbering across the reloads: no gap


async def test_sighup_reloads_the_running_process(tmp_path: Path, mosquitto: MosquittoProcess,
                                                  modbus_sim: SimServer, agent_process: type[AgentProcess]) -> None:
    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port, interval="100ms"))
    process = agent_process(config, tmp_path / "agent.log")
    process.start()
    await eventually(lambda: "agent started" in process.log(), 15, "the agent to start")
    config.write_text(config.read_text() + meter_device(modbus_sim.port, name="meter-2", interval="100ms"))
    assert process.process is not None
    process.process.send_signal(signal.SIGHUP)
    await eventually(lambda: "reload: 1 device(s) added, 0 changed, 0 removed, 1 unchanged" in process.log(), 10,
                     "the reload line")
    assert await asyncio.to_thread(process.terminate) == 0
