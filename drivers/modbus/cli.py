"""`edge-agent modbus ...`: the technician's tools, for the hour at the meter with a laptop.

- `read`: a range of registers (or bits), printed every way it could be meant: hex, uint16, int16, and for
  each pair of registers int32/uint32/float32 in the four word orders, plus the text, so the right
  interpretation is visible at a glance.
- `scan`: which unit ids answer on a serial line or behind a TCP gateway, with a progress bar.
- `poll`: one device polled once through its config entry or a profile, as a table.
- `sunspec-scan`: finds the SunSpec marker, lists the models of an inverter, meter or battery and writes
  their `[[devices]]` entries (drivers/modbus/sunspec.py).

They use the agent's own line and driver code, read only, and say what to do about the usual faults:
a busy port, permission denied on the serial device, connection refused, timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import struct
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent modbus", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    read = commands.add_parser("read", help="read registers and print them decoded every way")
    _line_options(read)
    read.add_argument("--unit", type=int, default=1, help="unit id (default 1)")
    read.add_argument("--function", choices=("holding", "input", "coil", "discrete"),
                      help="register space; not needed with a 5- or 6-digit vendor number such as 40001")
    read.add_argument("address", help="0-based address, or a vendor number (30001, 40101) with --vendor")
    read.add_argument("--count", type=int, default=10, help="registers (or bits) to read (default 10)")
    read.add_argument("--vendor", action="store_true",
                      help="the address is a vendor number: 30001 = input register 0, 40001 = holding register 0")
    read.set_defaults(handler=_cmd_read)

    scan = commands.add_parser("scan", help="find the unit ids that answer")
    _line_options(scan)
    scan.add_argument("--units", default="1-247", help="unit ids to try, e.g. 1-247 or 1,2,5-9 (default 1-247)")
    scan.add_argument("--function", choices=("holding", "input"), default="holding",
                      help="what to ask each unit for (default holding)")
    scan.add_argument("--address", type=int, default=0, help="0-based address to read (default 0)")
    scan.set_defaults(handler=_cmd_scan)

    poll = commands.add_parser("poll", help="poll one device once and print point, value, unit, quality")
    poll.add_argument("--config", "-c", type=Path, help="the agent's config file")
    poll.add_argument("--device", help="with --config: the device's name")
    poll.add_argument("--profile", help="without --config: a shipped profile (docs/profiles.md)")
    _line_options(poll, required=False)
    poll.add_argument("--unit", type=int, default=1, help="with --profile: unit id (default 1)")
    poll.set_defaults(handler=_cmd_poll)

    sunspec = commands.add_parser("sunspec-scan", help="find a SunSpec device's models and write its config")
    _line_options(sunspec)
    sunspec.add_argument("--unit", type=int, default=1, help="unit id (default 1)")
    sunspec.add_argument("--base", type=int, action="append",
                         help="holding register of the \"SunS\" marker (default: try 40000, 0, 50000)")
    sunspec.add_argument("--device-name", default="sunspec",
                         help="device name prefix in the config written (default sunspec: sunspec-inverter, ...)")
    sunspec.add_argument("--write-config", type=Path, metavar="FILE",
                         help="write [[devices]] entries for the polled models to FILE ('-' for standard output)")
    sunspec.set_defaults(handler=_cmd_sunspec)

    args = parser.parse_args(argv)
    try:
        return int(args.handler(args, parser))
    except KeyboardInterrupt:
        return 130


def _line_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    where = parser.add_argument_group("the line (one of --host or --serial-port)")
    where.add_argument("--host", help="Modbus TCP device or gateway")
    where.add_argument("--port", type=int, default=502, help="TCP port (default 502)")
    where.add_argument("--rtu-over-tcp", action="store_true", help="RTU frames over TCP (a serial device server)")
    where.add_argument("--serial-port", help="serial device, e.g. /dev/ttyUSB0")
    where.add_argument("--baudrate", type=int, default=9600)
    where.add_argument("--parity", choices=("N", "E", "O"), default="N")
    where.add_argument("--stop-bits", type=int, choices=(1, 2), default=1)
    where.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for each answer (default 1)")
    parser.set_defaults(line_required=required)


def _line(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    if bool(args.host) == bool(args.serial_port):
        parser.error("give --host (Modbus TCP) or --serial-port (RTU), one of them")
    if args.serial_port:
        return {"transport": "rtu", "serial_port": args.serial_port, "baudrate": args.baudrate,
                "parity": args.parity, "stop_bits": args.stop_bits, "timeout": args.timeout}
    return {"transport": "rtu_over_tcp" if args.rtu_over_tcp else "tcp", "host": args.host, "port": args.port,
            "timeout": args.timeout}


def _device(line: dict[str, Any], unit: int, points: list[dict[str, Any]], name: str = "cli") -> Any:
    from drivers.modbus.config import ModbusDevice

    return ModbusDevice.model_validate({"name": name, "driver": "modbus", "unit_id": unit, "points": points,
                                        **line})


def _tool_line(device: Any) -> Any:
    """The device's line for a tool: a scan or a read keeps it busy on purpose, so the daemon's "busy 100 % of
    the last minute" judgement would only interrupt the tool's own output."""
    from drivers.modbus import line as lines

    link = lines.acquire(device)
    link.watch_saturation = False
    return link


