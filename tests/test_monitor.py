"""`edge-agent monitor` and the Monitor behind it, against a real mosquitto: hand-made messages (valid, a
duplicate, a gap that never fills, one that breaks the schema, status messages) and a real agent."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.demo.mosquitto import MosquittoProcess, free_port
from agent.monitor import Monitor, SeqSet, add_arguments, run
from agent.payload import STATUS_SCHEMA, iso_utc
from drivers.modbus.simulator import SimServer
from tests.conftest import agent_config, meter_device
from tests.test_end_to_end import start_agent, stop_agent

BUFFER_ID = "0123456789abcdef0123456789abcdef"


def data_message(seqs: range | list[int], device: str = "meter-1", gateway: str = "gw-a",
                 buffer_id: str = BUFFER_ID, **changes: Any) -> tuple[str, dict[str, Any]]:
    readings = [{"seq": s, "point": f"p{i}", "value": 230.5, "quality": "good", "unit": "V"}
                for i, s in enumerate(seqs)]
    body = {"schema": "edge-agent/v1", "gateway": gateway, "site": "site-1", "buffer_id": buffer_id,
            "device": device, "polls": [{"ts": iso_utc(time.time()), "readings": readings}], **changes}
    return f"edge/site-1/{gateway}/data/{device}", body


def status_message(state: str, gateway: str = "gw-a") -> tuple[str, dict[str, Any]]:
    return f"edge/site-1/{gateway}/status", {"schema": STATUS_SCHEMA, "state": state, "gateway": gateway,
                                             "site": "site-1", "version": "0.1.0", "ts": iso_utc(time.time())}


def publish(port: int, messages: list[tuple[str, Any]], retain: bool = False) -> None:
    """Publish at QoS 1, in order, and return once the broker confirmed each. Bodies that are not bytes
    are sent as JSON."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for topic, body in messages:
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def run_monitor(port: int, *options: str) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(["--port", str(port), *options]))


def final_report(stdout: str) -> dict[str, Any]:
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert lines and lines[-1]["report"] == "final", stdout
    return lines[-1]


def test_seqset_folds_old_numbers_and_keeps_answers_exact() -> None:
    seqs = SeqSet(window=16)
    arrived = [s for s in range(1_000_000_001, 1_000_000_101) if s % 17 and s != 1_000_000_050]
    for seq in arrived:
        seqs.add(seq)
    assert len(seqs._seen) <= 16  # neither the first number nor the run length costs memory
    seqs.add(1_000_000_050)       # late, below the window: fills its gap
    seqs.add(1_000_000_050)
    expected = [(s, s) for s in range(1_000_000_001, 1_000_000_101) if s % 17 == 0]
    assert seqs.gaps() == expected and seqs.duplicates == 1 and seqs.count == len(arrived) + 1
    assert seqs.missing(1_000_000_000, 1_000_000_101) == [1_000_000_000] + [a for a, _ in expected] + [1_000_000_101]
    seqs.add(1_000_000_000)       # older than the first number seen: sent before we subscribed, no gap
    assert seqs.gaps() == expected and 1_000_000_000 in seqs

    # The same answers as a plain set, whatever the order of arrival.
    rnd = random.Random(7)
    numbers = [s for s in range(1, 3000) if rnd.random() < 0.97]
    order = numbers + rnd.sample(numbers, 200)
    rnd.shuffle(order)
    seqs, seen = SeqSet(window=64), set()
    for seq in order:
        seqs.add(seq)
        seen.add(seq)
    assert all((s in seqs) == (s in seen) for s in range(0, 3002))
    assert seqs.count == len(seen) and seqs.duplicates == len(order) - len(seen)
    assert sum(b - a + 1 for a, b in seqs.gaps()) == len(set(range(order[0], max(seen))) - seen)


