"""The wire format (JSON, version 1) and the topic layout. Specified for the platform in docs/payload.md.

A message carries one device's poll: the poll time once, then each reading with its own sequence number.
It is encoded once, when the buffer stores it, so what is sent after an outage is byte for byte what
would have been sent live.
"""

from __future__ import annotations

import json
import math
import string
from datetime import UTC, datetime
from typing import Any

from agent.model import PollResult, Quality, Reading

SCHEMA = "edge-agent/v1"
STATUS_SCHEMA = "edge-agent/status/v1"


DATA_TOPIC = "{prefix}/{site}/{gateway}/data/{device}"
STATUS_TOPIC = "{prefix}/{site}/{gateway}/status"
_PLACEHOLDERS = {"prefix", "site", "gateway", "device"}


def topic_template_problem(template: str, device_allowed: bool) -> str | None:
    """What is wrong with a topic template, or None. Checked at config time, never at publish time."""
    allowed = _PLACEHOLDERS if device_allowed else _PLACEHOLDERS - {"device"}
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        return f"not a valid template ({exc}); placeholders are written {{site}}"
    unknown = sorted(fields - allowed)
    if unknown:
        return f"unknown placeholder {{{unknown[0]}}}; allowed: " + ", ".join(f"{{{n}}}" for n in sorted(allowed))
    if any(char in template for char in "+#\0"):
        return "an MQTT topic to publish to cannot contain '+', '#' or NUL"
    if device_allowed and "device" not in fields:
        return "must contain {device}: the platform tells devices apart by topic"
    return None


class Topics:
    """The rendered topics of one gateway; the data topic of each device is rendered once."""

    def __init__(self, data_template: str, status_template: str, prefix: str, site: str, gateway: str) -> None:
        self._data_template = data_template
        self._fields = {"prefix": prefix, "site": site, "gateway": gateway}
        self.status = status_template.format(**self._fields)
        self._data: dict[str, str] = {}

    def data(self, device: str) -> str:
        topic = self._data.get(device)
        if topic is None:
            topic = self._data[device] = self._data_template.format(device=device, **self._fields)
        return topic


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Encoder:
    def __init__(self, gateway: str, site: str, buffer_id: str) -> None:
        self._head = {"schema": SCHEMA, "gateway": gateway, "site": site, "buffer_id": buffer_id}
        self._dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode

    def encode(self, result: PollResult, first_seq: int) -> bytes:
        """Never fails: a value JSON cannot carry (NaN, an unknown type) is sent as a bad reading, so one
        odd value can neither stop the buffer writer nor be retried forever."""
        readings = [self._item(seq, reading) for seq, reading in enumerate(result.readings, first_seq)]
        message = {**self._head, "device": result.device, "ts": iso_utc(result.ts), "readings": readings}
        try:
            return self._dumps(message).encode()
        except (TypeError, ValueError):
            message["readings"] = [self._item(seq, _encodable(reading))
                                   for seq, reading in enumerate(result.readings, first_seq)]
            return self._dumps(message).encode()

    @staticmethod
    def _item(seq: int, reading: Reading) -> dict[str, Any]:
        item: dict[str, Any] = {"seq": seq, "point": reading.point, "value": reading.value,
                                "quality": reading.quality.value}
        if reading.unit is not None:
            item["unit"] = reading.unit
        if reading.quality is not Quality.GOOD and reading.reason:
            item["reason"] = reading.reason
        return item


def _encodable(reading: Reading) -> Reading:
    value = reading.value
    if value is None or isinstance(value, bool | int | str) or (isinstance(value, float) and math.isfinite(value)):
        return reading
    what = "not a finite number" if isinstance(value, float) else f"a {type(value).__name__} cannot be sent"
    return Reading.bad(reading.point, f"{what} ({value!r:.40})", reading.unit)