async def _ask(link: Any, device: Any, function: str, address: int, count: int) -> Any:
    """One read on the tool's line. A failure is a `DeviceError` in the driver's words (`line.failure`): no
    answer, a reply that was not the request's, or a lost connection, never all of them as "no answer"."""
    from pymodbus.exceptions import ModbusException

    from agent.errors import DeviceError
    from drivers.modbus import line as lines
    from drivers.modbus.config import FUNCTION_CODE
    from drivers.modbus.driver import READ_METHOD

    async def call(client: Any) -> Any:
        return await getattr(client, READ_METHOD[function])(address, count=count, device_id=device.unit_id)

    try:
        return await link.request(call, device.timeout)
    except ModbusException as exc:
        raise DeviceError(lines.failure(exc, device.endpoint, FUNCTION_CODE[function], address, count,
                                        device.timeout)) from exc


def _silent(exc: BaseException) -> bool:
    """Whether a failed read got no valid answer (as opposed to a port or connection that failed)."""
    from drivers.modbus.transport import NoAnswer

    return isinstance(exc.__cause__, NoAnswer)


# --- read ------------------------------------------------------------------------------------------------

def _cmd_read(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from drivers.modbus.config import MAX_BITS_PER_READ, MAX_REGISTERS_PER_READ
    from drivers.modbus.profiles import modicon

    line = _line(args, parser)
    try:
        # Vendor numbers are decimal and may be written with leading zeros (00001 = coil 0); 0x10 works too.
        number = int(args.address, 10 if args.vendor else 0)
    except ValueError:
        try:
            number = int(args.address, 0)
        except ValueError:
            parser.error(f"address must be a number, got {args.address!r}")
    if args.vendor:
        try:
            function, address = modicon(number)
        except ValueError as exc:
            parser.error(str(exc))
        if args.function and args.function != function:
            parser.error(f"{number} is a {function} in vendor numbering, not a {args.function}")
    else:
        if args.function is None:
            hint = " (or --vendor, if 40001-style)" if number >= 10001 else ""
            parser.error(f"say which register space: --function holding|input|coil|discrete{hint}")
        function, address = args.function, number
    limit = MAX_BITS_PER_READ if function in ("coil", "discrete") else MAX_REGISTERS_PER_READ
    if not 1 <= args.count <= limit or address + args.count > 65536:
        parser.error(f"--count must be 1..{limit} and stay within address 65535")
    return asyncio.run(_read(line, args.unit, function, address, args.count))


async def _read(line: dict[str, Any], unit: int, function: str, address: int, count: int) -> int:
    from agent.errors import DeviceError
    from drivers.modbus import line as lines
    from drivers.modbus.driver import EXCEPTION_NAMES

    device = _device(line, unit, [{"name": "probe", "function": "holding", "address": 0, "type": "uint16"}])
    link = _tool_line(device)
    try:
        try:
            response = await _ask(link, device, function, address, count)
        except DeviceError as exc:
            advice = "; check the unit id, the wiring (A/B swapped?), the baud rate and parity" if _silent(exc) else ""
            return _fail(f"{exc}{advice}")
    finally:
        lines.release(link, device.name)
    if response.isError():
        code = getattr(response, "exception_code", 0)
        return _fail(f"{device.endpoint} answered with Modbus exception {code} "
                     f"({EXCEPTION_NAMES.get(code, 'unknown')}): that address or count is not readable there")
    if function in ("coil", "discrete"):
        print(format_bits(function, address, response.bits[:count]))
    else:
        print(format_registers(function, address, response.registers))
    return EXIT_OK


def format_bits(function: str, address: int, bits: list[bool]) -> str:
    from drivers.modbus.config import vendor_address

    rows = [f"{'address':>7} {'vendor':>7}  value"]
    rows += [f"{address + i:>7} {vendor_address(function, address + i):>7}  {int(bit)}" for i, bit in enumerate(bits)]
    return "\n".join(rows)


def format_registers(function: str, address: int, registers: list[int]) -> str:
    """One row per register (hex, uint16, int16, bits as text) and, for each pair starting there, the
    32-bit readings in the four word orders; float32 shown only where it is a plausible number."""
    from drivers.modbus.config import vendor_address

    header = (f"{'address':>7} {'vendor':>7}  {'hex':>6} {'uint16':>6} {'int16':>6} {'text':>4}  |  32-bit from here: "
              f"{'uint32 ABCD':>11} {'int32 ABCD':>11} {'float32 ABCD':>13} {'float32 CDAB':>13} "
              f"{'float32 BADC':>13} {'float32 DCBA':>13} {'uint32 CDAB':>11}")
    rows = [header]
    for i, register in enumerate(registers):
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in register.to_bytes(2, "big"))
        row = (f"{address + i:>7} {vendor_address(function, address + i):>7}  0x{register:04X} {register:>6} "
               f"{register - 65536 if register >= 32768 else register:>6} {text:>4}  |  ")
        if i + 1 < len(registers):
            pair = registers[i:i + 2]
            abcd = struct.pack(">2H", *pair)
            cdab = struct.pack(">2H", pair[1], pair[0])
            badc = bytes((abcd[1], abcd[0], abcd[3], abcd[2]))
            dcba = abcd[::-1]
            row += (f"{struct.unpack('>I', abcd)[0]:>29} {struct.unpack('>i', abcd)[0]:>11} "
                    f"{_float(abcd):>13} {_float(cdab):>13} {_float(badc):>13} {_float(dcba):>13} "
                    f"{struct.unpack('>I', cdab)[0]:>11}")
        rows.append(row.rstrip(" |"))
    return "\n".join(rows)


