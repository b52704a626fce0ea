"""The systemd notify protocol (sd_notify), spoken over its datagram socket: no compiled dependency.

READY=1 once the buffer is open and polling has started; STATUS= a line for `systemctl status`; WATCHDOG=1
sent from the event loop itself, so that a hung loop misses its pings and systemd restarts the agent
(WatchdogSec= in the unit); STOPPING=1 at shutdown. Outside systemd (no NOTIFY_SOCKET) every call does
nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        # An abstract socket is written "@name"; on the wire its name starts with a NUL byte.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        # systemd asks for a ping at least every WATCHDOG_USEC; ping at half of it, as sd_watchdog_enabled
        # advises. WATCHDOG_PID names the process meant (not, say, a child we started).
        meant_for_us = not pid or (pid.isdigit() and int(pid) == os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and meant_for_us else None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, *fields: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            if not self._failed:  # once: a missing socket must not flood the journal
                log.warning("cannot notify systemd at %s: %s", self._address.lstrip("\0"), exc)
            self._failed = True

    async def watchdog(self) -> None:
        """Ping until cancelled. Runs on the event loop: if the loop hangs, the pings stop."""
        if self.watchdog_interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
