"""The OPC-UA driver against real asyncua servers (the simulator, in-process): batched reads, value types,
quality and timestamps, a node that disappears, subscriptions with deadband and heartbeat, and a
SignAndEncrypt endpoint with a username and password, certificates and trust."""

from __future__ import annotations

import asyncio
import datetime
import logging
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from agent.demo.mosquitto import free_port
from agent.errors import DeviceError
from agent.model import PollResult, Quality, Reading
from drivers.opcua import DeviceConfig, create
from drivers.opcua.connection import CERT_NAME, KEY_NAME
from drivers.opcua.driver import OpcuaReader, OpcuaSubscriber
from drivers.opcua.simulator import PLANT, Simulator, make_server_certificate, start

pytestmark = pytest.mark.timeout(30)

USERNAME, PASSWORD = "operator", "S3cret-never-in-a-log"


def nsu(name: str) -> str:
    return f"nsu={PLANT};s={name}"


def device(url: str, points: list[dict[str, Any]], **settings: Any) -> DeviceConfig:
    return DeviceConfig.model_validate({"name": "boiler", "driver": "opcua", "endpoint": url,
                                        "namespaces": {"plant": PLANT}, "points": points, **settings})


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    server = await start(free_port(), padding=1, bulk=40)
    try:
        yield server
    finally:
        await server.stop()


class ReadCounter:
    """Counts the Read requests a driver sends (a spy on the real call; the server still answers)."""

    def __init__(self, driver: OpcuaReader) -> None:
        self.calls: list[int] = []
        self.driver = driver

    async def poll(self) -> list[Reading]:
        if self.driver._session.client is None:
            await self.driver.poll()  # connect first; count only the poll's own reads
        client = self.driver._session.client
        assert client is not None
        real = client.uaclient.read

        async def counted(params: ua.ReadParameters) -> list[ua.DataValue]:
            self.calls.append(len(params.NodesToRead))
            return await real(params)

        client.uaclient.read = counted  # type: ignore[method-assign]
        try:
            return await self.driver.poll()
        finally:
            client.uaclient.read = real  # type: ignore[method-assign]


async def test_read_mode_reads_every_node_in_one_request_with_types_quality_and_timestamps(
        sim: Simulator, tmp_path: Path) -> None:
    bulk = [{"name": f"v{i:02d}", "node_id": nsu(f"Bulk.{i:04d}")} for i in range(40)]
    points = [
        {"name": "temperature", "node_id": nsu("Boiler.Temperature"), "unit": "°C"},
        {"name": "pressure", "browse_path": "plant:Plant/plant:Boiler/plant:Pressure", "unit": "bar"},
        {"name": "running", "node_id": f"ns={sim.namespace_index};s=Boiler.Running"},
        {"name": "mode", "node_id": nsu("Boiler.Mode")},
        {"name": "counter", "node_id": nsu("Boiler.Counter")},
        {"name": "curve", "node_id": nsu("Boiler.Curve")},
        {"name": "doubtful", "node_id": nsu("Boiler.Doubtful")},
        {"name": "no_such_node", "node_id": nsu("Boiler.Nothing")},
        {"name": "no_such_path", "browse_path": "plant:Plant/plant:Boiler/plant:Nothing"},
        {"name": "no_such_namespace", "node_id": "nsu=urn:not-here;i=5"},
        *bulk,
    ]
    driver = create(device(sim.url, points), state_dir=tmp_path)
    assert isinstance(driver, OpcuaReader)
    spy = ReadCounter(driver)
    try:
        before = time.time()
        readings = {r.point: r for r in await spy.poll()}
        assert spy.calls == [48], "every resolvable node (50 points, 2 unresolved) in one Read request"
        assert [r.point for r in await driver.poll()][:2] == ["temperature", "pressure"]  # config order
    finally:
        await driver.close()
    assert (readings["temperature"].value, readings["temperature"].unit) == (21.5, "°C")
    assert readings["pressure"].value == 1.25 and readings["running"].value is True
    assert readings["mode"].value == "auto" and readings["counter"].value == 0
    assert isinstance(readings["counter"].value, int) and readings["v07"].value == 7.0
    assert all(readings[p].quality is Quality.GOOD for p in ("temperature", "pressure", "running", "mode", "v39"))
    source_ts = readings["temperature"].source_ts
    assert source_ts is not None and before - 60 < source_ts < time.time() + 1
    assert readings["temperature"].server_ts is not None
    # Quality from the status code, with the code's name as the reason; the value is kept when uncertain.
    assert (readings["doubtful"].quality, readings["doubtful"].value, readings["doubtful"].reason) == \
        (Quality.UNCERTAIN, 7.5, "UncertainLastUsableValue")
    assert (readings["no_such_node"].quality, readings["no_such_node"].reason) == (Quality.BAD, "BadNodeIdUnknown")
    assert readings["no_such_node"].value is None
    assert "browse path not found" in (readings["no_such_path"].reason or "")
    assert "urn:not-here is not on the server" in (readings["no_such_namespace"].reason or "")
    # Arrays are refused with a message, not flattened and not a crash.
    assert readings["curve"].quality is Quality.BAD and "array of 3 Double" in (readings["curve"].reason or "")


