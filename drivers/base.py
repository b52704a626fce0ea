"""What the agent asks of a driver. Drivers own the protocol; the agent owns time (scheduling, backoff,
health). A driver never knows about the buffer or MQTT."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

from agent.model import PollResult, Reading


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


@runtime_checkable
class StreamingDriver(Protocol):
    """A device that pushes its values (OPC-UA subscriptions): the driver runs, the agent restarts it.

    `run(emit)` connects, sets up what the device needs, then calls `emit` with a `PollResult` for each
    group of values that arrived together, for as long as the session lives. It raises
    `agent.errors.DeviceError` when the session is lost or cannot be set up; it cleans up its own
    connection before raising. The agent's `stream_loop` counts the failure and calls `run` again after a
    jittered, capped backoff. Every call it makes to the device has its own timeout.

    A driver package whose `create` wants the agent's state directory (for files it keeps, such as an
    application certificate) sets `USES_STATE_DIR = True` and takes `create(config, state_dir=Path)`.
    """

    async def run(self, emit: Callable[[PollResult], Awaitable[None]]) -> None: ...

    async def close(self) -> None: ...