def test_counts_duplicates_gaps_bad_readings_and_status(mosquitto: MosquittoProcess) -> None:
    with Monitor("127.0.0.1", mosquitto.port, "edge/#", gap_grace=60) as monitor:
        bad = {"seq": 8, "point": "p3", "value": None, "quality": "bad", "reason": "Modbus exception 2"}
        second = data_message(range(5, 8), device="meter-2")
        second[1]["polls"][0]["readings"].append(bad)
        publish(mosquitto.port, [
            status_message("online"),
            data_message(range(1, 5)),
            second,
            second,                                    # re-sent after a reconnect: 4 duplicates
            data_message(range(13, 17)),               # 9..12 never arrive
            data_message(range(21, 25)),
            data_message(range(17, 21), device="meter-2"),  # arrives after newer ones: out of order
        ])
        assert monitor.wait_for(lambda: monitor.report().gateways and monitor.report().gateways[0].messages == 6, 5)
        gateway = monitor.report().gateways[0]
        assert gateway.pending == 4 and gateway.gaps == 0, "within the grace period a gap is only pending"

        monitor.gap_grace = 0.0
        assert monitor.wait_for(lambda: monitor.report().gateways[0].gaps == 1, 2)
        report = monitor.report()
    gateway = report.gateways[0]
    assert (gateway.gateway, gateway.state) == ("gw-a", "online")
    assert (gateway.messages, gateway.readings, gateway.duplicates) == (6, 20, 4)
    assert (gateway.gaps, gateway.lost, gateway.pending, gateway.out_of_order) == (1, 4, 0, 1)
    assert gateway.streams[0].gap_ranges == ((9, 12),) and gateway.streams[0].buffer_id == BUFFER_ID
    assert gateway.invalid == 0 and not report.ok
    assert gateway.latency.p50_ms is not None and 0 <= gateway.latency.p50_ms < 5000
    assert gateway.latency.p95_ms is not None and gateway.latency.max_ms is not None
    assert gateway.rate_overall > 0
    devices = {d.device: d for d in gateway.devices}
    assert (devices["meter-1"].messages, devices["meter-1"].readings, devices["meter-1"].bad) == (3, 12, 0)
    assert (devices["meter-2"].messages, devices["meter-2"].bad) == (3, 2)  # the duplicate counts as received
    assert devices["meter-1"].last_seen_ago_s < 10
    assert monitor.received("gw-a") == 20 and 9 not in monitor.stream("gw-a").seqs  # the old API still answers


def test_invalid_messages_are_counted_per_gateway_with_their_errors(mosquitto: MosquittoProcess) -> None:
    null_but_good = data_message([1])
    null_but_good[1]["polls"][0]["readings"][0]["value"] = None
    wrong_device = data_message([2])
    wrong_device[1]["device"] = "meter-9"
    bad_date = data_message([3])
    bad_date[1]["polls"][0]["ts"] = "2026-13-45T25:61:61.000Z"
    with Monitor("127.0.0.1", mosquitto.port, "edge/#") as monitor:
        publish(mosquitto.port, [
            null_but_good,
            wrong_device,                                          # the topic says meter-1
            bad_date,                                              # matches the pattern, not a date
            data_message([4], schema="edge-agent/v2"),
            ("edge/site-1/gw-a/data/meter-1", b"{not json"),
            data_message([5], gateway="gw-b"),
            ("edge/site-1/gw-b/status", b'{"state": "sleeping"}'),
            ("edge/site-1/gw-b/config", b"whatever"),              # neither data nor status: ignored
        ])
        assert monitor.wait_for(lambda: monitor.invalid == 6 and monitor.ignored == 1, 5)
        report = monitor.report()
    gw_a, gw_b = report.gateways
    assert (gw_a.invalid, gw_a.readings, gw_b.invalid, gw_b.readings) == (5, 0, 1, 1)
    errors = "\n".join(gw_a.invalid_errors)
    assert len(gw_a.invalid_errors) == 5
    assert "meter-1: $.polls[0].readings[0].value: None is not of type" in errors
    assert "$.device: 'meter-9' but the topic 'edge/site-1/gw-a/data/meter-1' says 'meter-1'" in errors
    assert "$.polls[0].ts: '2026-13-45T25:61:61.000Z' is not a 'date-time'" in errors
    assert "$.schema: 'edge-agent/v1' was expected" in errors
    assert "meter-1: not JSON" in errors
    assert gw_b.invalid_errors[0].startswith("status: not an edge-agent/status/v1 message")
    assert report.invalid == 6 and not report.ok


