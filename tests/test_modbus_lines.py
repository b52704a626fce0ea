"""Modbus against real pymodbus servers on every transport: RTU through a pseudo-terminal pair (pyserial
and RTU framing for real), RTU over TCP, Modbus TCP. Several unit ids share one line; one of them is dead;
a coalesced request meets an exception; and the server counts every function code it receives, so the
no-write guarantee is checked on what reached the wire."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException

from agent.health import DeviceHealth, FailureLog
from agent.model import Float32, PollResult, Quality
from agent.scheduler import poll_loop
from drivers.modbus import line as lines
from drivers.modbus.config import ModbusDevice
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.simulator import PtyLink, SimServer
from tests.conftest import FixedRegisters

pytestmark = pytest.mark.timeout(60)

# Unit 1 and 2 answer with values the test knows; unit 3 is on the line's config but not on the wire.
VOLTS = [229.8, 231.4]
ENERGY = [123456789, 987654]


def words(fmt: str, value: float) -> list[int]:
    data = struct.pack(">" + fmt, value)
    return list(struct.unpack(f">{len(data) // 2}H", data))


def meter(index: int) -> FixedRegisters:
    inputs = words("f", VOLTS[index]) + [0] * 8 + words("I", ENERGY[index])
    return FixedRegisters(inputs=inputs, holding=[0x4142, 0x4300, 0xFFFF, 1 << 3],
                          coils=[True, False, True], discrete_inputs=[False, True])


POINTS: list[dict[str, Any]] = [
    {"name": "voltage", "function": "input", "address": 0, "type": "float32", "unit": "V"},
    {"name": "energy", "function": "input", "address": 10, "type": "uint32", "unit": "Wh"},
    {"name": "model", "function": "holding", "address": 0, "type": "string", "count": 2},
    {"name": "status", "function": "holding", "address": 2, "type": "uint16", "not_available": [0xFFFF]},
    {"name": "alarm", "function": "holding", "address": 3, "type": "bool", "bit": 3},
    {"name": "relay_1", "function": "coil", "address": 0},
    {"name": "relay_3", "function": "coil", "address": 2},
    {"name": "door_open", "function": "discrete", "address": 1},
]


def device(name: str, unit_id: int, **line: Any) -> ModbusDevice:
    return ModbusDevice.model_validate({"name": name, "driver": "modbus", "unit_id": unit_id, "points": POINTS,
                                        "timeout": 0.25, "poll_interval": 0.2, **line})


def expected(index: int) -> dict[str, Any]:
    return {"voltage": VOLTS[index], "energy": ENERGY[index], "model": "ABC", "status": None, "alarm": True,
            "relay_1": True, "relay_3": True, "door_open": True}


@pytest.fixture
def pty_link() -> Iterator[PtyLink]:
    with PtyLink() as link:
        yield link


async def serve_line(kind: str, link: PtyLink) -> tuple[SimServer, dict[str, Any]]:
    units = {1: meter(0), 2: meter(1)}
    if kind == "rtu":
        server = SimServer(units, serial_port=link.server_path, update_interval=None)
        await server.start()
        return server, {"transport": "rtu", "serial_port": link.client_path, "baudrate": 19200,
                        "turnaround": "5ms"}
    server = SimServer(units, framer="rtu" if kind == "rtu_over_tcp" else "socket", update_interval=None)
    await server.start()
    return server, {"transport": kind, "host": "127.0.0.1", "port": server.port}


@pytest.fixture(params=["rtu", "rtu_over_tcp", "tcp"])
async def line_under_test(request: pytest.FixtureRequest,
                          pty_link: PtyLink) -> AsyncIterator[tuple[SimServer, dict[str, Any]]]:
    """A simulator with units 1 and 2 on one line, and the device keys that reach it."""
    server, line = await serve_line(request.param, pty_link)
    try:
        yield server, line
    finally:
        await server.stop()


def on(*kinds: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("line_under_test", kinds, indirect=True)


def values(readings: Any) -> dict[str, Any]:
    """Each point's value as the JSON encoding shows it (a float32 by its shortest decimal)."""
    return {r.point: float(repr(r.value)) if isinstance(r.value, Float32) else r.value for r in readings}


async def test_every_type_over_every_transport(line_under_test: Any) -> None:
    server, line = line_under_test
    drivers = [ModbusDriver(device(f"meter-{u}", u, **line)) for u in (1, 2)]
    try:
        for index, driver in enumerate(drivers):
            readings = await driver.poll()
            assert values(readings) == expected(index)
            status = next(r for r in readings if r.point == "status")
            assert status.quality is Quality.BAD and "0xFFFF" in (status.reason or "")
        # Both devices went through one line: one client, one queue.
        assert drivers[0].line is drivers[1].line
        assert drivers[0].line is not None and drivers[0].line.requests == 2 * len(drivers[0].requests)
    finally:
        for driver in drivers:
            await driver.close()
    assert not lines.lines()
    assert set(code for _, code in server.function_codes) <= {1, 2, 3, 4}


