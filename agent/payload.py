"""The wire format (JSON, version 1) and the topic layout. Specified for the platform in docs/payload.md.

A message carries one device's polls: live usually one, after an outage as many as fit the configured
message size. Each poll has its time once and each reading its own sequence number. A poll is encoded
once, when the buffer stores it (a "fragment"); a message is the fragments joined under a header, byte
concatenation only, so what is sent after an outage is byte for byte what would have been sent live.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

from agent.floats import shortest_float32, shortest_float32_many
from agent.model import Float32, PollResult, Quality, Reading

SCHEMA = "edge-agent/v1"
CONTENT_TYPE = "application/json"
STATUS_SCHEMA = "edge-agent/status/v1"


DATA_TOPIC = "{prefix}/{site}/{gateway}/data/{device}"
STATUS_TOPIC = "{prefix}/{site}/{gateway}/status"
META_TOPIC = "{prefix}/{site}/{gateway}/meta/{device}"


class Topics:
    """The rendered topics of one gateway; the data topic of each device is rendered once."""

    def __init__(self, data_template: str, status_template: str, prefix: str, site: str, gateway: str,
                 meta_template: str = META_TOPIC) -> None:
        self._data_template = data_template
        self._meta_template = meta_template
        self._fields = {"prefix": prefix, "site": site, "gateway": gateway}
        self.status = status_template.format(**self._fields)
        self._data: dict[str, str] = {}

    def data(self, device: str) -> str:
        topic = self._data.get(device)
        if topic is None:
            topic = self._data[device] = self._data_template.format(device=device, **self._fields)
        return topic

    def meta(self, device: str) -> str:
        """The retained topic of a device's point tables (compact encoding)."""
        return self._meta_template.format(device=device, **self._fields)


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_POLLS_OPEN, _POLLS_CLOSE = b',"polls":[', b"]}"
_value = itemgetter(1)


class Encoder:
    def __init__(self, gateway: str, site: str, buffer_id: str) -> None:
        self._dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
        head = {"schema": SCHEMA, "gateway": gateway, "site": site, "buffer_id": buffer_id}
        self._head = self._dumps(head)[:-1].encode() + b',"device":'
        self._texts: dict[tuple[str, str | None], tuple[str, str]] = {}

    def encode(self, result: PollResult, first_seq: int) -> bytes:
        """One poll as a fragment of a message. Never fails: a value JSON cannot carry (NaN, an unknown
        type) is sent as a bad reading, so one odd value can neither stop the buffer writer nor be retried
        forever."""
        ts = iso_utc(result.ts)
        fast = self._good_numbers(result.readings, first_seq)
        if fast is not None:
            return f'{{"ts":"{ts}","readings":[{fast}]}}'.encode()
        readings = [self._item(seq, reading) for seq, reading in enumerate(result.readings, first_seq)]
        poll = {"ts": ts, "readings": readings}
        try:
            return self._dumps(poll).encode()
        except (TypeError, ValueError):
            poll["readings"] = [self._item(seq, bad_if_unsendable(reading))
                                for seq, reading in enumerate(result.readings, first_seq)]
            return self._dumps(poll).encode()

    def fragment(self, result: PollResult, first_seq: int) -> tuple[bytes, None]:
        """The fragment and its table: JSON polls name their points, so there is none."""
        return self.encode(result, first_seq), None

    def declare(self, device: str, points: object) -> None:
        """JSON needs no point tables (see agent/compact.py)."""

    def take_tables(self) -> list[tuple[str, str, str]]:
        return []

    def _good_numbers(self, readings: tuple[Reading, ...], seq: int) -> str | None:
        """The readings as JSON text when every one is a good number without device timestamps (the common
        poll), else None. Byte for byte what the general path writes (a test holds them equal), in a third
        of its time: the text around each value is built once per point and unit, and a float is written by
        float.__repr__, as the json module does."""
        parts: list[str] = []
        texts = self._texts
        singles = [value for value in map(_value, readings) if type(value) is Float32]
        shown = iter(map(float.__repr__, shortest_float32_many(singles))) if singles else None  # all at once
        for point, value, unit, quality, _, source_ts, server_ts in readings:
            kind = type(value)
            if kind is Float32:
                if value - value != 0.0:  # NaN or infinity: the general path makes it a bad reading
                    return None
                text = next(shown)  # type: ignore[arg-type]
            elif kind is float:
                if value - value != 0.0:
                    return None
                text = float.__repr__(value)
            elif kind is int:
                text = int.__repr__(value)
            elif kind is bool:
                text = "true" if value else "false"
            else:
                return None
            if quality is not Quality.GOOD or source_ts is not None or server_ts is not None:
                return None
            around = texts.get((point, unit))
            if around is None:
                if len(texts) > 100_000:  # points come from the config: only a bug could grow it this far
                    texts.clear()
                unit_text = "" if unit is None else ',"unit":' + self._dumps(unit)
                around = texts[(point, unit)] = (',"point":' + self._dumps(point) + ',"value":',
                                                 ',"quality":"good"' + unit_text + "}")
            parts.append(f'{{"seq":{seq}{around[0]}{text}{around[1]}')
            seq += 1
        return ",".join(parts)

    def frame(self, device: str, polls: list[bytes]) -> bytes:
        """The message for some polls of one device, oldest first."""
        return b"".join((self._head, self._dumps(device).encode(), _POLLS_OPEN, b",".join(polls), _POLLS_CLOSE))

    def framed_size(self, device: str, polls_bytes: int, polls: int) -> int:
        """len(frame(...)) without building it: device names are ASCII (config pattern), quoted once."""
        return len(self._head) + len(device) + 2 + len(_POLLS_OPEN) + polls_bytes + max(polls - 1, 0) + \
            len(_POLLS_CLOSE)

    def message(self, result: PollResult, first_seq: int) -> bytes:
        """A single poll as a whole message (tests, tools)."""
        return self.frame(result.device, [self.encode(result, first_seq)])

    @staticmethod
    def _item(seq: int, reading: Reading) -> dict[str, Any]:
        value = reading.value
        if type(value) is Float32:  # the json module would write its exact binary value, not its decimal
            value = shortest_float32(value)
        item: dict[str, Any] = {"seq": seq, "point": reading.point, "value": value,
                                "quality": reading.quality.value}
        if reading.unit is not None:
            item["unit"] = reading.unit
        if reading.quality is not Quality.GOOD and reading.reason:
            item["reason"] = reading.reason
        if reading.source_ts is not None or reading.server_ts is not None:  # one test on the common path
            for key, ts in (("source_ts", reading.source_ts), ("server_ts", reading.server_ts)):
                try:
                    if ts is not None:
                        item[key] = iso_utc(ts)
                except (OverflowError, OSError, ValueError):
                    pass  # a device clock out of any calendar: the reading goes without it, never the poll
        return item


def bad_if_unsendable(reading: Reading) -> Reading:
    """The reading, or a bad reading in its place when its value cannot be sent (NaN, an unknown type)."""
    value = reading.value
    if value is None or isinstance(value, bool | int | str) or (isinstance(value, float) and math.isfinite(value)):
        return reading
    what = "not a finite number" if isinstance(value, float) else f"a {type(value).__name__} cannot be sent"
    return Reading(reading.point, None, reading.unit, Quality.BAD, f"{what} ({value!r:.40})", reading.source_ts,
                   reading.server_ts)
