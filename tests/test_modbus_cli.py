"""`edge-agent modbus read|scan|poll` as a technician runs them, against real servers: TCP, and RTU on a
pseudo-terminal (the CLI runs as its own process and opens the serial device through pyserial)."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from drivers.modbus.cli import format_registers, parse_units
from drivers.modbus.simulator import PtyLink, SimServer
from tests.conftest import FixedRegisters, edge_agent

pytestmark = pytest.mark.timeout(60)


def f32(value: float) -> list[int]:
    return list(struct.unpack(">2H", struct.pack(">f", value)))


async def cli(*args: str) -> tuple[int, str, str]:
    return await edge_agent("modbus", *args, timeout=30)


def plant() -> dict[int, FixedRegisters]:
    return {1: FixedRegisters(inputs=f32(229.8) + f32(12.5), coils=[True, False, True]),
            7: FixedRegisters(holding=[0x4C53, 0x2045])}


@pytest.fixture
async def tcp_server() -> AsyncIterator[SimServer]:
    async with SimServer(plant(), update_interval=None) as server:
        yield server


@pytest.fixture
def pty_link() -> Iterator[PtyLink]:
    with PtyLink() as link:
        yield link


async def test_read_shows_every_interpretation_with_both_numberings(tcp_server: SimServer) -> None:
    code, out, err = await cli("read", "--host", "127.0.0.1", "--port", str(tcp_server.port), "--vendor", "30001",
                               "--count", "4")
    assert code == 0, err
    first = out.splitlines()[1].split()
    assert first[:5] == ["0", "30001", "0x4365", "17253", "17253"]
    assert "229.8" in out.splitlines()[1] and "12.5" in out.splitlines()[3]  # float32 ABCD at 0 and at 2


async def test_read_takes_vendor_numbers_with_leading_zeros(tcp_server: SimServer) -> None:
    code, out, err = await cli("read", "--host", "127.0.0.1", "--port", str(tcp_server.port), "--vendor", "00001",
                               "--count", "3")
    assert code == 0, err
    assert [line.split() for line in out.splitlines()[1:]] == [["0", "1", "1"], ["1", "2", "0"], ["2", "3", "1"]]


async def test_scan_finds_the_units_on_a_serial_line(pty_link: PtyLink) -> None:
    async with SimServer(plant(), serial_port=pty_link.server_path, update_interval=None):
        code, out, err = await cli("scan", "--serial-port", pty_link.client_path, "--units", "1-8",
                                   "--timeout", "0.1", "--function", "input")
    assert code == 0, err
    assert "unit   1: answers (input 0 = 17253)" in out
    assert "unit   7: answers (exception 1, illegal function" in out  # present, but has no input registers
    assert "2 of 8 unit id(s) answered on serial " in out


async def test_poll_prints_a_table_through_a_config_entry(tcp_server: SimServer, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f"""
[gateway]
id = "gw"
site = "s"
[[devices]]
name = "main"
driver = "modbus"
host = "127.0.0.1"
port = {tcp_server.port}
points = [
  {{ name = "voltage", function = "input", address = 0, type = "float32", unit = "V" }},
  {{ name = "current", function = "input", address = 2, type = "float32", unit = "A" }},
  {{ name = "missing", function = "input", address = 50, type = "uint16" }},
]
""", encoding="utf-8")
    code, out, err = await cli("poll", "--config", str(config), "--device", "main")
    assert code == 1, (out, err)  # one point bad
    lines = out.splitlines()
    assert lines[1].split() == ["voltage", "229.8", "V", "good"]
    assert lines[2].split() == ["current", "12.5", "A", "good"]
    assert "bad: the meter refuses it: Modbus exception 2 (illegal data address) for FC04 50 (30051)" in lines[3]
    assert "3 points from tcp 127.0.0.1" in out and "1 bad" in out


@pytest.mark.parametrize(("args", "message"), [
    (("read", "--host", "127.0.0.1", "--port", "1", "--function", "holding", "0"), "connection refused|cannot connect"),
    (("read", "--serial-port", "/dev/ttyNOPE0", "--function", "holding", "0"), "no such serial device"),
    (("read", "--host", "127.0.0.1", "0"), "say which register space"),
    (("poll", "--profile", "eastron_sdm360", "--host", "127.0.0.1"), "did you mean 'eastron_sdm630'"),
])
async def test_errors_say_what_to_do(args: tuple[str, ...], message: str) -> None:
    import re

    code, out, err = await cli(*args)
    assert code in (1, 2), (code, out, err)
    assert re.search(message, err), err
    assert "Traceback" not in err


async def test_a_unit_that_does_not_answer_times_out_with_advice(pty_link: PtyLink) -> None:
    async with SimServer(plant(), serial_port=pty_link.server_path, update_interval=None):
        code, _, err = await cli("read", "--serial-port", pty_link.client_path, "--unit", "9", "--timeout", "0.2",
                                 "--function", "holding", "0")
    assert code == 1
    assert "no answer from serial" in err and "within 0.2 s" in err


@pytest.mark.parametrize("command", [("read", "--function", "holding", "0", "--count", "2"), ("sunspec-scan",)])
async def test_a_closed_connection_is_said_as_such_not_as_no_answer(command: tuple[str, ...]) -> None:
    """The tools say what the line says (drivers/modbus/line.py `failure`): a device that closes the connection
    at the request is not a unit that does not answer."""
    from tests.test_modbus_framing import MisbehavingDevice

    device = MisbehavingDevice()
    device.mode = "close"
    port = await device.start()
    try:
        code, _, err = await cli(*command, "--host", "127.0.0.1", "--port", str(port), "--timeout", "2")
    finally:
        await device.stop()
    assert code == 1
    assert f"tcp 127.0.0.1:{port} unit 1: the device closed the connection during FC03 " in err, err
    assert "no answer" not in err and "check the unit id" not in err, err


def test_units_and_the_register_table() -> None:
    assert parse_units("1-3,7") == [1, 2, 3, 7]
    with pytest.raises(ValueError):
        parse_units("250-260")
    table = format_registers("holding", 99, [0x4365, 0xCCCD])
    assert "  99   40100  0x4365" in table and "229.8" in table
