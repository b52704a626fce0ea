"""The agent: one TaskGroup owns the pollers, the buffer writer and the uplink.

Data flows driver -> scheduler -> writer -> buffer -> uplink -> broker; acknowledgements flow back from
the uplink to the buffer. Shutdown runs in the same order: pollers stop first, the writer commits what
they produced, the uplink gets a short grace for messages in flight, the buffer is closed. What is not
acknowledged by then stays in the buffer for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import drivers
from agent.config import AgentConfig
from agent.health import DeviceHealth, FailureLog
from agent.metrics import MetricsServer
from agent.payload import Encoder
from agent.scheduler import poll_loop
from agent.status import StatusReporter
from agent.systemd import Notifier
from agent.uplink import MqttUplink
from agent.writer import BufferWriter
from buffer.store import Buffer
from drivers.base import PollingDriver

log = logging.getLogger("agent")

SHUTDOWN_GRACE = 2.0


def status_line(snapshot: dict[str, Any], connected: bool) -> str:
    """One line for `systemctl status`: is everything polled, is it getting out, is anything lost."""
    devices = snapshot["devices"].values()
    failing = sum(1 for d in devices if d["state"] == "failing")
    buffer = snapshot["buffer"]
    return (f"{len(devices) - failing}/{len(devices)} devices ok; broker {'connected' if connected else 'DOWN'}; "
            f"{buffer['readings']} readings buffered (oldest {buffer['oldest_age_s']:.0f} s); "
            f"{buffer['dropped_oldest'] + buffer['rejected'] + buffer['expired']} lost to buffer limits")


async def stop_tasks(tasks: list[asyncio.Task[None]], grace: float = 2.0, attempts: int = 3) -> None:
    """Cancel tasks and wait for them, cancelling again any that go on (a cancellation can be lost in a
    library), and name those that still refuse, so a hung stop is never silent."""
    pending = [task for task in tasks if not task.done()]
    for _ in range(attempts):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, still = await asyncio.wait(pending, timeout=grace)
        pending = list(still)
    if pending:
        log.error("tasks refusing to stop after %d cancellations: %s", attempts,
                  ", ".join(task.get_name() for task in pending))


@dataclass(frozen=True, slots=True)
class Counters:
    readings_polled: int
    readings_committed: int
    readings_delivered: int
    mqtt_connected: bool
    inflight: int


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.health = {d.name: DeviceHealth(d.name, FailureLog(f"device {d.name}", log)) for d in config.devices}
        self.buffer: Buffer | None = None
        self.writer: BufferWriter | None = None
        self.uplink: MqttUplink | None = None
        self.started = asyncio.Event()
        self.notifier = Notifier()
        self.metrics: MetricsServer | None = None

    async def run(self, stop: asyncio.Event) -> None:
        config = self.config
        limits = config.buffer
        self.buffer = buffer = await Buffer.open(limits.path, limits.max_bytes, limits.durability, limits.on_full,
                                                 limits.max_age)
        device_drivers: dict[str, PollingDriver] = {}
        try:
            self.uplink = uplink = MqttUplink(config.mqtt, config.gateway, buffer)
            encoder = Encoder(config.gateway.id, config.gateway.site, buffer.buffer_id)
            self.writer = writer = BufferWriter(buffer, encoder, uplink.notify)
            for device in config.devices:
                device_drivers[device.name] = drivers.load(device.driver).create(device)
            stats = await buffer.stats()
            log.info("agent started: %d device(s), buffer %s holds %d readings (next sequence number %d), "
                     "broker %s:%d", len(config.devices), buffer.path, stats.readings, stats.next_seq,
                     config.mqtt.host, config.mqtt.effective_port)
            reporter = StatusReporter(buffer, self.health, stats.dropped)
            self.metrics = await self._start_metrics(reporter)
            async with asyncio.TaskGroup() as group:
                watchdog_task = group.create_task(self.notifier.watchdog(), name="systemd-watchdog")
                writer_task = group.create_task(writer.run(), name="buffer-writer")
                uplink_task = group.create_task(uplink.run(), name="mqtt-uplink")
                status_task = group.create_task(self._report_status(reporter), name="status")
                pollers = [group.create_task(poll_loop(d.name, d.poll_interval, device_drivers[d.name],
                                                       self.health[d.name], writer.submit), name=f"poll:{d.name}")
                           for d in config.devices]
                self.started.set()
                self.notifier.notify("READY=1", f"STATUS=polling {len(config.devices)} device(s); buffer holds "
                                                f"{stats.readings} readings")
                await stop.wait()
                self.notifier.notify("STOPPING=1", "STATUS=stopping: committing what was polled")
                log.info("stopping: pollers first, then the buffer writer, then the uplink")
                await stop_tasks([*pollers, status_task])
                await writer.flush()
                await uplink.drain(SHUTDOWN_GRACE)
                writer_task.cancel()
                uplink_task.cancel()
                watchdog_task.cancel()
        finally:
            if self.metrics is not None:
                await self.metrics.stop()
            for driver in device_drivers.values():
                await driver.close()
            remaining = await buffer.stats()
            await buffer.close()
            self.notifier.close()
            log.info("stopped; %d readings remain in the buffer for the next start", remaining.readings)

    async def _start_metrics(self, reporter: StatusReporter) -> MetricsServer | None:
        """The local endpoint; if it cannot listen, the agent runs without it (the data path matters more)."""
        settings = self.config.metrics
        if not settings.enabled:
            return None
        assert self.uplink is not None
        uplink = self.uplink

        async def snapshot() -> dict[str, Any]:
            status = await reporter.snapshot(uplink.inflight, uplink.readings_delivered, mark_reported=False)
            return {**status, "gateway": self.config.gateway.id, "site": self.config.gateway.site,
                    "mqtt_connected": uplink.connected}

        server = MetricsServer(settings.host, settings.port, snapshot)
        try:
            await server.start()
        except OSError as exc:
            log.error("metrics: cannot listen on %s:%d (%s); running without the metrics endpoint",
                      settings.host, settings.port, exc.strerror or exc)
            return None
        return server

    async def _report_status(self, reporter: StatusReporter) -> None:
        """Every status_interval, and at once after each (re)connect: expire old rows (max_age) and send
        the status message. A failure here is logged and retried next time; it never stops the agent."""
        assert self.uplink is not None and self.buffer is not None
        uplink, buffer = self.uplink, self.buffer
        failures = FailureLog("status message", log)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.gateway.status_interval):
                    await uplink.status_due.wait()
            uplink.status_due.clear()
            try:
                await buffer.expire()
                await buffer.note_uplink(uplink.inflight)
                snapshot = await reporter.snapshot(uplink.inflight, uplink.readings_delivered)
                if uplink.connected:
                    uplink.publish_status(snapshot)
                self.notifier.notify(f"STATUS={status_line(snapshot, uplink.connected)}")
            except Exception as exc:  # noqa: BLE001 - status is best effort; the data path is unaffected
                failures.failed(exc)
            else:
                failures.succeeded()

    def counters(self) -> Counters:
        writer, uplink = self.writer, self.uplink
        committed = writer.readings_committed if writer else 0
        delivered = uplink.readings_delivered if uplink else 0
        return Counters(
            readings_polled=sum(h.readings for h in self.health.values()),
            readings_committed=committed,
            readings_delivered=delivered,
            mqtt_connected=uplink.connected if uplink else False,
            inflight=uplink.inflight if uplink else 0,
        )
