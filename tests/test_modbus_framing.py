"""What arrives on a Modbus line besides the answer, against peers that misbehave on purpose.

RTU: a relay between a real pymodbus RTU server and the agent puts glitch bytes (0x00, 0xFF, noise, a false
start, a frame with a bad CRC) before every reply, as an RS-485 transceiver switching direction does; over a
pseudo-terminal pair (serial RTU) and over TCP (RTU over TCP). Every answer must still be found, on time.

Modbus TCP: a raw asyncio socket server (pymodbus cannot be made to do this) answers with the wrong function
code, with transaction id 0 and another block's data, with a stray reply that takes the next transaction id,
with the wrong unit id, an unknown function code, a reset or a closed socket. No wrong value may ever be
marked good; each is counted by reason, and the log says what happened in words, once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import struct
import time
import tty
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from agent.errors import DeviceError
from agent.metrics import prometheus_text
from agent.model import Quality
from drivers.modbus.config import ModbusDevice
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.simulator import SimServer
from drivers.modbus.transport import crc16
from tests.test_modbus_lines import expected, meter, values

pytestmark = pytest.mark.timeout(60)

POINTS: list[dict[str, Any]] = [
    {"name": "voltage", "function": "input", "address": 0, "type": "float32", "unit": "V"},
    {"name": "energy", "function": "input", "address": 10, "type": "uint32", "unit": "Wh"},
    {"name": "model", "function": "holding", "address": 0, "type": "string", "count": 2},
    {"name": "alarm", "function": "holding", "address": 3, "type": "bool", "bit": 3},
    {"name": "relay_1", "function": "coil", "address": 0},
    {"name": "relay_3", "function": "coil", "address": 2},
    {"name": "door_open", "function": "discrete", "address": 1},
]
TIMEOUT = 0.3


def bad_crc_lookalike(request: bytes) -> bytes:
    """A frame with the request's unit id and function code whose CRC is wrong: a near miss of the answer."""
    frame = bytes([request[0], request[1], 2, 0x12, 0x34])
    good = crc16(frame)
    return frame + ((good ^ 0x5A5A) & 0xFFFF).to_bytes(2, "big")


# What goes on the line before each reply, in turn: a direction-switch glitch of either polarity, noise, the
# start of a frame that never completes (unit 1, FC04, 85 bytes announced), and a garbled copy of the answer.
GLITCHES: list[Any] = [b"\x00", b"\xff", b"\x00\xff", bytes([0x13, 0x37, 0x5A]), bytes([1, 4, 0x55]),
                       bad_crc_lookalike]


class Injector:
    """Decides what goes before each reply; counts the requests it saw."""

    def __init__(self) -> None:
        self._glitches = itertools.cycle(GLITCHES)
        self._before: bytes | None = None
        self.replies = 0
        self.lookalikes = 0

    def request(self, data: bytes) -> None:
        glitch = next(self._glitches)
        if callable(glitch):
            self.lookalikes += 1
            glitch = glitch(data)
        self._before = glitch

    def reply(self, data: bytes) -> bytes:
        before, self._before = self._before, None
        if before is None:  # the rest of a reply that came in pieces
            return data
        self.replies += 1
        return before + data


class PtyRelay:
    """Two pseudo-terminal pairs and a forwarding task between their masters: the meter on one pair, the
    agent on the other, and whatever the injector adds in between."""

    def __init__(self, injector: Injector) -> None:
        self.injector = injector
        self._fds: list[int] = []
        self.meter_master, self.meter_path = self._pair()
        self.agent_master, self.agent_path = self._pair()
        loop = asyncio.get_running_loop()
        loop.add_reader(self.agent_master, self._from_agent)
        loop.add_reader(self.meter_master, self._from_meter)

    def _pair(self) -> tuple[int, str]:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._fds += [master, slave]  # the slave stays open: a pty vanishes with its last fd
        return master, os.ttyname(slave)

    def _read(self, fd: int) -> bytes:
        try:
            return os.read(fd, 4096)
        except OSError:  # EIO: nobody has the other end open right now
            return b""

    def _from_agent(self) -> None:
        if data := self._read(self.agent_master):
            self.injector.request(data)
            os.write(self.meter_master, data)

    def _from_meter(self) -> None:
        if data := self._read(self.meter_master):
            os.write(self.agent_master, self.injector.reply(data))

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.agent_master)
        loop.remove_reader(self.meter_master)
        for fd in self._fds:
            os.close(fd)


