"""SunSpec checked by a second implementation: pysunspec2's own Modbus TCP client (the SunSpec Alliance's
reference code, with its own socket code, not pymodbus) reads the same simulated device as
`edge-agent modbus sunspec-scan` and the driver, and both must find the same models and the same values.

Our simulator and our driver are both ours and can share a wrong assumption (an offset, a scale register,
a "not implemented" value) that tests/test_sunspec.py would never see. pysunspec2 shares neither: it finds
the models itself, places each point by its own reading of the model definitions and scales with its own
code. Where the agent differs on purpose, this file says so:

- units: the agent sends kW, kWh, kvar, ... and a power factor of -1..1 (docs/profiles.md); SunSpec says W,
  Wh, var and percent;
- a value whose scale factor is "not implemented" (0x8000): pysunspec2 hands back the raw number unscaled
  (`device.Point.get_value` skips a missing exponent); the agent sends it bad, as docs/profiles.md promises.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from agent.config import load_config
from agent.model import Quality, Reading
from drivers.modbus.simulator import SimServer
from tests.sunspec_simulator import SunSpecDevice
from tests.test_sunspec import GATEWAY, cli, plant, poll

pytestmark = pytest.mark.timeout(60)

# SunSpec's unit -> (unit the agent sends, factor), from docs/profiles.md "Solar inverters and SunSpec";
# written out here rather than taken from drivers/modbus/sunspec.py, so that a change there shows up.
SENT_AS = {"W": ("kW", 0.001), "VA": ("kVA", 0.001), "var": ("kvar", 0.001), "Wh": ("kWh", 0.001),
           "VAh": ("kVAh", 0.001), "varh": ("kvarh", 0.001), "C": ("°C", 1.0), "Secs": ("s", 1.0)}
NOT_POLLED = {"string", "sunssf", "pad"}  # text, exponents (read, not sent) and filler


@dataclass(frozen=True)
class TheirPoint:
    """One point as pysunspec2 read it."""

    model: int
    name: str  # module1.DCW for a point in a repeating block
    type: str
    units: str | None
    value: int | float | str | None  # None: "not implemented"
    cvalue: int | float | str | None  # scaled with its *_SF
    sf_missing: bool  # it has a scale factor register and that register says "not implemented"


@dataclass(frozen=True)
class TheirScan:
    base: int
    chain: list[tuple[int, int, int]]  # (model id, first register after the header, last register)
    points: dict[int, TheirPoint]  # by holding register
    errors: list[str]


def pysunspec2_scan(port: int) -> TheirScan:
    """Blocking: pysunspec2 scans the device on 127.0.0.1:`port`, unit 1, and reads every model in full."""
    device = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=port, timeout=5)
    try:
        device.scan()
    finally:
        device.disconnect()  # scan() leaves its socket open when it fails half-way
    chain, points, errors = [], {}, []
    for model in device.model_list:
        chain.append((model.model_id, model.model_addr + 2, model.model_addr + 1 + model.model_len))
        if model.error_info:
            errors.append(f"model {model.model_id}: {model.error_info.strip()}")
        blocks = [("", model)]
        for name, groups in model.groups.items():
            for index, group in enumerate(groups if isinstance(groups, list) else [groups]):
                blocks.append((f"{name}{index + 1}.", group))
        for prefix, block in blocks:
            for name, point in block.points.items():
                sf_name = point.pdef.get("sf")
                sf_point = (block.points.get(sf_name) or model.points.get(sf_name)) if isinstance(sf_name, str) \
                    else None
                points[model.model_addr + point.offset] = TheirPoint(
                    model.model_id, prefix + name, point.pdef["type"], point.pdef.get("units"), point.value,
                    point.cvalue, sf_point is not None and sf_point.value is None)
    return TheirScan(device.base_addr, chain, points, errors)


def every_register_filled(seed: int) -> SunSpecDevice:
    """The plant's models with every point set to some value of its type (fixed seed) and every scale factor
    to -3..3: every point's address, size, sign and scale register is looked at, not only the plant's few."""
    rng = random.Random(seed)
    device = SunSpecDevice([1, 103, 160, 203], repeats={160: 2})
    for (model_id, name), register in device.points.items():
        if model_id == 1 or register.type in ("string", "pad"):
            continue
        if register.type == "sunssf":
            device.set(model_id, name, rng.randint(-3, 3))
        else:
            device.set(model_id, name, rng.randrange(1 << (16 * register.size)))
    return device


def nothing_implemented() -> SunSpecDevice:
    """Every point at the simulator's "not implemented" value: each must be "not implemented" to pysunspec2
    too, and bad in the agent."""
    device = SunSpecDevice([1, 103, 160, 203], repeats={160: 2})
    device.set(1, "Mn", "Acme Solar")
    return device


DEVICES: dict[str, Callable[[], SunSpecDevice]] = {
    "plant": plant, "every register filled": lambda: every_register_filled(160203),
    "nothing implemented": nothing_implemented}


@pytest.mark.parametrize("make", DEVICES.values(), ids=DEVICES.keys())
async def test_pysunspec2_finds_the_same_models_and_values_as_the_scan_and_the_driver(
        make: Callable[[], SunSpecDevice], tmp_path: Path) -> None:
    device = make()
    snippet = tmp_path / "sunspec.toml"
    async with SimServer({1: device}, update_interval=None) as server:
        code, out, err = await cli("modbus", "sunspec-scan", "--host", "127.0.0.1", "--port", str(server.port),
                                   "--write-config", str(snippet))
        assert code == 0, err
        # pysunspec2 blocks on its socket: in a thread, so that this loop's server can answer it. Its socket
        # timeout (5 s) ends the thread even if the deadline here has already given up on it.
        async with asyncio.timeout(30):
            theirs = await asyncio.to_thread(pysunspec2_scan, server.port)
        config = tmp_path / "config.toml"
        config.write_text(GATEWAY + snippet.read_text("utf-8"), encoding="utf-8")
        devices = load_config(config).devices
        readings = [await poll(d) for d in devices]

    assert theirs.errors == []
    marker = re.search(r"SunSpec marker at holding register (\d+)", out)
    assert marker is not None and int(marker[1]) == theirs.base
    ours = [(int(m[1]), int(m[2]), int(m[3])) for m in re.finditer(r"^ +model +(\d+) .* holding (\d+)\.\.(\d+)",
                                                                    out, re.MULTILINE)]
    assert ours == theirs.chain

    compared: set[int] = set()
    for entry, polled in zip(devices, readings, strict=True):
        for point in entry.points:
            theirs_point = theirs.points.get(point.address)
            assert theirs_point is not None, f"{entry.name}.{point.name}: no SunSpec point starts at {point.address}"
            compare(f"{entry.name}.{point.name} ({theirs_point.model} {theirs_point.name})", polled[point.name],
                    theirs_point)
            compared.add(point.address)
    # And nothing pysunspec2 reads as a number in a polled model is left out of the agent's config.
    polled_models = {model for model, _, _ in theirs.chain if model != 1}
    numbers = {address for address, p in theirs.points.items()
               if p.model in polled_models and p.type not in NOT_POLLED and p.name not in ("ID", "L")}
    assert [f"{theirs.points[a].model} {theirs.points[a].name}" for a in sorted(numbers - compared)] == []


def compare(what: str, reading: Reading, theirs: TheirPoint) -> None:
    if theirs.value is None:
        assert reading.quality is Quality.BAD, f"{what}: pysunspec2 says not implemented, the agent sent " \
                                               f"{reading.value!r}"
        return
    if theirs.sf_missing:
        assert reading.quality is Quality.BAD and "scale factor" in (reading.reason or ""), \
            f"{what}: its scale factor is not implemented, the agent sent {reading.value!r} ({reading.reason})"
        return
    assert reading.quality is Quality.GOOD, f"{what}: pysunspec2 read {theirs.cvalue!r}, the agent: {reading.reason}"
    unit, factor = SENT_AS.get(theirs.units or "", (theirs.units, 1.0))
    if theirs.units == "Pct" and theirs.name.rsplit(".")[-1].startswith("PF"):
        unit, factor = None, 0.01
    assert isinstance(theirs.cvalue, int | float) and isinstance(reading.value, int | float)
    assert math.isclose(reading.value, theirs.cvalue * factor, rel_tol=1e-9, abs_tol=1e-12), \
        f"{what}: pysunspec2 {theirs.cvalue} {theirs.units}, the agent {reading.value} {reading.unit}"
    assert reading.unit == unit, f"{what}: SunSpec unit {theirs.units}, the agent sends {reading.unit}"
