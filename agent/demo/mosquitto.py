"""Start and control a real mosquitto broker process.

The demo, the integration tests and the benchmarks all want the same thing: a private mosquitto on a free
loopback port that can be killed and brought back on the same port (to play a broker outage) and that is
never left running afterwards. A system mosquitto may already own 127.0.0.1:1883, so this module never
uses a fixed port and only ever signals the process it spawned, by PID.

Invariants:
- Every process we spawn is reaped: `stop()`/`kill()` wait for it, the context manager stops it, and a
  `weakref.finalize` hook kills it at interpreter exit if the owner forgot.
- `start()` returns only once the port accepts TCP connections; otherwise it raises `MosquittoStartError`
  carrying the tail of the broker log, and no process is left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

LOOPBACK = "127.0.0.1"

# Debian installs the broker in /usr/sbin, which is not on a normal user's PATH.
_SBIN_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
_ADDRESS_IN_USE_RETRY_S = 1.0
_RUNNING_LINE = re.compile(r"mosquitto version \S+ running")


class MosquittoError(RuntimeError):
    """Base class for everything that goes wrong while driving a mosquitto process."""


class MosquittoNotFoundError(MosquittoError):
    """The mosquitto binary is not installed (or not where we look)."""


class MosquittoStartError(MosquittoError):
    """mosquitto exited or did not accept connections in time; the message carries its log tail."""


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _SBIN_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on `host` that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _reap(proc: subprocess.Popen[bytes]) -> None:
    # Runs from weakref.finalize (also at interpreter exit): must not raise.
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


class MosquittoProcess:
    """One private mosquitto broker on a loopback port; `with MosquittoProcess() as broker:`."""

    host: str = LOOPBACK

    def __init__(
        self,
        port: int | None = None,
        work_dir: str | Path | None = None,
        extra_config: Sequence[str] = (),
        *,
        binary: str | None = None,
        start_timeout: float = 5.0,
    ) -> None:
        self._binary = binary or find_mosquitto()
        self.port = port if port is not None else free_port(self.host)
        self._owns_work_dir = work_dir is None
        self.work_dir = Path(tempfile.mkdtemp(prefix="mosquitto-")) if work_dir is None else Path(work_dir)
        self.extra_config = tuple(extra_config)
        self.start_timeout = start_timeout
        self.config_path = self.work_dir / "mosquitto.conf"
        self.log_path = self.work_dir / "mosquitto.log"
        # Errors printed before the log file is open (bad config, port in use) only reach stderr.
        self.stderr_path = self.work_dir / "mosquitto.stderr"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._finalizer: weakref.finalize | None = None

    @property
    def pid(self) -> int | None:
        """PID of the current process, None before the first start."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            # 0 = no limit in mosquitto 2.0, so an outage-recovery test measures the agent, not broker caps.
            "max_inflight_messages 0",
            "max_queued_messages 0",
            "set_tcp_nodelay true",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto drops to user "mosquitto" before opening the log file and TLS files, which
            # then cannot read our 0700 temp dir; it keeps running without a log. Stay root instead.
            lines.append("user root")
        lines.extend(self.extra_config)
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Spawn mosquitto and return once its port accepts connections."""
        if self.running:
            return
        if self._binary is None:
            raise MosquittoNotFoundError(
                "mosquitto is not installed (looked on PATH and in " + ", ".join(_SBIN_CANDIDATES) + ")"
            )
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        started = time.monotonic()
        deadline = started + self.start_timeout
        while True:
            self._spawn()
            failure = self._wait_until_listening(deadline)
            if failure is None:
                return
            # Right after kill() the old listening socket can linger; mosquitto sets SO_REUSEADDR, but a short
            # retry covers the rest. A port held by another live listener still fails after a second.
            if "Address already in use" in failure and time.monotonic() - started < _ADDRESS_IN_USE_RETRY_S:
                time.sleep(0.1)
                continue
            self.kill()
            raise MosquittoStartError(f"mosquitto on {self.host}:{self.port} {failure}\n{self.log_tail()}")

    def _spawn(self) -> None:
        assert self._binary is not None
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        # Truncated per spawn so an old error does not fool the retry check.
        with self.stderr_path.open("wb") as stderr:
            self._proc = subprocess.Popen(
                [self._binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                cwd=self.work_dir,
            )
        self._finalizer = weakref.finalize(self, _reap, self._proc)

    def _output_since_spawn(self) -> str:
        """What this spawn wrote to its log file and to stderr (the log only reports after it is open)."""
        text = ""
        with contextlib.suppress(OSError), self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            text = log.read().decode(errors="replace")
        with contextlib.suppress(OSError):
            text += self.stderr_path.read_text(errors="replace")
        return text

    def _wait_until_listening(self, deadline: float) -> str | None:
        """None once our process is up and the port accepts connections, else why it did not."""
        assert self._proc is not None
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                return f"exited with code {code}: {self._output_since_spawn().strip()}"
            # A connectable port alone could be someone else's listener: mosquitto logs "running" only
            # after all its listeners are bound.
            if _RUNNING_LINE.search(self._output_since_spawn()) and _port_accepts(self.host, self.port):
                return None
            time.sleep(0.02)
        return f"did not accept connections within {self.start_timeout:.1f} s"

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; always reaps the process."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._detach()

    def kill(self) -> None:
        """SIGKILL: a broker crash, as far as its clients can tell."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._detach()

    def restart(self) -> None:
        """Stop if running, then start again on the same port (clients reconnect to the same address)."""
        self.stop()
        self.start()

    def _detach(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def log_tail(self, lines: int = 20) -> str:
        """Last lines of the broker log and stderr, for error messages."""
        parts = []
        for path in (self.log_path, self.stderr_path):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()
                if text:
                    parts.append(f"--- {path.name} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(parts) or "(mosquitto wrote no log)"

    def close(self) -> None:
        """Stop the broker and remove the work dir if we created it."""
        self.stop()
        if self._owns_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> MosquittoProcess:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
