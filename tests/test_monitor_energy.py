"""`edge-agent monitor` and the energy records, against a real mosquitto with hand-made messages: windows and
alarm events count in the gateway's sequence numbers like readings, each meter's windows are checked as a
sequence of their own (missing, duplicated, delivered twice with two values), and the latest window, the live
demand and the alarm state are shown."""

from __future__ import annotations

import time
from typing import Any

import pytest

from agent.demo.mosquitto import MosquittoProcess
from agent.monitor import Monitor
from agent.payload import iso_utc
from tests.test_monitor import BUFFER_ID, data_message, publish, run_monitor

SITE, GW = "site-1", "gw-a"
EDGE = 1_715_646_600.0  # 2024-05-14 09:30 in Seoul


def record(stream: str, seq: int, ts: float, readings: list[tuple[str, Any, str | None]]) -> tuple[str, dict]:
    body = {"schema": "edge-agent/v1", "gateway": GW, "site": SITE, "buffer_id": BUFFER_ID, "device": stream,
            "polls": [{"ts": iso_utc(ts), "readings": [
                {"seq": seq + i, "point": point, "value": value, "quality": "good", **({"unit": unit} if unit else {})}
                for i, (point, value, unit) in enumerate(readings)]}]}
    return f"edge/{SITE}/{GW}/data/{stream}", body


def window(seq: int, start: float, demand: float, flags: str = "") -> tuple[str, dict]:
    local = time.strftime("%Y-%m-%dT%H:%M:%S+09:00", time.gmtime(start + 9 * 3600))
    return record("incomer-1/demand", seq, start + 900, [
        ("window_start", local, None), ("window_s", 900, "s"), ("energy", demand / 4, "kWh"),
        ("demand", demand, "kW"), ("coverage", 1.0, None), ("longest_gap", 1.0, "s"), ("flags", flags, None)])


def alarm(seq: int, ts: float, state: str) -> tuple[str, dict]:
    return record("incomer-1/alarm", seq, ts, [("alarm", state, None), ("level", 500.0, "kW"),
                                               ("projected_demand", 512.5, "kW"), ("window_start", "x", None)])


LIVE = {"schema": "edge-agent/demand-state/v1", "gateway": GW, "site": SITE, "meter": "incomer-1", "ts": EDGE + 3000,
        "window_start": "2024-05-14T10:15:00+09:00", "window_end": "2024-05-14T10:30:00+09:00", "energy_kwh": 40.5,
        "power_kw": 520.0, "projected_kw": 512.5, "target_kw": 500.0, "alarms_kw": [500.0]}


def messages() -> list[tuple[str, Any]]:
    return [
        data_message(range(1, 5)),                    # readings of another device: seq 1..4
        window(5, EDGE, 480.0),                       # 09:30-09:45: seq 5..11
        window(12, EDGE + 900, 490.0),                # 09:45-10:00: seq 12..18
        window(12, EDGE + 900, 490.0),                # delivered again, same values: a duplicate
        window(19, EDGE + 2700, 505.0, "restart"),    # 10:15-10:30: 10:00-10:15 never comes
        alarm(26, EDGE + 2750, "raised"),             # seq 26..29
        (f"edge/{SITE}/{GW}/demand/incomer-1", LIVE),
    ]


