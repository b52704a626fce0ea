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


def test_a_live_state_still_settling_says_when_alarms_are_decided() -> None:
    """Rounded up, as sent: 0.04 s left is not 'decided' (0), nor 'in 0 s'."""
    for settling, words in ((41.3, "alarms decided in 41 s"), (0.04, "alarms decided in 1 s")):
        live = LiveDemand("incomer-1", START + 460, START, START + 900, 51.2, 400.0, 403.5, (), settling_s=settling)
        assert view_of(live).endswith(f"projected 403.5 kW  {words}")
    raised = LiveDemand("incomer-1", START + 460, START, START + 900, 51.2, 400.0, 403.5, (400.0,), settling_s=20.0)
    assert view_of(raised).endswith("ALARM at 400 kW")  # an alarm raised before a restart stays in view
