"""Simulated Modbus devices served by a real pymodbus server: Modbus TCP, RTU over TCP, RTU on a serial port.

`edge-agent demo`, the test suite and the benchmarks need meters that answer like the ones on a plant floor:
real TCP, real exception codes, values that move the way a factory load moves. This module provides a
three-phase power meter, an environmental sensor and a cheap benchmark device, and serves any set of them
on one `ModbusTcpServer` per port, in-process (`serve`, `serve_many`) or as a separate process
(`python -m drivers.modbus.simulator plant`).

How it holds together:
- Addresses are 0-based protocol addresses: "30001" in a manual is input register 0 (function code 04).
- Each device keeps a register image, one list of 16-bit words per function code. `update(now)` rewrites
  the image in one synchronous step, so a client never reads a float32 whose two words come from
  different updates, and `decoded_values()` decodes that same image, so it is exactly what a correct
  agent decodes from the wire (float32 rounding and 0.1 V steps included).
- pymodbus 3.16 copies `ModbusSequentialDataBlock`/`ModbusDeviceContext` contents into its own runtime
  when the server starts (and deprecates both), so writing into a data block afterwards changes nothing.
  Each device is therefore served as a pymodbus `SimDevice` whose `action` copies the requested slice of
  the image into pymodbus's registers on every read.
- Writes are refused with ILLEGAL_ADDRESS and counted in `write_attempts`: the agent must never write to
  a meter unless a person enabled it, and tests can check that it did not.
- A unit id with no device answers GATEWAY_NO_RESPONSE (0x0B) on Modbus TCP, as a TCP-to-RS-485 gateway does
  for a silent slave, instead of pymodbus's default (an ERROR traceback in the log and DEVICE_FAILURE). On a
  serial line and through RTU over TCP (a transparent serial server) it stays silent, as a dead meter does.
- Every request's function code is counted per unit id (`SimServer.function_codes`), including those
  pymodbus rejects before any device sees them: the no-write guarantee is checked on what reached the wire.
- Serial lines: `PtyLink` joins two pseudo-terminals back to back (what `socat` does), so the server and
  the agent each open a real serial device path through pyserial, and RTU framing runs for real.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
import select
import signal
import struct
import sys
import threading
import time
import tty
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import ClassVar, NamedTuple, Self

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimAction, SimData
from pymodbus.simulator import SimDevice as PymodbusDevice

COILS = 1
DISCRETE_INPUTS = 2
HOLDING_REGISTERS = 3
INPUT_REGISTERS = 4
READ_FUNCTION_CODES = frozenset({1, 2, 3, 4})

# Function codes whose reads are answered from an image; writes never reach this table. Coils and
# discrete inputs are kept as pymodbus keeps them: 16 bits per word, bit 0 of word 0 = address 0.
_IMAGE_FOR_FUNCTION_CODE = {1: COILS, 2: DISCRETE_INPUTS, 3: HOLDING_REGISTERS, 23: HOLDING_REGISTERS,
                            4: INPUT_REGISTERS}


class RegisterPoint(NamedTuple):
    """One value in a device's register map, in the terms a technician writes in a config."""

    name: str
    function_code: int  # 3 = holding registers, 4 = input registers
    address: int  # 0-based protocol address of the first register
    type: str  # int16 | uint16 | int32 | uint32 | float32
    word_order: str  # ABCD: high word first; CDAB: low word first; one-register types say ABCD
    scale: float  # engineering value = raw value * scale
    unit: str

    @property
    def register_count(self) -> int:
        return 1 if self.type in ("int16", "uint16") else 2


_STRUCT_CODES = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f"}
_UNSIGNED_BITS = {"uint16": 16, "uint32": 32}


def encode_value(point: RegisterPoint, value: float) -> list[int]:
    """Registers holding `value` (an engineering value) the way `point` says the device stores it."""
    raw: float
    if point.type == "float32":
        raw = value / point.scale
    else:
        raw = round(value / point.scale)
        if point.type in _UNSIGNED_BITS:
            # A counter that outgrows its register pair wraps, as the meter's does.
            raw %= 1 << _UNSIGNED_BITS[point.type]
    packed = struct.pack(">" + _STRUCT_CODES[point.type], raw)
    words = list(struct.unpack(f">{point.register_count}H", packed))
    if point.word_order == "CDAB":
        words.reverse()
    return words