async def run_loops(devices: list[ModbusDevice], seconds: float) -> tuple[dict[str, DeviceHealth],
                                                                         list[PollResult]]:
    healths = {d.name: DeviceHealth(d.name, FailureLog(d.name, __import__("logging").getLogger("test")))
               for d in devices}
    drivers = [ModbusDriver(d) for d in devices]
    results: list[PollResult] = []

    async def submit(result: PollResult) -> None:
        results.append(result)

    tasks = [asyncio.create_task(poll_loop(d.name, d.poll_interval, drv, healths[d.name], submit))
             for d, drv in zip(devices, drivers, strict=True)]
    try:
        await asyncio.sleep(seconds)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for driver in drivers:
            await driver.close()
    return healths, results


@on("rtu", "rtu_over_tcp")
async def test_a_dead_unit_does_not_stall_the_line(line_under_test: Any) -> None:
    """Units 1 and 2 polled every 200 ms (4 requests each), unit 3 is dead (silent, 250 ms timeout).
    Without backoff the dead unit would take more than the whole line; with it, the live units keep their
    schedule but for the tick of each retry."""
    server, line = line_under_test
    devices = [device("meter-1", 1, **line), device("meter-2", 2, **line), device("dead", 3, **line)]
    seconds = 4.0
    healths, results = await run_loops(devices, seconds)
    ticks = round(seconds / 0.2)
    dead = healths["dead"]
    assert dead.polls_ok == 0 and dead.failures.failing
    # Backoff 1, 2, 4, 8 ticks: about 4 attempts in 20 ticks, never one per tick.
    assert 2 <= dead.polls_failed <= 6, dead.polls_failed
    for name, index in (("meter-1", 0), ("meter-2", 1)):
        health = healths[name]
        assert health.polls_failed == 0, health
        # Each attempt on the dead unit holds the line for one 250 ms timeout: at most two 200 ms ticks of
        # the live units, and nothing else is lost.
        assert ticks - health.polls_ok <= 2 * dead.polls_failed + 2, (name, health.polls_ok, health.overruns)
        assert all(values(r.readings) == expected(index) for r in results if r.device == name)
    assert "no answer" in (dead.last_error or "")
    # One timeout per attempt, not one per request of the device.
    assert sum(n for (unit, _), n in server.function_codes.items() if unit == 3) == dead.polls_failed


@on("tcp")
async def test_exception_inside_a_coalesced_block_splits_it_and_keeps_the_split(line_under_test: Any) -> None:
    server, line = line_under_test
    sim = server.devices[1]
    sim.refuse(4, 5, 5)  # a hole inside the bridged gap between "voltage" (0..1) and "energy" (10..11)
    points = [POINTS[0], POINTS[1], {"name": "hole", "function": "input", "address": 5, "type": "uint16"}]
    driver = ModbusDriver(ModbusDevice.model_validate({"name": "m", "driver": "modbus", "unit_id": 1, **line,
                                                       "points": points, "max_gap": 10}))
    try:
        assert [(r.address, r.count) for r in driver.requests] == [(0, 12)]
        first = await driver.poll()
        assert values(first) == {"voltage": VOLTS[0], "energy": ENERGY[0], "hole": None}
        hole = next(r for r in first if r.point == "hole")
        assert "exception 2 (illegal data address)" in (hole.reason or "")
        # Bisected: the good points never go dark, and the refused value is left out of the following polls.
        assert [(r.address, r.count) for r in driver.requests] == [(0, 2), (10, 2)]
        sent_before = server.function_codes[(1, 4)]
        second = await driver.poll()
        assert values(second) == values(first)
        assert server.function_codes[(1, 4)] - sent_before == 2  # the kept plan, no second refusal
    finally:
        await driver.close()


@on("tcp")
async def test_the_agent_never_sends_a_write_function_code(line_under_test: Any) -> None:
    server, line = line_under_test
    # The recorder must be able to see a write: one sent by hand is counted (and refused).
    client = AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=1, retries=0)
    await client.connect()
    try:
        await client.write_register(0, 1, device_id=1)
        await client.write_coil(0, True, device_id=1)
    finally:
        client.close()
    assert server.writes == 2
    assert server.devices[1].write_attempts >= 1
    server.function_codes.clear()
    healths, results = await run_loops([device("meter-1", 1, **line), device("meter-2", 2, **line)], 1.5)
    assert results and all(h.polls_ok > 0 for h in healths.values())
    assert set(code for _, code in server.function_codes) == {1, 2, 3, 4}
    assert server.writes == 0


@on("rtu")
async def test_devices_with_different_intervals_share_the_line_fairly(line_under_test: Any) -> None:
    _, line = line_under_test
    fast = device("fast", 1, **line)
    slow = device("slow", 2, **line).model_copy(update={"poll_interval": 1.0})
    healths, _ = await run_loops([fast, slow], 3.2)
    assert healths["fast"].polls_ok >= 12 and healths["slow"].polls_ok >= 2
    assert healths["fast"].polls_failed == healths["slow"].polls_failed == 0