async def test_the_read_is_split_only_where_the_server_limits_nodes_per_read(sim: Simulator, tmp_path: Path) -> None:
    limit = sim.server.get_node(ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead))
    await limit.write_value(ua.Variant(16, ua.VariantType.UInt32))
    points = [{"name": f"v{i:02d}", "node_id": nsu(f"Bulk.{i:04d}")} for i in range(40)]
    driver = create(device(sim.url, points), state_dir=tmp_path)
    assert isinstance(driver, OpcuaReader)
    spy = ReadCounter(driver)
    try:
        readings = await spy.poll()
    finally:
        await driver.close()
    assert spy.calls == [16, 16, 8]
    assert [r.value for r in readings] == [float(i) for i in range(40)]


async def test_a_node_that_disappears_is_bad_alone_and_comes_back(sim: Simulator, tmp_path: Path) -> None:
    points = [{"name": "temperature", "node_id": nsu("Boiler.Temperature")},
              {"name": "mode", "node_id": nsu("Boiler.Mode")},
              {"name": "counter", "browse_path": "plant:Plant/plant:Boiler/plant:Counter"}]
    driver = create(device(sim.url, points), state_dir=tmp_path)
    try:
        assert all(r.quality is Quality.GOOD for r in await driver.poll())
        await sim.delete("Boiler.Mode")
        readings = {r.point: r for r in await driver.poll()}
        assert (readings["mode"].quality, readings["mode"].reason) == (Quality.BAD, "BadNodeIdUnknown")
        assert readings["temperature"].quality is Quality.GOOD and readings["counter"].quality is Quality.GOOD
        # The node is created again (a PLC program download): the same session reads it again.
        folder = sim.server.get_node(ua.NodeId("Boiler", sim.namespace_index))
        await folder.add_variable(ua.NodeId("Boiler.Mode", sim.namespace_index),
                                  ua.QualifiedName("Mode", sim.namespace_index), "manual")
        readings = {r.point: r for r in await driver.poll()}
        assert (readings["mode"].quality, readings["mode"].value) == (Quality.GOOD, "manual")
    finally:
        await driver.close()


async def test_subscriptions_send_changes_beyond_the_deadband_and_a_heartbeat(sim: Simulator, tmp_path: Path) -> None:
    points = [{"name": "temperature", "node_id": nsu("Boiler.Temperature"), "deadband": 1.0,
               "deadband_type": "absolute"},
              {"name": "counter", "node_id": nsu("Boiler.Counter"), "sampling_interval": "10ms"},
              {"name": "mode", "node_id": nsu("Boiler.Mode")},
              {"name": "gone", "node_id": nsu("Boiler.Nothing")}]
    config = device(sim.url, points, mode="subscribe", poll_interval="50ms", sampling_interval="20ms",
                    heartbeat="600ms")
    driver = create(config, state_dir=tmp_path)
    assert isinstance(driver, OpcuaSubscriber)
    results: list[PollResult] = []

    async def emit(result: PollResult) -> None:
        results.append(result)

    def values(point: str) -> list[Any]:
        return [r.value for result in results for r in result.readings if r.point == point]

    task = asyncio.create_task(driver.run(emit))
    try:
        await eventually(lambda: len(values("mode")) >= 1 and len(values("temperature")) >= 1, 5, "initial values")
        # The initial values of the good points arrive together, as one result.
        assert any({r.point for r in result.readings} >= {"temperature", "counter", "mode"} for result in results)
        assert ("gone", "cannot monitor: BadNodeIdUnknown") in \
            [(r.point, r.reason) for result in results for r in result.readings]
        # +0.4 stays inside the 1.0 deadband, +1.1 (and +1.5 from the last value sent) does not. (asyncua's
        # server compares with the previous sample, not the last value sent; these steps mean the same for both.)
        for value in (21.9, 23.0):
            await sim.set("Boiler.Temperature", value, ua.VariantType.Double)
            await asyncio.sleep(0.03)
        for n in (1, 2, 3):
            await sim.set("Boiler.Counter", n, ua.VariantType.UInt32)
            await asyncio.sleep(0.03)
        await eventually(lambda: 23.0 in values("temperature") and 3 in values("counter"), 5, "the changes")
        assert values("temperature") == [21.5, 23.0]
        assert values("counter") == [0, 1, 2, 3]
        # Mode never changed: the heartbeat sends its last value again, with the server's original timestamps.
        await eventually(lambda: len(values("mode")) >= 2, 3, "a heartbeat of mode")
        modes = [r for result in results for r in result.readings if r.point == "mode"]
        assert modes[1].value == "auto" and modes[1].source_ts == modes[0].source_ts
        received = [result.ts for result in results]
        assert received == sorted(received) and all(isinstance(result.ts, float) for result in results)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await driver.close()