def test_windows_count_in_the_sequence_and_are_checked_as_a_sequence_of_their_own(mosquitto: MosquittoProcess) -> None:
    with Monitor("127.0.0.1", mosquitto.port, "edge/#", gap_grace=0.0) as monitor:
        publish(mosquitto.port, messages())
        assert monitor.wait_for(lambda: bool(monitor.report().gateways) and
                                monitor.report().gateways[0].meters[:1] != () and
                                monitor.report().gateways[0].meters[0].projected_kw is not None, 5)
        report = monitor.report()
    gateway = report.gateways[0]
    # The windows' and alarm's readings are sequence numbers like any: 1..29 arrived, no gap, 7 duplicates.
    assert (gateway.readings, gateway.gaps, gateway.duplicates, gateway.invalid) == (29, 0, 7, 0)
    (meter,) = gateway.meters
    assert meter.meter == "incomer-1" and meter.windows == 3
    assert (meter.missing, meter.duplicates, meter.conflicting) == (1, 1, 0)
    assert (meter.latest_start, meter.latest_demand_kw, meter.latest_flags) == \
        ("2024-05-14T10:15:00+09:00", 505.0, "restart")
    assert (meter.alarm_events, meter.alarms_kw, meter.projected_kw, meter.live_energy_kwh) == \
        (1, (500.0,), 512.5, 40.5)
    assert not report.ok  # a window is missing


def test_the_late_window_arrives_and_a_window_with_two_values_fails_the_run(
        mosquitto: MosquittoProcess, capsys: pytest.CaptureFixture[str]) -> None:
    with Monitor("127.0.0.1", mosquitto.port, "edge/#", gap_grace=0.0) as monitor:
        publish(mosquitto.port, [*messages()[1:3], window(30, EDGE + 1800, 470.0), messages()[4]])
        assert monitor.wait_for(lambda: bool(monitor.report().gateways) and
                                monitor.report().gateways[0].meters[:1] != () and
                                monitor.report().gateways[0].meters[0].windows == 4, 5)
        meter = monitor.report().gateways[0].meters[0]
        assert meter.missing == 0 and monitor.report().gateways[0].meters[0].latest_flags == "restart"
    # The command line, as an integrator runs it: a window sent twice with two values fails the run.
    conflicting = window(40, EDGE, 999.0)
    import threading

    later = threading.Timer(1.0, publish, (mosquitto.port, [window(5, EDGE, 480.0), conflicting]))
    later.start()
    try:
        code = run_monitor(mosquitto.port, "--duration", "3", "--interval", "1", "--grace", "0.1")
    finally:
        later.join()
    out = capsys.readouterr().out
    assert code == 1, out
    assert "incomer-1 demand: windows 1 (dup 0)  CONFLICTING 1  latest window 2024-05-14T09:30:00+09:00 480 kW" in out
    assert "1 with two values" in out


