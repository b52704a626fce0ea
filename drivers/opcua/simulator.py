"""A small OPC-UA server with a plant-like address space, for tests, benchmarks and trying the agent
without a PLC: `python -m drivers.opcua.simulator --port 4840`.

Address space (namespace `urn:edge-agent:simulator:plant`, string node ids, so that `nsu=` addresses stay
valid whatever index the namespace gets):

    Objects/Plant/Boiler/Temperature   Double, changes each tick      nsu=...;s=Boiler.Temperature
                        /Pressure      Float 1.25                     nsu=...;s=Boiler.Pressure
                        /Running       Boolean true                   nsu=...;s=Boiler.Running
                        /Mode          String "auto"                  nsu=...;s=Boiler.Mode
                        /Counter       UInt32, +1 each tick           nsu=...;s=Boiler.Counter
                        /Curve         Double array (not a scalar)    nsu=...;s=Boiler.Curve
                        /Doubtful      Double, status Uncertain       nsu=...;s=Boiler.Doubtful
    Objects/Plant/Bulk/Value0000 ...   Double, --bulk of them         nsu=...;s=Bulk.0000

`--padding N` registers N other namespaces first, so the plant namespace gets index 2 + N: a restart with
another padding is a server that renumbered its namespaces. `--security` offers only SignAndEncrypt
Basic256Sha256 with a user and password (anonymous refused). Prints `READY <port>` when it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PLANT = "urn:edge-agent:simulator:plant"
SERVER_URI = "urn:edge-agent:simulator"

logging.getLogger("asyncua").setLevel(logging.ERROR)


class PasswordUsers:
    """asyncua user manager: one username and password, or an X.509 user certificate whose common name is
    that username; everyone else (anonymous included) is refused."""

    def __init__(self, username: str, password: str) -> None:
        self.username, self.password = username, password

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if username == self.username and password == self.password:
            return User(role=UserRole.User)
        if certificate is not None:
            cert = certificate if isinstance(certificate, x509.Certificate) else x509.load_der_x509_certificate(
                certificate)
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if names and names[0].value == self.username:
                return User(role=UserRole.User)
        return None


def make_server_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed server certificate (RSA 2048) for 127.0.0.1 and localhost, with the server's URI."""
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-agent simulator")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SERVER_URI),
                                                        x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                         data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "server.der", directory / "server.key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@dataclass
class Simulator:
    """A running server; `nodes` by short name (`Boiler.Temperature`, `Bulk.0000`)."""

    server: Server
    port: int
    namespace_index: int
    nodes: dict[str, Any] = field(default_factory=dict)
    _ticker: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}/edge-agent/"

    async def set(self, name: str, value: Any, variant_type: ua.VariantType | None = None) -> None:
        await self.nodes[name].write_value(ua.Variant(value, variant_type) if variant_type else value)

    async def delete(self, name: str) -> None:
        await self.server.delete_nodes([self.nodes.pop(name)])

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        # asyncua's stop waits for its once-a-second clock task to wake up; cancelling it saves that second.
        clock = getattr(self.server.iserver, "time_task", None)
        if clock is not None:
            clock.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await clock
            self.server.iserver.time_task = None
        await self.server.stop()


