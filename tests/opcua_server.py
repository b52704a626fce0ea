"""OPC-UA servers for the tests: the simulator (drivers/opcua/simulator.py) in-process, or as a child
process where a restart must be real (the socket closes, the sessions and subscriptions die with it).
Every process started here is stopped by its PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class SimulatorProcess:
    """`python -m drivers.opcua.simulator` on a fixed port, so that a restart comes back at the same URL."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.namespace_index: int | None = None

    @property
    def url(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}/edge-agent/"

    def start(self, *, padding: int = 0, tick: float = 0.05, timeout: float = 20.0,
              extra: list[str] | None = None) -> None:
        assert self.process is None or self.process.poll() is not None
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "drivers.opcua.simulator", "--port", str(self.port), "--padding",
                 str(padding), "--tick", str(tick), *(extra or [])],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            if "READY" in text:
                self.namespace_index = int(text.split("READY", 1)[1].split()[2])
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the OPC-UA simulator did not start:\n{text}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop it like a crash or power cut of the server: SIGKILL, no goodbye to the clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
