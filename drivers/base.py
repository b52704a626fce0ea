"""What the agent asks of a driver. Drivers own the protocol; the agent owns time (scheduling, backoff,
health). A driver never knows about the buffer or MQTT."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from agent.model import Reading


class PollingDriver(Protocol):
    """A device read on the agent's schedule.

    `poll()` reads every point once. It raises `agent.errors.DeviceError` when the device or the link
    failed as a whole (the scheduler retries with backoff); a point the device answered badly comes back
    as a reading with quality "bad" and a reason. `max_poll_seconds` bounds one whole poll, so a stuck
    call can never hang the device's task.
    """

    @property
    def max_poll_seconds(self) -> float: ...

    async def poll(self) -> Sequence[Reading]: ...

    async def close(self) -> None: ...