def decode_registers(point: RegisterPoint, registers: Sequence[int]) -> float:
    """The engineering value in `registers` (exactly `point.register_count` words)."""
    words = list(registers)
    if point.word_order == "CDAB":
        words.reverse()
    (raw,) = struct.unpack(">" + _STRUCT_CODES[point.type], struct.pack(f">{len(words)}H", *words))
    return raw * point.scale


class SimulatedDevice(ABC):
    """A device on the simulated bus: a register map, a register image and a model that moves the values."""

    kind: ClassVar[str]

    def __init__(
        self,
        register_map: tuple[RegisterPoint, ...],
        *,
        holding_registers: int,
        input_registers: int,
        seed: int | None,
        coils: int = 0,
        discrete_inputs: int = 0,
    ) -> None:
        self.register_map = register_map
        self.write_attempts = 0
        self._rng = random.Random(seed)
        self._images: dict[int, list[int]] = {}
        if holding_registers:
            self._images[HOLDING_REGISTERS] = [0] * holding_registers
        if input_registers:
            self._images[INPUT_REGISTERS] = [0] * input_registers
        self._refused: set[tuple[int, int]] = set()  # (function code, address) answered ILLEGAL_ADDRESS
        # Some meters answer ILLEGAL_VALUE to a register read longer than their own limit.
        self.longest_read: int | None = None
        self._bits = {COILS: coils, DISCRETE_INPUTS: discrete_inputs}
        for function_code, count in self._bits.items():
            if count:
                self._images[function_code] = [0] * ((count + 15) // 16)
        self._points = {point.name: point for point in register_map}

    @abstractmethod
    def update(self, now: float) -> None:
        """Compute the values at `now` (seconds, `time.monotonic()` clock) and write them into the image."""

    def registers(self, function_code: int) -> list[int]:
        """A copy of the register image for function code 3 or 4 (empty if the device has none)."""
        return list(self._images.get(function_code, ()))

    def refuse(self, function_code: int, first: int, last: int) -> None:
        """Answer ILLEGAL_ADDRESS to any read that touches `first..last`, as meters do for holes in their map."""
        self._refused.update((function_code, address) for address in range(first, last + 1))

    def accept(self, function_code: int, first: int, last: int) -> None:
        """Answer reads of `first..last` again (after `refuse`), as a meter does after a firmware update."""
        self._refused.difference_update((function_code, address) for address in range(first, last + 1))

    def set_bit(self, function_code: int, address: int, value: bool) -> None:
        """Set coil (1) or discrete input (2) `address`."""
        word, bit = divmod(address, 16)
        image = self._images[function_code]
        image[word] = image[word] | (1 << bit) if value else image[word] & ~(1 << bit)

    def decoded_values(self) -> dict[str, float]:
        """Every point of the register map decoded from the current image: what an agent should see."""
        values = {}
        for point in self.register_map:
            image = self._images[point.function_code]
            words = image[point.address : point.address + point.register_count]
            values[point.name] = decode_registers(point, words)
        return values

    def _store(self, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            point = self._points[name]
            image = self._images[point.function_code]
            image[point.address : point.address + point.register_count] = encode_value(point, value)

    def pymodbus_device(self, unit_id: int) -> PymodbusDevice:
        """This device as pymodbus serves it at `unit_id`; reads are answered from the live image."""
        return _pymodbus_device(
            unit_id,
            holding_registers=len(self._images.get(HOLDING_REGISTERS, ())),
            input_registers=len(self._images.get(INPUT_REGISTERS, ())),
            action=self._answer,
            coils=self._bits[COILS],
            discrete_inputs=self._bits[DISCRETE_INPUTS],
        )

    async def _answer(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        # pymodbus has already checked that address..address+count lies inside the block.
        if set_values is not None:
            self.write_attempts += 1
            return ExcCodes.ILLEGAL_ADDRESS
        image = self._images.get(_IMAGE_FOR_FUNCTION_CODE.get(function_code, 0))
        if image is None:
            return ExcCodes.ILLEGAL_FUNCTION
        if self.longest_read is not None and function_code in (HOLDING_REGISTERS, INPUT_REGISTERS) \
                and count > self.longest_read:
            return ExcCodes.ILLEGAL_VALUE
        if self._refused:
            is_bits = function_code in (COILS, DISCRETE_INPUTS)
            touched = range(address, address + (count * 16 if is_bits else count))
            if any((function_code, a) in self._refused for a in touched):
                return ExcCodes.ILLEGAL_ADDRESS
        # For bits, pymodbus passes the bit address and the count of 16-bit words that hold the bits.
        offset = (address // 16 if function_code in (COILS, DISCRETE_INPUTS) else address) - start_address
        registers[offset : offset + count] = image[offset : offset + count]
        return None


def _pymodbus_device(
    unit_id: int, *, holding_registers: int, input_registers: int, action: SimAction, coils: int = 0,
    discrete_inputs: int = 0,
) -> PymodbusDevice:
    # Separate blocks per function code, so FC03 and FC04 at the same address read different registers.
    # Every register inside a block is valid and reads 0 until the model writes it; beyond the block pymodbus
    # answers ILLEGAL_ADDRESS. A function code the device lacks gets a block as large as the other, so that
    # the action answers ILLEGAL_FUNCTION whatever the address.
    def block(size: int) -> list[SimData]:
        return [SimData(0, count=max(size, 1), values=0, datatype=DataType.REGISTERS)]

    def bits(size: int) -> list[SimData]:
        return [SimData(0, count=max(size, 1), values=False, datatype=DataType.BITS)]

    return PymodbusDevice(
        unit_id,
        simdata=(
            bits(coils),
            bits(discrete_inputs),
            block(holding_registers or input_registers),
            block(input_registers or holding_registers),
        ),
        action=action,
    )


async def _answer_no_device(
    function_code: int,
    start_address: int,
    address: int,
    count: int,
    registers: list[int],
    set_values: list[int] | list[bool] | None,
) -> ExcCodes:
    return ExcCodes.GATEWAY_NO_RESPONSE


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _duty_cycle(t: float, period: float, duty: float, ramp: float) -> float:
    """Level 0..1 of a machine that runs `duty` of every `period` seconds, ramping over `ramp` seconds."""
    phase = t % period
    running = duty * period
    if phase < ramp:
        return phase / ramp
    if phase < running:
        return 1.0
    if phase < running + ramp:
        return 1.0 - (phase - running) / ramp
    return 0.0


def _wave(t: float, period: float, phase: float) -> float:
    return math.sin(2 * math.pi * t / period + phase)


POWER_METER_REGISTERS: tuple[RegisterPoint, ...] = (
    # Input registers (FC04), float32 ABCD: a simplified layout of our own (not a real meter's map; the
    # shipped profiles in drivers/modbus/profiles are the real ones).
    RegisterPoint("voltage_avg", 4, 0, "float32", "ABCD", 1.0, "V"),
    RegisterPoint("current_l1", 4, 2, "float32", "ABCD", 1.0, "A"),
    RegisterPoint("current_l2", 4, 4, "float32", "ABCD", 1.0, "A"),
    RegisterPoint("current_l3", 4, 6, "float32", "ABCD", 1.0, "A"),
    RegisterPoint("power_factor", 4, 22, "float32", "ABCD", 1.0, ""),
    RegisterPoint("active_power", 4, 24, "float32", "ABCD", 1.0, "kW"),
    RegisterPoint("reactive_power", 4, 26, "float32", "ABCD", 1.0, "kvar"),
    RegisterPoint("apparent_power", 4, 28, "float32", "ABCD", 1.0, "kVA"),
    RegisterPoint("frequency", 4, 30, "float32", "ABCD", 1.0, "Hz"),
    RegisterPoint("active_energy", 4, 32, "float32", "ABCD", 1.0, "kWh"),
    # Holding registers (FC03): the same quantities as integers, in the encodings meters mix in practice.
    RegisterPoint("active_energy_wh", 3, 100, "uint32", "CDAB", 1.0, "Wh"),
    RegisterPoint("voltage_l1", 3, 102, "uint16", "ABCD", 0.1, "V"),
    RegisterPoint("voltage_l2", 3, 103, "uint16", "ABCD", 0.1, "V"),
    RegisterPoint("voltage_l3", 3, 104, "uint16", "ABCD", 0.1, "V"),
    RegisterPoint("frequency_int", 3, 105, "int16", "ABCD", 0.01, "Hz"),
    RegisterPoint("active_power_w", 3, 106, "int32", "ABCD", 1.0, "W"),
    RegisterPoint("power_factor_int", 3, 108, "int16", "ABCD", 0.001, ""),
)


class PowerMeter(SimulatedDevice):
    """A three-phase meter on a factory feeder: 220/380 V, 60 Hz, a base load and machines cycling."""

    kind = "power_meter"

    # (share of base load, period s, duty, ramp s): a press line and a compressor.
    _MACHINES = ((0.7, 240.0, 0.55, 8.0), (0.4, 420.0, 0.4, 3.0))

    def __init__(
        self,
        *,
        seed: int | None = None,
        energy_wh: float = 1_234_567.0,
        base_load_kw: float = 45.0,
        nominal_voltage: float = 220.0,
        machines_start_at: Sequence[float] | None = None,
    ) -> None:
        """`machines_start_at`: seconds after the first update at which the press line and the compressor start
        their cycles (default: somewhere in their cycle, at random). The demo uses it so that a newcomer sees
        the load rise over the demand target within its first minutes. The energy counters integrate the
        active power, whatever the load does."""
        super().__init__(POWER_METER_REGISTERS, holding_registers=128, input_registers=64, seed=seed)
        self.energy_wh = energy_wh
        self.base_load_kw = base_load_kw
        self.nominal_voltage = nominal_voltage
        rng = self._rng
        self._phases = [rng.uniform(0, 2 * math.pi) for _ in range(4)]
        self._machine_offsets = [rng.uniform(0, period) for _, period, _, _ in self._MACHINES]
        if machines_start_at is not None:
            self._machine_offsets = [(-start) % period for start, (_, period, _, _)
                                     in zip(machines_start_at, self._MACHINES, strict=True)]
        shares = [1 + rng.uniform(0.01, 0.04), 1 - rng.uniform(0.0, 0.03), 1 - rng.uniform(0.0, 0.02)]
        self._phase_shares = [share * 3 / sum(shares) for share in shares]
        self._voltage_offsets = [rng.uniform(-0.003, 0.003) for _ in range(3)]
        self._peak_kw = base_load_kw * (1.1 + sum(share for share, *_ in self._MACHINES))
        self._started_at: float | None = None
        self._last_update = 0.0

    def update(self, now: float) -> None:
        if self._started_at is None:
            self._started_at = self._last_update = now
        t = now - self._started_at
        elapsed = max(0.0, now - self._last_update)
        self._last_update = max(self._last_update, now)
        gauss = self._rng.gauss

        load_kw = self._load_kw(t)
        load_fraction = _clamp(load_kw / self._peak_kw, 0.0, 1.0)
        # Induction motors run closer to unity power factor when loaded. The clamps sit a hair inside the
        # stated ranges so that float32 rounding never takes a reading outside them.
        power_factor = _clamp(0.85 + 0.12 * load_fraction + gauss(0, 0.004), 0.8505, 0.9695)
        common = 0.01 * _wave(t, 1800, self._phases[1]) - 0.006 * load_fraction
        low, high = self.nominal_voltage * 0.9801, self.nominal_voltage * 1.0199
        voltages = [
            _clamp(self.nominal_voltage * (1 + common + offset + gauss(0, 0.001)), low, high)
            for offset in self._voltage_offsets
        ]
        currents = [
            load_kw * 1000 / 3 * (share + gauss(0, 0.004)) / (voltage * power_factor)
            for share, voltage in zip(self._phase_shares, voltages, strict=True)
        ]
        active_kw = sum(v * i * power_factor for v, i in zip(voltages, currents, strict=True)) / 1000
        reactive_kvar = active_kw * math.tan(math.acos(power_factor))
        frequency = _clamp(60 + 0.015 * _wave(t, 900, self._phases[2]) + gauss(0, 0.004), 59.9705, 60.0295)
        self.energy_wh += active_kw * 1000 * elapsed / 3600

        self._store({
            "voltage_avg": sum(voltages) / 3,
            "current_l1": currents[0],
            "current_l2": currents[1],
            "current_l3": currents[2],
            "power_factor": power_factor,
            "active_power": active_kw,
            "reactive_power": reactive_kvar,
            "apparent_power": math.hypot(active_kw, reactive_kvar),
            "frequency": frequency,
            "active_energy": self.energy_wh / 1000,
            # floor, so the integer counter never runs ahead of the energy actually integrated
            "active_energy_wh": math.floor(self.energy_wh),
            "voltage_l1": voltages[0],
            "voltage_l2": voltages[1],
            "voltage_l3": voltages[2],
            "frequency_int": frequency,
            "active_power_w": active_kw * 1000,
            "power_factor_int": power_factor,
        })

    def _load_kw(self, t: float) -> float:
        base = self.base_load_kw * (1 + 0.08 * _wave(t, 3600, self._phases[0]))
        machines = sum(
            self.base_load_kw * share * _duty_cycle(t + offset, period, duty, ramp)
            for (share, period, duty, ramp), offset in zip(self._MACHINES, self._machine_offsets, strict=True)
        )
        return max(0.0, (base + machines) * (1 + self._rng.gauss(0, 0.015)))


ENV_SENSOR_REGISTERS: tuple[RegisterPoint, ...] = (
    RegisterPoint("temperature", 3, 0, "int16", "ABCD", 0.1, "degC"),
    RegisterPoint("humidity", 3, 1, "uint16", "ABCD", 0.1, "%RH"),
    RegisterPoint("co2", 3, 2, "uint16", "ABCD", 1.0, "ppm"),
    RegisterPoint("pm2_5", 3, 3, "uint16", "ABCD", 0.1, "ug/m3"),
)


class EnvSensor(SimulatedDevice):
    """A generic RS-485 temperature/humidity/CO2/PM2.5 sensor on a factory floor with shifts and breaks."""

    kind = "env_sensor"

    def __init__(
        self, *, seed: int | None = None, mean_temperature: float = 25.0, day_seconds: float = 86_400.0
    ) -> None:
        super().__init__(ENV_SENSOR_REGISTERS, holding_registers=16, input_registers=0, seed=seed)
        self.mean_temperature = mean_temperature
        self.day_seconds = day_seconds
        rng = self._rng
        self._day_offset = rng.uniform(0, day_seconds)
        self._phases = [rng.uniform(0, 2 * math.pi) for _ in range(3)]
        self._started_at: float | None = None
        self._last_update = 0.0
        self._co2 = 0.0
        self._pm2_5 = 0.0

    def update(self, now: float) -> None:
        first = self._started_at is None
        if self._started_at is None:
            self._started_at = self._last_update = now
        t = now - self._started_at
        elapsed = max(0.0, now - self._last_update)
        self._last_update = max(self._last_update, now)
        gauss = self._rng.gauss

        mean = self.mean_temperature
        temperature = _clamp(
            mean + 3.5 * _wave(t + self._day_offset, self.day_seconds, 0.0)
            + 1.0 * _wave(t, 1500, self._phases[0]) + gauss(0, 0.05),
            mean - 7, mean + 7,
        )
        humidity = _clamp(
            50 - 1.8 * (temperature - mean) + 5 * _wave(t, 5400, self._phases[1]) + gauss(0, 0.3), 30, 70
        )
        # Shifts of 24 working minutes and a 6-minute break; crews thin out and fill up over two hours.
        occupancy = _clamp(
            0.1 + _duty_cycle(t, 1800, 0.8, 90) * (0.75 + 0.25 * _wave(t, 7200, self._phases[2])), 0, 1
        )
        co2_target = 420 + 950 * occupancy
        pm2_5_target = 5 + 30 * occupancy
        if first:
            self._co2, self._pm2_5 = co2_target, pm2_5_target
        else:
            # The air lags the people: first-order responses, minutes long.
            self._co2 += (co2_target - self._co2) * (1 - math.exp(-elapsed / 300))
            self._pm2_5 += (pm2_5_target - self._pm2_5) * (1 - math.exp(-elapsed / 120))

        self._store({
            "temperature": temperature,
            "humidity": humidity,
            "co2": _clamp(self._co2 + gauss(0, 4), 400, 1500),
            "pm2_5": _clamp(self._pm2_5 + gauss(0, 0.8), 0, 500),
        })


class BenchDevice(SimulatedDevice):
    """`points` float32 values in holding registers 0..2*points-1 (ABCD), every one changing every update."""

    kind = "bench"

    def __init__(self, points: int, *, seed: int | None = None, period: float = 61.0) -> None:
        if not 1 <= points <= 32_768:
            raise ValueError(f"points must be 1..32768 (two registers each), got {points}")
        register_map = tuple(
            RegisterPoint(f"point_{i}", 3, 2 * i, "float32", "ABCD", 1.0, "") for i in range(points)
        )
        super().__init__(register_map, holding_registers=2 * points, input_registers=0, seed=seed)
        start = self._rng.uniform(0, 2 * math.pi)
        self._phases = [start + 2 * math.pi * i / points for i in range(points)]
        self._omega = 2 * math.pi / period
        self._pack = struct.Struct(f">{points}f")
        self._unpack = struct.Struct(f">{2 * points}H")

    def update(self, now: float) -> None:
        angle = self._omega * now
        values = [i + 100 * math.sin(angle + phase) for i, phase in enumerate(self._phases)]
        self._images[HOLDING_REGISTERS][:] = self._unpack.unpack(self._pack.pack(*values))

    def decoded_values(self) -> dict[str, float]:
        values = self._pack.unpack(self._unpack.pack(*self._images[HOLDING_REGISTERS]))
        return {point.name: value for point, value in zip(self.register_map, values, strict=True)}


class _ServerChatterFilter(logging.Filter):
    """Drop pymodbus's server-side INFO/DEBUG lines ("Server listening." on every start).

    A filter rather than a level on the "pymodbus" logger, so the agent's own pymodbus client in the same
    process keeps whatever logging the user chose; warnings and errors always pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return "/pymodbus/server/" not in record.pathname.replace(os.sep, "/")


_SERVER_CHATTER_FILTER = _ServerChatterFilter()


def quiet_pymodbus_server() -> None:
    """Keep pymodbus server chatter out of the log (idempotent)."""
    logging.getLogger("pymodbus.logging").addFilter(_SERVER_CHATTER_FILTER)


class SimServer:
    """One pymodbus server on one TCP port or serial port, serving several unit ids, with a task that updates
    them. `framer="rtu"` sends RTU frames over TCP (a serial device server); `serial_port` serves RTU on a
    serial device instead of TCP (with `PtyLink`, a pseudo-terminal)."""

    def __init__(
        self,
        devices: Mapping[int, SimulatedDevice],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        update_interval: float | None = 0.5,
        framer: str = "socket",
        serial_port: str | None = None,
        baudrate: int = 9600,
    ) -> None:
        """`port=0` picks a free port; `update_interval=None` leaves updating to the caller (`update_all`)."""
        if framer not in ("socket", "rtu"):
            raise ValueError(f'framer must be "socket" or "rtu", got {framer!r}')
        self.framer = "rtu" if serial_port is not None else framer
        self.serial_port = serial_port
        self.baudrate = baudrate
        self.function_codes: Counter[tuple[int, int]] = Counter()  # (unit id, function code) -> requests
        if not devices:
            raise ValueError("a simulator needs at least one device")
        for unit_id in devices:
            if not 0 <= unit_id <= 255:
                raise ValueError(f"unit id must be 0..255 (0 answers every unit id), got {unit_id}")
        if not 0 <= port <= 65_535:
            raise ValueError(f"port must be 0..65535, got {port}")
        if update_interval is not None and update_interval <= 0:
            raise ValueError(f"update_interval must be positive, got {update_interval}")
        self.devices = dict(devices)
        self.host = host
        self.update_interval = update_interval
        self._requested_port = port
        self._port: int | None = None
        self._modbus: ModbusTcpServer | ModbusSerialServer | None = None
        self._listener: asyncio.Server | None = None
        self._updater: asyncio.Task[None] | None = None

    @property
    def writes(self) -> int:
        """Requests with any function code other than the four reads, whatever pymodbus did with them."""
        return sum(n for (_, code), n in self.function_codes.items() if code not in READ_FUNCTION_CODES)

    def _trace(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.function_codes[(pdu.dev_id, pdu.function_code)] += 1
        return pdu

    def _silence_missing_units(self, sending: bool, packet: bytes) -> bytes:
        # pymodbus answers an unknown unit id with DEVICE_FAILURE; on a serial line a missing meter is
        # silent. An RTU frame starts with the unit id.
        if sending and packet and packet[0] not in self.devices:
            return b""
        return packet

    @property
    def port(self) -> int:
        """The port actually listened on."""
        if self._port is None:
            raise RuntimeError("the simulator has not been started")
        return self._port

    @property
    def is_serving(self) -> bool:
        return self._modbus is not None

    def update_all(self, now: float | None = None) -> None:
        """Update every device now (`time.monotonic()` unless `now` is given)."""
        now = time.monotonic() if now is None else now
        for device in self.devices.values():
            device.update(now)

    async def start(self) -> None:
        if self._modbus is not None:
            raise RuntimeError("the simulator is already serving")
        quiet_pymodbus_server()
        self.update_all()
        served = [device.pymodbus_device(unit_id) for unit_id, device in self.devices.items()]
        silent = self.framer == "rtu"  # a dead meter on a serial line does not answer at all
        if 0 not in self.devices and not silent:
            served.append(self._no_device())
        if self.serial_port is not None:
            serial = ModbusSerialServer(served, port=self.serial_port, framer=FramerType.RTU, baudrate=self.baudrate,
                                        trace_pdu=self._trace, trace_packet=self._silence_missing_units)
            try:
                await serial.serve_forever(background=True)
            except RuntimeError as exc:
                raise OSError(f"Modbus simulator could not open {self.serial_port}") from exc
            self._modbus, self._port = serial, 0
            self._start_updates()
            return
        framer = FramerType.RTU if self.framer == "rtu" else FramerType.SOCKET
        modbus = ModbusTcpServer(served, address=(self.host, self._requested_port), framer=framer,
                                 trace_pdu=self._trace, trace_packet=self._silence_missing_units if silent else None)
        try:
            await modbus.serve_forever(background=True)
        except RuntimeError as exc:
            # pymodbus has logged the OSError behind this as a warning.
            raise OSError(f"Modbus simulator could not listen on {self.host}:{self._requested_port}") from exc
        listener = modbus.transport
        assert isinstance(listener, asyncio.Server)
        self._modbus, self._listener = modbus, listener
        self._port = listener.sockets[0].getsockname()[1]
        self._start_updates()

    def _start_updates(self) -> None:
        if self.update_interval is not None:
            self._updater = asyncio.create_task(
                self._update_forever(self.update_interval), name=f"modbus-simulator-{self.serial_port or self._port}"
            )

    async def stop(self) -> None:
        """Stop updating, close the listener and every client connection (idempotent)."""
        updater, self._updater = self._updater, None
        if updater is not None:
            updater.cancel()
            try:
                await updater
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        modbus, self._modbus = self._modbus, None
        listener, self._listener = self._listener, None
        if modbus is not None:
            await modbus.shutdown()
        if listener is not None:
            await listener.wait_closed()

    async def __aenter__(self) -> Self:
        if not self.is_serving:
            await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _update_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.update_all()

    def _no_device(self) -> PymodbusDevice:
        # Unit 0 is pymodbus's catch-all; sized like the largest device so that any address a real
        # device would answer gets GATEWAY_NO_RESPONSE rather than ILLEGAL_ADDRESS.
        def largest(function_code: int) -> int:
            return max(len(device.registers(function_code)) for device in self.devices.values())

        return _pymodbus_device(
            0,
            holding_registers=largest(HOLDING_REGISTERS),
            input_registers=largest(INPUT_REGISTERS),
            action=_answer_no_device,
        )


class PtyLink:
    """Two pseudo-terminals joined back to back: bytes written to one path come out of the other, like a
    null-modem cable between two serial ports. Both ends are real tty devices, opened through pyserial by
    whoever uses them. The relay is a thread, so it works whatever event loops the two ends run in."""

    def __init__(self) -> None:
        self._masters: list[int] = []
        self.paths: list[str] = []
        for _ in range(2):
            master, slave = os.openpty()
            tty.setraw(slave)  # no echo, no line discipline: a byte is a byte
            self._masters.append(master)
            self.paths.append(os.ttyname(slave))
            self._slaves = [*getattr(self, "_slaves", []), slave]  # kept open: a pty vanishes with its last fd
        self._wake_read, self._wake_write = os.pipe()
        self._thread = threading.Thread(target=self._relay, name="pty-link", daemon=True)
        self._thread.start()

    @property
    def server_path(self) -> str:
        return self.paths[0]

    @property
    def client_path(self) -> str:
        return self.paths[1]

    def _relay(self) -> None:
        a, b = self._masters
        peer = {a: b, b: a}
        while True:
            readable, _, _ = select.select([a, b, self._wake_read], [], [])
            if self._wake_read in readable:
                return
            for fd in readable:
                try:
                    data = os.read(fd, 4096)
                except OSError:  # EIO: no process has the other end open right now
                    data = b""
                if data:
                    os.write(peer[fd], data)
                else:
                    time.sleep(0.005)

    def close(self) -> None:
        if not self._thread.is_alive() and not self._masters:
            return
        os.write(self._wake_write, b"x")
        self._thread.join(timeout=2)
        for fd in (*self._masters, *self._slaves, self._wake_read, self._wake_write):
            try:
                os.close(fd)
            except OSError:
                pass
        self._masters, self._slaves = [], []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SimServerGroup:
    """Several simulators started and stopped together, e.g. one bench device per port."""

    def __init__(self, servers: Sequence[SimServer]) -> None:
        self.servers = list(servers)

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    async def start(self) -> None:
        started: list[SimServer] = []
        try:
            for server in self.servers:
                await server.start()
                started.append(server)
        except BaseException:
            for server in reversed(started):
                await server.stop()
            raise

    async def stop(self) -> None:
        for server in reversed(self.servers):
            await server.stop()

    async def __aenter__(self) -> Self:
        if not all(server.is_serving for server in self.servers):
            await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def serve(
    devices: Mapping[int, SimulatedDevice],
    host: str = "127.0.0.1",
    port: int = 0,
    update_interval: float | None = 0.5,
) -> SimServer:
    """Start serving `devices` (unit id -> device) on one port; stop it with `await server.stop()`."""
    server = SimServer(devices, host=host, port=port, update_interval=update_interval)
    await server.start()
    return server


async def serve_many(
    device_sets: Iterable[Mapping[int, SimulatedDevice]],
    host: str = "127.0.0.1",
    first_port: int = 0,
    update_interval: float | None = 0.5,
) -> SimServerGroup:
    """One server per device set, on consecutive ports from `first_port` (free ports if it is 0)."""
    device_sets = list(device_sets)
    if first_port and first_port + len(device_sets) - 1 > 65_535:
        raise ValueError(f"{len(device_sets)} ports from {first_port} run past 65535")
    group = SimServerGroup([
        SimServer(
            devices, host=host, port=first_port + i if first_port else 0, update_interval=update_interval
        )
        for i, devices in enumerate(device_sets)
    ])
    await group.start()
    return group


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m drivers.modbus.simulator",
        description="Serve simulated Modbus TCP devices. Prints 'READY <port> ...' once listening; "
        "stops cleanly on SIGTERM or SIGINT.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=5020,
        help="TCP port; bench uses consecutive ports from here; 0 picks free ports (default 5020)",
    )
    parser.add_argument(
        "--update-interval", type=float, default=0.5, help="seconds between updates (default 0.5)"
    )
    parser.add_argument("--seed", type=int, help="random seed, for repeatable values")
    profiles = parser.add_subparsers(dest="profile", required=True, metavar="{plant,bench}")
    profiles.add_parser("plant", help="power meter at unit 1, environmental sensor at unit 2")
    bench = profiles.add_parser("bench", help="one server per device, each a bench device at unit 1")
    bench.add_argument("--devices", type=int, default=1, help="number of servers (default 1)")
    bench.add_argument("--points", type=int, default=50, help="float32 values per device (default 50)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65_535:
        parser.error(f"--port must be 0..65535, got {args.port}")
    if args.update_interval <= 0:
        parser.error(f"--update-interval must be positive, got {args.update_interval}")
    if args.profile == "bench":
        if args.devices < 1:
            parser.error(f"--devices must be at least 1, got {args.devices}")
        if not 1 <= args.points <= 32_768:
            parser.error(f"--points must be 1..32768, got {args.points}")
        if args.port and args.port + args.devices - 1 > 65_535:
            parser.error(f"{args.devices} ports from {args.port} run past 65535")
    return args


def _device_sets(args: argparse.Namespace) -> list[dict[int, SimulatedDevice]]:
    def seed(offset: int) -> int | None:
        return None if args.seed is None else args.seed + offset

    if args.profile == "plant":
        return [{1: PowerMeter(seed=seed(0)), 2: EnvSensor(seed=seed(1))}]
    return [{1: BenchDevice(args.points, seed=seed(i))} for i in range(args.devices)]


async def _run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        group = await serve_many(_device_sets(args), args.host, args.port, args.update_interval)
    except OSError as exc:
        print(f"simulator: {exc}", file=sys.stderr)
        return 1
    async with group:
        units = ",".join(f"{unit_id}:{device.kind}" for unit_id, device in group.servers[0].devices.items())
        details = f" devices={args.devices} points={args.points}" if args.profile == "bench" else ""
        ports = ",".join(str(port) for port in group.ports)
        print(f"READY {group.ports[0]} {args.profile} host={args.host} ports={ports} units={units}{details}",
              flush=True)
        await stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
