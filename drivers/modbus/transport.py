"""The bytes on a Modbus line: the agent's own client for the four read function codes, over a serial port
(RTU), a TCP socket (Modbus TCP, MBAP header) or RTU framing carried over TCP.

Why not pymodbus's client (3.16), which the agent used before:
- Its RTU framer throws away everything received so far on the first bad CRC. One 0x00 or 0xFF that an
  RS-485 transceiver puts on the line as it switches direction, just before a meter's valid reply, made the
  whole answer vanish and the request end as "no answer" after the full timeout.
- It takes a Modbus TCP reply as the request's when its transaction id is 0 or when its function code or
  length differ from the request's: another block's data was decoded as this block's and marked good.
- Anything raised while it decodes runs out of `data_received` into asyncio, which logs a full traceback at
  every retry; and a wrong unit id, a wrong transaction id, a reset and a closed socket all end as the same
  timeout, with nothing saying which.
pymodbus still gives the PDUs: requests are built by its `ModbusClientMixin` (`read_coils` ...
`read_input_registers`, the calls the driver and the tools make) and answers are its response classes, so
nothing above the line changes.

Invariants:
- One request at a time per link: the `Line`'s lock serialises them; `execute` refuses a second one.
- A reply is the request's only if its unit id, function code (or the exception form of it), length (the
  byte count for the count asked) and, on Modbus TCP, transaction id all match; on RTU its CRC is right too.
  Anything else is discarded, counted by reason, told once in the log, and the wait goes on to the timeout:
  a stray reply never ends a request, and a wrong value is never handed up as good.
- On RTU the request's answer is looked for at every byte offset of what arrived, so bytes before it
  (glitches, noise, the tail of an earlier answer) cost nothing but a count.
- What arrives between requests can never be the next request's answer: on RTU it is dropped (and counted)
  when the next request is sent; on TCP each whole frame in it is discarded as "no request was waiting".
- Only function codes 01-04 are sent: the no-write guarantee holds at the wire, whatever calls `execute`.
- Nothing raised while receiving escapes into asyncio: it is caught, counted as a framing error and logged
  with the once-loud, then-quiet rule (`FailureLog`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Literal

from pymodbus.client.mixin import ModbusClientMixin
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsResponse, ReadDiscreteInputsResponse
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse, ReadInputRegistersResponse

from agent.health import FailureLog

log = logging.getLogger("drivers.modbus")

READ_CODES = frozenset({1, 2, 3, 4})
# Why a well-formed reply was not taken, as counted in a line's `discarded` (status, /metrics).
DISCARD_REASONS = ("transaction_id", "unit_id", "function_code", "length", "unexpected")
MAX_BUFFER = 2048  # bytes kept while hunting for a frame; an RTU answer is at most 256


# --- the answers ---------------------------------------------------------------------------------------

class _Brief(ModbusPDU):
    """pymodbus formats a PDU's every register or bit when it is printed; ours says what it is, briefly."""

    def __str__(self) -> str:
        return f"{type(self).__name__}(dev_id={self.dev_id}, transaction_id={self.transaction_id})"


class RegisterBytes(_Brief):
    """A register answer kept as the bytes that came (big-endian registers): the block decoder reads the bytes
    in one step instead of one register at a time. `registers` is there for the tools."""

    payload: bytes = b""

    def decode(self, data: bytes) -> None:
        byte_count = data[0]
        if byte_count >= len(data):  # as pymodbus: a count longer than the frame is not an answer
            raise ModbusIOException(f"byte_count {byte_count} > length of packet {len(data)}",
                                    function_code=self.function_code)
        self.payload = data[1:1 + byte_count - byte_count % 2]

    @property  # type: ignore[override]
    def registers(self) -> list[int]:
        return list(struct.unpack(f">{len(self.payload) // 2}H", self.payload))

    @registers.setter
    def registers(self, registers: list[int]) -> None:
        self.payload = struct.pack(f">{len(registers)}H", *registers)


class _HoldingRegisters(RegisterBytes, ReadHoldingRegistersResponse):
    pass


class _InputRegisters(RegisterBytes, ReadInputRegistersResponse):
    pass


class _Coils(_Brief, ReadCoilsResponse):
    pass


class _DiscreteInputs(_Brief, ReadDiscreteInputsResponse):
    pass


