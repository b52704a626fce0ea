"""Modbus polling over TCP, RTU on a serial line, and RTU over TCP; the read plan computed at start-up.

Every request goes through the device's `Line` (drivers/modbus/line.py), shared with the other devices on
the same serial port or TCP endpoint. What a poll does with each kind of trouble:
- No answer to the first request: the device is not answering; `DeviceError`, and the agent's scheduler
  tries again on a backoff (agent/scheduler.py) while the other units keep their schedule.
- No answer after some requests were answered: the points not yet read come back bad ("stopped answering")
  with what was read; the next poll starts again from the first request.
- An exception response 2 or 3 (illegal address, illegal value) to a request: the meter refuses something
  in it. The request is bisected (two halves of its points, and so on down to one value) to find what:
  one value it refuses, the unused registers a request read through between two points, or the length of
  a request. What it refuses is remembered and left out of the following polls (its points come back bad,
  naming the exception), and the rest is planned again, good runs joined as before: one refused register
  costs a request or two, never the device. Once an hour (`REPROBE_S`) a poll asks with the original plan
  again, logged: if the meter answers whole blocks again, the plan reverts.
- Any other exception (device failure, busy): an answer, not a failure; that request's points come back
  bad for this poll.
Only read function codes (01, 02, 03, 04) exist in this module; pymodbus's own retries and reconnects are
off, the scheduler decides when to try again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.pdu import ExceptionResponse, ModbusPDU

from agent.errors import DeviceError
from agent.model import Reading
from drivers.modbus import line as lines
from drivers.modbus.config import ModbusDevice, vendor_address
from drivers.modbus.decode import ReadRequest, Scaling, device_plan, halves, planned_points

log = logging.getLogger("drivers.modbus")
# pymodbus logs every failed connect and timeout at ERROR; the agent logs the first failure itself.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

EXCEPTION_NAMES = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value", 4: "device failure",
    5: "acknowledge", 6: "device busy", 8: "memory parity error", 10: "gateway path unavailable",
    11: "gateway target failed to respond",
}
# Exceptions that mean "not these addresses" (some meters answer 3 for a count they dislike): worth a bisection.
_SPLIT_ON = frozenset({2, 3})
# How long what a meter refused is left out before a poll asks with the whole plan again: meters are
# reconfigured or replaced rarely, and each re-probe costs the requests of one bisection.
REPROBE_S = 3600.0

READ_METHOD = {"coil": "read_coils", "discrete": "read_discrete_inputs", "holding": "read_holding_registers",
               "input": "read_input_registers"}


@dataclass(frozen=True, slots=True)
class Refused:
    """Addresses (`first`..`last`, one register space) the meter answered an exception for: the registers of
    one value (`points` names it), or unused registers a request read through between two points."""

    function: str
    first: int
    last: int
    code: int
    points: tuple[str, ...] = ()

    def describe(self) -> str:
        span = f"{self.first}" if self.first == self.last else f"{self.first}..{self.last}"
        function_code = _FUNCTION_CODES[self.function]
        return (f"Modbus exception {self.code} ({exception_name(self.code)}) for FC{function_code:02d} {span} "
                f"({vendor_address(self.function, self.first)})")


_FUNCTION_CODES = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}


@dataclass
class Refusals:
    """What the meter refused, as learned by bisection: ranges to leave unread, and breaks where two runs it
    answers separately must not be joined (a meter that refuses the length, not an address)."""

    ranges: list[Refused] = field(default_factory=list)
    breaks: dict[tuple[str, int], int] = field(default_factory=dict)  # (function, address) -> exception code

    def __bool__(self) -> bool:
        return bool(self.ranges or self.breaks)

    def merge(self, other: Refusals) -> bool:
        """Add what `other` learned; whether anything was new."""
        new = [r for r in other.ranges if r not in self.ranges]
        fresh = {k: v for k, v in other.breaks.items() if k not in self.breaks}
        self.ranges.extend(new)
        self.breaks.update(fresh)
        return bool(new or fresh)

    def same(self, other: Refusals) -> bool:
        return set(self.ranges) == set(other.ranges) and self.breaks.keys() == other.breaks.keys()

    def reason(self) -> dict[str, str]:
        """Each left-out point's bad reading reason."""
        return {name: f"the meter refuses it: {r.describe()}; left out of the polls until the hourly re-probe"
                for r in self.ranges for name in r.points}

    def summary(self) -> str:
        parts = [r.describe() + (f" [{', '.join(r.points)}]" if r.points else " (unused registers between points)")
                 for r in self.ranges]
        parts += [f"Modbus exception {c} ({exception_name(c)}) for a FC{_FUNCTION_CODES[f]:02d} request across "
                  f"{a - 1}/{a} (its length?)" for (f, a), c in self.breaks.items()]
        return "; ".join(parts)


