"""OPC-UA devices: read mode (the agent polls, one batched Read per poll) and subscribe mode (the server
pushes changes of monitored items).

Recovery is the same for both and needs no person: when the session is lost (connection closed, server
restarted, keep-alive unanswered) the driver drops it and raises `DeviceError`; the agent's scheduler
waits (backoff) and asks again, and the driver builds a new session from scratch: namespaces and browse
paths resolved again, subscription and monitored items created again. A node the server does not know
(BadNodeIdUnknown, a browse path that leads nowhere) is a bad reading of that point only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from asyncua import Client, ua

from agent.errors import DeviceError
from agent.model import PollResult, Reading
from drivers.opcua.config import OpcuaDevice, OpcuaPoint
from drivers.opcua.connection import Resolved, Security, close_quietly, connect, describe_failure, read, resolve
from drivers.opcua.values import status_name, to_reading

log = logging.getLogger("drivers.opcua")

# Session-level failures: the session or its connection is gone, not one node.
_SESSION_LOST = (ConnectionError, OSError, TimeoutError, ua.UaError)


class _Session:
    """A connected client and the points resolved in it; shared by both modes."""

    def __init__(self, config: OpcuaDevice, state_dir: Path | None) -> None:
        self.config = config
        self.security = Security.of(config, state_dir)
        self.client: Client | None = None
        self.resolved: Resolved | None = None
        self.lost: asyncio.Event = asyncio.Event()
        self.lost_reason = ""

    async def open(self) -> tuple[Client, Resolved]:
        self.lost = asyncio.Event()
        client = await connect(self.security, self._on_lost)
        try:
            async with asyncio.timeout(self.config.timeout * 4 + 1):
                resolved = await resolve(client, self.config.points, self.config.namespaces)
        except Exception as exc:  # a session that cannot resolve is dropped whole
            await close_quietly(client)
            raise DeviceError(f"{self.config.endpoint}: connected, but resolving the points failed: "
                              f"{describe_failure(exc, self.security)}") from exc
        self.client, self.resolved = client, resolved
        for index, problem in resolved.problems.items():
            log.warning("device %s: point %s: %s", self.config.name, self.config.points[index].name, problem)
        return client, resolved

    async def _on_lost(self, exc: Exception) -> None:
        self.lost_reason = describe_failure(exc, self.security)
        self.lost.set()

    async def close(self) -> None:
        client, self.client, self.resolved = self.client, None, None
        if client is not None:
            await close_quietly(client, self.config.timeout + 1)


class OpcuaReader:
    """Read mode: `poll()` reads every resolved node in one Read request (more only when the server's
    MaxNodesPerRead requires), with both timestamps."""

    def __init__(self, config: OpcuaDevice, state_dir: Path | None = None) -> None:
        self.config = config
        self._session = _Session(config, state_dir)
        self._points: list[OpcuaPoint] = list(config.points)

    @property
    def max_poll_seconds(self) -> float:
        # A poll may have to connect first (endpoints, channel, session, activate, namespaces, browse
        # paths, limits) before it reads.
        chunks = 1 + len(self._points) // 1000
        return self.config.timeout * (chunks + 16) + 2.0

    async def poll(self) -> list[Reading]:
        session = self._session
        if session.client is None or session.lost.is_set():
            await session.close()
            await session.open()
        assert session.client is not None and session.resolved is not None
        resolved = session.resolved
        wanted = [(i, node) for i, node in enumerate(resolved.node_ids) if node is not None]
        try:
            values = await read(session.client, [node for _, node in wanted], resolved.max_nodes_per_read)
        except _SESSION_LOST as exc:
            reason = session.lost_reason or describe_failure(exc, session.security)
            await session.close()
            raise DeviceError(f"read failed, session dropped: {reason}") from exc
        readings: list[Reading | None] = [None] * len(self._points)
        for (i, _), data in zip(wanted, values, strict=True):
            point = self._points[i]
            readings[i] = to_reading(point.name, point.unit, data)
        for i, problem in resolved.problems.items():
            readings[i] = Reading.bad(self._points[i].name, problem, self._points[i].unit)
        return [r for r in readings if r is not None]

    async def close(self) -> None:
        await self._session.close()


class _Changes:
    """asyncua subscription handler: collects data changes until the driver takes them; notices a lost
    subscription. asyncua calls it from its own tasks, in the loop's thread."""

    def __init__(self, session: _Session) -> None:
        self.session = session
        self.pending: list[tuple[int, ua.DataValue]] = []
        self.arrived = asyncio.Event()

    def datachange_notification(self, node: object, value: object, data: object) -> None:
        self.pending.append((data.subscription_data.client_handle, data.monitored_item.Value))  # type: ignore[attr-defined]
        self.arrived.set()

    def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
        code = status.Status.value if status.Status is not None else 0
        if code >> 30 >= 2:
            self.session.lost_reason = self.session.lost_reason or f"subscription ended: {status_name(code)}"
            self.session.lost.set()
            self.arrived.set()


