"""The uplink over TLS against a real mosquitto: server verification, mutual TLS, a wrong CA, a username
and password over TLS, and no secret in any log line.

The broker gets two listeners: the TLS one the agent talks to (the port `MosquittoProcess` opens first;
mosquitto applies `cafile`/`certfile`/`keyfile`/`require_certificate` to the listener above them) and a
plain one for the test's Monitor, which plays the platform and needs no TLS. The certificates are made
fresh for each test by tests/certs.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.demo.mosquitto import MosquittoProcess, free_port
from agent.monitor import Monitor
from drivers.modbus.simulator import SimServer
from tests.certs import CertificateSet, make_test_certificates
from tests.conftest import REPO, agent_config, meter_device, requires_mosquitto
from tests.test_end_to_end import eventually, start_agent, stop_agent

pytestmark = [requires_mosquitto, pytest.mark.timeout(60)]

GATEWAY = "gw-test"
TOPICS = f"edge/test-site/{GATEWAY}/#"
USERNAME = "gateway-7"
PASSWORD = "Tr0ub4dor&3-not-in-any-log"
WRONG_PASSWORD = "wrong-Pa55word-also-never-logged"
# The platform's own account on the password-protected broker (allow_anonymous is global in mosquitto 2.0).
MONITOR_USER, MONITOR_PASSWORD = "platform", "monitor-secret"
QUIET_SECONDS = 3.0  # long enough for two or three reconnect attempts (reconnect_min 1s, reconnect_max 2s)


@dataclass(frozen=True, slots=True)
class TlsBroker:
    process: MosquittoProcess
    plain_port: int  # for the Monitor

    @property
    def tls_port(self) -> int:
        return self.process.port


@pytest.fixture
def certs(tmp_path: Path) -> CertificateSet:
    return make_test_certificates(tmp_path / "certs")


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    """A mosquitto password file with the agent's account and the monitor's."""
    mosquitto_passwd = shutil.which("mosquitto_passwd")
    if mosquitto_passwd is None:
        pytest.skip("mosquitto_passwd is not on PATH (it comes with the mosquitto package)")
    path = tmp_path / "mosquitto.passwd"
    subprocess.run([mosquitto_passwd, "-b", "-c", str(path), USERNAME, PASSWORD], check=True, timeout=10)
    subprocess.run([mosquitto_passwd, "-b", str(path), MONITOR_USER, MONITOR_PASSWORD], check=True, timeout=10)
    return path


@pytest.fixture
def tls_broker_factory(tmp_path: Path, certs: CertificateSet) -> Iterator[Any]:
    """Start a mosquitto with a TLS listener (and a plain one); every broker started is stopped."""
    started: list[MosquittoProcess] = []

    def start(*, require_certificate: bool = False, password_file: Path | None = None) -> TlsBroker:
        plain_port = free_port()
        extra = [f"cafile {certs.ca_file}", f"certfile {certs.server_cert}", f"keyfile {certs.server_key}"]
        if require_certificate:
            extra.append("require_certificate true")
        if password_file is not None:
            # Security settings are global (per_listener_settings false): they hold for both listeners.
            extra += ["allow_anonymous false", f"password_file {password_file}"]
        extra.append(f"listener {plain_port} 127.0.0.1")
        process = MosquittoProcess(work_dir=tmp_path / f"mosquitto-{len(started)}", extra_config=extra)
        started.append(process)
        process.start()
        return TlsBroker(process, plain_port)

    yield start
    for process in started:
        process.close()


def monitor_for(broker: TlsBroker, *, authenticated: bool = False) -> Monitor:
    monitor = Monitor("127.0.0.1", broker.plain_port, TOPICS)
    if authenticated:
        # Monitor has no credentials option; the platform's account on a broker without anonymous access.
        monitor._client.username_pw_set(MONITOR_USER, MONITOR_PASSWORD)
    return monitor


def tls_section(ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None) -> str:
    lines = ["[mqtt.tls]", f'ca_file = "{ca_file}"']
    if cert_file is not None and key_file is not None:
        lines += [f'cert_file = "{cert_file}"', f'key_file = "{key_file}"']
    return "\n".join(lines) + "\n"


async def readings_arrive(config: Path, monitor: Monitor) -> None:
    with monitor:
        agent, stop, task = await start_agent(config)
        try:
            await eventually(lambda: monitor.received(GATEWAY) >= 8, 10, "readings over TLS")
            assert agent.uplink is not None and agent.uplink.connected
        finally:
            await stop_agent(stop, task)
    assert monitor.status, "the agent's status message arrived too"


async def nothing_arrives(config: Path, monitor: Monitor) -> None:
    """Run the agent for a few seconds while its connection keeps failing: nothing may be delivered,
    and what it polled waits in the buffer."""
    with monitor:
        agent, stop, task = await start_agent(config)
        try:
            assert agent.uplink is not None and agent.buffer is not None
            await asyncio.sleep(QUIET_SECONDS)
            assert not agent.uplink.connected
            assert agent.uplink.readings_delivered == 0
            assert (await agent.buffer.stats()).readings > 0, "polled readings must wait in the buffer"
        finally:
            await stop_agent(stop, task)
    assert monitor.streams == {} and monitor.status == {}, "nothing may reach the broker"


def link_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and r.name == "agent.uplink" and "MQTT broker" in r.getMessage()]


def edge_agent_check(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "check", "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})})


# --- 1. server verification ------------------------------------------------------------------------

async def test_readings_arrive_over_tls_verified_against_the_ca_file(
        tmp_path: Path, certs: CertificateSet, tls_broker_factory: Any, modbus_sim: SimServer) -> None:
    broker = tls_broker_factory()
    config = agent_config(tmp_path, broker.tls_port, meter_device(modbus_sim.port),
                          extra_mqtt=tls_section(certs.ca_file))
    await readings_arrive(config, monitor_for(broker))


# --- 2. mutual TLS -----------------------------------------------------------------------------------

async def test_readings_arrive_over_mutual_tls(
        tmp_path: Path, certs: CertificateSet, tls_broker_factory: Any, modbus_sim: SimServer) -> None:
    broker = tls_broker_factory(require_certificate=True)
    config = agent_config(tmp_path, broker.tls_port, meter_device(modbus_sim.port),
                          extra_mqtt=tls_section(certs.ca_file, certs.client_cert, certs.client_key))
    await readings_arrive(config, monitor_for(broker))


async def test_without_the_client_certificate_nothing_is_delivered_and_an_error_is_logged(
        tmp_path: Path, certs: CertificateSet, tls_broker_factory: Any, modbus_sim: SimServer,
        caplog: pytest.LogCaptureFixture) -> None:
    broker = tls_broker_factory(require_certificate=True)
    config = agent_config(tmp_path, broker.tls_port, meter_device(modbus_sim.port),
                          extra_mqtt=tls_section(certs.ca_file))
    await nothing_arrives(config, monitor_for(broker))
    errors = link_errors(caplog)
    assert len(errors) == 1, errors  # loud once, then quiet


async def test_without_the_client_certificate_the_error_names_the_certificate(
        tmp_path: Path, certs: CertificateSet, tls_broker_factory: Any, modbus_sim: SimServer,
        caplog: pytest.LogCaptureFixture) -> None:
    broker = tls_broker_factory(require_certificate=True)
    config = agent_config(tmp_path, broker.tls_port, meter_device(modbus_sim.port),
                          extra_mqtt=tls_section(certs.ca_file))
    await nothing_arrives(config, monitor_for(broker))
    [error] = link_errors(caplog)
    assert "certificate" in error and "cert_file" in error, error


# --- 3. wrong CA -------------------------------------------------------------------------------------

async def test_a_wrong_ca_logs_one_clear_error_and_keeps_the_readings(
        tmp_path: Path, certs: CertificateSet, tls_broker_factory: Any, modbus_sim: SimServer,
        caplog: pytest.LogCaptureFixture) -> None:
    broker = tls_broker_factory()
    config = agent_config(tmp_path, broker.tls_port, meter_device(modbus_sim.port),
                          extra_mqtt=tls_section(certs.wrong_ca_file))
    await nothing_arrives(config, monitor_for(broker))
    errors = link_errors(caplog)
    assert len(errors) == 1, errors
    assert "certificate" in errors[0] and "ca_file" in errors[0], errors[0]


# --- 4 and 6. username and password over TLS, and no secret in any log line ---------------------------

def password_settings(tmp_path: Path, source: str, password: str, monkeypatch: pytest.MonkeyPatch) -> str:
    if source == "password_file":
        path = tmp_path / "mqtt.password"
        path.write_text(password + "\n")
        return f'username = "{USERNAME}"\npassword_file = "{path}"\n'
    monkeypatch.setenv("EDGE_AGENT_TEST_MQTT_PASSWORD", password)
    return f'username = "{USERNAME}"\npassword_env = "EDGE_AGENT_TEST_MQTT_PASSWORD"\n'


def assert_never_logged(secret: str, caplog: pytest.LogCaptureFixture) -> None:
    assert caplog.records, "the test must have captured the agent's log"
    for record in caplog.records:
        text = " ".join([str(record.msg), repr(record.args), record.getMessage(), record.exc_text or ""])
        assert secret not in text, f"the password appears in a log record of {record.name}: {record.getMessage()}"


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every logger at DEBUG, paho's too (it logs only when asked, but a change must not start leaking)."""
    caplog.set_level(logging.DEBUG)
    for name in ("paho", "paho.mqtt", "paho.mqtt.client", "agent", "agent.uplink"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


@pytest.mark.parametrize("source", ["password_file", "password_env"])
async def test_readings_arrive_with_a_password_over_tls_and_it_is_never_logged(
        source: str, tmp_path: Path, certs: CertificateSet, password_file: Path, tls_broker_factory: Any,
        modbus_sim: SimServer, monkeypatch: pytest.MonkeyPatch, debug_logs: pytest.LogCaptureFixture) -> None:
    broker = tls_broker_factory(password_file=password_file)
    settings = password_settings(tmp_path, source, PASSWORD, monkeypatch)
    config = agent_config(tmp_path, broker.tls_port, meter_device(modbus_sim.port),
                          extra_mqtt=settings + tls_section(certs.ca_file))
    await readings_arrive(config, monitor_for(broker, authenticated=True))
    assert_never_logged(PASSWORD, debug_logs)
    check = edge_agent_check(config)
    assert check.returncode == 0, check.stderr
    assert PASSWORD not in check.stdout + check.stderr


@pytest.mark.parametrize("source", ["password_file", "password_env"])
async def test_a_wrong_password_gives_a_clear_error_delivers_nothing_and_is_never_logged(
        source: str, tmp_path: Path, certs: CertificateSet, password_file: Path, tls_broker_factory: Any,
        modbus_sim: SimServer, monkeypatch: pytest.MonkeyPatch, debug_logs: pytest.LogCaptureFixture) -> None:
    broker = tls_broker_factory(password_file=password_file)
    settings = password_settings(tmp_path, source, WRONG_PASSWORD, monkeypatch)
    config = agent_config(tmp_path, broker.tls_port, meter_device(modbus_sim.port),
                          extra_mqtt=settings + tls_section(certs.ca_file))
    await nothing_arrives(config, monitor_for(broker, authenticated=True))
    errors = link_errors(debug_logs)
    assert len(errors) == 1, errors
    assert any(words in errors[0].lower() for words in ("not authorized", "bad user name or password")), errors[0]
    assert_never_logged(WRONG_PASSWORD, debug_logs)


# --- 5. a password without TLS is refused at config time ------------------------------------------------

def test_a_password_without_tls_is_refused_by_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = password_settings(tmp_path, "password_file", PASSWORD, monkeypatch)
    config = agent_config(tmp_path, 8883, meter_device(5020), extra_mqtt=settings)
    check = edge_agent_check(config)
    assert check.returncode == 78, check.stdout + check.stderr
    assert "mqtt.tls" in check.stderr, check.stderr
    assert PASSWORD not in check.stdout + check.stderr


def test_a_password_without_tls_is_accepted_when_explicitly_allowed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = password_settings(tmp_path, "password_env", PASSWORD, monkeypatch)
    config = agent_config(tmp_path, 1883, meter_device(5020),
                          extra_mqtt=settings + "allow_password_without_tls = true\n")
    check = edge_agent_check(config)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "no TLS" in check.stdout
    assert PASSWORD not in check.stdout + check.stderr