async def start(port: int, *, padding: int = 0, bulk: int = 0, tick: float | None = None,
                security: tuple[Path, Path, str, str] | None = None, max_nodes_per_read: int = 0,
                bulk_changes_per_tick: int = 0) -> Simulator:
    """Start a simulator on 127.0.0.1:`port`. `security`: (certificate, key, username, password).
    `tick`: seconds between value changes (None: values change only when the test writes them)."""
    server = Server(user_manager=PasswordUsers(security[2], security[3]) if security else None)
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/edge-agent/")
    server.set_server_name("edge-agent simulator")
    await server.set_application_uri(SERVER_URI)
    if security is not None:
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        server.set_identity_tokens([ua.UserNameIdentityToken, ua.X509IdentityToken])
        await server.load_certificate(str(security[0]))
        await server.load_private_key(str(security[1]))
    else:
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    for n in range(padding):
        await server.register_namespace(f"urn:edge-agent:simulator:padding:{n}")
    ns = await server.register_namespace(PLANT)
    plant = await server.nodes.objects.add_object(ua.NodeId("Plant", ns), ua.QualifiedName("Plant", ns))
    boiler = await plant.add_object(ua.NodeId("Boiler", ns), ua.QualifiedName("Boiler", ns))
    sim = Simulator(server, port, ns)
    for name, value, kind in (("Temperature", 21.5, ua.VariantType.Double), ("Pressure", 1.25, ua.VariantType.Float),
                              ("Running", True, ua.VariantType.Boolean), ("Mode", "auto", ua.VariantType.String),
                              ("Counter", 0, ua.VariantType.UInt32),
                              ("Curve", [1.0, 2.0, 3.0], ua.VariantType.Double),
                              ("Doubtful", 7.5, ua.VariantType.Double)):
        sim.nodes[f"Boiler.{name}"] = await boiler.add_variable(ua.NodeId(f"Boiler.{name}", ns),
                                                                ua.QualifiedName(name, ns), ua.Variant(value, kind))
    await sim.nodes["Boiler.Doubtful"].write_value(ua.DataValue(
        ua.Variant(7.5, ua.VariantType.Double), StatusCode=ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue)))
    if bulk:
        folder = await plant.add_folder(ua.NodeId("Bulk", ns), ua.QualifiedName("Bulk", ns))
        for i in range(bulk):
            sim.nodes[f"Bulk.{i:04d}"] = await folder.add_variable(
                ua.NodeId(f"Bulk.{i:04d}", ns), ua.QualifiedName(f"Value{i:04d}", ns),
                ua.Variant(float(i), ua.VariantType.Double))
    if max_nodes_per_read:
        limit = server.get_node(ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead))
        await limit.write_value(ua.Variant(max_nodes_per_read, ua.VariantType.UInt32))
    await server.start()
    if tick is not None:
        sim._ticker = asyncio.create_task(_tick(sim, tick, bulk, bulk_changes_per_tick))
    return sim


async def _tick(sim: Simulator, interval: float, bulk: int, bulk_changes: int) -> None:
    counter, step = 0, 0
    while True:
        await asyncio.sleep(interval)
        counter += 1
        await sim.nodes["Boiler.Counter"].write_value(ua.Variant(counter, ua.VariantType.UInt32))
        temperature = 20.0 + (counter % 100) / 10
        await sim.nodes["Boiler.Temperature"].write_value(ua.Variant(temperature, ua.VariantType.Double))
        for _ in range(min(bulk_changes, bulk)):
            node = sim.nodes[f"Bulk.{step % bulk:04d}"]
            step += 1
            await node.write_value(ua.Variant(float(step), ua.VariantType.Double))


async def _main(args: argparse.Namespace) -> None:
    security = None
    if args.security:
        cert, key = make_server_certificate(Path(args.security))
        security = (cert, key, args.username, args.password)
    sim = await start(args.port, padding=args.padding, bulk=args.bulk, tick=args.tick, security=security,
                      bulk_changes_per_tick=args.bulk_changes)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"READY {sim.port} namespace {sim.namespace_index}", flush=True)
    await stop.wait()
    await sim.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drivers.opcua.simulator", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4840)
    parser.add_argument("--padding", type=int, default=0, help="namespaces registered before the plant's")
    parser.add_argument("--bulk", type=int, default=0, help="Double variables under Plant/Bulk")
    parser.add_argument("--bulk-changes", type=int, default=0, help="bulk variables changed per tick")
    parser.add_argument("--tick", type=float, default=0.1, help="seconds between value changes")
    parser.add_argument("--security", metavar="DIR", help="SignAndEncrypt only, certificate made in DIR")
    parser.add_argument("--username", default="operator")
    parser.add_argument("--password", default="operator-password")
    args = parser.parse_args(argv)
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
