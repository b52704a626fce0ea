"""The values that cross module boundaries: a reading, its quality, one poll cycle's result.

Drivers produce `PollResult`s, the scheduler hands them to the buffer writer, the buffer stores them
encoded. Nothing downstream of a driver knows which protocol a reading came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple


class Float32(float):
    """A float that a device sent as float32, shown by its shortest decimal (229.8, not 229.8000030517578).

    For everything but encoders it is a float. The compact encoding sends it as the 4 bytes the device
    sent without working out whether that loses anything: a driver that makes one vouches that it is
    exactly a float32's shortest decimal (drivers.modbus.decode.shortest_float32)."""

    __slots__ = ()


Value = float | int | bool | str | None


class Quality(StrEnum):
    GOOD = "good"
    UNCERTAIN = "uncertain"
    BAD = "bad"


class Reading(NamedTuple):
    """One value of one point. A bad reading carries `value=None` and a `reason` a person can act on.

    `source_ts` and `server_ts` (UTC epoch seconds) are set by drivers whose devices time-stamp their own
    values (OPC-UA); the poll's `ts` stays the agent's clock.

    A named tuple, not a frozen dataclass: one is made per value polled, and a tuple is built in a third of
    the time (0.25 against 0.87 microseconds here), with the same fields, immutability and equality."""

    point: str
    value: Value
    unit: str | None = None
    quality: Quality = Quality.GOOD
    reason: str | None = None
    source_ts: float | None = None
    server_ts: float | None = None

    @classmethod
    def bad(cls, point: str, reason: str, unit: str | None = None) -> Reading:
        return cls(point, None, unit, Quality.BAD, reason)


@dataclass(frozen=True, slots=True)
class PollResult:
    """Everything one device produced in one poll cycle, stamped with one clock read (UTC epoch seconds)."""

    device: str
    ts: float
    readings: tuple[Reading, ...]
