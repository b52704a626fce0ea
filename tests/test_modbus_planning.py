"""What a poll costs the line, against real pymodbus servers (Modbus TCP, RTU over TCP, RTU through a
pseudo-terminal pair): a meter that refuses part of a coalesced request costs only what it refuses, and gets
it back when it answers again; a serial line is planned by its cost; the tools say what went on the wire and
keep the daemon's line warnings out of their output; and a meter that misses a few answers is back on its
interval as soon as it answers."""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import AsyncIterator, Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from agent.health import DeviceHealth, FailureLog
from agent.model import PollResult, Quality
from agent.scheduler import poll_loop
from drivers.modbus import describe
from drivers.modbus import line as lines
from drivers.modbus.cli import _scan
from drivers.modbus.config import ModbusDevice
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.simulator import PtyLink, SimServer
from tests.conftest import FixedRegisters, edge_agent

pytestmark = pytest.mark.timeout(30)
INPUTS = 4  # function code of the input registers


def register_points(addresses: list[int], function: str = "input") -> list[dict[str, Any]]:
    return [{"name": f"p{a}", "function": function, "address": a, "type": "uint16"} for a in addresses]


def meter(count: int = 64) -> FixedRegisters:
    """Input register n holds 1000 + n: a wrong register is seen at once."""
    return FixedRegisters(inputs=[1000 + n for n in range(count)])


@pytest.fixture
def pty_link() -> Iterator[PtyLink]:
    with PtyLink() as link:
        yield link


@pytest.fixture(params=["tcp", "rtu"])
async def served(request: pytest.FixtureRequest, pty_link: PtyLink) -> AsyncIterator[tuple[SimServer, dict[str, Any]]]:
    """A meter at unit 1, over Modbus TCP or on a serial line, and the device keys that reach it."""
    if request.param == "rtu":
        server = SimServer({1: meter()}, serial_port=pty_link.server_path, update_interval=None)
        line: dict[str, Any] = {"transport": "rtu", "serial_port": pty_link.client_path, "turnaround": "2ms"}
    else:
        server = SimServer({1: meter()}, update_interval=None)
        line = {}
    await server.start()
    if not line:
        line = {"transport": "tcp", "host": "127.0.0.1", "port": server.port}
    try:
        yield server, line
    finally:
        await server.stop()


def modbus_device(line: dict[str, Any], points: list[dict[str, Any]], **keys: Any) -> ModbusDevice:
    return ModbusDevice.model_validate({"name": "m", "driver": "modbus", "unit_id": 1, "timeout": 0.5,
                                        "points": points, **line, **keys})


def spans(driver: ModbusDriver) -> list[tuple[int, int]]:
    return [(r.address, r.count) for r in driver.requests]


def by_point(readings: Any) -> dict[str, Any]:
    return {r.point: r for r in readings}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- a refused range costs only itself -------------------------------------------------------------------------

async def test_a_refused_range_costs_only_itself_and_is_not_asked_again(served: Any) -> None:
    server, line = served
    server.devices[1].refuse(INPUTS, 4, 5)  # two registers in the middle of ten the meter does not have
    driver = ModbusDriver(modbus_device(line, register_points(list(range(10)))))
    try:
        assert spans(driver) == [(0, 10)]
        polled = await driver.poll()
        first = by_point(polled)
        assert len(polled) == 10  # each point once
        assert {name: r.value for name, r in first.items() if name not in ("p4", "p5")} == \
            {f"p{n}": 1000 + n for n in (0, 1, 2, 3, 6, 7, 8, 9)}
        # The good runs stay joined around what is refused: 2 requests, not one per point.
        assert spans(driver) == [(0, 4), (6, 4)]
        assert first["p4"].quality is Quality.BAD and first["p4"].reason == \
            "the meter refuses it: Modbus exception 2 (illegal data address) for FC04 4 (30005)"
        for _ in range(2):
            sent = server.function_codes[(1, INPUTS)]
            later = by_point(await driver.poll())
            assert server.function_codes[(1, INPUTS)] - sent == 2 == driver.sent_last_poll
            assert [later[f"p{n}"].value for n in (0, 3, 6, 9)] == [1000, 1003, 1006, 1009]
            assert later["p5"].quality is Quality.BAD
            assert later["p5"].reason == ("the meter refuses it: Modbus exception 2 (illegal data address) for FC04 "
                                          "5 (30006); left out of the polls until the hourly re-probe")
        assert len(later) == 10 and driver.sent_last_poll == 2
    finally:
        await driver.close()