class OpcuaSubscriber:
    """Subscribe mode: one subscription (publishing interval = poll_interval) with a monitored item per
    resolved node, sampling interval, queue size and deadband as configured. Changes that arrive together
    become one PollResult stamped with the agent's receive time; each reading keeps the server's source and
    server timestamps. With `heartbeat`, a point that has not changed for that long is sent again."""

    def __init__(self, config: OpcuaDevice, state_dir: Path | None = None) -> None:
        self.config = config
        self._session = _Session(config, state_dir)
        self._points: list[OpcuaPoint] = list(config.points)

    async def run(self, emit: Callable[[PollResult], Awaitable[None]]) -> None:
        session = self._session
        await session.close()
        client, resolved = await session.open()
        try:
            await self._stream(client, resolved, emit)
        finally:
            await session.close()

    async def _stream(self, client: Client, resolved: Resolved,
                      emit: Callable[[PollResult], Awaitable[None]]) -> None:
        config, session = self.config, self._session
        changes = _Changes(session)
        first: list[Reading] = [Reading.bad(self._points[i].name, problem, self._points[i].unit)
                                for i, problem in resolved.problems.items()]
        try:
            async with asyncio.timeout(config.timeout * 4 + 1):
                params = ua.CreateSubscriptionParameters(
                    RequestedPublishingInterval=config.poll_interval * 1000,
                    RequestedLifetimeCount=max(30, int(config.keepalive * 3 / config.poll_interval) + 3),
                    RequestedMaxKeepAliveCount=max(1, int(config.keepalive / config.poll_interval)),
                    MaxNotificationsPerPublish=0, PublishingEnabled=True, Priority=0)
                subscription = await client.create_subscription(params, changes)
                requests = [(i, self._item_request(i, node)) for i, node in enumerate(resolved.node_ids)
                            if node is not None]
                size = resolved.max_items_per_call or len(requests) or 1
                for start in range(0, len(requests), size):
                    batch = requests[start:start + size]
                    results = await subscription.create_monitored_items([r for _, r in batch])
                    for (i, _), result in zip(batch, results, strict=True):
                        if isinstance(result, ua.StatusCode):
                            point = self._points[i]
                            first.append(Reading.bad(point.name, f"cannot monitor: {status_name(result.value)}",
                                                     point.unit))
        except _SESSION_LOST as exc:
            raise DeviceError(f"setting up the subscription failed: {describe_failure(exc, session.security)}") \
                from exc
        if first:
            await emit(PollResult(config.name, time.time(), tuple(first)))
        await self._forward(changes, emit)

    def _item_request(self, index: int, node: ua.NodeId) -> ua.MonitoredItemCreateRequest:
        point, config = self._points[index], self.config
        parameters = ua.MonitoringParameters()
        parameters.ClientHandle = index + 1
        sampling = point.sampling_interval or config.sampling_interval or config.poll_interval
        parameters.SamplingInterval = sampling * 1000
        parameters.QueueSize = point.queue_size or config.queue_size
        parameters.DiscardOldest = True
        if point.deadband is not None and point.deadband_type is not None:
            parameters.Filter = ua.DataChangeFilter(
                Trigger=ua.DataChangeTrigger.StatusValue,
                DeadbandType=ua.DeadbandType.Absolute if point.deadband_type == "absolute" else ua.DeadbandType.Percent,
                DeadbandValue=point.deadband)
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(NodeId=node, AttributeId=ua.AttributeIds.Value),
            MonitoringMode=ua.MonitoringMode.Reporting, RequestedParameters=parameters)

    async def _forward(self, changes: _Changes, emit: Callable[[PollResult], Awaitable[None]]) -> None:
        config, session, points = self.config, self._session, self._points
        heartbeat = config.heartbeat
        last: dict[int, tuple[Reading, float]] = {}  # point index -> (last reading sent, when)
        wait = min(heartbeat or config.keepalive, config.keepalive)
        while True:
            if not changes.pending:
                try:
                    async with asyncio.timeout(wait):
                        await changes.arrived.wait()
                except TimeoutError:
                    pass
            changes.arrived.clear()
            if session.lost.is_set():
                raise DeviceError(f"session lost: {session.lost_reason or 'no reason given'}")
            now = time.time()
            batch, changes.pending = changes.pending, []
            readings = []
            for handle, data in batch:
                point = points[handle - 1]
                reading = to_reading(point.name, point.unit, data)
                readings.append(reading)
                last[handle - 1] = (reading, now)
            if heartbeat is not None:
                due = [i for i, (_, sent) in last.items() if now - sent >= heartbeat]
                for i in due:
                    readings.append(last[i][0])
                    last[i] = (last[i][0], now)
            if readings:
                await emit(PollResult(config.name, now, tuple(readings)))

    async def close(self) -> None:
        await self._session.close()

