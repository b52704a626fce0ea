"""Peers for the uplink's tests besides mosquitto: a second MQTT broker implementation (nats-server, whose
MQTT speaks 3.1.1 only and refuses topics with '.' or ' ' by dropping the connection) and raw TCP peers
that misbehave where no broker can (accept and close at once, accept and never answer). Every process is
started on a free loopback port, bounded in time, and killed by its PID at teardown."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from agent.demo.mosquitto import free_port

NATS_SERVER = shutil.which("nats-server") or ("/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists()
                                               else None)


class NatsServer:
    """nats-server with its MQTT listener (which needs JetStream) on free loopback ports."""

    def __init__(self, work_dir: Path, extra_config: str = "") -> None:
        self.work_dir = work_dir
        self.port = free_port()
        self.client_port = free_port()
        self.extra_config = extra_config
        self.log_path = work_dir / "nats.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        assert NATS_SERVER is not None
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self.work_dir / "nats.conf"
        config.write_text(f"""
server_name: edge-agent-test
listen: 127.0.0.1:{self.client_port}
jetstream {{ store_dir: "{self.work_dir / 'jetstream'}" }}
mqtt {{ listen: 127.0.0.1:{self.port} }}
{self.extra_config}
""")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen([NATS_SERVER, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not _accepts(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"nats-server did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(10)
        self._process = None


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class RawPeer:
    """A TCP listener that records when each connection came and either closes it at once (a broker going
    down) or keeps it open without a word (a broker that does not speak the client's MQTT version)."""

    def __init__(self, close_at_once: bool = True) -> None:
        self.close_at_once = close_at_once
        self.accepted: list[float] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.append(time.monotonic())
        if self.close_at_once:
            writer.close()
        else:
            self._writers.append(writer)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