class TcpRelay:
    """A TCP proxy in front of an RTU-over-TCP server, adding the injector's bytes before each reply."""

    def __init__(self, injector: Injector, upstream_port: int) -> None:
        self.injector, self.upstream_port = injector, upstream_port
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, replies: bool) -> None:
            while data := await source.read(4096):
                if replies:
                    data = self.injector.reply(data)
                else:
                    self.injector.request(data)
                sink.write(data)
                await sink.drain()

        tasks = [asyncio.create_task(pump(reader, up_writer, False)),
                 asyncio.create_task(pump(up_reader, writer, True))]
        self.tasks.update(tasks)
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            writer.close()
            up_writer.close()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture(params=["rtu", "rtu_over_tcp"])
async def glitchy_line(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Injector, dict[str, Any]]]:
    """A pymodbus RTU server for units 1 and 2 behind a relay that puts glitches before each reply."""
    injector = Injector()
    units = {1: meter(0), 2: meter(1)}
    if request.param == "rtu":
        relay = PtyRelay(injector)
        server = SimServer(units, serial_port=relay.meter_path, update_interval=None)
        await server.start()
        try:
            yield injector, {"transport": "rtu", "serial_port": relay.agent_path, "baudrate": 19200,
                             "turnaround": "5ms"}
        finally:
            await server.stop()
            relay.close()
    else:
        server = SimServer(units, framer="rtu", update_interval=None)
        await server.start()
        tcp = TcpRelay(injector, server.port)
        try:
            yield injector, {"transport": "rtu_over_tcp", "host": "127.0.0.1", "port": await tcp.start()}
        finally:
            await tcp.stop()
            await server.stop()


def device(name: str, unit_id: int, points: list[dict[str, Any]], **line: Any) -> ModbusDevice:
    return ModbusDevice.model_validate({"name": name, "driver": "modbus", "unit_id": unit_id, "points": points,
                                        "timeout": TIMEOUT, "poll_interval": 1, **line})


async def test_glitch_bytes_before_rtu_replies_cost_no_answer(glitchy_line: Any) -> None:
    injector, line = glitchy_line
    drivers = [ModbusDriver(device(f"meter-{u}", u, POINTS, **line)) for u in (1, 2)]
    want = [{k: v for k, v in expected(index).items() if k in {p["name"] for p in POINTS}} for index in (0, 1)]
    try:
        for _ in range(4):
            for index, driver in enumerate(drivers):
                started = time.monotonic()
                readings = await driver.poll()
                took = time.monotonic() - started
                assert all(r.quality is Quality.GOOD for r in readings), [r.reason for r in readings]
                assert values(readings) == want[index]
                # None late: a reply that was lost and waited for costs a whole timeout per request.
                assert took < TIMEOUT, took
        link = drivers[0].line
        assert link is not None
        figures = link.snapshot()
        assert injector.replies == figures["requests"] == 4 * 2 * len(drivers[0].requests)
        assert figures["timeouts"] == 0
        # Every glitch was seen and counted: the garbled copies as CRC errors, the rest as framing errors.
        assert figures["crc_errors"] == injector.lookalikes > 0
        assert figures["framing_errors"] >= injector.replies - injector.lookalikes - 1
        text = prometheus_text({"devices": {}, "lines": [figures], "buffer": {"readings": 0, "bytes": 0,
                                "oldest_age_s": 0, "dropped_oldest": 0, "rejected": 0, "expired": 0,
                                "unstored": 0, "refused": 0},
                                "uplink": {"inflight": 0, "delivered_readings": 0}, "uptime_s": 1,
                                "mqtt_connected": True})
        label = f'{{line="{figures["line"]}"}}'
        assert f"edge_agent_line_crc_errors_total{label} {injector.lookalikes}" in text
        assert f"edge_agent_line_timeouts_total{label} 0" in text
    finally:
        for driver in drivers:
            await driver.close()


