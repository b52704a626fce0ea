"""Modbus driver. Registered in `drivers.REGISTRY`; imports pymodbus only when a device is created."""

from __future__ import annotations

from typing import TYPE_CHECKING

from drivers.modbus.config import ModbusDevice as DeviceConfig

if TYPE_CHECKING:
    from drivers.modbus.driver import ModbusDriver

__all__ = ["DeviceConfig", "create", "describe"]


def create(config: DeviceConfig) -> ModbusDriver:
    from drivers.modbus.driver import ModbusDriver

    return ModbusDriver(config)


def describe(config: DeviceConfig) -> list[str]:
    """What `edge-agent check` prints for this device: the line, the read plan, both address numberings."""
    from drivers.modbus.config import vendor_address
    from drivers.modbus.decode import device_plan, gaps, plan, planned_points

    chosen = gaps(config)
    requests = device_plan(config)
    minimum = len(plan(planned_points(config), config.max_registers, 65535, config.unreadable, config.max_bits))
    profile = f", profile {config.profile}" if config.profile else ""
    gap = f"max_gap {chosen.registers}" + (" derived from the line" if chosen.derived and chosen.cost else
                                           " by default over TCP" if chosen.derived else "")
    lines = [f"device {config.name}: modbus {config.endpoint}{profile}, every {config.poll_interval:g} s, "
             f"timeout {config.timeout:g} s: {_count(len(config.points), 'point')} in "
             f"{_count(len(requests), 'request')} per poll (fewest possible {minimum}; {gap})"]
    if config.transport == "rtu":
        lines.append(f"  line {config.serial_port}: {config.baudrate} baud {config.data_bits}{config.parity}"
                     f"{config.stop_bits}, turnaround {config.effective_turnaround * 1000:g} ms")
    cost = chosen.cost
    if cost is not None:
        worth = f"up to {cost.max_gap} unused registers are worth reading to save a request" if chosen.derived \
            else f"reading up to {cost.max_gap} unused registers would save a request (max_gap is set to " \
                 f"{config.max_gap})"
        seconds = sum(cost.per_request + r.count * (cost.character / 8 if r.function in ("coil", "discrete")
                                                    else cost.per_register) for r in requests)
        lines.append(f"  cost on the line: a request ~{cost.per_request * 1000:.0f} ms, a register "
                     f"~{cost.per_register * 1000:.1f} ms: {worth}; this plan ~{seconds * 1000:.0f} ms a poll")
    for request in requests:
        first, last = request.address, request.address + request.count - 1
        unit = "bit" if request.function in ("coil", "discrete") else "register"
        used = sum(p.register_count for p in request.points if p.bit is None) + \
            len({p.address for p in request.points if p.bit is not None})
        unused = f", {request.count - used} unused" if request.count > used else ""
        lines.append(f"  FC{request.function_code:02d} {_SPACE[request.function]} {first}..{last} "
                     f"({vendor_address(request.function, first)}..{vendor_address(request.function, last)}), "
                     f"{_count(request.count, unit)}{unused}")
        for point in request.points:
            scale = f" x{point.scale:g}" if point.scale != 1 else ""
            if point.scaled_by_register:  # the exponent read in the same poll
                scale = f" x10^{point.scale_from or point.scale_register}{scale}"
            if point.carry_register is not None:  # the roll-over counter read in the same poll
                scale = f" +carry({point.carry_register})x{point.carry_factor:g}{scale}"
            offset = f" {point.offset:+g}" if point.offset else ""
            kind = point.type + (f"[{point.count}]" if point.type == "string" else "") + \
                (f" bit {point.bit}" if point.bit is not None else "")
            order = f" {point.word_order}" if point.type != "bool" else ""
            lines.append(f"    {point.name:<24} address {point.address:>5} "
                         f"({vendor_address(point.function, point.address)}) {kind:<7}{order}{scale}{offset} "
                         f"{point.unit or ''}".rstrip())
    return lines


_SPACE = {"coil": "coils", "discrete": "discrete inputs", "holding": "holding registers", "input": "input registers"}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