async def test_a_meter_that_refuses_long_reads_gets_the_longest_it_answers(served: Any) -> None:
    server, line = served
    server.devices[1].longest_read = 8  # exception 3 (illegal data value) above 8 registers
    driver = ModbusDriver(modbus_device(line, register_points(list(range(20)))))
    try:
        for _ in range(3):
            readings = await driver.poll()
            assert [r.value for r in readings] == [1000 + n for n in range(20)]  # never a point lost
        assert all(count <= 8 for _, count in spans(driver)) and len(driver.requests) == 4
        sent = server.function_codes[(1, INPUTS)]
        await driver.poll()
        assert server.function_codes[(1, INPUTS)] - sent == 4  # no refused request left in the plan
    finally:
        await driver.close()


async def test_the_split_reverts_when_the_meter_answers_whole_blocks_again(
        served: Any, caplog: pytest.LogCaptureFixture) -> None:
    server, line = served
    sim = server.devices[1]
    sim.refuse(INPUTS, 3, 3)
    clock = Clock()
    driver = ModbusDriver(modbus_device(line, register_points([0, 1, 2, 3, 4, 5])), clock=clock)
    caplog.set_level(logging.INFO, logger="drivers.modbus")
    try:
        await driver.poll()
        assert spans(driver) == [(0, 3), (4, 2)]
        clock.now += 3599
        await driver.poll()
        assert spans(driver) == [(0, 3), (4, 2)]  # not asked again within the hour
        sim.accept(INPUTS, 3, 3)  # the meter's map changed (a firmware update, a replaced meter)
        clock.now += 1
        sent = server.function_codes[(1, INPUTS)]
        readings = await driver.poll()
        assert server.function_codes[(1, INPUTS)] - sent == 1
        assert [r.value for r in readings] == [1000, 1001, 1002, 1003, 1004, 1005]
        assert spans(driver) == [(0, 6)]
        messages = [r.getMessage() for r in caplog.records if r.name == "drivers.modbus"]
        assert any("asking again for what the meter refused 60 min ago" in m for m in messages)
        assert "device m: the meter answers the whole plan again; back to 1 request(s) per poll" in messages
        await driver.poll()
        assert spans(driver) == [(0, 6)]
    finally:
        await driver.close()


async def test_a_re_probe_of_a_meter_that_still_refuses_keeps_the_plan(served: Any) -> None:
    server, line = served
    server.devices[1].refuse(INPUTS, 3, 3)
    clock = Clock()
    driver = ModbusDriver(modbus_device(line, register_points([0, 1, 2, 3, 4, 5])), clock=clock)
    try:
        await driver.poll()
        clock.now += 3600
        readings = by_point(await driver.poll())
        assert readings["p3"].quality is Quality.BAD and readings["p4"].value == 1004
        assert spans(driver) == [(0, 3), (4, 2)]
        clock.now += 60  # the re-probe started a new hour
        sent = server.function_codes[(1, INPUTS)]
        await driver.poll()
        assert server.function_codes[(1, INPUTS)] - sent == 2
    finally:
        await driver.close()


# --- a serial line is planned by its cost -------------------------------------------------------------------

async def test_a_serial_line_reads_through_gaps_cheaper_than_a_request(pty_link: PtyLink) -> None:
    async with SimServer({1: meter()}, serial_port=pty_link.server_path, update_interval=None) as server:
        line = {"transport": "rtu", "serial_port": pty_link.client_path, "baudrate": 9600}
        # 14 unused registers between points: 29 ms to read through, against 41 ms for one more request.
        points = register_points([0, 15, 30, 45])
        driver = ModbusDriver(modbus_device(line, points))
        never = ModbusDriver(modbus_device(line, [*points, *register_points([55])],
                                           unreadable=[{"function": "input", "first": 50, "last": 52}]))
        try:
            readings = await driver.poll()
            assert [r.value for r in readings] == [1000, 1015, 1030, 1045]
            assert server.function_codes[(1, INPUTS)] == 1
            assert spans(driver) == [(0, 46)]
            # A declared unreadable range is never read through, however cheap.
            assert spans(never) == [(0, 46), (55, 1)]
        finally:
            await driver.close()
            await never.close()


def test_check_shows_the_cost_of_the_line_and_of_the_plan() -> None:
    device = modbus_device({"transport": "rtu", "serial_port": "/dev/ttyUSB0"}, register_points([0, 15, 30, 45]))
    shown = describe(device)
    assert shown[0].endswith("4 points in 1 request per poll (fewest possible 1; max_gap 19 derived from the line)")
    assert shown[2] == ("  cost on the line: a request ~41 ms, a register ~2.1 ms: up to 19 unused registers are "
                        "worth reading to save a request; this plan ~137 ms a poll")
    fixed = describe(modbus_device({"transport": "rtu", "serial_port": "/dev/ttyUSB0"},
                                   register_points([0, 15, 30, 45]), max_gap=10))
    assert "4 requests per poll (fewest possible 1; max_gap 10)" in fixed[0]
    assert "would save a request (max_gap is set to 10); this plan ~172 ms a poll" in fixed[2]


