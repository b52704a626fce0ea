"""The agent: one TaskGroup owns the pollers, the buffer writer and the uplink.

Data flows driver -> scheduler -> writer -> buffer -> uplink -> broker; acknowledgements flow back from
the uplink to the buffer. Shutdown runs in the same order: pollers stop first, the writer commits what
they produced (within WRITER_GRACE; on a failing or full disk it gives them up at once, numbered and
counted), the uplink gets a short grace for messages in flight, the buffer is closed. What is not
acknowledged by then stays in the buffer for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import ssl
import time
from dataclasses import dataclass, replace
from typing import Any

import drivers
from agent.compact import CborEncoder
from agent.config import AgentConfig, DeviceBase, load_config, read_first_line
from agent.errors import ConfigError
from agent.health import DeviceHealth, FailureLog
from agent.metrics import MetricsServer, server_tls
from agent.payload import Encoder
from agent.scheduler import poll_loop, stream_loop
from agent.status import StatusReporter
from agent.systemd import Notifier
from agent.uplink import MqttUplink
from agent.webpage import LatestReadings, page_snapshot
from agent.writer import BufferWriter
from buffer.store import LOSS_REASONS, Buffer
from drivers.base import PollingDriver, StreamingDriver
from energy.clock import ClockWatch
from energy.stage import EnergyStage
from energy.wiring import page_section, reload_note, start_stage, status_sections

log = logging.getLogger("agent")

SHUTDOWN_GRACE = 2.0
WRITER_GRACE = 5.0  # at a stop, for committing what the pollers produced; a failing disk gives up sooner


def status_line(snapshot: dict[str, Any], connected: bool) -> str:
    """One line for `systemctl status`: is everything polled, is it getting out, is anything lost."""
    devices = snapshot["devices"].values()
    failing = sum(1 for d in devices if d["state"] == "failing")
    buffer = snapshot["buffer"]
    return (f"{len(devices) - failing}/{len(devices)} devices ok; broker {'connected' if connected else 'DOWN'}; "
            f"{buffer['readings']} readings buffered (oldest {buffer['oldest_age_s']:.0f} s); "
            f"{sum(buffer[reason] for reason in LOSS_REASONS)} lost (limits, disk, broker refusals)"
            f"{'; buffer disk FULL' if buffer['disk_full'] else ''}")


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
        self.energy: EnergyStage | None = None  # between pollers and writer when a device has an energy table
        self.clock = ClockWatch()  # the clock's health: in the status message, /metrics, and energy windows' flags
        self.started = asyncio.Event()
        self.notifier = Notifier()
        self.metrics: MetricsServer | None = None
        self.latest = LatestReadings()  # each device's last poll, for the status page
        self._group: asyncio.TaskGroup | None = None
        self._drivers: dict[str, PollingDriver | StreamingDriver] = {}
        self._pollers: dict[str, asyncio.Task[None]] = {}
        self._reload_requested = asyncio.Event()
        self.reloads = 0  # completed reloads, rejected ones not counted

    def request_reload(self) -> None:
        """SIGHUP (systemctl reload): re-read the config file. Only sets an event; the reload runs in the loop."""
        self._reload_requested.set()

    def _start_device(self, device: DeviceBase) -> None:
        assert self._group is not None and self.writer is not None
        health = self.health[device.name] = DeviceHealth(device.name, FailureLog(f"device {device.name}", log))
        module = drivers.load(device.driver)
        # The buffer's folder is the agent's state directory: a driver keeps its own files there (OPC-UA: the
        # application certificate and the trusted server certificates).
        driver = module.create(device, state_dir=self.config.buffer.path.parent) \
            if getattr(module, "USES_STATE_DIR", False) else module.create(device)
        self._drivers[device.name] = driver
        # The compact encoding sends values in the order of the configured points (its point table).
        self.writer.declare(device.name, [(point.name, getattr(point, "unit", None))
                                          for point in getattr(device, "points", ())])
        submit = self.energy.submit if self.energy is not None else self.writer.submit
        if isinstance(driver, StreamingDriver):
            loop = stream_loop(device.name, driver, health, submit)
        else:
            loop = poll_loop(device.name, device.poll_interval, driver, health, submit)
        self._pollers[device.name] = self._group.create_task(loop, name=f"poll:{device.name}")

    async def _stop_device(self, name: str) -> None:
        await stop_tasks([self._pollers.pop(name)])
        await self._drivers.pop(name).close()
        del self.health[name]
        self.latest.forget(name)

    async def _reload_on_request(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            await self._reload()

    async def _reload(self) -> None:
        """Apply a changed config to the devices: restart only those whose entry changed, add and remove the
        others; the buffer and the MQTT session are never touched. A config that does not validate is
        rejected with its problems and the running one stays."""
        try:
            new = load_config(self.config.source)
        except ConfigError as exc:
            log.error("reload rejected, the running configuration stays:\n%s", exc.render())
            self.notifier.notify("STATUS=reload rejected: the config file has errors (see the journal)")
            return
        if (note := reload_note(self.config, new)) is not None:
            log.warning(note)
        for section in ("gateway", "buffer", "mqtt", "metrics"):
            if getattr(new, section) != getattr(self.config, section):
                log.warning("reload: [%s] changed; that takes effect at the next restart (devices are reloaded "
                            "now)", section)
        old_devices = {d.name: d for d in self.config.devices}
        new_devices = {d.name: d for d in new.devices}
        changed = [n for n in new_devices if n in old_devices and new_devices[n] != old_devices[n]]
        removed = [n for n in old_devices if n not in new_devices]
        added = [n for n in new_devices if n not in old_devices]
        for name in removed + changed:
            await self._stop_device(name)
        for name in changed + added:
            self._start_device(new_devices[name])
        # An unchanged device keeps the model its driver was built from: holding the equal new one as well
        # would keep a second copy of every point for as long as the agent runs.
        kept = {name: old_devices[name] for name in new_devices if name in old_devices and name not in changed}
        self.config = replace(self.config, devices=tuple(kept.get(d.name, d) for d in new.devices))
        self.reloads += 1
        log.info("reload: %d device(s) added, %d changed, %d removed, %d unchanged; buffer and MQTT session kept",
                 len(added), len(changed), len(removed), len(new_devices) - len(added) - len(changed))
        self.notifier.notify("READY=1", f"STATUS=reloaded: {len(new_devices)} device(s)")

    async def run(self, stop: asyncio.Event) -> None:
        config = self.config
        limits = config.buffer
        self.buffer = buffer = await Buffer.open(limits.path, limits.max_bytes, limits.durability, limits.on_full,
                                                 limits.max_age)
        try:
            self.uplink = uplink = MqttUplink(config.mqtt, config.gateway, buffer)
            if uplink.sparkplug is not None:  # a device whose polls fail gets its DDEATH
                uplink.sparkplug.health = self.health
            compact = config.mqtt.encoding == "cbor"
            encoder = (CborEncoder if compact else Encoder)(config.gateway.id, config.gateway.site, buffer.buffer_id)
            self.writer = writer = BufferWriter(buffer, encoder, uplink.notify, observe=self.latest.record)
            stats = await buffer.stats()
            log.info("agent started: %d device(s), buffer %s holds %d readings (next sequence number %d), "
                     "broker %s:%d", len(config.devices), buffer.path, stats.readings, stats.next_seq,
                     config.mqtt.host, config.mqtt.effective_port)
            reporter = StatusReporter(buffer, self.health, stats.dropped, self._line_figures,
                                      lambda: status_sections(self.clock, self.energy))
            self.metrics = await self._start_metrics(reporter)
            async with asyncio.TaskGroup() as group:
                self._group = group
                watchdog_task = group.create_task(self.notifier.watchdog(), name="systemd-watchdog")
                writer_task = group.create_task(writer.run(), name="buffer-writer")
                self.energy = await start_stage(config, writer, uplink, self.clock)
                uplink_task = group.create_task(uplink.run(), name="mqtt-uplink")
                status_task = group.create_task(self._report_status(reporter), name="status")
                reload_task = group.create_task(self._reload_on_request(), name="reload")
                for device in config.devices:
                    self._start_device(device)
                # What start-up built (config models, read plans, imported modules) lives as long as the agent:
                # out of the cyclic collector's reach, which otherwise walks it all again at every full
                # collection, and polling allocates a reading per value.
                gc.freeze()
                self.started.set()
                self.notifier.notify("READY=1", f"STATUS=polling {len(config.devices)} device(s); buffer holds "
                                                f"{stats.readings} readings")
                await stop.wait()
                self.notifier.notify("STOPPING=1", "STATUS=stopping: committing what was polled")
                log.info("stopping: pollers first, then the buffer writer, then the uplink")
                await stop_tasks([reload_task, *self._pollers.values(), status_task])
                committed = await writer.stop(WRITER_GRACE)
                if self.energy is not None:
                    await self.energy.close(committed)
                try:
                    await uplink.drain(SHUTDOWN_GRACE)
                except Exception as exc:  # noqa: BLE001 - unacknowledged or undeleted rows stay: duplicates at most
                    log.error("stopping: the uplink could not finish (%s); what it did not delete is sent again "
                              "at the next start", exc)
                writer_task.cancel()
                uplink_task.cancel()
                watchdog_task.cancel()
        finally:
            if self.metrics is not None:
                await self.metrics.stop()
            for driver in self._drivers.values():
                await driver.close()
            remaining = await buffer.stats()
            await buffer.close()
            self.notifier.close()
            log.info("stopped; %d readings remain in the buffer for the next start", remaining.readings)

    def _line_figures(self) -> list[dict[str, Any]]:
        """The lines (serial ports, TCP gateways) the devices share, each once, by the drivers that have one."""
        seen: dict[int, dict[str, Any]] = {}
        for driver in self._drivers.values():
            link = getattr(driver, "link", None)
            line = link() if callable(link) else None
            if line is not None and id(line) not in seen:
                seen[id(line)] = line.snapshot()
        return sorted(seen.values(), key=lambda figures: str(figures["line"]))

    async def _start_metrics(self, reporter: StatusReporter) -> MetricsServer | None:
        """The local endpoint; if it cannot listen, the agent runs without it (the data path matters more)."""
        settings = self.config.metrics
        if not settings.enabled:
            return None
        assert self.uplink is not None
        uplink = self.uplink

        async def snapshot() -> dict[str, Any]:
            status = await reporter.snapshot(uplink.inflight, uplink.readings_delivered)
            return {**status, "gateway": self.config.gateway.id, "site": self.config.gateway.site,
                    "mqtt_connected": uplink.connected}

        async def page() -> dict[str, Any]:
            now = time.time()
            energy = page_section(self.energy, now) if self.energy is not None else None
            return page_snapshot(await snapshot(), self.config, uplink, self.latest, now, energy)

        # Checked by the config validation; read once here, never logged or shown.
        password = read_first_line(settings.password_file) if settings.password_file is not None else None
        if password == "":
            log.error("metrics: %s has no password on its first line; running without the status page and "
                      "metrics endpoint", settings.password_file)
            return None
        for warning in settings.warnings():
            log.warning(warning)
        tls = None
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            try:  # checked by the config validation; the files may have changed since
                tls = server_tls(settings.tls_cert_file, settings.tls_key_file)
            except (ssl.SSLError, OSError, ValueError) as exc:
                # Never fall back to plain HTTP: the password would go out in clear where HTTPS was asked for.
                log.error("metrics: cannot load %s and %s (%s); running without the status page and metrics "
                          "endpoint", settings.tls_cert_file, settings.tls_key_file, exc)
                return None
        server = MetricsServer(settings.host, settings.port, snapshot, page, password, tls)
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
                try:  # housekeeping that writes: a full or failing disk must not hold the status back
                    await buffer.expire()
                    await buffer.note_uplink(uplink.inflight)
                except Exception as exc:  # noqa: BLE001 - logged by the buffer's own failure rules
                    log.debug("status: buffer housekeeping failed: %s", exc)
                snapshot = await reporter.snapshot(uplink.inflight, uplink.readings_delivered)
                sent = uplink.publish_status(snapshot) if uplink.connected else None
                if sent is not None:
                    reporter.sent(snapshot, sent.is_published)
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
