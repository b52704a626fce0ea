"""Modbus polling over TCP, RTU on a serial line, and RTU over TCP; the read plan computed at start-up.

Every request goes through the device's `Line` (drivers/modbus/line.py), shared with the other devices on
the same serial port or TCP endpoint. What a poll does with each kind of trouble:
- No answer to the first request: the device is not answering; `DeviceError`, and the agent's scheduler
  backs off (1, 2, 4 ... ticks up to a minute), so a dead unit costs its line at most one timeout per backoff
  period while the other units keep their schedule.
- No answer after some requests were answered: the points not yet read come back bad ("stopped answering")
  with what was read; the next poll starts again from the first request.
- An exception response (illegal address, busy): an answer, not a failure. When the refused request had
  joined several points, it is split (runs of adjacent points, then register by register) and the split
  is kept for the following polls, so one unreadable address never blanks a whole block. Points still
  refused on their own come back bad, naming the exception.
Only read function codes (01, 02, 03, 04) exist in this module; pymodbus's own retries and reconnects are
off, the scheduler decides when to try again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.pdu import ExceptionResponse, ModbusPDU

from agent.errors import DeviceError
from agent.model import Reading
from drivers.modbus import line as lines
from drivers.modbus.config import ModbusDevice
from drivers.modbus.decode import ReadRequest, plan, split

log = logging.getLogger("drivers.modbus")
# pymodbus logs every failed connect and timeout at ERROR; the agent logs the first failure itself.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

EXCEPTION_NAMES = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value", 4: "device failure",
    5: "acknowledge", 6: "device busy", 8: "memory parity error", 10: "gateway path unavailable",
    11: "gateway target failed to respond",
}
# Exceptions that mean "not these addresses" (some meters answer 3 for a count they dislike): worth a split.
_SPLIT_ON = frozenset({2, 3})

READ_METHOD = {"coil": "read_coils", "discrete": "read_discrete_inputs", "holding": "read_holding_registers",
               "input": "read_input_registers"}


class ModbusDriver:
    def __init__(self, config: ModbusDevice) -> None:
        self.config = config
        self.requests: tuple[ReadRequest, ...] = plan(config.points, config.max_registers, config.max_gap,
                                                      config.unreadable, config.max_bits)
        self.line: lines.Line | None = None
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # built outside the agent (a tool, a test): the line is taken at the first poll
        else:
            self._line()  # on the line's books from the start, also while a long interval has not polled yet

    @property
    def max_poll_seconds(self) -> float:
        # A poll may wait behind every other device's requests on a shared line.
        own = self.config.timeout * (len(self.requests) + 1)
        return own + (self.line.worst_wait() if self.line is not None else 0.0) + 1.0

    @property
    def endpoint(self) -> str:
        return self.config.endpoint

    async def poll(self) -> list[Reading]:
        line = self._line()
        readings: list[Reading] = []
        requests = self.requests  # a split during this poll changes self.requests, not this tuple
        for index, request in enumerate(requests):
            try:
                readings.extend(await self._read(line, request))
            except DeviceError as exc:
                if index == 0:
                    raise
                # Answered a moment ago: report what was read, and no second timeout on this poll.
                for rest in requests[index:]:
                    readings.extend(Reading.bad(p.name, f"device stopped answering: {exc}", p.unit)
                                    for p in rest.points)
                break
        return readings

    async def close(self) -> None:
        if self.line is not None:
            lines.release(self.line, self.config.name)
            self.line = None

    def link(self) -> lines.Line | None:
        """The line this device shares, for the status report."""
        return self.line

    def _line(self) -> lines.Line:
        if self.line is None:
            self.line = lines.acquire(self.config)
            self.line.demand[self.config.name] = (len(self.requests), self.config.timeout)
        return self.line

    async def _read(self, line: lines.Line, request: ReadRequest) -> list[Reading]:
        response = await self._send(line, request)
        if isinstance(response, ExceptionResponse) or response.isError():
            code = getattr(response, "exception_code", 0)
            if code in _SPLIT_ON and len(request.points) > 1:
                parts = split(request)
                if len(parts) > 1:
                    self._replace(request, parts, code)
                    readings: list[Reading] = []
                    for part in parts:
                        readings.extend(await self._read(line, part))
                    return readings
            reason = f"Modbus exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')}) for " \
                     f"FC{request.function_code:02d} {request.address}+{request.count}"
            return [Reading.bad(p.name, reason, p.unit) for p in request.points]
        return readings_of(request, response)

    async def _send(self, line: lines.Line, request: ReadRequest) -> ModbusPDU:
        unit = self.config.unit_id
        method = READ_METHOD[request.function]

        def call(client: lines.Client) -> Awaitable[ModbusPDU]:
            read: Callable[..., Awaitable[ModbusPDU]] = getattr(client, method)
            return read(request.address, count=request.count, device_id=unit)

        try:
            return await line.request(call, self.config.timeout)
        except ModbusException as exc:
            # A broken connection is dropped for everyone on the line; a silent unit on a shared line is
            # only that unit's problem (its neighbours keep the connection).
            if isinstance(exc, ConnectionException) or line.users == 1:
                line.lost(str(exc))
            # The line counts its timeouts and says what came instead of an answer (a reset, a stray reply).
            raise DeviceError(lines.failure(exc, self.endpoint, request.function_code, request.address,
                                            request.count, self.config.timeout)) from exc

    def _replace(self, request: ReadRequest, parts: tuple[ReadRequest, ...], code: int) -> None:
        """Keep the split for the following polls: the device will refuse the joined request again."""
        position = self.requests.index(request) if request in self.requests else None
        if position is not None:
            self.requests = (*self.requests[:position], *parts, *self.requests[position + 1:])
        if self.line is not None:
            self.line.demand[self.config.name] = (len(self.requests), self.config.timeout)
        log.info("device %s: FC%02d %d+%d refused (exception %d, %s); reading those %d points in %d requests "
                 "from now on", self.config.name, request.function_code, request.address, request.count, code,
                 EXCEPTION_NAMES.get(code, "unknown"), len(request.points), len(parts))


def readings_of(request: ReadRequest, response: ModbusPDU) -> list[Reading]:
    """The readings of an answer that is not an exception response."""
    try:
        if isinstance(response, lines.RegisterBytes):
            return request.decoder.decode_bytes(response.payload)  # type: ignore[union-attr]
        data = response.bits if request.function in ("coil", "discrete") else response.registers
        return request.decoder.decode(data)  # type: ignore[arg-type]
    except ValueError as exc:
        return [Reading.bad(p.name, f"malformed response: {exc}", p.unit) for p in request.points]
