"""The local metrics endpoint: Prometheus text at /metrics, the status snapshot as JSON at /status.json, and
the technician's status page at / (agent/webpage.py) with its data at /page.json.

Bound to 127.0.0.1 by default: operations staff scrape it on the gateway or over an SSH tunnel, and
`edge-agent status` reads /status.json. A tiny asyncio HTTP server (GET and HEAD, one request per
connection), so it shares the agent's event loop and no thread; every figure comes from the same snapshot
as the status message the platform receives.

A client can never stop or slow the agent: headers are read for at most 5 s and 8 KiB (431 past that), at
most 32 connections are served at once (more are closed unanswered), every error is a short plain-text
reply. With a password (required off loopback, config.py), every path asks for it (HTTP Basic); it is
compared as a digest in constant time, and a wrong one is answered only after a pause taken one at a time,
so guessing runs at two tries a second however many connections try.

With a certificate ([metrics] tls_cert_file and tls_key_file) the listener speaks HTTPS only: off loopback,
the password and the figures are then encrypted on the plant network. A plain-HTTP request to it is never
answered: its bytes are not a TLS handshake, so the connection is closed before anything is read, and no
password prompt or figure goes out in clear. A handshake gets HEADER_TIMEOUT, as the headers do. The
certificate and key are read once, at start: replacing the files takes a restart.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.webpage import load_assets
from buffer.store import LOSS_REASONS

log = logging.getLogger(__name__)

Snapshot = Callable[[], Awaitable[dict[str, Any]]]
MAX_HEADER_BYTES = 8192
MAX_CONNECTIONS = 32
HEADER_TIMEOUT = 5.0
WRONG_PASSWORD_PAUSE = 0.5
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large"}
# The page's own files only, no inline script, no framing by another site, nothing cached by a proxy.
_PAGE_HEADERS = ("Content-Security-Policy: default-src 'self'; frame-ancestors 'none'\r\n"
                 "X-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\n"
                 "Cache-Control: no-store\r\n")
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
    # What the line's receive path threw away (drivers/modbus/README.md "What came instead of an answer").
    with_errors = [line for line in shared if "crc_errors" in line]
    metric("line_crc_errors_total", "counter", "RTU frames that looked like an answer but failed the CRC: noise "
           "or a wiring fault (termination, biasing, baud rate, cable).",
           [(f'{{line="{_label(line["line"])}"}}', float(line["crc_errors"])) for line in with_errors])
    metric("line_framing_errors_total", "counter", "Answers that came with stray bytes around them, bytes that were "
           "no frame, malformed Modbus TCP headers.",
           [(f'{{line="{_label(line["line"])}"}}', float(line["framing_errors"])) for line in with_errors])
    metric("line_discarded_replies_total", "counter", "Well-formed replies that were not the request's, by what "
           "did not match (transaction_id, unit_id, function_code, length; unexpected: no request waiting).",
           [(f'{{line="{_label(line["line"])}",reason="{reason}"}}', float(count))
            for line in with_errors for reason, count in sorted(line["discarded"].items())])
    metric("line_disconnects_total", "counter", "Connections (or serial ports) lost.",
           [(f'{{line="{_label(line["line"])}"}}', float(line["disconnects"])) for line in with_errors])
    metric("buffer_readings", "gauge", "Readings waiting in the buffer for the broker.", [("", buffer["readings"])])
    metric("buffer_bytes", "gauge", "The buffer's size on disk.", [("", buffer["bytes"])])
    metric("buffer_oldest_age_seconds", "gauge", "Age of the oldest waiting reading.", [("", buffer["oldest_age_s"])])
    metric("buffer_lost_readings_total", "counter", "Readings given up (buffer limits, disk full, refused by the "
           "broker), by reason.", [(f'{{reason="{reason}"}}', buffer[reason]) for reason in LOSS_REASONS])
    metric("mqtt_connected", "gauge", "1 while connected to the broker.", [("", float(status["mqtt_connected"]))])
    metric("mqtt_inflight_messages", "gauge", "Messages awaiting the broker's PUBACK.", [("", uplink["inflight"])])
    metric("mqtt_delivered_readings_total", "counter", "Readings the broker acknowledged.",
           [("", uplink["delivered_readings"])])
    _clock_and_energy(status, metric)
    return "\n".join(lines) + "\n"


def _clock_and_energy(status: dict[str, Any],
                      metric: Callable[[str, str, str, list[tuple[str, float]]], None]) -> None:
    """The clock's health (always) and the energy stage's figures (with energy tables): energy/wiring.py."""
    clock = status.get("clock")
    if clock is not None:
        known = clock["known"]
        metric("clock_synchronised", "gauge", "1 while the kernel reports its clock synchronised (adjtimex; NTP via "
               "chrony or timesyncd); absent when it cannot be asked.",
               [("", float(clock["synchronised"]))] if known else [])
        metric("clock_estimated_error_seconds", "gauge", "The kernel's estimated clock error.",
               [("", clock["esterror_s"])] if known else [])
        metric("clock_maximum_error_seconds", "gauge", "The kernel's maximum clock error.",
               [("", clock["maxerror_s"])] if known else [])
        metric("clock_steps_total", "counter", "Wall-clock steps seen since the start (NTP's first correction, a "
               "manual date change): demand windows across one are flagged clock_step.", [("", clock["steps"])])
    energy = status.get("energy")
    if energy is not None:
        metric("energy_windows_total", "counter", "Demand windows closed since the start (meters and groups).",
               [("", energy["windows"])])
        metric("energy_alarms_active", "gauge", "Demand alarm levels raised now, all meters and groups.",
               [("", energy["alarms_active"])])


def server_tls(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The listener's HTTPS: the standard library's server defaults (its cipher list, the server's order of
    preference, no compression), never below TLS 1.2 (already its default; said here so that it stays).
    Raises ssl.SSLError or OSError when the files cannot be loaded."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file), password="")
    return context


_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def local_client_tls(cert_file: Path) -> ssl.SSLContext:
    """How a client on the gateway itself (`edge-agent status`) trusts the agent's HTTPS listener.

    It cannot check the certificate the usual way: it connects to the listener's address as configured
    (0.0.0.0, the plant-side IP, a host name), which need not be a name the certificate carries, and a
    self-signed certificate has no authority to check it against. So it trusts exactly one certificate, the
    first of tls_cert_file, which is the one the agent serves: the handshake then proves the listener holds
    that certificate's key. That is narrower than a CA and a name check, not weaker: verification stays on
    (a different certificate, or this one expired, is refused); only the name check is off, because the
    pinned certificate replaces it. For the agent's own listener only: any other server is checked the
    ordinary way, by its CA and its name. Raises OSError or ssl.SSLError when the file holds no certificate."""
    match = _PEM_CERTIFICATE.search(cert_file.read_text(encoding="ascii", errors="replace"))
    if match is None:
        raise ssl.SSLError(f"no PEM certificate in {cert_file}")
    context = ssl.create_default_context(cadata=match.group(0))  # this certificate only, not the system store
    # The pinned certificate is the trust anchor itself, even when a CA issued it.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False
    return context


class MetricsServer:
    def __init__(self, host: str, port: int, snapshot: Snapshot, page: Snapshot | None = None,
                 password: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        """`page`: the status page's snapshot (/page.json); without it, no page. `password`: asked of every
        request (HTTP Basic, any user name). `tls`: serve HTTPS only (server_tls)."""
        self.host, self.port = host, port
        self._tls = tls
        self._snapshot = snapshot
        self._page = page
        self._assets = load_assets() if page is not None else {}
        self._password = hashlib.sha256(password.encode()).digest() if password is not None else None
        self._wrong_password = asyncio.Lock()
        self._server: asyncio.Server | None = None
        self.connections = 0
        self.refused = 0  # connections closed unanswered because MAX_CONNECTIONS were open

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=MAX_HEADER_BYTES, ssl=self._tls,
            ssl_handshake_timeout=HEADER_TIMEOUT if self._tls is not None else None)
        self.port = self._server.sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        where = f"{'https' if self._tls is not None else 'http'}://{host}:{self.port}"
        log.info("%s on %s/ (/metrics, /status.json)%s", "status page" if self._page else "metrics", where,
                 "; password required" if self._password else "")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= MAX_CONNECTIONS:
            self.refused += 1
            writer.close()
            return
        self.connections += 1
        try:
            await self._serve(reader, writer)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # a slow client or one that went away: drop it, the agent goes on
        finally:
            self.connections -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEADER_TIMEOUT):
                request = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await self._reply(writer, 431, "text/plain", f"request headers over {MAX_HEADER_BYTES} bytes\n")
            await _discard_rest(reader)
            return
        request_line, *header_lines = request[:-4].split(b"\r\n")
        parts = request_line.decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await self._reply(writer, 400, "text/plain", "not an HTTP request\n")
            return
        method, target, _ = parts
        headers = dict(_header(line) for line in header_lines)
        head = method == "HEAD"
        if self._password is not None and not self._authorised(headers.get("authorization", "")):
            if "authorization" in headers:
                async with self._wrong_password:  # one pause at a time: guesses cannot run in parallel
                    await asyncio.sleep(WRONG_PASSWORD_PAUSE)
            await self._reply(writer, 401, "text/plain", "password required\n", head,
                              'WWW-Authenticate: Basic realm="edge-agent", charset="UTF-8"\r\n')
            return
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            await self._reply(writer, 405, "text/plain", "only GET\n", extra="Allow: GET, HEAD\r\n")
        elif path == "/metrics":
            await self._reply(writer, 200, "text/plain; version=0.0.4", prometheus_text(await self._snapshot()),
                              head)
        elif path == "/status.json":
            await self._reply(writer, 200, "application/json", json.dumps(await self._snapshot()), head)
        elif path == "/page.json" and self._page is not None:
            await self._reply(writer, 200, "application/json", json.dumps(await self._page()), head, _PAGE_HEADERS)
        elif path in self._assets:
            asset = self._assets[path]
            await self._reply(writer, 200, asset.content_type, asset.body, head, _PAGE_HEADERS)
        else:
            await self._reply(writer, 404, "text/plain", "not found; try / (the status page), /metrics or "
                                                          "/status.json\n", head)

    def _authorised(self, authorization: str) -> bool:
        assert self._password is not None
        scheme, _, encoded = authorization.partition(" ")
        try:
            credentials = base64.b64decode(encoded.strip(), validate=True) if scheme.lower() == "basic" else b""
        except (binascii.Error, ValueError):
            credentials = b""
        _, _, password = credentials.partition(b":")
        # Digests of equal length, compared in constant time: neither the password nor its length leaks.
        return hmac.compare_digest(hashlib.sha256(password).digest(), self._password)

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, code: int, content_type: str, body: str | bytes,
                     head: bool = False, extra: str = "") -> None:
        data = body.encode() if isinstance(body, str) else body
        writer.write(f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(data)}\r\n{extra}Connection: close\r\n\r\n".encode()
                     + (b"" if head else data))
        await writer.drain()


def _header(line: bytes) -> tuple[str, str]:
    name, _, value = line.decode("latin-1").partition(":")
    return name.strip().lower(), value.strip()


async def _discard_rest(reader: asyncio.StreamReader) -> None:
    """Read what the client still sends (briefly, boundedly) before closing: closing a socket with unread
    data resets the connection, and the client may then never see the reply."""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(1.0):
            for _ in range(64):
                if not await reader.read(65536):
                    return
