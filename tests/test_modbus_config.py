"""Modbus device entries a technician can get wrong, each named with its dotted path; and the rules for
devices that share one line."""

from __future__ import annotations

import pytest

from agent.config import parse_config
from agent.errors import ConfigError

GATEWAY = '[gateway]\nid = "gw-1"\nsite = "plant-a"\n'
TCP = 'host = "10.0.0.5"\n'
SERIAL = 'transport = "rtu"\nserial_port = "/dev/ttyUSB0"\n'


def entry(points: str, line: str = TCP, name: str = "m1", extra: str = "") -> str:
    return f'[[devices]]\nname = "{name}"\ndriver = "modbus"\n{line}{extra}points = [{points}]\n'


def problems_of(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(GATEWAY + text, source="case.toml")
    return [(p.where, p.message) for p in caught.value.problems]


CASES = [
    ("a 32-bit type with a count of 1",
     entry('{ name = "p", function = "input", address = 0, type = "float32", count = 1 }'),
     "devices[0].points[0]", "a float32 spans 2 register(s); count = 1 contradicts it"),
    ("an address beyond 65535",
     entry('{ name = "p", function = "input", address = 65536, type = "uint16" }'),
     "devices[0].points[0].address", "less than or equal to 65535"),
    ("a value running past 65535",
     entry('{ name = "p", function = "input", address = 65535, type = "uint32" }'),
     "devices[0].points[0].address", "runs past the last address 65535"),
    ("a string with no length",
     entry('{ name = "p", function = "holding", address = 0, type = "string" }'),
     "devices[0].points[0]", "a string needs its length: count ="),
    ("two points overlapping",
     entry('{ name = "a", function = "input", address = 0, type = "float32" }, '
           '{ name = "b", function = "input", address = 1, type = "uint16" }'),
     "devices[0].points[1].address", "overlaps points[0] ('a') at input register 1"),
    ("a bit claimed twice",
     entry('{ name = "a", function = "holding", address = 7, type = "bool", bit = 2 }, '
           '{ name = "b", function = "holding", address = 7, type = "bool", bit = 2 }'),
     "devices[0].points[1].bit", "bit 2 of holding register 7 is already points[0]"),
    ("a number on a register used for bits",
     entry('{ name = "a", function = "holding", address = 7, type = "bool", bit = 2 }, '
           '{ name = "b", function = "holding", address = 7, type = "uint16" }'),
     "devices[0].points[1].address", "overlaps bit points at holding register 7"),
    ("a coil with a numeric type",
     entry('{ name = "p", function = "coil", address = 0, type = "float32" }'),
     "devices[0].points[0]", 'type must be "bool"'),
    ("a bool in a register without its bit",
     entry('{ name = "p", function = "holding", address = 0, type = "bool" }'),
     "devices[0].points[0]", "needs `bit` (0-15)"),
    ("scale on a string",
     entry('{ name = "p", function = "holding", address = 0, type = "string", count = 4, scale = 0.1 }'),
     "devices[0].points[0]", "scale and offset apply to numbers"),
    ("rtu without a serial port",
     entry('{ name = "p", function = "input", address = 0, type = "uint16" }', line='transport = "rtu"\n'),
     "devices[0]", 'transport "rtu" needs serial_port'),
    ("tcp with a serial port",
     entry('{ name = "p", function = "input", address = 0, type = "uint16" }',
           line=TCP + 'serial_port = "/dev/ttyUSB0"\n'),
     "devices[0]", 'serial_port is for transport "rtu"'),
    ("an unknown parity",
     entry('{ name = "p", function = "input", address = 0, type = "uint16" }', line=SERIAL + 'parity = "X"\n'),
     "devices[0].parity", "'N', 'E' or 'O'"),
    ("a point inside a range declared unreadable",
     entry('{ name = "p", function = "input", address = 10, type = "uint16" }',
           extra='unreadable = [{ function = "input", first = 5, last = 20 }]\n'),
     "devices[0].points[0].address", "lies in a range declared unreadable (5..20)"),
    ("no points and no profile", entry(""), "devices[0]", "no points: give `points`, or a `profile`"),
    ("a request limit above the protocol's",
     entry('{ name = "p", function = "input", address = 0, type = "uint16" }', extra="max_registers = 126\n"),
     "devices[0].max_registers", "less than or equal to 125"),
    ("a misspelt key in a point",
     entry('{ name = "p", function = "input", address = 0, type = "uint16", wordorder = "CDAB" }'),
     "devices[0].points[0].wordorder", "unknown key; did you mean 'word_order'?"),
    ("not_available that is not a list",
     entry('{ name = "p", function = "input", address = 0, type = "uint16", not_available = 65535 }'),
     "devices[0].points[0].not_available", "Input should be a valid list (got 65535)"),
]


@pytest.mark.parametrize(("text", "where", "fragment"), [pytest.param(t, w, f, id=n) for n, t, w, f in CASES])
def test_a_bad_modbus_entry_is_named_with_its_path(text: str, where: str, fragment: str) -> None:
    problems = problems_of(text)
    assert [w for w, _ in problems] == [where], problems
    assert fragment in problems[0][1], problems


POINT = '{ name = "p", function = "input", address = 0, type = "uint16" }'


def test_devices_on_one_serial_line_must_agree_on_its_settings() -> None:
    text = entry(POINT, SERIAL, "m1") + entry(POINT, SERIAL + "baudrate = 19200\n", "m2")
    [(where, message)] = problems_of(text)
    assert where == "devices[1].baudrate"
    assert "serial /dev/ttyUSB0 is one line, shared with devices[0] ('m1'), which sets baudrate = 9600" in message


def test_one_endpoint_cannot_be_both_tcp_and_rtu_over_tcp() -> None:
    text = entry(POINT, TCP, "m1") + entry(POINT, TCP + 'transport = "rtu_over_tcp"\n', "m2")
    [(where, message)] = problems_of(text)
    assert where == "devices[1].transport" and "shared with devices[0]" in message


def test_many_units_on_one_line_with_different_intervals_and_timeouts_are_fine() -> None:
    text = "".join(entry(POINT, SERIAL + f'unit_id = {unit}\npoll_interval = "{unit}s"\ntimeout = "{unit}00ms"\n',
                         f"m{unit}") for unit in range(1, 6))
    config = parse_config(GATEWAY + text, source="case.toml")
    assert {d.line_key for d in config.devices} == {"serial /dev/ttyUSB0"}
    assert [d.effective_turnaround for d in config.devices] == [0.02] * 5


def test_serial_settings_on_a_tcp_device_are_refused() -> None:
    [(where, message)] = problems_of(entry(POINT, TCP + "baudrate = 19200\n"))
    assert where == "devices[0]" and 'baudrate: serial line settings, but transport is "tcp"' in message


def test_two_tcp_devices_on_one_endpoint_disagreeing_on_turnaround_name_it() -> None:
    text = entry(POINT, TCP, "m1") + entry(POINT, TCP + 'turnaround = "50ms"\n', "m2")
    [(where, message)] = problems_of(text)
    assert where == "devices[1].turnaround" and "which sets turnaround = None" in message


def test_rtu_over_tcp_shows_its_framing() -> None:
    config = parse_config(GATEWAY + entry(POINT, TCP + 'transport = "rtu_over_tcp"\nunit_id = 7\n'), source="c")
    [device] = config.devices
    assert device.endpoint == "rtu-over-tcp 10.0.0.5:502 unit 7"  # type: ignore[attr-defined]
    assert device.line_key == "tcp 10.0.0.5:502"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("function", "address", "vendor"), [
    ("coil", 0, "1"), ("coil", 9998, "9999"), ("discrete", 0, "10001"), ("input", 0, "30001"),
    ("input", 9998, "39999"), ("input", 9999, "310000"), ("holding", 100, "40101"), ("holding", 65535, "465536"),
])
def test_vendor_numbers_as_check_prints_them(function: str, address: int, vendor: str) -> None:
    from drivers.modbus.config import vendor_address
    from drivers.modbus.profiles import modicon

    assert vendor_address(function, address) == vendor
    if int(vendor) >= 10001 or function == "coil":
        assert modicon(int(vendor)) == (function, address)  # and back


def test_a_changed_point_makes_a_different_device() -> None:
    """What reload compares: an equal file gives an equal device, any change in a point a different one."""
    def device(point: str) -> object:
        return parse_config(GATEWAY + entry(point), source="case.toml").devices[0]

    plain = '{ name = "p", function = "input", address = 0, type = "uint16", not_available = [65535] }'
    assert device(plain) == device(plain)
    assert device(plain) != device(plain.replace("65535", "32768"))
    assert device(plain) != device(plain.replace("}", ", scale = 0.1 }"))
    assert device(plain) != device(plain.replace("}", ', description = "pump" }'))


def test_a_point_cannot_be_changed_after_validation() -> None:
    [point] = parse_config(GATEWAY + entry(POINT), source="case.toml").devices[0].points
    with pytest.raises(AttributeError):
        point.scale = 2.0  # type: ignore[misc]
    assert point.not_available == () and not hasattr(point, "__dict__")  # slotted: ~140 bytes a point
