"""Modbus driver. Registered in `drivers.REGISTRY`; imports pymodbus only when a device is created."""

from __future__ import annotations

from typing import TYPE_CHECKING

from drivers.modbus.config import ModbusDevice as DeviceConfig

if TYPE_CHECKING:
    from drivers.modbus.driver import ModbusTcpDriver

__all__ = ["DeviceConfig", "create"]


def create(config: DeviceConfig) -> ModbusTcpDriver:
    from drivers.modbus.driver import ModbusTcpDriver

    return ModbusTcpDriver(config)


def describe(config: DeviceConfig) -> list[str]:
    """What `edge-agent check` prints for this device: the read plan, with both address numberings."""
    from drivers.modbus.decode import plan

    requests = plan(config.points)
    lines = [f"device {config.name}: modbus {config.transport} {config.host}:{config.port} unit {config.unit_id}, "
             f"every {config.poll_interval:g} s, timeout {config.timeout:g} s: {_count(len(config.points), 'point')} "
             f"in {_count(len(requests), 'request')} per poll"]
    for request in requests:
        base = 40001 if request.function == "holding" else 30001
        first, last = request.address, request.address + request.count - 1
        lines.append(f"  FC{request.function_code:02d} {request.function} registers {first}..{last} "
                     f"({base + first}..{base + last}), {_count(request.count, 'register')}")
        for point in request.decoder.points:
            scale = f" x{point.scale:g}" if point.scale != 1 else ""
            offset = f" {point.offset:+g}" if point.offset else ""
            lines.append(f"    {point.name:<24} address {point.address:>5} ({base + point.address}) "
                         f"{point.type:<7} {point.word_order}{scale}{offset} {point.unit or ''}".rstrip())
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