async def test_a_garbled_rtu_answer_is_a_crc_error_not_silence(glitchy_line: Any) -> None:
    """When the only thing that comes is a damaged answer, the log says so instead of "no answer"."""
    injector, line = glitchy_line

    def garble(data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 0xFF])  # the last CRC byte damaged

    injector.reply = lambda data: garble(data)  # type: ignore[method-assign]
    driver = ModbusDriver(device("meter-1", 1, POINTS[:1], **line))
    try:
        with pytest.raises(DeviceError, match=r"no valid answer .* within 0\.3 s: a reply with a bad CRC"):
            await driver.poll()
        assert driver.line is not None
        figures = driver.line.snapshot()
        assert (figures["crc_errors"], figures["timeouts"]) == (1, 1)
    finally:
        await driver.close()


# --- Modbus TCP against a device that answers wrongly ------------------------------------------------

INPUTS = [1000 + i for i in range(20)]  # what FC04 reads
HOLDING = [5000 + i for i in range(20)]  # another block: what must never be taken for FC04's answer
TCP_POINTS: list[dict[str, Any]] = [{"name": "a", "function": "input", "address": 0, "type": "uint16"},
                                    {"name": "b", "function": "input", "address": 1, "type": "uint16"}]


def mbap(tid: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


def registers(function_code: int, words: list[int]) -> bytes:
    return bytes([function_code, 2 * len(words)]) + struct.pack(f">{len(words)}H", *words)


class MisbehavingDevice:
    """A raw Modbus TCP server: answers FC04 from INPUTS, in the way `mode` says."""

    def __init__(self) -> None:
        self.mode = "good"
        self.server: asyncio.Server | None = None
        self.requests = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(7)
                tid, _, length, unit = struct.unpack(">HHHB", header)
                pdu = await reader.readexactly(length - 1)
                self.requests += 1
                code, address, count = struct.unpack(">BHH", pdu[:5])
                if not await self._answer(writer, tid, unit, code, address, count):
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, tid: int, unit: int, code: int, address: int,
                      count: int) -> bool:
        right = mbap(tid, unit, registers(code, INPUTS[address:address + count]))
        other = HOLDING[address:address + count]
        mode = self.mode
        if mode == "good":
            writer.write(right)
        elif mode == "wrong_function":  # FC03's answer (another block) to an FC04 request
            writer.write(mbap(tid, unit, registers(3, other)))
        elif mode == "wrong_function_then_right":
            writer.write(mbap(tid, unit, registers(3, other)))
            await asyncio.sleep(0.02)
            writer.write(right)
        elif mode == "transaction_zero":  # a gateway answering with tid 0 and another block's data
            writer.write(mbap(0, unit, registers(code, other)))
        elif mode == "stray_takes_next_id":
            # A stray reply (another block, another length) carrying this request's id, then the answer.
            writer.write(mbap(tid, unit, registers(code, HOLDING[:count + 2])))
            await asyncio.sleep(0.02)
            writer.write(right)
        elif mode == "extra_after":
            writer.write(right + mbap(tid % 0xFFFF + 1, unit, registers(code, other)))
        elif mode == "wrong_unit":
            writer.write(mbap(tid, 9, registers(code, other)))
        elif mode == "unknown_function":
            writer.write(mbap(tid, unit, bytes([0x41, 0, 0])))
        elif mode == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        elif mode == "close":
            return False
        return True


@pytest.fixture
async def misbehaving() -> AsyncIterator[tuple[MisbehavingDevice, int]]:
    peer = MisbehavingDevice()
    port = await peer.start()
    try:
        yield peer, port
    finally:
        await peer.stop()


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger="drivers.modbus")
    caplog.set_level(logging.DEBUG, logger="asyncio")
    yield caplog


