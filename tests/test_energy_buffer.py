"""Windows and alarm events leave through the real buffer as readings do: the same writer, gapless sequence
numbers shared with the readings, JSON that matches the documented schema, compact messages a consumer
decodes with the tables stored beside them."""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import cbor2
import jsonschema
import pytest
from energy_sim import Profile, SimMeter, poll_times, polls

from agent.compact import CborEncoder, decode_polls
from agent.payload import Encoder
from agent.writer import BufferWriter
from buffer.store import Buffer
from energy.clock import ClockState
from energy.config import EnergyPlan
from energy.stage import EnergyStage
from energy.windows import MeterSpec, window_start

SEOUL = ZoneInfo("Asia/Seoul")
T0 = datetime(2024, 5, 14, 9, 7, 30, tzinfo=SEOUL).timestamp()
SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "payload.schema.json").read_text())


@pytest.mark.parametrize("encoding", ["json", "cbor"])
async def test_windows_and_alarms_share_the_buffer_and_its_sequence_numbers(tmp_path: Path, encoding: str) -> None:
    buffer = await Buffer.open(tmp_path / "buffer.db")
    encoder = (CborEncoder if encoding == "cbor" else Encoder)("gw-1", "plant-a", buffer.buffer_id)
    writer = BufferWriter(buffer, encoder, lambda: None)
    task = asyncio.create_task(writer.run())
    try:
        spec = MeterSpec("incomer-1", "energy_active_import", resolution=0.01, max_kw=5000.0, target_kw=500.0,
                         levels_kw=(500.0,), hysteresis_kw=25.0)
        stage = EnergyStage(EnergyPlan({"incomer-1": spec}, ()), tmp_path / "energy-state.json", None,
                            writer.submit, writer.flush, clock_state=lambda: ClockState(True, True, 0.0, 0.0))
        await stage.start()
        meter = SimMeter(Profile(T0, base=450.0, ramp=0.05))  # heads over 500 kW within the hour
        for result in polls("incomer-1", meter, poll_times(T0, T0 + 3600, 5.0)):
            await stage.submit(result)
        await stage.close()
        rows = await buffer.read_after(0, 100_000)
    finally:
        task.cancel()
    assert {row.device for row in rows} == {"incomer-1", "incomer-1/demand", "incomer-1/alarm"}
    seqs = [(row.seq, row.count) for row in rows]
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(seqs))  # gapless across streams
    windows = [row for row in rows if row.device == "incomer-1/demand"]
    assert len(windows) == 3
    assert window_start(windows[0].ts - 1, 900, SEOUL) == windows[0].ts - 900
    for device in ("incomer-1/demand", "incomer-1/alarm", "incomer-1"):
        mine = [row.payload for row in rows if row.device == device]
        message = encoder.frame(device, mine)
        if encoding == "json":
            decoded = json.loads(message)
            jsonschema.validate(decoded, SCHEMA)
            polls_ = decoded["polls"]
        else:
            tables = {tid: json.loads(text) for tid, text in (await buffer.tables(device)).items()}
            polls_ = decode_polls(cbor2.loads(message), tables)
        if device == "incomer-1/demand":
            first = {r["point"]: r["value"] for r in polls_[0]["readings"]}
            start = datetime.fromisoformat(first["window_start"]).timestamp()
            assert first["energy"] == pytest.approx(meter.analytic_kwh(start, start + 900), abs=0.02)
            assert first["flags"] == ""
        if device == "incomer-1/alarm":
            assert [{r["point"]: r["value"] for r in p["readings"]}["alarm"] for p in polls_] == ["raised"]
    await buffer.close()