@on("rtu")
async def test_a_device_is_on_its_lines_books_before_its_first_poll(line_under_test: Any) -> None:
    _, line = line_under_test
    fast, slow = ModbusDriver(device("fast", 1, **line)), ModbusDriver(device("slow", 2, **line))
    try:
        assert fast.line is not None and fast.line is slow.line
        assert fast.line.snapshot()["devices"] == ["fast", "slow"]
        assert fast.max_poll_seconds > 2 * len(fast.requests) * 0.25  # includes the neighbour's worst case
    finally:
        await fast.close()
        await slow.close()
    assert not lines.lines()


@on("rtu")
async def test_a_line_measures_its_utilisation(line_under_test: Any) -> None:
    _, line = line_under_test
    driver = ModbusDriver(device("meter-1", 1, **line))
    try:
        for _ in range(5):
            await driver.poll()
        assert driver.line is not None
        snapshot = driver.line.snapshot()
        assert snapshot["requests"] == 5 * len(driver.requests)
        assert snapshot["devices"] == ["meter-1"]
        assert 0 < snapshot["utilisation"] <= 1
    finally:
        await driver.close()


async def test_a_serial_port_that_does_not_exist_says_so(tmp_path: Any) -> None:
    driver = ModbusDriver(device("m", 1, transport="rtu", serial_port=str(tmp_path / "ttyUSB9")))
    try:
        with pytest.raises(Exception, match="no such serial device"):
            await driver.poll()
    finally:
        await driver.close()


async def test_a_serial_port_in_use_by_another_agent_is_refused(pty_link: PtyLink) -> None:
    line = {"transport": "rtu", "serial_port": pty_link.client_path}
    first = ModbusDriver(device("first", 1, **line))
    try:
        with pytest.raises(Exception, match="no answer"):  # nobody serves the line: but the port is open
            await first.poll()
        # A second process on the same adapter; simulated by a second line object (another loop's registry).
        other = lines.Line(device("second", 2, **line))
        with pytest.raises(Exception, match="the port is busy"):
            await other.request(lambda client: client.read_coils(0, count=1, device_id=2), 0.2)
        other.close()
    finally:
        await first.close()


def test_a_saturated_line_is_logged_once_and_its_recovery_once(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import time

    caplog.set_level(logging.INFO, logger="drivers.modbus")
    line = lines.Line(device("m", 1, transport="rtu", serial_port="/dev/ttyUSB0"))
    now = time.monotonic()
    line._opened = now - 60  # a minute of history
    for second in range(60):  # busy the whole minute, one request per 0.5 s
        line._account(now - 60 + second, now - 60 + second + 1.0)
    line._judged = 0
    line._account(now - 0.5, now)
    assert line.utilisation() >= 0.9
    line._judged = 0
    line._account(now - 0.2, now)  # still saturated: not logged again
    saturated = [r for r in caplog.records if "busy" in r.getMessage() and "cannot all keep" in r.getMessage()]
    assert len(saturated) == 1 and saturated[0].levelname == "ERROR"
    line._busy = [0.0] * lines.WINDOW_S  # the devices were slowed down: the line is idle again
    line._judged = 0
    line._account(now, now + 0.001)
    assert any("recovered" in r.getMessage() for r in caplog.records)


@on("tcp")
async def test_a_register_answer_keeps_its_bytes_and_still_gives_its_registers(line_under_test: Any) -> None:
    _, line_keys = line_under_test
    link = lines.Line(device("m", 1, **line_keys))
    try:
        response = await link.request(lambda client: client.read_input_registers(0, count=12, device_id=1), 1.0)
        assert isinstance(response, lines.RegisterBytes)
        inputs = words("f", VOLTS[0]) + [0] * 8 + words("I", ENERGY[0])
        assert response.payload == struct.pack(">12H", *inputs)
        assert response.registers == inputs  # for the tools (edge-agent modbus read)
        assert "registers=" not in str(response)  # pymodbus formats every answer; ours is brief
    finally:
        link.close()


def test_a_register_answer_is_decoded_as_pymodbus_decodes_it() -> None:
    from pymodbus.pdu.register_message import ReadHoldingRegistersResponse

    holding = next(r for r in lines.READ_RESPONSES if r.function_code == 3)
    for data in (bytes([4, 0x43, 0x5B, 0, 1]), bytes([5, 0x43, 0x5B, 0, 1, 7, 9]), bytes([0])):
        ours, theirs = holding(), ReadHoldingRegistersResponse()
        ours.decode(data)
        theirs.decode(data)
        assert ours.registers == theirs.registers
    with pytest.raises(ModbusIOException, match="byte_count 6"):
        holding().decode(bytes([6, 0x43, 0x5B]))