READ_RESPONSES: tuple[type[ModbusPDU], ...] = (_Coils, _DiscreteInputs, _HoldingRegisters, _InputRegisters)
_RESPONSE = {cls.function_code: cls for cls in READ_RESPONSES}


# --- what can go wrong, in words ---------------------------------------------------------------------

class NoAnswer(ModbusIOException):
    """No reply that was the request's within the timeout; `detail` says what came instead, if anything."""

    def __init__(self, timeout: float, detail: str = "") -> None:
        self.timeout, self.detail = timeout, detail
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.detail:
            return f"no valid answer within {self.timeout:g} s: {self.detail}"
        return f"no answer within {self.timeout:g} s"


class LinkLost(ConnectionException):
    """The connection or the port went away; `detail` says how."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)

    def __str__(self) -> str:
        return self.detail


@dataclass
class LineCounters:
    """What a line's receive path threw away, since the start (kept across reconnects)."""

    crc_errors: int = 0  # RTU frames that looked like the answer but whose CRC was wrong
    framing_errors: int = 0  # bytes around or instead of a frame (noise, glitches), malformed MBAP headers
    discarded: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DISCARD_REASONS, 0))
    disconnects: int = 0  # connections (or serial ports) lost during or between requests


@dataclass(frozen=True, slots=True)
class Expect:
    """The answer a request is waiting for."""

    unit: int
    function_code: int
    byte_count: int
    transaction_id: int = 0  # Modbus TCP only; never 0 there

    def judge(self, transaction_id: int | None, unit: int, pdu: bytes) -> tuple[str, str] | None:
        """None if `pdu` from `unit` is this request's answer (normal or exception), else (reason, words)."""
        if transaction_id is not None and transaction_id != self.transaction_id:
            return "transaction_id", f"transaction id {transaction_id} (expected {self.transaction_id})"
        if unit != self.unit:
            return "unit_id", f"unit id {unit} (expected {self.unit})"
        code = pdu[0]
        if code == self.function_code | 0x80:
            return None if len(pdu) == 2 else ("length", f"an exception reply of {len(pdu)} bytes (expected 2)")
        if code != self.function_code:
            return "function_code", f"function code {code} (expected {self.function_code})"
        if len(pdu) < 2 or pdu[1] != self.byte_count or len(pdu) != 2 + self.byte_count:
            count = pdu[1] if len(pdu) >= 2 else 0
            return "length", f"{count} data bytes (expected {self.byte_count})"
        return None


def expected_byte_count(function_code: int, count: int) -> int:
    return (count + 7) // 8 if function_code in (1, 2) else 2 * count


def answer(unit: int, transaction_id: int, pdu: bytes) -> ModbusPDU:
    """The pymodbus response object of a PDU already judged to be the request's answer."""
    if pdu[0] & 0x80:
        return ExceptionResponse(pdu[0] & 0x7F, pdu[1], device_id=unit, transaction=transaction_id)
    response = _RESPONSE[pdu[0]](dev_id=unit, transaction_id=transaction_id)
    response.decode(pdu[1:])
    return response


# --- RTU: hunting for the frame ------------------------------------------------------------------------

