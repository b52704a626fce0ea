"""One request queue per physical line: a serial port, or one TCP endpoint with any number of unit ids.

RS-485 is half duplex and a TCP-to-RS-485 gateway forwards one request at a time, so every device on a line
must take turns: two pollers talking at once garble both answers (the collisions reported against other
gateways). A `Line` owns the one client of its port or endpoint and an `asyncio.Lock`; every request of every
device on the line goes through `Line.request`, which waits its turn (the lock is FIFO, so devices with
different intervals are served in the order they asked), sends, and keeps the line quiet for the
turnaround pause before the next request.

Lines are shared by key (`ModbusDevice.line_key`) and counted: the first device opens it, the last one
to close releases it, so a reload that restarts one device leaves the others' connection alone.

The line also measures itself: the share of the last minute it was busy (requests plus pauses). Near
100 % it cannot keep its devices' schedules; `saturated` is logged once, with the recovery once. And it
counts what its receive path threw away (`LineCounters`: CRC errors, framing errors, replies that were not
the request's, disconnects), kept across reconnects, for the status message, /metrics and the log.

The bytes themselves (framing, finding the answer, judging a reply) are drivers/modbus/transport.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pymodbus.exceptions import ModbusException

from agent.errors import DeviceError
from agent.health import FailureLog
from drivers.modbus.config import ModbusDevice
from drivers.modbus.transport import (
    READ_RESPONSES,
    LineCounters,
    LinkLost,
    ModbusLink,
    NoAnswer,
    RegisterBytes,
    SerialSettings,
)

__all__ = ["READ_RESPONSES", "Client", "Line", "RegisterBytes", "acquire", "failure", "lines", "release"]

log = logging.getLogger("drivers.modbus")

T = TypeVar("T")
WINDOW_S = 60
SATURATED = 0.9

Client = ModbusLink


class Line:
    def __init__(self, device: ModbusDevice) -> None:
        self.key = device.line_label
        self.settings = device.line_settings
        self.transport = device.transport
        self.turnaround = device.effective_turnaround
        self._template = device
        self._lock = asyncio.Lock()
        self._client: Client | None = None
        self.users = 0
        self.requests = 0
        self.timeouts = 0  # requests that got no valid answer in time (whatever else came instead)
        self.counters = LineCounters()  # what the receive path threw away: CRC, noise, others' replies
        self._told: set[str] = set()  # the kinds of discarded reply logged at WARNING already
        self._receiving = FailureLog(f"line {self.key}: receiving", log)
        self.queue_length = 0  # requests waiting for their turn
        self.demand: dict[str, tuple[int, float]] = {}  # device name -> (requests per poll, timeout)
        self._busy = [0.0] * WINDOW_S  # busy seconds per second of the last minute, indexed by second % 60
        self._busy_second = [0] * WINDOW_S
        self._opened = time.monotonic()
        self._judged = 0  # the second of the last saturation judgement
        self.saturation = FailureLog(f"line {self.key}", log)
        # The daemon's judgement; a tool (modbus scan, poll) that keeps the line busy on purpose turns it off.
        self.watch_saturation = True

    def worst_wait(self) -> float:
        """How long a poll could wait behind every device's requests on this line if all of them timed out."""
        return sum(count * (timeout + self.turnaround) for count, timeout in self.demand.values())

    async def request(self, call: Callable[[Client], Awaitable[T]], seconds: float) -> T:
        """`call(client)` in this line's turn; `seconds` is the device's timeout for the answer."""
        self.queue_length += 1
        try:
            await self._lock.acquire()
        finally:
            self.queue_length -= 1
        try:
            started = time.monotonic()
            try:
                client = await self._connected(seconds)
                # One client serves devices with different timeouts; it reads it for every request.
                client.timeout = seconds
                self.requests += 1
                try:
                    return await call(client)
                except NoAnswer:
                    self.timeouts += 1
                    raise
            finally:
                try:
                    if self.turnaround:
                        await asyncio.sleep(self.turnaround)
                finally:
                    self._account(started, time.monotonic())
        finally:
            self._lock.release()

    def lost(self, reason: str) -> None:
        """A request found the connection broken: drop it, the next request reconnects. On a serial line a
        silent unit is not a broken port, so only TCP connections are dropped."""
        if self.transport != "rtu" and self._client is not None:
            log.debug("line %s: dropping the connection (%s)", self.key, reason)
            self._client.close()
            self._client = None

    def utilisation(self) -> float:
        """Share of the last minute (or of the time since the line opened, if shorter) it was busy."""
        now = time.monotonic()
        second = int(now)
        busy = sum(b for b, s in zip(self._busy, self._busy_second, strict=True) if second - s < WINDOW_S)
        span = min(float(WINDOW_S), max(now - self._opened, 1.0))
        return min(1.0, busy / span)

    def snapshot(self) -> dict[str, Any]:
        counters = self.counters
        return {"line": self.key, "devices": sorted(self.demand), "utilisation": round(self.utilisation(), 3),
                "requests": self.requests, "timeouts": self.timeouts, "queue": self.queue_length,
                "crc_errors": counters.crc_errors, "framing_errors": counters.framing_errors,
                "discarded": dict(counters.discarded), "disconnects": counters.disconnects}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _account(self, started: float, ended: float) -> None:
        # Spread the busy time over the seconds it covered.
        while started < ended:
            second = int(started)
            part = min(ended, second + 1.0) - started
            slot = second % WINDOW_S
            if self._busy_second[slot] != second:
                self._busy_second[slot], self._busy[slot] = second, 0.0
            self._busy[slot] += part
            started += part
        # Judged once a second (not per request: it sums the minute), and only on a fair sample.
        if self.watch_saturation and int(ended) != self._judged and ended - self._opened >= 10:
            self._judged = int(ended)
            used = self.utilisation()
            if used >= SATURATED:
                self.saturation.failed(f"busy {used:.0%} of the last minute: the devices on it cannot all keep "
                                       "their poll_interval (see their overruns); lengthen intervals, trim points "
                                       "or split the line")
            elif used < SATURATED - 0.1:
                self.saturation.succeeded()

    async def _connected(self, seconds: float) -> Client:
        client = self._client
        if client is not None and client.connected:
            return client
        self.close()
        client = self._new_client(seconds)
        try:
            ok = await client.connect()
        except (OSError, ValueError, ModbusException) as exc:  # pyserial's SerialException is an OSError
            client.close()
            raise DeviceError(f"{self._cannot()}: {describe_open_error(exc, self._template.serial_port)}") from exc
        if not ok:
            client.close()
            raise DeviceError(f"{self._cannot()}: {_not_connected(self._template)}")
        self._client = client
        return client

    def _cannot(self) -> str:
        if self.transport == "rtu":
            return f"cannot open the serial port {self._template.serial_port}"
        return f"cannot connect to {self._template.host}:{self._template.port}"

    def _new_client(self, timeout: float) -> Client:
        device = self._template
        if device.transport == "rtu":
            assert device.serial_port is not None
            # pyserial's exclusive lock: a second program (or a second agent) on the same RS-485 adapter is
            # refused instead of garbling every frame.
            serial = SerialSettings(device.serial_port, device.baudrate, device.parity, device.data_bits,
                                    device.stop_bits)
            return ModbusLink("rtu", name=self.key, timeout=timeout, counters=self.counters, serial=serial,
                              told=self._told, receiving=self._receiving)
        assert device.host is not None
        return ModbusLink(device.transport, name=self.key, timeout=timeout, counters=self.counters,
                          host=device.host, port=device.port, told=self._told, receiving=self._receiving)