async def poll_in_mode(peer: MisbehavingDevice, port: int, mode: str, polls: int = 3) -> tuple[
        list[Any], list[str], dict[str, Any]]:
    """`polls` polls with the device in `mode`: the readings, the failures' words, the line's figures."""
    driver = ModbusDriver(device("meter", 1, TCP_POINTS, host="127.0.0.1", port=port))
    readings: list[Any] = []
    failures: list[str] = []
    try:
        peer.mode = "good"
        assert values(await driver.poll()) == {"a": 1000, "b": 1001}
        peer.mode = mode
        for _ in range(polls):
            try:
                readings.extend(await driver.poll())
            except DeviceError as exc:
                failures.append(str(exc))
        assert driver.line is not None
        return readings, failures, driver.line.snapshot()
    finally:
        await driver.close()


def no_wrong_value_marked_good(readings: list[Any]) -> None:
    for reading in readings:
        if reading.quality is Quality.GOOD:
            assert reading.value == {"a": 1000, "b": 1001}[reading.point], reading


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info or r.name == "asyncio"], \
        [r.getMessage() for r in caplog.records if r.exc_info or r.name == "asyncio"]


@pytest.mark.parametrize(("mode", "reason", "words"), [
    ("wrong_function", "function_code", "function code 3 (expected 4)"),
    ("transaction_zero", "transaction_id", "transaction id 0 (expected"),
    ("wrong_unit", "unit_id", "unit id 9 (expected 1)"),
    ("unknown_function", "function_code", "function code 65 (expected 4)"),
])
async def test_a_reply_that_is_not_the_requests_is_never_taken(misbehaving: Any, logged: Any, mode: str,
                                                                 reason: str, words: str) -> None:
    peer, port = misbehaving
    readings, failures, figures = await poll_in_mode(peer, port, mode)
    no_wrong_value_marked_good(readings)
    assert len(failures) == 3, failures
    assert all(f"no valid answer from tcp 127.0.0.1:{port} unit 1 to FC04 0+2 within 0.3 s: discarded a reply "
               f"with {words}" in failure for failure in failures), failures
    assert figures["discarded"][reason] == 3 and figures["timeouts"] == 3
    # The agent dropped the connection after each timeout itself (asyncio tells the link a loop turn later,
    # before the next poll): the device lost none.
    assert figures["disconnects"] == 0
    # Said once at WARNING in words, then at debug; never a traceback.
    told = [r for r in logged.records if "not the request's" in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(told) == 1 and words in told[0].getMessage()
    no_traceback(logged)


@pytest.mark.parametrize(("mode", "reason"), [("wrong_function_then_right", "function_code"),
                                              ("stray_takes_next_id", "length")])
async def test_a_stray_reply_is_discarded_and_the_answer_still_taken(misbehaving: Any, logged: Any, mode: str,
                                                                       reason: str) -> None:
    peer, port = misbehaving
    readings, failures, figures = await poll_in_mode(peer, port, mode)
    assert not failures
    assert values(readings) == {"a": 1000, "b": 1001} and all(r.quality is Quality.GOOD for r in readings)
    assert figures["discarded"][reason] == 3 and figures["timeouts"] == 0
    no_traceback(logged)


@pytest.mark.parametrize(("mode", "words"), [("reset", "the connection was reset by the device"),
                                             ("close", "the device closed the connection")])
async def test_a_lost_connection_is_said_in_words_not_as_a_timeout(misbehaving: Any, logged: Any, mode: str,
                                                                   words: str) -> None:
    peer, port = misbehaving
    started = time.monotonic()
    readings, failures, figures = await poll_in_mode(peer, port, mode, polls=2)
    assert time.monotonic() - started < 2 * TIMEOUT  # told at once, not after a timeout
    assert not readings and len(failures) == 2
    assert all(f"tcp 127.0.0.1:{port} unit 1: {words}" in failure and failure.endswith("during FC04 0+2")
               for failure in failures), failures
    assert figures["timeouts"] == 0 and figures["disconnects"] == 2
    no_traceback(logged)


async def test_a_reply_that_came_before_its_request_is_never_its_answer(misbehaving: Any, logged: Any) -> None:
    """A device that sends, right behind an answer, a second reply with the next transaction id (a
    retransmission, a gateway's reply for another master): it sits in the buffer when the next request goes
    out, and must not be taken for that request's answer."""
    peer, port = misbehaving
    readings, failures, figures = await poll_in_mode(peer, port, "extra_after", polls=3)
    assert not failures
    no_wrong_value_marked_good(readings)
    assert values(readings) == {"a": 1000, "b": 1001}
    assert figures["discarded"]["unexpected"] == 2  # the strays behind the first two answers in this mode
    no_traceback(logged)


# --- the receive path on its own --------------------------------------------------------------------

def rtu_answer(unit: int, words: list[int], function_code: int = 3) -> bytes:
    from drivers.modbus.transport import rtu_frame

    return rtu_frame(unit, registers(function_code, words))


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_the_rtu_answer_is_found_behind_noise_false_starts_and_another_units_frame(chunk: int) -> None:
    """Byte by byte (a USB adapter), in small pieces, or at once: the answer is found, and each thing in
    front of it is counted as what it is."""
    from drivers.modbus.transport import Expect, LineCounters, RtuReceiver

    counters = LineCounters()
    receiver = RtuReceiver(counters)
    receiver.begin(Expect(unit=1, function_code=3, byte_count=4))
    other_unit = rtu_answer(2, [9, 9])  # a whole, valid frame from unit 2: not ours
    garbled = bytearray(rtu_answer(1, [8, 8]))
    garbled[3] ^= 0x40  # our header, damaged data: a CRC error
    stream = b"\xff\x00" + bytes([1, 3, 0x7F]) + other_unit + bytes(garbled) + rtu_answer(1, [1000, 1001])
    response = None
    for start in range(0, len(stream), chunk):
        response = receiver.feed(stream[start:start + chunk]) or response
    assert response is not None and response.registers == [1000, 1001]
    assert counters.discarded["unit_id"] == 1
    assert counters.crc_errors == 1
    assert counters.framing_errors >= 1  # the glitch bytes and the false start


def test_an_exception_inside_the_receive_path_is_logged_once_and_never_reaches_asyncio(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """No device input is known to raise in the receive path; this guards the rule if one ever does (a decode
    error of a future response class): counted, told once at ERROR, then at debug, and the recovery once."""
    from drivers.modbus import transport

    caplog.set_level(logging.DEBUG, logger="drivers.modbus")
    link = transport.ModbusLink("tcp", name="tcp 127.0.0.1:1", timeout=0.1, counters=transport.LineCounters())
    good = transport.answer

    def broken(unit: int, transaction_id: int, pdu: bytes) -> Any:
        raise ValueError("a decoder bug")

    monkeypatch.setattr(transport, "answer", broken)
    for tid in (1, 2, 3):
        link._receiver.begin(transport.Expect(1, 4, 4, tid))
        link.received(mbap(tid, 1, registers(4, [1, 2])))  # returns: nothing propagates to the transport
    monkeypatch.setattr(transport, "answer", good)
    link._receiver.begin(transport.Expect(1, 4, 4, 4))
    loop = asyncio.new_event_loop()
    try:
        link._waiter = loop.create_future()
        link.received(mbap(4, 1, registers(4, [1, 2])))
        assert link._waiter.result().registers == [1, 2]
    finally:
        loop.close()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "ValueError: a decoder bug" in errors[0].getMessage()
    assert not errors[0].exc_info
    assert any("recovered after 3 failures" in r.getMessage() for r in caplog.records)
    assert link.counters.framing_errors == 3


def test_edge_agent_status_shows_what_a_line_threw_away() -> None:
    from agent.cli import _line_errors

    quiet = {"crc_errors": 0, "framing_errors": 0, "discarded": {"unit_id": 0}, "disconnects": 0}
    assert _line_errors(quiet) == ""
    noisy = {"crc_errors": 12, "framing_errors": 3, "discarded": {"unit_id": 1, "length": 1}, "disconnects": 0}
    assert _line_errors(noisy) == "; 12 CRC errors, 3 framing errors, 2 replies discarded"