# --- the tools -------------------------------------------------------------------------------------------

async def cli(*args: str) -> tuple[int, str, str]:
    return await edge_agent("modbus", *args, timeout=20)


async def test_poll_reports_the_requests_that_went_on_the_wire(tmp_path: Path) -> None:
    async with SimServer({1: meter()}, update_interval=None) as server:
        server.devices[1].refuse(INPUTS, 5, 5)
        config = tmp_path / "config.toml"
        config.write_text(f"""
[gateway]
id = "gw"
site = "s"
[[devices]]
name = "main"
driver = "modbus"
host = "127.0.0.1"
port = {server.port}
points = [
  {{ name = "voltage", function = "input", address = 0, type = "uint16" }},
  {{ name = "hole", function = "input", address = 5, type = "uint16" }},
  {{ name = "energy", function = "input", address = 10, type = "uint16" }},
]
""", encoding="utf-8")
        code, out, err = await cli("poll", "--config", str(config), "--device", "main")
        on_the_wire = server.function_codes[(1, INPUTS)]
    assert code == 1, (out, err)  # the hole is bad
    assert on_the_wire == 5  # the whole block, then the bisection: [voltage], [hole energy], [hole], [energy]
    assert f"3 points from tcp 127.0.0.1:{server.port} unit 1 in 5 request(s) (planned 1; the meter refused part " \
           "of it: 2 per poll from now on)" in out and out.endswith("; 1 bad\n")


async def test_scan_keeps_the_daemons_line_warnings_out_of_its_output(
        pty_link: PtyLink, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Minutes of scanning in about a second: the line's own clock runs 100 times faster (only the line's: the
    # event loop keeps real time). Waiting for silent unit ids keeps the line busy all the time, which in the
    # daemon is "saturated".
    real, started = time.monotonic, time.monotonic()
    monkeypatch.setattr(lines, "time", types.SimpleNamespace(monotonic=lambda: started + (real() - started) * 100))
    caplog.set_level(logging.DEBUG, logger="drivers.modbus")
    async with SimServer({1: meter(), 7: meter()}, serial_port=pty_link.server_path, update_interval=None):
        code = await _scan({"transport": "rtu", "serial_port": pty_link.client_path, "baudrate": 9600,
                            "parity": "N", "stop_bits": 1, "timeout": 0.05}, list(range(1, 16)), "input", 0)
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines() == ["unit   1: answers (input 0 = 1000)", "unit   7: answers (input 0 = 1000)",
                                f"2 of 15 unit id(s) answered on serial {pty_link.client_path}"]
    assert [r.getMessage() for r in caplog.records if "busy" in r.getMessage()] == []


def test_the_daemon_still_judges_its_lines() -> None:
    device = modbus_device({"transport": "tcp", "host": "127.0.0.1", "port": 1502}, register_points([0]))

    async def acquire() -> lines.Line:
        line = lines.acquire(device)
        lines.release(line, device.name)
        return line

    assert asyncio.run(acquire()).watch_saturation is True


# --- a meter that misses a few answers ----------------------------------------------------------------------

async def until(condition: Callable[[], bool], task: asyncio.Task[None]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            assert not task.done(), task
            await asyncio.sleep(0.01)


async def test_a_meter_that_misses_a_few_answers_is_back_on_its_interval_as_soon_as_it_answers() -> None:
    # RTU over TCP (a serial device server): a unit that is not on the line is silent, as a meter is.
    async with SimServer({1: meter()}, framer="rtu", update_interval=None) as server:
        line = {"transport": "rtu_over_tcp", "host": "127.0.0.1", "port": server.port}
        interval = 0.5
        config = modbus_device(line, register_points([0, 1]), timeout=0.1, poll_interval=interval)
        driver = ModbusDriver(config)
        health = DeviceHealth("m", FailureLog("device m", logging.getLogger("tests.planning")))
        results: list[PollResult] = []

        async def submit(result: PollResult) -> None:
            results.append(result)

        silent = server.devices.pop(1)  # the meter stops answering
        task = asyncio.create_task(poll_loop("m", interval, driver, health, submit))
        try:
            await until(lambda: health.polls_failed >= 4, task)
            server.devices[1] = silent  # and answers again
            back = time.monotonic()
            await until(lambda: len(results) >= 3, task)
            # The old backoff held it 8 ticks (4 s) after its 4th miss; now within its line share (10 x 0.1 s).
            assert time.monotonic() - back < 2.0 + interval
            ticks = [round(r.ts / interval) for r in results]
            assert [b - a for a, b in pairwise(ticks)] == [1, 1]  # back on every tick
            assert health.failures.consecutive == 0
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await driver.close()
