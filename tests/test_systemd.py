"""Running under systemd: the notify protocol spoken to a real datagram socket, the watchdog seen to stop
when the event loop hangs, and the unit file checked by systemd's own tools where they are installed."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest

from agent.demo.mosquitto import MosquittoProcess
from drivers.modbus.simulator import SimServer
from tests.conftest import REPO, agent_config, meter_device
from tests.test_end_to_end import eventually, start_agent, stop_agent

UNIT = REPO / "systemd" / "edge-agent.service"


class NotifySocket:
    """What systemd listens on: records every datagram with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.received: list[tuple[float, str]] = []
        self._running = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._running:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for field in data.decode().split("\n"):
                self.received.append((time.monotonic(), field))

    def times(self, field: str) -> list[float]:
        return [at for at, text in self.received if text == field]

    def close(self) -> None:
        self._running = False
        self._thread.join(2)
        self.sock.close()


async def test_ready_status_and_a_watchdog_that_stops_when_the_event_loop_hangs(
        tmp_path: Path, mosquitto: MosquittoProcess, modbus_sim: SimServer, monkeypatch: pytest.MonkeyPatch) -> None:
    notify = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # WatchdogSec=0.4: a ping every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    config = agent_config(tmp_path, mosquitto.port, meter_device(modbus_sim.port, interval="100ms"))
    try:
        agent, stop, task = await start_agent(config)
        await eventually(lambda: len(notify.times("WATCHDOG=1")) >= 3 and notify.times("READY=1"), 5,
                         "READY and watchdog pings")
        hung_at = time.monotonic()
        time.sleep(1.5)  # the event loop hangs: nothing runs, no ping may go out
        await eventually(lambda: any(at > hung_at + 1.5 for at in notify.times("WATCHDOG=1")), 5,
                         "pings again after the hang")
        assert agent.uplink is not None
        agent.uplink.status_due.set()
        await eventually(lambda: any(text.startswith("STATUS=1/1 devices ok") for _, text in notify.received), 5,
                         "a status line for systemctl")
        await stop_agent(stop, task)
    finally:
        notify.close()
    pings = notify.times("WATCHDOG=1")
    gaps = [later - earlier for earlier, later in pairwise(pings)]
    assert max(gaps) >= 1.3  # the hang: systemd (WatchdogSec=0.4) would have restarted the agent
    assert sorted(gaps)[len(gaps) // 2] < 0.4  # otherwise on time
    fields = [text for _, text in notify.received]
    assert fields.index("READY=1") < fields.index("STOPPING=1")


def test_not_under_systemd_nothing_is_sent() -> None:
    from agent.systemd import Notifier

    notifier = Notifier(environ={})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.notify("READY=1")  # does nothing, raises nothing
    assert asyncio.run(notifier.watchdog()) is None


def test_the_watchdog_is_not_taken_for_another_process() -> None:
    from agent.systemd import Notifier

    assert Notifier(environ={"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier(environ={"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_unit_file_verifies_and_its_exposure_is_low(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this checkout's agent instead of /opt.
    unit = tmp_path / "edge-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/edge-agent/venv/bin/edge-agent",
                                             str(REPO / ".venv" / "bin" / "edge-agent")))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                              text=True, timeout=60)
    match = re.search(r"Overall exposure level for edge-agent.service: ([0-9.]+)", security.stdout)
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) <= 2.0, security.stdout


def unit_values(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(f"{key}=")]


def test_usb_serial_adapters_are_allowed_by_major_number_so_a_late_driver_is_not_blocked() -> None:
    """A class given by name (char-ttyUSB) is looked up in /proc/devices when the unit starts; a driver that
    loads later (seen at boot: unit at 26 s, driver at 30 s) left the adapter blocked until a restart. The
    kernel's fixed majors need no lookup: 188 (ttyUSB) and 166 (ttyACM)."""
    allowed = unit_values("DeviceAllow")
    assert unit_values("DevicePolicy") == ["closed"]
    assert "char-188 rw" in allowed and "char-166 rw" in allowed
    assert not [rule for rule in allowed if rule.startswith(("char-ttyUSB", "char-ttyACM"))], allowed
    # Nothing broader than serial classes: no wildcard, no block devices.
    assert all(re.fullmatch(r"char-(ttyS|\d+) rw", rule) for rule in allowed), allowed


def test_reload_checks_the_config_before_it_signals_the_agent(tmp_path: Path) -> None:
    """`systemctl reload` runs every ExecReload= in turn and fails at the first that fails: the check first, so
    that a file the agent would refuse makes the reload fail, with the reason in the journal."""
    reload = unit_values("ExecReload")
    assert len(reload) == 2 and reload[1] == "/bin/kill -HUP $MAINPID", reload
    check = reload[0].split()
    assert check[:2] == ["/opt/edge-agent/venv/bin/edge-agent", "check"], reload
    config = agent_config(tmp_path, 1883, meter_device(502))
    good = config.read_text()
    command = [str(REPO / ".venv" / "bin" / "edge-agent"), *check[1:]]
    command[command.index("/etc/edge-agent/config.toml")] = str(config)
    config.write_text(good.replace('driver = "modbus"', 'driver = "nosuch"'))
    refused = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 78 and "devices[0]" in refused.stderr, refused.stdout + refused.stderr
    config.write_text(good)
    accepted = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr


def test_a_port_blocked_by_the_device_policy_is_not_sent_to_group_membership(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """EPERM on open comes from a device policy; no test can be put under one without systemd as PID 1, so the
    error pyserial raises is built here, for a real character device (a pty)."""
    import errno
    import os

    import serial

    from drivers.modbus.line import describe_open_error

    controller, terminal = os.openpty()
    try:
        port = os.ttyname(terminal)
        major = os.major(os.stat(port).st_rdev)
        error = serial.SerialException(errno.EPERM, f"could not open port {port}: [Errno 1] Operation not "
                                                    f"permitted: '{port}'")
        monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")  # as systemd sets it
        text = describe_open_error(error, port)
    finally:
        os.close(controller)
        os.close(terminal)
    assert "blocked by this service's device policy" in text, text
    assert f"add `DeviceAllow=char-{major} rw` with `systemctl edit edge-agent`" in text
    assert "dialout" not in text and "usermod" not in text
