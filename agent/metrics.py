"""The local metrics endpoint: Prometheus text at /metrics, the status snapshot as JSON at /status.json.

Bound to 127.0.0.1 by default: operations staff scrape it on the gateway or over an SSH tunnel, and
`edge-agent status` reads /status.json. A tiny asyncio HTTP server (GET only, one request per connection),
so it shares the agent's event loop and no thread; every figure comes from the same snapshot as the
status message the platform receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

Snapshot = Callable[[], Awaitable[dict[str, Any]]]
_STATES = ("ok", "failing", "starting")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def prometheus_text(status: dict[str, Any]) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP edge_agent_{name} {text}")
        lines.append(f"# TYPE edge_agent_{name} {kind}")
        lines.extend(f"edge_agent_{name}{labels} {value:g}" for labels, value in samples)

    devices = status["devices"]

    def per_device(key: str) -> list[tuple[str, float]]:
        return [(f'{{device="{name}"}}', float(d[key])) for name, d in devices.items()]

    buffer, uplink = status["buffer"], status["uplink"]
    metric("up", "gauge", "1 while the agent runs.", [("", 1)])
    metric("uptime_seconds", "gauge", "Seconds since the agent started.", [("", status["uptime_s"])])
    metric("device_polls_ok_total", "counter", "Polls that got an answer.", per_device("polls_ok"))
    metric("device_polls_failed_total", "counter", "Polls that failed (no answer, refused, timeout).",
           per_device("polls_failed"))
    metric("device_overruns_total", "counter", "Ticks skipped because the previous poll was still running.",
           per_device("overruns"))
    metric("device_readings_total", "counter", "Readings produced.", per_device("readings"))
    metric("device_bad_readings_total", "counter", "Readings with quality bad.", per_device("bad_readings"))
    metric("device_last_poll_seconds", "gauge", "How long the last poll took.",
           [(labels, value / 1000) for labels, value in per_device("last_poll_ms")])
    metric("device_state", "gauge", "1 for the device's current state.",
           [(f'{{device="{name}",state="{state}"}}', float(d["state"] == state))
            for name, d in devices.items() for state in _STATES])
    shared = status.get("lines", [])

    def per_line(key: str) -> list[tuple[str, float]]:
        return [(f'{{line="{_label(line["line"])}"}}', float(line[key])) for line in shared]

    metric("line_utilisation", "gauge", "Share of the last minute a shared line (serial port, TCP gateway) was "
           "busy; near 1 it cannot keep its devices' schedules.", per_line("utilisation"))
    metric("line_requests_total", "counter", "Requests sent on the line.", per_line("requests"))
    metric("line_timeouts_total", "counter", "Requests on the line that got no answer.", per_line("timeouts"))
    metric("line_queue_requests", "gauge", "Requests waiting for their turn on the line.", per_line("queue"))
    metric("buffer_readings", "gauge", "Readings waiting in the buffer for the broker.", [("", buffer["readings"])])
    metric("buffer_bytes", "gauge", "The buffer's size on disk.", [("", buffer["bytes"])])
    metric("buffer_oldest_age_seconds", "gauge", "Age of the oldest waiting reading.", [("", buffer["oldest_age_s"])])
    reasons = ("dropped_oldest", "rejected", "expired", "unstored")
    metric("buffer_lost_readings_total", "counter", "Readings given up by the buffer's limits, by reason.",
           [(f'{{reason="{reason}"}}', buffer[reason]) for reason in reasons])
    metric("mqtt_connected", "gauge", "1 while connected to the broker.", [("", float(status["mqtt_connected"]))])
    metric("mqtt_inflight_messages", "gauge", "Messages awaiting the broker's PUBACK.", [("", uplink["inflight"])])
    metric("mqtt_delivered_readings_total", "counter", "Readings the broker acknowledged.",
           [("", uplink["delivered_readings"])])
    return "\n".join(lines) + "\n"


class MetricsServer:
    def __init__(self, host: str, port: int, snapshot: Snapshot) -> None:
        self.host, self.port = host, port
        self._snapshot = snapshot
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics and /status.json", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if method != "GET":
                await self._reply(writer, 405, "text/plain", "only GET\n")
            elif path == "/metrics":
                await self._reply(writer, 200, "text/plain; version=0.0.4", prometheus_text(await self._snapshot()))
            elif path == "/status.json":
                await self._reply(writer, 200, "application/json", json.dumps(await self._snapshot()))
            else:
                await self._reply(writer, 404, "text/plain", "try /metrics or /status.json\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ConnectionError):
            pass  # a bad or slow client: drop it, the agent goes on
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, code: int, content_type: str, body: str) -> None:
        data = body.encode()
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[code]
        writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + data)
        await writer.drain()
