"""The monitor's energy view (energy/watch.py) reads the retained live state as the agent publishes it
(energy/records.py live_payload): the first window after commissioning says how much of it is estimated."""

from __future__ import annotations

import json
from zoneinfo import ZoneInfo

from energy.records import live_payload
from energy.watch import EnergyView, meter_lines
from energy.windows import LiveDemand

SEOUL = ZoneInfo("Asia/Seoul")
START = 1_715_644_800.0  # 2024-05-14 09:00 Asia/Seoul


def view_of(live: LiveDemand) -> str:
    view = EnergyView()
    body = json.loads(live_payload(live, "gw-1", "plant-a", SEOUL, None, 500.0))
    assert view.live("gw-1", live.meter, body)
    (line,) = meter_lines(view.report("gw-1"))
    return line


def test_a_live_state_estimated_in_part_says_so() -> None:
    estimated = LiveDemand("incomer-1", START + 460, START, START + 900, 51.2, 400.0, 403.5, (), estimated_s=450.0)
    assert "projected 403.5 kW (first 450 s estimated)" in view_of(estimated)


def test_a_live_state_read_from_its_edge_says_nothing_more() -> None:
    read = LiveDemand("incomer-1", START + 460, START, START + 900, 51.2, 400.0, 403.5, ())
    line = view_of(read)
    assert line.endswith("projected 403.5 kW") and "estimated" not in line