def _float(data: bytes) -> str:
    from drivers.modbus.decode import shortest_float32

    value = struct.unpack(">f", data)[0]
    if not math.isfinite(value):
        return "nan" if value != value else "inf"
    if value != 0 and not 1e-6 <= abs(value) <= 1e12:
        return "-"  # denormal or absurd: not this interpretation
    return f"{shortest_float32(value):.7g}"


# --- scan ------------------------------------------------------------------------------------------------

def parse_units(text: str) -> list[int]:
    units: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        low, high = int(first), int(last or first)
        if not 0 <= low <= high <= 255:
            raise ValueError(f"unit ids are 0..255, got {part!r}")
        units.extend(range(low, high + 1))
    return units


def _cmd_scan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    line = _line(args, parser)
    try:
        units = parse_units(args.units)
    except ValueError as exc:
        parser.error(f"--units: {exc}")
    return asyncio.run(_scan(line, units, args.function, args.address))


async def _scan(line: dict[str, Any], units: list[int], function: str, address: int) -> int:
    from agent.errors import DeviceError
    from drivers.modbus import line as lines
    from drivers.modbus.driver import EXCEPTION_NAMES, READ_METHOD

    device = _device(line, units[0], [{"name": "probe", "function": "holding", "address": 0, "type": "uint16"}])
    link = _tool_line(device)
    found: list[str] = []
    started = time.monotonic()
    try:
        for done, unit in enumerate(units, 1):
            async def call(client: Any, unit: int = unit) -> Any:
                return await getattr(client, READ_METHOD[function])(address, count=1, device_id=unit)

            try:
                response = await link.request(call, device.timeout)
            except DeviceError as exc:
                _progress_done()
                return _fail(str(exc))
            except Exception:  # noqa: BLE001 - no answer from this unit id: the scan goes on
                result = None
            else:
                if response.isError():
                    code = getattr(response, "exception_code", 0)
                    # 0x0A/0x0B come from a gateway: the unit itself did not answer.
                    result = None if code in (10, 11) else \
                        f"answers (exception {code}, {EXCEPTION_NAMES.get(code, 'unknown')}, at {function} {address})"
                else:
                    result = f"answers ({function} {address} = {response.registers[0]})"
            if result is not None:
                found.append(f"unit {unit:>3}: {result}")
                _progress_line(f"unit {unit:>3}: {result}")
            _progress(done, len(units), unit, len(found), time.monotonic() - started)
    finally:
        lines.release(link, device.name)
        _progress_done()
    print(f"{len(found)} of {len(units)} unit id(s) answered on {device.line_key}")
    return EXIT_OK if found else EXIT_FAILED