# --- security -------------------------------------------------------------------------------------------------

def user_certificate(directory: Path, common_name: str) -> tuple[Path, Path]:
    """A self-signed RSA user certificate (the simulator accepts one whose common name is its user)."""
    directory.mkdir(parents=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "user.der", directory / "user.key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Simulator]:
    cert, key = make_server_certificate(tmp_path / "server-pki")
    server = await start(free_port(), security=(cert, key, USERNAME, PASSWORD))
    try:
        yield server
    finally:
        await server.stop()


async def test_a_signandencrypt_endpoint_with_username_password_x509_user_and_trust(
        secured: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    password_file = tmp_path / "opcua-password"
    password_file.write_text(PASSWORD + "\n")
    state = tmp_path / "state"
    settings = {"security_mode": "SignAndEncrypt", "security_policy": "Basic256Sha256", "username": USERNAME,
                "password_file": str(password_file)}
    points = [{"name": "temperature", "node_id": nsu("Boiler.Temperature")}]

    # 1. The server's certificate is not trusted yet: refused, and kept where the technician can look at it.
    driver = create(device(secured.url, points, **settings), state_dir=state)
    with pytest.raises(DeviceError, match="certificate is not trusted: urn:edge-agent:simulator"):
        await driver.poll()
    rejected = list((state / "opcua" / "rejected").glob("*.der"))
    assert len(rejected) == 1
    # The agent's own certificate was created on first use, its key readable by the agent only.
    key_mode = stat.S_IMODE((state / "opcua" / KEY_NAME).stat().st_mode)
    assert (state / "opcua" / CERT_NAME).is_file() and key_mode == 0o600

    # 2. Trust on first use (commissioning): stored and logged, then the session works.
    driver = create(device(secured.url, points, trust_on_first_use=True, **settings), state_dir=state)
    try:
        readings = await driver.poll()
    finally:
        await driver.close()
    assert [(r.point, r.value, r.quality) for r in readings] == [("temperature", 21.5, Quality.GOOD)]
    assert len(list((state / "opcua" / "trusted").glob("*.der"))) == 1
    assert any("trusted on first use" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

    # 3. Now trusted without TOFU; a wrong password is refused with the server's reason.
    password_file.write_text("wrong-password-also-secret\n")
    driver = create(device(secured.url, points, **settings), state_dir=state)
    with pytest.raises(DeviceError) as refused:
        await driver.poll()
    assert "BadUserAccessDenied" in str(refused.value) or "BadIdentityTokenRejected" in str(refused.value)

    # 4. A policy the server does not offer: says what it offers.
    driver = create(device(secured.url, points, **{**settings, "security_policy": "Aes256_Sha256_RsaPss"}),
                    state_dir=state)
    with pytest.raises(DeviceError, match=r"security policy mismatch.*offers SignAndEncrypt/Basic256Sha256"):
        await driver.poll()

    # 5. An X.509 user identity instead of a password: accepted for the server's user, refused for another.
    for common_name, accepted in ((USERNAME, True), ("intruder", False)):
        cert, key = user_certificate(tmp_path / common_name, common_name)
        driver = create(device(secured.url, points, security_mode="SignAndEncrypt", security_policy="Basic256Sha256",
                               user_certificate=str(cert), user_private_key=str(key)), state_dir=state)
        try:
            if accepted:
                assert [r.value for r in await driver.poll()] == [21.5]
            else:
                with pytest.raises(DeviceError, match="BadUserAccessDenied"):
                    await driver.poll()
        finally:
            await driver.close()

    logged = "\n".join(r.getMessage() + str(r.exc_info or "") for r in caplog.records)
    assert PASSWORD not in logged and "wrong-password-also-secret" not in logged
    assert PASSWORD not in str(refused.value)
