"""The JSON wire format: what the platform receives, and that no value can break the encoder."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import topic_template_problem
from agent.model import Float32, PollResult, Quality, Reading
from agent.payload import DATA_TOPIC, SCHEMA, STATUS_TOPIC, Encoder, Topics, iso_utc


def test_a_message_carries_each_reading_with_its_own_sequence_number() -> None:
    result = PollResult("meter-1", 1_764_020_700.25, (
        Reading("voltage", 229.8, "V"), Reading("energy", 4_000_000_123, "Wh"),
        Reading.bad("pf", "Modbus exception 2 (illegal data address) for FC04 22+2")))
    message = json.loads(Encoder("gw-1", "plant-a", "buf123").message(result, 41))
    assert message == {
        "schema": SCHEMA, "gateway": "gw-1", "site": "plant-a", "buffer_id": "buf123", "device": "meter-1",
        "polls": [{"ts": "2025-11-24T21:45:00.250Z", "readings": [
            {"seq": 41, "point": "voltage", "value": 229.8, "quality": "good", "unit": "V"},
            {"seq": 42, "point": "energy", "value": 4_000_000_123, "quality": "good", "unit": "Wh"},
            {"seq": 43, "point": "pf", "value": None, "quality": "bad",
             "reason": "Modbus exception 2 (illegal data address) for FC04 22+2"},
        ]}]}


def test_a_batched_message_is_the_stored_polls_joined_byte_for_byte() -> None:
    encoder = Encoder("gw-1", "plant-a", "0123456789abcdef0123456789abcdef")
    first = encoder.encode(PollResult("m1", 1_764_020_700.0, (Reading("v", 229.8, "V"),)), 1)
    second = encoder.encode(PollResult("m1", 1_764_020_701.0, (Reading("v", 229.9, "V"),)), 2)
    framed = encoder.frame("m1", [first, second])
    assert first in framed and second in framed  # no re-encoding: what was stored is what is sent
    assert len(framed) == encoder.framed_size("m1", len(first) + len(second), 2)
    polls = json.loads(framed)["polls"]
    assert [(p["ts"], p["readings"][0]["seq"]) for p in polls] == [
        ("2025-11-24T21:45:00.000Z", 1), ("2025-11-24T21:45:01.000Z", 2)]


def test_a_value_json_cannot_carry_becomes_a_bad_reading_instead_of_stopping_the_writer() -> None:
    result = PollResult("m", 0.0, (Reading("ok", 1.5), Reading("nan", float("nan")), Reading("inf", float("inf")),
                                   Reading("odd", b"\x01\x02"), Reading("text", "가동")))  # type: ignore[arg-type]
    readings = json.loads(Encoder("gw", "s", "b").encode(result, 1))["readings"]  # one poll's fragment
    assert [(r["seq"], r["quality"]) for r in readings] == [
        (1, "good"), (2, "bad"), (3, "bad"), (4, "bad"), (5, "good")]
    assert readings[1]["value"] is None and "not a finite number" in readings[1]["reason"]
    assert "bytes cannot be sent" in readings[3]["reason"]
    assert readings[4]["value"] == "가동"


def test_topics_and_timestamps() -> None:
    topics = Topics(DATA_TOPIC, STATUS_TOPIC, "edge", "plant-a", "gw-1")
    assert topics.data("meter-1") == "edge/plant-a/gw-1/data/meter-1"
    assert topics.status == "edge/plant-a/gw-1/status"
    custom = Topics("fems/{site}/{device}/{gateway}", "fems/{site}/gateways/{gateway}", "edge", "plant-a", "gw-1")
    assert (custom.data("m1"), custom.status) == ("fems/plant-a/m1/gw-1", "fems/plant-a/gateways/gw-1")


def test_topic_templates_are_checked() -> None:
    assert topic_template_problem(DATA_TOPIC, device_allowed=True) is None
    assert "{devcie}" in (topic_template_problem("{prefix}/{devcie}", device_allowed=True) or "")
    assert "must contain {device}" in (topic_template_problem("{prefix}/{site}", device_allowed=True) or "")
    assert "unknown placeholder {device}" in (topic_template_problem("a/{device}", device_allowed=False) or "")
    assert "'+'" in (topic_template_problem("a/+/{device}", device_allowed=True) or "")
    assert "not a valid template" in (topic_template_problem("a/{device", device_allowed=True) or "")
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"


def test_the_documented_schema_accepts_what_the_encoder_writes() -> None:
    import jsonschema
    schema = json.loads((Path(__file__).parent.parent / "docs" / "payload.schema.json").read_text())
    result = PollResult("meter-1", 1_764_020_700.0, (Reading("v", 229.8, "V"), Reading.bad("x", "timeout"),
                                                     Reading("n", 7), Reading("s", "run"), Reading("b", True)))
    jsonschema.validate(json.loads(Encoder("gw-1", "plant-a", "0123456789abcdef0123456789abcdef").message(result, 1)),
                        schema)
    assert Quality.UNCERTAIN.value in json.dumps(schema)


def test_the_schema_shipped_in_the_package_is_the_documented_one() -> None:
    from importlib import resources

    docs = (Path(__file__).parent.parent / "docs" / "payload.schema.json").read_text()
    assert resources.files("agent").joinpath("payload.schema.json").read_text() == docs


def as_float32(value: float) -> Float32:
    return Float32(struct.unpack(">f", struct.pack(">f", value))[0])


_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70), st.booleans(),
                    st.text(max_size=5), st.none(), st.floats(width=32).map(Float32))
_readings = st.builds(
    Reading, point=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,10}", fullmatch=True), value=_values,
    unit=st.one_of(st.none(), st.sampled_from(["V", "kWh", "°C", "µg/m³", 'a"b'])),
    quality=st.sampled_from(list(Quality)), reason=st.one_of(st.none(), st.text(max_size=5)),
    source_ts=st.one_of(st.none(), st.just(1_700_000_000.5)),
    server_ts=st.one_of(st.none(), st.floats(), st.just(1_700_000_000.75)))


@settings(max_examples=300, deadline=None)
@given(readings=st.lists(_readings, max_size=8), first_seq=st.integers(1, 2**40),
       good_only=st.booleans())
def test_the_fast_path_writes_exactly_what_the_general_path_writes(readings: list[Reading], first_seq: int,
                                                                    good_only: bool) -> None:
    if good_only:  # most polls: every reading a good number, so the fast path is taken
        readings = [Reading(r.point, (float(i) / 3, i, as_float32(i / 7 * 10.0 ** (i - 4)))[i % 3], r.unit)
                    for i, r in enumerate(readings)]
    result = PollResult("dev", 1_700_000_000.25, tuple(readings))
    fast = Encoder("gw", "site", "b").encode(result, first_seq)
    general = Encoder("gw", "site", "b")
    general._good_numbers = lambda *_: None  # type: ignore[method-assign]
    assert fast == general.encode(result, first_seq)