def _progress(done: int, total: int, unit: int, found: int, elapsed: float) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} unit {unit}, {found} found, "
                     f"{elapsed:.0f} s ")
    sys.stderr.flush()


def _progress_line(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    print(text, flush=True)


def _progress_done() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()


# --- poll ------------------------------------------------------------------------------------------------

def _cmd_poll(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from agent.errors import EX_CONFIG, ConfigError

    if args.config:
        if not args.device:
            parser.error("with --config, say which device: --device NAME")
        from agent.config import load_config

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(exc.render(), file=sys.stderr)
            return EX_CONFIG
        matches = [d for d in config.devices if d.name == args.device]
        if not matches or matches[0].driver != "modbus":
            names = ", ".join(d.name for d in config.devices if d.driver == "modbus")
            parser.error(f"no Modbus device {args.device!r} in {args.config}; there are: {names}")
        device = matches[0]
    elif args.profile:
        from drivers.modbus.profiles import expand_profile

        raw = {"name": args.profile.replace("_", "-")[:60], "driver": "modbus", "unit_id": args.unit,
               "profile": args.profile, **_line(args, parser)}
        raw, problems = expand_profile(raw)
        if problems:
            parser.error("; ".join(f"{where}: {message}" for where, message in problems))
        device = _device({k: v for k, v in raw.items() if k not in ("name", "driver", "unit_id", "points")},
                         args.unit, raw["points"], raw["name"])
    else:
        parser.error("give --config and --device, or --profile with --host/--serial-port")
    return asyncio.run(_poll(device))


async def _poll(device: Any) -> int:
    from agent.errors import DeviceError
    from agent.model import Quality
    from drivers.modbus.driver import ModbusDriver

    driver = ModbusDriver(device)  # inside the event loop: it takes its line now
    link = driver.link()
    if link is not None:
        link.watch_saturation = False  # see _tool_line
    started = time.monotonic()
    try:
        readings = await driver.poll()
    except DeviceError as exc:
        return _fail(str(exc))
    finally:
        await driver.close()
    elapsed = time.monotonic() - started
    width = max(len(r.point) for r in readings)
    print(f"{'point':<{width}}  {'value':>16}  {'unit':<6} quality")
    for reading in readings:
        value = "-" if reading.value is None else str(reading.value)
        quality = reading.quality.value + (f": {reading.reason}" if reading.quality is not Quality.GOOD else "")
        print(f"{reading.point:<{width}}  {value:>16}  {reading.unit or '':<6} {quality}")
    bad = sum(1 for r in readings if r.quality is not Quality.GOOD)
    # What went on the wire, bisection of a refused request included, not what the plan says.
    sent = driver.sent_last_poll
    planned = "" if sent == len(driver.base) == len(driver.requests) else \
        f" (planned {len(driver.base)}; the meter refused part of it: {len(driver.requests)} per poll from now on)"
    print(f"{len(readings)} points from {device.endpoint} in {sent} request(s){planned}, "
          f"{elapsed * 1000:.0f} ms; {bad} bad")
    return EXIT_OK if bad == 0 else EXIT_FAILED


# --- sunspec-scan ----------------------------------------------------------------------------------------

def _cmd_sunspec(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from agent.names import _name_problem  # the rule device names follow

    line = _line(args, parser)
    bases = args.base or None
    if bases and not all(0 <= b <= 65533 for b in bases):
        parser.error("--base must be 0..65533")
    problem = _name_problem(f"{args.device_name}-inverter-1")
    if problem:
        parser.error(f"--device-name: {problem}")
    code, text, devices = asyncio.run(_sunspec(line, args.unit, bases, args.device_name))
    if text is not None and args.write_config is not None:
        if str(args.write_config) == "-":
            print(text, end="")
        else:
            args.write_config.write_text(text, encoding="utf-8")
            print(f"wrote {devices} device(s) to {args.write_config}", file=sys.stderr)
    return code


async def _sunspec(line: dict[str, Any], unit: int, bases: list[int] | None,
                   device_name: str) -> tuple[int, str | None, int]:
    """Walks the model chain and prints it: (exit code, the config snippet, devices in it)."""
    from agent.errors import DeviceError
    from drivers.modbus import line as lines
    from drivers.modbus import sunspec

    device = _device(line, unit, [{"name": "probe", "function": "holding", "address": 0, "type": "uint16"}])
    link = _tool_line(device)

    async def read(address: int, count: int) -> list[int] | None:
        """Holding registers, or None for an exception answer (nothing there)."""
        out: list[int] = []
        while count > 0:
            size = min(count, 125)

            response = await _ask(link, device, "holding", address, size)
            if response.isError():
                return None
            out += response.registers[:size]
            address, count = address + size, count - size
        return out

    try:
        base = None
        for candidate in bases or sunspec.BASES:
            marker = await read(candidate, 2)
            if marker is not None and tuple(marker) == sunspec.MARKER:
                base = candidate
                break
        if base is None:
            tried = ", ".join(str(b) for b in bases or sunspec.BASES)
            return _fail(f"no SunSpec marker (\"SunS\", 0x53756E53) in holding register {tried} of "
                         f"{device.endpoint}; not a SunSpec device, or another unit id (try `modbus scan`)"), None, 0
        chain: list[sunspec.Found] = []
        address = base + 2
        ident: dict[str, str] = {}
        problem = ""
        while len(chain) < sunspec.MAX_MODELS:
            header = await read(address, 2) if address <= 65534 else None
            if header is None:
                problem = f"the chain breaks at holding register {address} (no model header, no end marker)"
                break
            model_id, length = header
            if model_id == sunspec.END:
                break
            if address + 2 + length > 65536:
                problem = f"model {model_id} at {address} claims {length} registers, past the last address"
                break
            found = sunspec.Found(model_id, address, length)
            chain.append(found)
            if model_id == 1:
                registers = await read(found.start, length)
                ident = sunspec.identity(registers or [])
            address = found.start + length
        else:
            problem = f"more than {sunspec.MAX_MODELS} models: the chain does not end"
    except DeviceError as exc:
        advice = "; check the host or serial settings and the unit id" if _silent(exc) else ""
        return _fail(f"{exc}{advice}"), None, 0
    finally:
        lines.release(link, device.name)
    print(f"SunSpec marker at holding register {base} of {device.endpoint}")
    if ident:
        print(f"  manufacturer {ident.get('Mn', '')!r}, model {ident.get('Md', '')!r}, serial {ident.get('SN', '')!r}, "
              f"version {ident.get('Vr', '')!r}")
    for found in chain:
        kind = sunspec.KIND.get(found.id)
        what = f"polled as {kind}: {len(sunspec.points(found)[0])} points" if kind else \
            "identity" if found.id == 1 else "not polled"
        last = found.start + found.length - 1
        print(f"  model {found.id:>5}  {sunspec.label(found.id):<40} holding {found.start}..{last}  {what}")
    if problem:
        print(f"  {problem}")
    else:
        print(f"  end of the chain at holding register {address}")
    text = sunspec.snippet(device_name, {k: v for k, v in line.items() if k != "timeout"}, unit, base, chain,
                           ident, device.line_label)
    polled = sum(1 for f in chain if f.id in sunspec.KIND)
    return (EXIT_FAILED if problem and not chain else EXIT_OK), text, polled


def _fail(message: str) -> int:
    print(f"edge-agent modbus: {message}", file=sys.stderr)
    return EXIT_FAILED