def crc16(data: bytes) -> int:
    """Modbus CRC-16, as the two bytes appear on the wire (low byte first) read big-endian."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return ((crc & 0xFF) << 8) | (crc >> 8)


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def rtu_frame(unit: int, pdu: bytes) -> bytes:
    frame = bytes([unit]) + pdu
    return frame + crc16(frame).to_bytes(2, "big")


class Receiver:
    """The receive buffer of one link, judged against the request that waits (if any)."""

    def __init__(self, counters: LineCounters) -> None:
        self.counters = counters
        self.buffer = bytearray()
        self.expect: Expect | None = None
        self.last_discard = ""  # words for the most recent discarded reply of this request

    def begin(self, expect: Expect) -> None:
        raise NotImplementedError

    def feed(self, data: bytes) -> ModbusPDU | None:
        raise NotImplementedError

    def give_up(self) -> str:
        """The request timed out: count what is left and say what came instead of an answer ("" if nothing)."""
        raise NotImplementedError

    def _discard(self, reason: str, words: str) -> None:
        self.counters.discarded[reason] += 1
        self.last_discard = f"discarded a reply with {words}"
        self.on_discard(reason, words)

    def on_discard(self, reason: str, words: str) -> None:
        """Set by the link to tell the log."""


class RtuReceiver(Receiver):
    """RTU has no header to find a frame by: the answer is looked for at every offset of what arrived, by unit
    id, function code, a length that fits, and its CRC. A frame with a good CRC that is not the request's
    (another unit, another function code or length) is discarded whole; bytes that are no frame are noise.

    Incremental, because a USB adapter may hand over a reply a byte at a time: each offset is sized once
    (`_next`), and a possible frame is checked once, when its last byte has come (`_pending`)."""

    def __init__(self, counters: LineCounters) -> None:
        super().__init__(counters)
        self._reset()

    def _reset(self) -> None:
        self._next = 0  # the first offset not yet sized
        self._pending: list[tuple[int, int]] = []  # (offset, end) of possible frames still arriving
        self._bad_crc: set[int] = set()  # offsets of frames that looked like the answer but failed the CRC
        self._noise = False  # bytes were dropped that belonged to no frame

    def begin(self, expect: Expect) -> None:
        if self.buffer:
            self.counters.framing_errors += 1  # bytes after an answer, or between requests: noise
        self.buffer.clear()
        self.expect, self.last_discard = expect, ""
        self._reset()

    def feed(self, data: bytes) -> ModbusPDU | None:
        self.buffer += data
        if len(self.buffer) > MAX_BUFFER:  # a babbling line: start again from the newest bytes
            del self.buffer[:len(self.buffer) - MAX_BUFFER // 2]
            self._reset()
            self._noise = True
        expect = self.expect
        if expect is None:
            return None
        buffer = self.buffer
        while True:
            while (size := _rtu_size(buffer, self._next)) is not None:
                if size:
                    self._pending.append((self._next, self._next + size))
                self._next += 1
            whole = next((pending for pending in self._pending if pending[1] <= len(buffer)), None)
            if whole is None:
                return None  # nothing whole yet
            self._pending.remove(whole)
            offset, end = whole
            frame = bytes(buffer[offset:end])
            if crc16(frame[:-2]) != int.from_bytes(frame[-2:], "big"):
                if frame[0] == expect.unit and frame[1] in (expect.function_code, expect.function_code | 0x80):
                    self._bad_crc.add(offset)
                continue
            unit, pdu = frame[0], frame[1:-2]
            verdict = expect.judge(None, unit, pdu)
            self._count_skipped(offset)
            del buffer[:end]
            if verdict is None:
                self.expect = None
                self._reset()
                return answer(unit, 0, pdu)
            # A whole frame that is not the answer: what lay before it is judged; look again after it.
            self._discard(*verdict)
            self._reset()

    def give_up(self) -> str:
        self.expect = None
        if self._bad_crc:
            self.counters.crc_errors += len(self._bad_crc)
            self.buffer.clear()
            self._reset()
            return "a reply with a bad CRC (noise or a wiring fault on the line)" + self._also()
        if self.buffer or self._noise:
            self.counters.framing_errors += 1
            count = len(self.buffer)
            self.buffer.clear()
            self._reset()
            return f"{count} byte(s) that were no valid Modbus frame (noise on the line)" + self._also()
        return self.last_discard

    def _also(self) -> str:
        return f"; also {self.last_discard}" if self.last_discard else ""

    def _count_skipped(self, offset: int) -> None:
        """Bytes before a whole frame: a near miss with a bad CRC is a CRC error, anything else noise."""
        bad = {o for o in self._bad_crc if o < offset}
        self.counters.crc_errors += len(bad)
        if (offset and not bad) or self._noise:
            self.counters.framing_errors += 1


def _rtu_size(buffer: bytearray, offset: int) -> int | None:
    """The length of the frame that would start at `offset` (a read answer or an exception): 0 if the bytes
    there cannot start one, None if they do not say yet."""
    if offset + 1 >= len(buffer):
        return None
    code = buffer[offset + 1]
    if code & 0x80:
        return 5 if code & 0x7F in READ_CODES else 0
    if code not in READ_CODES:
        return 0
    return 5 + buffer[offset + 2] if offset + 2 < len(buffer) else None


# --- Modbus TCP: the MBAP header ------------------------------------------------------------------------

class MbapReceiver(Receiver):
    """Modbus TCP frames carry their length, so the stream is cut frame by frame and each one judged; a
    header that cannot be one (protocol id not 0, length out of range) means the stream is out of step: what
    is buffered is dropped and counted as a framing error."""

    def begin(self, expect: Expect) -> None:
        self.expect, self.last_discard = None, ""
        self.feed(b"")  # whole frames already here came before the request: none of them is its answer
        self.expect = expect

    def feed(self, data: bytes) -> ModbusPDU | None:
        self.buffer += data
        buffer = self.buffer
        while len(buffer) >= 8:
            transaction_id, protocol, length = struct.unpack_from(">HHH", buffer)
            if protocol != 0 or not 2 <= length <= 254:
                self.counters.framing_errors += 1
                self.last_discard = (f"discarded {len(buffer)} bytes after a malformed MBAP header "
                                     f"(protocol id {protocol}, length {length})")
                self.on_discard("framing", self.last_discard)
                buffer.clear()
                return None
            if len(buffer) < 6 + length:
                return None
            unit, pdu = buffer[6], bytes(buffer[7:6 + length])
            del buffer[:6 + length]
            expect = self.expect
            if expect is None:
                self._discard("unexpected", f"transaction id {transaction_id} while no request was waiting")
                continue
            verdict = expect.judge(transaction_id, unit, pdu)
            if verdict is not None:
                self._discard(*verdict)
                continue
            self.expect = None
            return answer(unit, transaction_id, pdu)
        return None

    def give_up(self) -> str:
        self.expect = None
        return self.last_discard


# --- the link: one connection or port, one request at a time -------------------------------------------

Kind = Literal["rtu", "rtu_over_tcp", "tcp"]


@dataclass(frozen=True, slots=True)
class SerialSettings:
    port: str
    baudrate: int
    parity: str
    data_bits: int
    stop_bits: int


class _Protocol(asyncio.Protocol):
    def __init__(self, link: ModbusLink) -> None:
        self.link = link

    def data_received(self, data: bytes) -> None:
        self.link.received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.lost_connection(exc)


class _SerialPort:
    """A serial port opened by pyserial (its settings, its exclusive lock), read by the event loop."""

    def __init__(self, settings: SerialSettings, link: ModbusLink) -> None:
        import serial

        self.port = serial.Serial(settings.port, baudrate=settings.baudrate, parity=settings.parity,
                                  bytesize=settings.data_bits, stopbits=settings.stop_bits, timeout=0,
                                  exclusive=True)  # a second program on the same adapter is refused
        self.fd = self.port.fileno()
        os.set_blocking(self.fd, False)
        self.link = link
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._readable)
        self.open = True

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: the USB adapter went away
            self.close()
            self.link.lost_connection(exc)
            return
        if data:
            self.link.received(data)

    def write(self, data: bytes) -> None:
        # A request is 8 bytes: far below what the tty's output queue takes at once.
        written = os.write(self.fd, data)
        if written != len(data):
            raise OSError(f"the serial port took {written} of {len(data)} bytes")

    def close(self) -> None:
        if self.open:
            self.open = False
            self._loop.remove_reader(self.fd)
            self.port.close()


class ModbusLink(ModbusClientMixin[Awaitable[ModbusPDU]]):
    """A Modbus client for reads: `read_coils`, `read_discrete_inputs`, `read_holding_registers` and
    `read_input_registers` (from pymodbus's mixin) return pymodbus response objects, or raise `NoAnswer` or
    `LinkLost` with what happened in words."""

    def __init__(self, kind: Kind, *, name: str, timeout: float, counters: LineCounters,
                 serial: SerialSettings | None = None, host: str | None = None, port: int = 502,
                 told: set[str] | None = None, receiving: FailureLog | None = None) -> None:
        """`counters`, `told` (the kinds of discarded reply already logged) and `receiving` belong to the line:
        they outlive a reconnect, so a device that keeps misbehaving is told once, not once per connection."""
        super().__init__()
        self.kind, self.name, self.timeout, self.counters = kind, name, timeout, counters
        self._serial_settings, self.host, self.port = serial, host, port
        self._receiver: Receiver = MbapReceiver(counters) if kind == "tcp" else RtuReceiver(counters)
        self._receiver.on_discard = self._tell  # type: ignore[method-assign]
        self._serial: _SerialPort | None = None
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[ModbusPDU] | None = None
        self._transaction_id = 0
        self._lost: str | None = None
        self._told = told if told is not None else set()
        self.receiving = receiving or FailureLog(f"line {name}: receiving", log)

    @property
    def connected(self) -> bool:
        return self._serial is not None or (self._transport is not None and not self._transport.is_closing())

    async def connect(self) -> bool:
        """Open the port or connection; False on a connect timeout, `OSError` (with its errno) otherwise."""
        self._lost = None
        if self.kind == "rtu":
            assert self._serial_settings is not None
            self._serial = _SerialPort(self._serial_settings, self)
            return True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                transport, _ = await loop.create_connection(lambda: _Protocol(self), self.host, self.port)
        except TimeoutError:
            return False
        self._transport = transport
        return True

    def close(self) -> None:
        if self._serial is not None:
            self._serial.close()
            self._serial = None
        if self._transport is not None:
            transport, self._transport = self._transport, None
            transport.close()

    async def execute(self, no_response_expected: bool, request: ModbusPDU) -> ModbusPDU:  # type: ignore[override]
        code = request.function_code
        if code not in READ_CODES or no_response_expected:
            raise ModbusIOException(f"function code {code} is not sent: the agent only reads (01-04)")
        if self._waiter is not None:
            raise ModbusIOException("a request is already waiting on this link")
        if not self.connected:
            raise LinkLost(self._lost or "not connected")
        tid = 0
        if self.kind == "tcp":
            self._transaction_id = self._transaction_id % 0xFFFF + 1  # 1..65535: 0 is never ours
            tid = self._transaction_id
        expect = Expect(request.dev_id, code, expected_byte_count(code, request.count), tid)
        self._receiver.begin(expect)
        pdu = bytes([code]) + request.encode()
        if self.kind == "tcp":
            frame = struct.pack(">HHHB", tid, 0, len(pdu) + 1, request.dev_id) + pdu
        else:
            frame = rtu_frame(request.dev_id, pdu)
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            self._write(frame)
            async with asyncio.timeout(self.timeout):
                return await waiter
        except TimeoutError:
            raise NoAnswer(self.timeout, self._receiver.give_up()) from None
        finally:
            self._waiter = None
            self._receiver.expect = None

    def received(self, data: bytes) -> None:
        """From the transport: never raises (an exception here would reach asyncio's handler, with a traceback
        at every request, and on TCP close the connection)."""
        try:
            response = self._receiver.feed(data)
        except Exception as exc:  # noqa: BLE001 - whatever a device sends, the loop must not see it
            self.counters.framing_errors += 1
            self._receiver.buffer.clear()
            self.receiving.failed(f"an answer that could not be decoded was dropped ({type(exc).__name__}: {exc})")
            return
        if response is not None and self._waiter is not None and not self._waiter.done():
            self.receiving.succeeded()
            self._waiter.set_result(response)

    def lost_connection(self, exc: BaseException | None) -> None:
        if self._transport is None and self._serial is None:
            # `close` came first: the agent dropped the connection itself (after a timeout, at a release) and
            # asyncio tells it a loop turn later. Not a connection lost; no request waits on a closed link.
            return
        if exc is None:
            why = "the device closed the connection" if self.kind != "rtu" else "the serial port closed"
        elif isinstance(exc, ConnectionResetError):
            why = "the connection was reset by the device (or a firewall)"
        elif self.kind == "rtu":
            why = f"the serial port failed ({exc}): the adapter was unplugged?"
        else:
            why = f"the connection failed ({exc})"
        self._lost = why
        self.counters.disconnects += 1
        self._transport = None
        self._serial = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(LinkLost(why))

    def _write(self, frame: bytes) -> None:
        try:
            if self._serial is not None:
                self._serial.write(frame)
            elif self._transport is not None:
                self._transport.write(frame)
            else:
                raise LinkLost(self._lost or "not connected")
        except OSError as exc:
            self.close()
            raise LinkLost(f"could not send: {exc}") from exc

    def _tell(self, reason: str, words: str) -> None:
        """Each kind of discarded reply once at WARNING per link; they are counted either way."""
        text = words if reason == "framing" else f"discarded a reply that was not the request's: {words}"
        if reason in self._told:
            log.debug("line %s: %s", self.name, text)
            return
        self._told.add(reason)
        log.warning("line %s: %s (counted in the line's figures; further ones are logged at debug level)",
                    self.name, text)