@pytest.mark.parametrize("case", ["clean", "gap", "invalid"])
def test_run_exits_1_on_a_lasting_gap_or_an_invalid_message(
        case: str, mosquitto: MosquittoProcess, capsys: pytest.CaptureFixture[str]) -> None:
    # Retained, so that they reach the monitor when it subscribes (agents never retain data messages).
    # One topic per message, since a broker keeps the last retained message of each.
    messages = [status_message("online"), data_message(range(1, 5), device="d1"),
                data_message(range(5, 9), device="d2"), data_message(range(9, 13), device="d3")]
    if case == "gap":
        del messages[2]
    if case == "invalid":
        messages.append(data_message(range(13, 17), device="d4", site="Site 1"))
    publish(mosquitto.port, messages, retain=True)

    code = run_monitor(mosquitto.port, "--duration", "2", "--json", "--grace", "0.5")
    out, err = capsys.readouterr()
    report = final_report(out)
    gateway = report["gateways"][0]
    assert (gateway["gateway"], gateway["state"]) == ("gw-a", "online")
    assert gateway["rate"] >= 0 and gateway["latency"]["p50_ms"] is not None
    assert {d["device"] for d in gateway["devices"]} == {"d1", "d2", "d3"} - ({"d2"} if case == "gap" else set())
    assert f"subscribed to edge/# at 127.0.0.1:{mosquitto.port}" in err
    if case == "clean":
        assert (code, report["ok"], report["lost"], report["invalid"], gateway["readings"]) == (0, True, 0, 0, 12)
    elif case == "gap":
        assert (code, report["ok"], gateway["gaps"], gateway["lost"]) == (1, False, 1, 4)
        assert gateway["streams"][0]["gap_ranges"] == [[5, 8]]
    else:
        assert (code, report["ok"], report["lost"], report["invalid"]) == (1, False, 0, 1)
        assert "d4: $.site: 'Site 1' does not match" in gateway["invalid_errors"][0]


def test_run_prints_a_table_for_people(mosquitto: MosquittoProcess, capsys: pytest.CaptureFixture[str]) -> None:
    publish(mosquitto.port, [data_message(range(1, 5), device="d1"), data_message(range(9, 13), device="d3")],
            retain=True)
    code = run_monitor(mosquitto.port, "--duration", "1", "--interval", "0.5", "--grace", "0.2", "--verbose")
    out, _ = capsys.readouterr()
    assert code == 1
    assert "gw-a -  msgs 2  readings 8  rate " in out
    assert "gaps 1 (4 lost: 5..8)" in out and "invalid 0  latency p50 " in out
    assert "    d1  msgs 1  readings 4  bad 0  last seen " in out
    assert out.splitlines()[-1] == "FAILED: 4 reading(s) lost in 1 gap(s), 0 invalid message(s)"


def test_run_gives_up_quickly_on_a_broker_that_is_not_there(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    began = time.monotonic()
    assert run_monitor(port, "--duration", "10") == 1
    assert time.monotonic() - began < 5
    err = capsys.readouterr().err
    assert f"edge-agent monitor: cannot reach the MQTT broker at 127.0.0.1:{port}: Connection refused" in err


async def test_a_real_agent_delivers_without_gaps_or_invalid_messages(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port, interval="100ms"))
    monitor = asyncio.create_task(asyncio.to_thread(
        run_monitor, mosquitto.port, "--duration", "3", "--interval", "1", "--json", "--grace", "1"))
    _, stop, task = await start_agent(config)
    try:
        code = await monitor
    finally:
        await stop_agent(stop, task)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["report"] for line in lines].count("interval") >= 2
    report = lines[-1]
    assert code == 0, report
    gateway = report["gateways"][0]
    assert (gateway["gateway"], gateway["state"], gateway["lost"], gateway["invalid"]) == ("gw-test", "online", 0, 0)
    assert gateway["readings"] >= 4 * 10 and gateway["rate"] > 10   # 4 points, 10 polls a second
    assert [d["device"] for d in gateway["devices"]] == ["power-meter"]
    assert gateway["latency"]["p95_ms"] < 1000


def test_without_validation_only_the_schema_field_is_checked(mosquitto: MosquittoProcess) -> None:
    null_but_good = data_message([1, 2])
    null_but_good[1]["polls"][0]["readings"][0]["value"] = None
    with Monitor("127.0.0.1", mosquitto.port, "edge/#", validate=False) as monitor:
        publish(mosquitto.port, [null_but_good, data_message([3], schema="edge-agent/v2")])
        assert monitor.wait_for(lambda: monitor.invalid == 1 and monitor.received("gw-a") == 2, 5)
    assert monitor.report().gateways[0].invalid_errors == ("meter-1: not an edge-agent/v1 message",)


async def test_the_command_line_reports_a_clean_stream_from_a_real_agent(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port, interval="100ms"))
    _, stop, task = await start_agent(config)
    try:
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "agent", "monitor", "--port", str(mosquitto.port),
                             "--topic", "edge/#", "--duration", "3", "--json", "--no-validate"],
            cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        await stop_agent(stop, task)
    assert result.returncode == 0, result.stdout + result.stderr
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert final["report"] == "final" and final["ok"] and final["lost"] == 0 and final["invalid"] == 0
