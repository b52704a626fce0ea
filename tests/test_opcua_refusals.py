"""How the agent words a server's refusal, against servers that refuse the way real ones do.

node-opcua answers an OpenSecureChannel request from a client it does not trust with a ServiceFault
(BadSecurityChecksFailed) inside an OPN message, signed and encrypted for the client; asyncua turned that into a
bare `AssertionError:`. The asyncua simulator cannot refuse like that, so here its message processor is
replaced for the test by one that answers secured OPN requests exactly so (seen on the wire from node-opcua
2.186: an `OPNF` chunk of 1680 bytes, closed a second later). The rest of the server is the real simulator.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from asyncua.server import binary_server_asyncio
from asyncua.server.uaprocessor import UaProcessor
from asyncua.ua.ua_binary import struct_from_binary

from agent.demo.mosquitto import free_port
from agent.errors import DeviceError
from agent.health import DeviceHealth, FailureLog
from drivers.opcua import DeviceConfig, create
from drivers.opcua.cli import main
from drivers.opcua.connection import CERT_NAME
from drivers.opcua.simulator import PLANT, Simulator, make_server_certificate, start

pytestmark = pytest.mark.timeout(30)

LOGGER = "tests.opcua.refusals"


class Refusal:
    """What the refusing server answers to a secured OPN request; None: it accepts."""

    code: int | None = ua.StatusCodes.BadSecurityChecksFailed


class NodeOpcuaLikeProcessor(UaProcessor):
    """Answers a secured OpenSecureChannel request the way node-opcua does when it does not trust the client's
    certificate: a ServiceFault in an OPN chunk, secured for the client, then the socket closes."""

    def open_secure_channel(self, algohdr: Any, seqhdr: Any, body: Any) -> None:
        request = struct_from_binary(ua.OpenSecureChannelRequest, body.copy())
        if Refusal.code is None or request.Parameters.SecurityMode == ua.MessageSecurityMode.None_:
            return super().open_secure_channel(algohdr, seqhdr, body)
        self._connection.select_policy(algohdr.SecurityPolicyURI, algohdr.SenderCertificate,
                                       request.Parameters.SecurityMode)
        fault = ua.ServiceFault()
        fault.ResponseHeader.ServiceResult = ua.StatusCode(Refusal.code)
        self.send_response(request.RequestHeader.RequestHandle, seqhdr, fault, ua.MessageType.SecureOpen)
        asyncio.get_running_loop().call_later(1.0, self._transport.close)
        return None


@pytest.fixture
async def refusing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Simulator]:
    monkeypatch.setattr(binary_server_asyncio, "UaProcessor", NodeOpcuaLikeProcessor)
    monkeypatch.setattr(Refusal, "code", ua.StatusCodes.BadSecurityChecksFailed)
    cert, key = make_server_certificate(tmp_path / "server-pki")
    server = await start(free_port(), security=(cert, key, "operator", "secret-password"))
    try:
        yield server
    finally:
        await server.stop()


def secured_device(url: str, **settings: Any) -> DeviceConfig:
    return DeviceConfig.model_validate({
        "name": "boiler", "driver": "opcua", "endpoint": url, "poll_interval": "1s", "timeout": "2s",
        "security_mode": "SignAndEncrypt", "security_policy": "Basic256Sha256", "trust_on_first_use": True,
        "points": [{"name": "temperature", "node_id": f"nsu={PLANT};s=Boiler.Temperature"}], **settings})


async def test_a_server_that_does_not_trust_the_agent_gets_the_hint_to_trust_edge_agent_der(
        refusing: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    driver = create(secured_device(refusing.url), state_dir=state)
    try:
        with pytest.raises(DeviceError) as refused:
            await driver.poll()
    finally:
        await driver.close()
    text = str(refused.value)
    assert "AssertionError" not in text
    assert "BadSecurityChecksFailed" in text and "trusted certificates" in text
    assert text.endswith(f"{state / 'opcua' / CERT_NAME})")

    # `opcua read` says the same.
    pki = tmp_path / "cli-pki"
    code = await asyncio.to_thread(main, ["read", refusing.url, "i=2258", "--security-mode", "SignAndEncrypt",
                                          "--security-policy", "Basic256Sha256", "--trust-on-first-use",
                                          "--certificate-dir", str(pki)])
    err = capsys.readouterr().err
    assert code == 1 and "AssertionError" not in err
    assert "BadSecurityChecksFailed (the server rejected the secure channel" in err and str(pki / CERT_NAME) in err


async def test_a_security_mode_the_server_rejects_has_a_hint(refusing: Simulator, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Refusal, "code", ua.StatusCodes.BadSecurityModeRejected)
    driver = create(secured_device(refusing.url), state_dir=tmp_path)
    try:
        with pytest.raises(DeviceError, match=r"BadSecurityModeRejected \(the server refuses this security mode: "
                                              r"set security_mode and security_policy"):
            await driver.poll()
    finally:
        await driver.close()


async def test_a_new_reason_is_logged_at_error_once(refusing: Simulator, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The server first refuses the agent's certificate; then (say, restarted with a new certificate of its
    own) the agent refuses the server's: the second reason is a new failure and gets its ERROR line."""
    caplog.set_level(logging.DEBUG, LOGGER)
    health = DeviceHealth("boiler", FailureLog("device boiler", logging.getLogger(LOGGER)))
    state = tmp_path / "state"
    trust = tmp_path / "trusted"

    async def poll_once(**settings: Any) -> None:
        driver = create(secured_device(refusing.url, **settings), state_dir=state)
        try:
            await driver.poll()
        except DeviceError as exc:
            health.failures.failed(str(exc))
        else:
            health.failures.succeeded()
        finally:
            await driver.close()

    for _ in range(2):
        await poll_once()
    # A trust directory that holds another certificate for this server's URI: "not trusted ... new one?"
    trust.mkdir()
    other, _ = make_server_certificate(tmp_path / "other-server-pki")
    (trust / "old-server.der").write_bytes(other.read_bytes())
    for _ in range(2):
        await poll_once(trust_dir=str(trust), trust_on_first_use=False)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, errors
    assert "BadSecurityChecksFailed" in errors[0]
    assert "the server's certificate is not trusted" in errors[1] and "another reason" in errors[1]
    assert health.failures.consecutive == 4  # one episode: the backoff keeps growing