class _Wire:
    """Takes what the agent's Sparkplug session sends, in order, to publish it on the real broker after."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        self.messages.append((topic, payload))

    def subscribe(self, topic: str, qos: int = 0) -> None:
        pass

    def message_callback_add(self, topic: str, callback: object) -> None:
        pass


async def test_sparkplug_windows_and_alarms_reach_the_energy_view(mosquitto: MosquittoProcess, tmp_path: Any) -> None:
    """With `encoding = "sparkplug"` a meter's windows and alarm events are folders of its metrics
    ("demand/energy" in the DDATA of device incomer-1, agent/sparkplug): the monitor must read them as the
    streams `incomer-1/demand` and `incomer-1/alarm`, as in JSON, and check the windows as a sequence."""
    from zoneinfo import ZoneInfo

    from agent.model import PollResult, Reading
    from agent.payload import Encoder
    from agent.sparkplug import SparkplugSession
    from buffer.store import StoredBatch
    from energy.records import alarm_poll, window_poll
    from energy.windows import AlarmEvent, WindowRecord, local_iso

    seoul = ZoneInfo("Asia/Seoul")
    encoder = Encoder(GW, SITE, BUFFER_ID)
    seq = 1

    def row(poll: PollResult) -> StoredBatch:
        nonlocal seq
        stored = StoredBatch(seq, len(poll.readings), poll.device, poll.ts, encoder.encode(poll, seq))
        seq += len(poll.readings)
        return stored

    def closed(start: float, demand: float) -> PollResult:
        return window_poll(WindowRecord("incomer-1", start, start + 900, local_iso(start, seoul), 900, demand / 4,
                                        demand, None, 1.0, 1.0, frozenset()))

    session = SparkplugSession(SITE, GW, None, BUFFER_ID, tmp_path / "bdseq", "test", lambda: None)
    wire = _Wire()
    session.attach(wire)
    session.connected()
    session.publish(wire, "incomer-1", [row(PollResult("incomer-1", EDGE + 10, (Reading("active_power", 480.0),)))],
                    historical=False)
    session.publish(wire, "incomer-1/demand", [row(closed(EDGE, 480.0)), row(closed(EDGE + 900, 490.0))], False)
    session.publish(wire, "incomer-1/demand", [row(closed(EDGE + 2700, 505.0))], False)  # 10:00-10:15 lost
    session.publish(wire, "incomer-1/alarm", [row(alarm_poll(
        AlarmEvent("incomer-1", EDGE + 2750, 500.0, True, 512.5, EDGE + 2700, 500.0), {"incomer-1": seoul}))], False)
    session.stop()
    with Monitor("127.0.0.1", mosquitto.port, "spBv1.0/#", gap_grace=0.0) as monitor:
        publish(mosquitto.port, wire.messages)
        assert monitor.wait_for(lambda: sum(g.readings for g in monitor.report().gateways) == seq - 1, 5)
        report = monitor.report()
    (gateway,) = report.gateways
    assert (gateway.gateway, gateway.gaps, gateway.invalid) == (GW, 0, 0)
    assert [d.device for d in gateway.devices] == ["incomer-1", "incomer-1/alarm", "incomer-1/demand"]
    (meter,) = gateway.meters
    assert (meter.meter, meter.windows, meter.missing, meter.duplicates) == ("incomer-1", 3, 1, 0)
    assert (meter.latest_start, meter.latest_demand_kw) == ("2024-05-14T10:15:00+09:00", 505.0)
    assert (meter.alarm_events, meter.alarms_kw) == (1, (500.0,))
    assert not report.ok  # a window is missing, as with JSON


def test_a_compact_window_decodes_with_its_streams_retained_meta(mosquitto: MosquittoProcess) -> None:
    """In the compact encoding a window names a point table that the stream's retained meta topic
    (`meta/incomer-1/demand`, one level deeper than a device's) holds: a monitor that joins later, after the
    message that carried the table in band, must learn the table there and decode the window at once, not
    wait for a table the agent sends in band again only with a later window (15 minutes on)."""
    from zoneinfo import ZoneInfo

    from agent.compact import CborEncoder, meta_message
    from energy.records import window_poll
    from energy.windows import WindowRecord, local_iso

    seoul = ZoneInfo("Asia/Seoul")
    compact = CborEncoder(GW, SITE, BUFFER_ID)
    data = compact.message(window_poll(WindowRecord("incomer-1", EDGE, EDGE + 900, local_iso(EDGE, seoul), 900,
                                                    120.0, 480.0, None, 1.0, 1.0, frozenset())), 1)
    (stream, table_id, points), = compact.take_tables()
    assert stream == "incomer-1/demand"
    publish(mosquitto.port, [(f"edge/{SITE}/{GW}/meta/{stream}",
                              meta_message(GW, SITE, stream, {table_id: points}))], retain=True)
    with Monitor("127.0.0.1", mosquitto.port, "edge/#", gap_grace=0.0) as monitor:
        publish(mosquitto.port, [(f"edge/{SITE}/{GW}/data/{stream}", data)])
        decoded = monitor.wait_for(lambda: bool(monitor.report().gateways) and
                                   monitor.report().gateways[0].meters[:1] != () and
                                   monitor.report().gateways[0].meters[0].windows == 1, 5)
        gateway = monitor.report().gateways[0]
    assert decoded, (gateway.waiting_for_table, gateway.invalid_errors)
    assert (gateway.readings, gateway.invalid, gateway.waiting_for_table) == (7, 0, 0)
    assert gateway.meters[0].latest_demand_kw == 480.0