def failure(exc: ModbusException, endpoint: str, function_code: int, address: int, count: int,
            timeout: float) -> str:
    """A failed request in a technician's words: silence, something that was not the answer, or a lost link."""
    request = f"FC{function_code:02d} {address}+{count}"
    if isinstance(exc, NoAnswer) and exc.detail:
        return f"no valid answer from {endpoint} to {request} within {timeout:g} s: {exc.detail}"
    if isinstance(exc, NoAnswer):
        return f"no answer from {endpoint} to {request} within {timeout:g} s"
    if isinstance(exc, LinkLost):
        return f"{endpoint}: {exc} during {request}"
    return f"no answer from {endpoint} to {request} within {timeout:g} s ({exc})"


_BUSY = "the port is busy: another program has it open (another agent, a terminal program, ModemManager)"


def _not_connected(device: ModbusDevice) -> str:
    if device.transport == "rtu":
        assert device.serial_port is not None
        return probe_serial_port(device.serial_port)
    return "refused or no answer; check the address, the port and the network"


def probe_serial_port(path: str) -> str:
    """Why a serial port does not open, found by opening it with pyserial (pymodbus only says it failed)."""
    import serial

    try:
        port = serial.Serial(path, exclusive=True)
    except (OSError, ValueError) as exc:
        return describe_open_error(exc, path)
    port.close()
    return "it opened on a second try: a passing fault (a USB adapter re-plugged?)"


def describe_open_error(exc: BaseException, port: str | None = None) -> str:
    """What a technician should do about a port or connection that will not open."""
    import errno
    import grp
    import os

    text = str(exc)
    code = getattr(exc, "errno", None)
    if code == errno.EACCES or "Permission denied" in text:
        group = "dialout"
        if port:
            try:
                group = grp.getgrgid(os.stat(port).st_gid).gr_name
            except (OSError, KeyError):
                pass
        return (f"permission denied: the user needs the group {group!r} (sudo usermod -aG {group} $USER, then log "
                "in again; the systemd unit already has it)")
    if code == errno.EPERM or "Operation not permitted" in text:  # a device policy, not groups
        from agent.systemd import device_blocked

        return device_blocked(port)
    if code == errno.EBUSY or "busy" in text.lower() or "exclusively lock" in text:
        return _BUSY
    if code == errno.ENOENT or "No such file" in text:
        return "no such serial device: is the adapter plugged in? (ls /dev/ttyUSB* /dev/serial/by-id/)"
    if code == errno.ECONNREFUSED or "refused" in text.lower():
        return "connection refused: nothing listens on that port (wrong port, or the device's Modbus TCP is off)"
    return text or type(exc).__name__


# --- the shared lines of this process ------------------------------------------------------------------

_LINES: dict[tuple[int, str], Line] = {}


def acquire(device: ModbusDevice) -> Line:
    """The line of `device`, opened by the first device on it. Keyed by event loop too: a line's lock and
    client belong to the loop that made them."""
    key = (id(asyncio.get_running_loop()), device.line_key)
    line = _LINES.get(key)
    if line is None or line.settings != device.line_settings:
        if line is not None:
            log.warning("line %s: settings changed while %d device(s) still use it; opening it anew", line.key,
                        line.users)
        line = _LINES[key] = Line(device)
    line.users += 1
    return line


def release(line: Line, device_name: str) -> None:
    line.demand.pop(device_name, None)
    line.users -= 1
    if line.users <= 0:
        line.close()
        for key, known in list(_LINES.items()):
            if known is line:
                del _LINES[key]


def lines() -> list[Line]:
    return list(_LINES.values())
