"""The systemd notify protocol (sd_notify), spoken over its datagram socket: no compiled dependency.

READY=1 once the buffer is open and polling has started; STATUS= a line for `systemctl status`; WATCHDOG=1
sent from the event loop itself, so that a hung loop misses its pings and systemd restarts the agent
(WatchdogSec= in the unit); STOPPING=1 at shutdown. Outside systemd (no NOTIFY_SOCKET) every call does
nothing.

Also here: what a device the service's device policy blocks looks like (EPERM on open), in words.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
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


def device_blocked(path: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """Why opening a device node failed with EPERM ("Operation not permitted"), and what to do.

    File permissions and group membership give EACCES; EPERM on open() of a device node comes from a device
    policy (systemd's DevicePolicy=/DeviceAllow=, a container's device cgroup). The unit allows the serial
    classes; a class it does not know (another major) is named with the line to add."""
    where = "this service's device policy (DevicePolicy=closed and DeviceAllow= in edge-agent.service)" \
        if environ.get("INVOCATION_ID") else "a device policy (a systemd unit's DeviceAllow=, a container's devices)"
    node = ""
    allow = "DeviceAllow=char-<major> rw"
    if path:
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is not None and stat.S_ISCHR(st.st_mode):
            major = os.major(st.st_rdev)
            node = f" ({path} is character device {major}:{os.minor(st.st_rdev)})"
            allow = f"DeviceAllow=char-{major} rw"
    return (f"operation not permitted: blocked by {where}{node}, not by file permissions or groups: add "
            f"`{allow}` with `systemctl edit edge-agent`, then `systemctl restart edge-agent`")