def exception_name(code: int) -> str:
    return EXCEPTION_NAMES.get(code, "unknown")


class ModbusDriver:
    def __init__(self, config: ModbusDevice, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.base: tuple[ReadRequest, ...] = device_plan(config)  # the plan without what the meter refused
        self.scaling = Scaling(config)  # exponents and carries read from registers, applied once the poll is read
        self._planned = planned_points(config)
        self.requests: tuple[ReadRequest, ...] = self.base
        self.refusals = Refusals()
        self.sent_last_poll = 0  # requests that went on the wire in the last poll (bisection included)
        self._left_out: dict[str, str] = {}  # point name -> reason, for the points the meter refuses
        self._learned_at: float | None = None
        self._clock = clock
        self.reprobe_s = REPROBE_S
        self.line: lines.Line | None = None
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # built outside the agent (a tool, a test): the line is taken at the first poll
        else:
            self._line()  # on the line's books from the start, also while a long interval has not polled yet

    @property
    def max_poll_seconds(self) -> float:
        # A poll may wait behind every other device's requests on a shared line; a re-probe sends the base plan.
        own = self.config.timeout * (max(len(self.base), len(self.requests)) + 1)
        return own + (self.line.worst_wait() if self.line is not None else 0.0) + 1.0

    @property
    def endpoint(self) -> str:
        return self.config.endpoint

    async def poll(self) -> list[Reading]:
        line = self._line()
        self.sent_last_poll = 0
        reprobe = bool(self.refusals) and self._learned_at is not None \
            and self._clock() - self._learned_at >= self.reprobe_s
        if reprobe:
            log.info("device %s: asking again for what the meter refused %.0f min ago (%s)", self.config.name,
                     (self._clock() - (self._learned_at or 0.0)) / 60, self.refusals.summary())
        requests = self.base if reprobe else self.requests
        left_out = {} if reprobe else self._left_out  # as planned for this poll: learning replaces it
        learned = Refusals()
        readings: list[Reading] = []
        complete = False
        try:
            for index, request in enumerate(requests):
                try:
                    readings.extend(await self._read(line, request, learned))
                except DeviceError as exc:
                    if index == 0:
                        raise
                    # Answered a moment ago: report what was read, and no second timeout on this poll.
                    for rest in requests[index:]:
                        readings.extend(Reading.bad(p.name, f"device stopped answering: {exc}", p.unit)
                                        for p in rest.points)
                    break
            else:
                complete = True
        finally:
            self._learn(learned, reprobe, complete)
        if left_out:
            readings.extend(Reading.bad(p.name, left_out[p.name], p.unit) for p in self._planned
                            if p.name in left_out)
        return self.scaling.apply(readings) if self.scaling else readings

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

    async def _read(self, line: lines.Line, request: ReadRequest, learned: Refusals) -> list[Reading]:
        response = await self._send(line, request)
        if isinstance(response, ExceptionResponse) or response.isError():
            code = getattr(response, "exception_code", 0)
            if code in _SPLIT_ON:
                return await self._bisect(line, request, code, learned)
            reason = f"Modbus exception {code} ({exception_name(code)}) for " \
                     f"FC{request.function_code:02d} {request.address}+{request.count}"
            return [Reading.bad(p.name, reason, p.unit) for p in request.points]
        return readings_of(request, response)

    async def _bisect(self, line: lines.Line, request: ReadRequest, code: int, learned: Refusals) -> list[Reading]:
        """The readings of a refused request's points, read in halves until what the meter refuses is found."""
        parts = halves(request)
        if parts is None:  # one value (or the bits of one register): it is what the meter refuses
            refused = Refused(request.function, request.address, request.address + request.count - 1, code,
                              tuple(p.name for p in request.points))
            learned.ranges.append(refused)
            reason = f"the meter refuses it: {refused.describe()}"
            return [Reading.bad(p.name, reason, p.unit) for p in request.points]
        left, right = parts
        before = len(learned.ranges) + len(learned.breaks)
        readings = await self._read(line, left, learned)
        readings.extend(await self._read(line, right, learned))
        if len(learned.ranges) + len(learned.breaks) == before:
            # Both halves answered whole: what the meter refuses is between them (the unused registers the
            # request read through), or, with nothing between them, the request's length.
            gap_first, gap_last = left.address + left.count, right.address - 1
            if gap_first <= gap_last:
                learned.ranges.append(Refused(request.function, gap_first, gap_last, code))
            else:
                learned.breaks[(request.function, right.address)] = code
        return readings

    def _learn(self, learned: Refusals, reprobe: bool, complete: bool) -> None:
        """Keep what this poll learned for the following polls, and plan them again."""
        name = self.config.name
        if reprobe:
            if not complete:
                return  # the device stopped answering mid-way: ask again at the next poll
            self._learned_at = self._clock()
            if not learned:
                log.info("device %s: the meter answers the whole plan again; back to %d request(s) per poll",
                         name, len(self.base))
                self.refusals = Refusals()
            elif learned.same(self.refusals):
                log.info("device %s: the meter still refuses the same; asked again in %.0f min", name,
                         self.reprobe_s / 60)
                return
            else:
                self.refusals = Refusals()
                self.refusals.merge(learned)
        elif not self.refusals.merge(learned):
            return
        else:
            self._learned_at = self._clock()
        self._replan()
        if self.refusals:
            log.info("device %s: the meter refuses part of the plan: %s; that is left out of the polls, "
                     "%d request(s) per poll instead of %d, asked again in %.0f min", name, self.refusals.summary(),
                     len(self.requests), len(self.base), self.reprobe_s / 60)

    def _replan(self) -> None:
        self._left_out = self.refusals.reason()
        ranges, breaks = self.refusals.ranges, self.refusals.breaks
        requests = device_plan(self.config, ranges, breaks, frozenset(self._left_out))
        if not requests and self.base:
            # Nothing the meter answers is left: one refused value per poll still shows that it is there.
            probe = next(r for r in ranges if r.points)
            for name in probe.points:
                self._left_out.pop(name, None)
            requests = device_plan(self.config, [r for r in ranges if r is not probe], breaks,
                                   frozenset(self._left_out))
        self.requests = requests
        if self.line is not None:
            self.line.demand[self.config.name] = (len(self.requests), self.config.timeout)

    async def _send(self, line: lines.Line, request: ReadRequest) -> ModbusPDU:
        unit = self.config.unit_id
        method = READ_METHOD[request.function]

        def call(client: lines.Client) -> Awaitable[ModbusPDU]:
            read: Callable[..., Awaitable[ModbusPDU]] = getattr(client, method)
            return read(request.address, count=request.count, device_id=unit)

        self.sent_last_poll += 1
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


def readings_of(request: ReadRequest, response: ModbusPDU) -> list[Reading]:
    """The readings of an answer that is not an exception response."""
    try:
        if isinstance(response, lines.RegisterBytes):
            return request.decoder.decode_bytes(response.payload)  # type: ignore[union-attr]
        data = response.bits if request.function in ("coil", "discrete") else response.registers
        return request.decoder.decode(data)  # type: ignore[arg-type]
    except ValueError as exc:
        return [Reading.bad(p.name, f"malformed response: {exc}", p.unit) for p in request.points]
