"""A reload that changes an energy table says that it takes effect at the next restart: the stage goes on with
the running tables (an open window's edges, counter and saved state belong to them), and the log says so."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.demo.mosquitto import MosquittoProcess
from drivers.modbus.simulator import SimServer
from tests.conftest import agent_config, meter_device
from tests.test_end_to_end import eventually, start_agent, stop_agent


async def test_a_changed_target_at_reload_is_logged_as_taking_effect_at_the_next_restart(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer, caplog: pytest.LogCaptureFixture) -> None:
    device = meter_device(modbus_sim.port, interval="100ms").replace(
        'word_order = "CDAB" }', 'word_order = "CDAB", unit = "Wh" }') + \
        'energy = { import_point = "active_energy_wh", target_kw = 100 }\n'
    config = agent_config(tmp_path, mosquitto.port, device)
    agent, stop, task = await start_agent(config)
    try:
        assert agent.energy is not None
        running = agent.energy.plan
        await eventually(lambda: agent.health["power-meter"].polls_ok >= 2, 10, "polls")
        with caplog.at_level(logging.WARNING, logger="agent"):
            config.write_text(config.read_text().replace("target_kw = 100", "target_kw = 120"))
            agent.request_reload()
            await eventually(lambda: agent.reloads == 1, 10, "the reload")
        assert "energy tables or groups changed; they take effect at the next restart" in caplog.text
        assert agent.energy.plan is running and running.meters["power-meter"].target_kw == 100
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="agent"):
            config.write_text(config.read_text().replace('poll_interval = "100ms"', 'poll_interval = "200ms"'))
            agent.request_reload()
            await eventually(lambda: agent.reloads == 2, 10, "the second reload")
    finally:
        await stop_agent(stop, task)
    assert "energy tables" not in caplog.text  # a reload that leaves them alone says nothing of them
