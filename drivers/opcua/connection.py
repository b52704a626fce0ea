"""One OPC-UA session, set up from scratch: security, certificates and trust, the user, and the points'
node ids resolved against the server as it is now.

Invariants:
- Every session is new. After a connection loss nothing of the old session is reused: namespace indexes,
  node ids of browse paths, server limits and subscriptions are all looked up again (a server that
  restarted may have renumbered its namespaces or lost nodes). asyncua's own reconnect is off; the agent
  owns the retry (scheduler backoff).
- The server's certificate is checked before the secure channel is opened: it must be in the trust
  directory (DER or PEM, compared byte for byte), or, with trust_on_first_use, no certificate for that
  server's application URI may be trusted yet, and then it is stored there (and logged).
- A password is read when the session is made, never stored in a field that is logged or printed.
- Every call has a timeout; failures come out as `DeviceError` with a sentence a technician can act on.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncua import Client, ua
from asyncua.common.utils import Buffer
from asyncua.crypto import security_policies
from asyncua.ua.ua_binary import nodeid_from_binary, struct_from_binary
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import DeviceError
from drivers.opcua.config import OpcuaDevice, OpcuaPoint, browse_path_elements
from drivers.opcua.values import status_name

log = logging.getLogger("drivers.opcua")

POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
MODES = {"None": ua.MessageSecurityMode.None_, "Sign": ua.MessageSecurityMode.Sign,
         "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}
CERT_NAME, KEY_NAME = "edge-agent.der", "edge-agent.key.pem"
OBJECTS_FOLDER = ua.NodeId(ua.ObjectIds.ObjectsFolder)
_LIMITS = (ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
           ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall)

# asyncua logs connection trouble at WARNING/ERROR with tracebacks; the agent logs each failure itself
# (once loud, then quiet).
for _name in ("asyncua", "asyncua.client.client", "asyncua.client.ua_client", "asyncua.common.subscription"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)

# Status codes whose meaning a technician needs spelt out.
HINTS = {
    "BadUserAccessDenied": "the server refused the user: check username and password (or the user certificate)",
    "BadIdentityTokenInvalid": "the server does not accept this kind of user identity on this endpoint",
    "BadIdentityTokenRejected": "the server rejected the user identity: check username and password",
    "BadCertificateUntrusted": "the server does not trust the agent's certificate: add it to the server's "
                               "trusted certificates",
    "BadSecurityChecksFailed": "the server rejected the secure channel (often: it does not trust the agent's "
                               "certificate yet; add it to the server's trusted certificates)",
    "BadSecurityPolicyRejected": "the server does not offer this security policy",
    "BadSecurityModeRejected": "the server refuses this security mode: set security_mode and security_policy to "
                               "a pair the server offers (`edge-agent opcua browse` says which when they differ)",
    "BadCertificateTimeInvalid": "the server finds the agent's certificate expired or not yet valid: check the "
                                 "gateway's clock (and the server's)",
    "BadCertificateUseNotAllowed": "the server does not accept the agent's certificate for this use",
    "BadCertificateInvalid": "the server finds the agent's certificate invalid",
    "BadTooManySessions": "the server has no free session",
}
# Where the technician acts on the agent's certificate: the hint names the file to give the server.
_CERTIFICATE_HINTS = ("BadCertificateUntrusted", "BadSecurityChecksFailed", "BadCertificateUseNotAllowed",
                      "BadCertificateInvalid")


@dataclass(frozen=True, slots=True)
class Security:
    """How to reach one server: a device's settings, or the command line's."""

    endpoint: str
    timeout: float
    keepalive: float = 5.0
    security_mode: str = "None"
    security_policy: str = "None"
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    user_certificate: Path | None = None
    user_private_key: Path | None = None
    certificate_dir: Path | None = None
    trust_dir: Path | None = None
    trust_on_first_use: bool = False

    @classmethod
    def of(cls, device: OpcuaDevice, state_dir: Path | None) -> Security:
        certificate_dir = device.certificate_dir or ((state_dir or Path("/var/lib/edge-agent")) / "opcua")
        return cls(device.endpoint, device.timeout, device.keepalive, device.security_mode, device.security_policy,
                   device.username, device.password_file, device.password_env, device.user_certificate,
                   device.user_private_key, certificate_dir, device.trust_dir, device.trust_on_first_use)

    @property
    def trusted(self) -> Path:
        return self.trust_dir or self.certificate_directory / "trusted"

    @property
    def certificate_directory(self) -> Path:
        return self.certificate_dir or Path("/var/lib/edge-agent/opcua")

    def password(self) -> str | None:
        if self.password_file is not None:
            try:
                return self.password_file.read_text(encoding="utf-8").splitlines()[0] if \
                    self.password_file.stat().st_size else ""
            except OSError as exc:
                raise DeviceError(f"cannot read password_file {self.password_file}: {exc.strerror}") from exc
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise DeviceError(f"the environment variable {self.password_env} is not set")
            return value
        return None


# --- the agent's application certificate ------------------------------------------------------------

def application_uri() -> str:
    return f"urn:{socket.gethostname()}:edge-agent"


def ensure_application_certificate(directory: Path) -> tuple[Path, Path]:
    """The agent's certificate and key in `directory`, created on first use (RSA 2048, self-signed, 10 years,
    the application URI and host name as subject alternative names; the key file 0600)."""
    cert_path, key_path = directory / CERT_NAME, directory / KEY_NAME
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    host = socket.gethostname()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edge-agent@{host}"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-agent")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(application_uri()),
                                                        x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                         data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(key_bytes)
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    log.info("created the agent's OPC-UA application certificate %s (thumbprint %s); servers that check "
             "clients must trust it", cert_path, thumbprint(cert.public_bytes(serialization.Encoding.DER)))
    return cert_path, key_path


def thumbprint(der: bytes) -> str:
    return hashlib.sha1(der, usedforsecurity=False).hexdigest()


# --- trust ---------------------------------------------------------------------------------------------

def _load_der(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
        except ValueError:
            return None
    return data


def _uri_of(der: bytes) -> str | None:
    try:
        cert = x509.load_der_x509_certificate(der)
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.UniformResourceIdentifier)
    except (ValueError, x509.ExtensionNotFound):
        return None
    return uris[0] if uris else None


def check_trust(security: Security, der: bytes) -> None:
    """Raise DeviceError unless the server's certificate is trusted (or is trusted now, on first use)."""
    trusted = security.trusted
    known = [c for c in (_load_der(p) for p in sorted(trusted.glob("*")) if p.is_file()) if c] \
        if trusted.is_dir() else []
    if der in known:
        return
    uri = _uri_of(der) or "unknown application"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", uri).strip("_")[:80] + f"-{thumbprint(der)[:16]}.der"
    if security.trust_on_first_use and not any(_uri_of(c) == uri for c in known):
        trusted.mkdir(parents=True, exist_ok=True)
        (trusted / name).write_bytes(der)
        log.warning("%s: trusted on first use: the server certificate of %s (SHA-1 thumbprint %s), stored as %s. "
                    "Compare the thumbprint with the server's, then turn trust_on_first_use off.",
                    security.endpoint, uri, thumbprint(der), trusted / name)
        return
    rejected = security.certificate_directory / "rejected"
    try:
        rejected.mkdir(parents=True, exist_ok=True)
        (rejected / name).write_bytes(der)
        kept = f"; it was saved as {rejected / name}: check its thumbprint and move it to {trusted}/ to trust it"
    except OSError:
        kept = ""
    changed = " (a different certificate for this server is trusted: did the server get a new one?)" \
        if any(_uri_of(c) == uri for c in known) else ""
    raise DeviceError(f"the server's certificate is not trusted: {uri}, SHA-1 thumbprint {thumbprint(der)}"
                      f"{changed}{kept}")


# --- connecting -------------------------------------------------------------------------------------------

def describe_failure(exc: BaseException, security: Security) -> str:
    if isinstance(exc, DeviceError):
        return str(exc)
    if isinstance(exc, ua.UaStatusCodeError):
        name = status_name(exc.code)
        hint = HINTS.get(name)
        if name in _CERTIFICATE_HINTS:
            hint = f"{hint}: {security.certificate_directory / CERT_NAME}"
        return f"{security.endpoint}: {name}" + (f" ({hint})" if hint else "")
    if isinstance(exc, ua.UaError) and "No matching endpoints" in str(exc):
        return (f"{security.endpoint}: security policy mismatch: the server does not offer "
                f"{security.security_mode}/{security.security_policy}" + (
                    " (it offers only secured endpoints: set security_mode and security_policy)"
                    if security.security_mode == "None" else ""))
    if isinstance(exc, TimeoutError):
        return f"{security.endpoint}: no answer within {security.timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect to {security.endpoint}: refused (is the server running? check host and port)"
    if isinstance(exc, OSError | ConnectionError):
        return f"cannot connect to {security.endpoint}: {exc.strerror or exc}" if isinstance(exc, OSError) else \
            f"{security.endpoint}: connection lost ({exc or type(exc).__name__})"
    return f"{security.endpoint}: {type(exc).__name__}: {exc}"


class _Client(Client):
    """asyncua's client, but a server that refuses the secure channel is heard.

    node-opcua answers an OpenSecureChannel request whose client certificate it does not trust with a
    ServiceFault (BadSecurityChecksFailed) in an OPN message, signed and encrypted for the agent. asyncua
    decodes that as an OpenSecureChannelResponse, fails, and raises a bare AssertionError: the status code,
    and with it the hint to trust edge-agent.der, is lost. Here the answer to the OPN request is kept, and
    when opening fails with a bad status in it, that status is raised."""

    async def open_secure_channel(self, renew: bool = False) -> None:
        protocol = self.uaclient.protocol
        if protocol is None:
            return await super().open_secure_channel(renew)
        answers: list[asyncio.Future[Any]] = []
        send = protocol._send_request

        def keep(request: Any, timeout: float = 1, message_type: ua.MessageType = ua.MessageType.SecureMessage,
                 ) -> asyncio.Future[Any]:
            future = send(request, timeout, message_type)
            answers.append(future)
            return future

        protocol._send_request = keep  # type: ignore[method-assign]
        try:
            await super().open_secure_channel(renew)
        except Exception as exc:
            code = _refusal(answers)
            if code is None:
                raise
            raise ua.UaStatusCodeError(code) from exc
        finally:
            del protocol._send_request  # the class's method again


def _refusal(answers: Sequence[asyncio.Future[Any]]) -> int | None:
    """The bad ServiceResult in an answer to OpenSecureChannel (a ServiceFault or a response), if any."""
    for future in answers:
        if not future.done() or future.cancelled() or future.exception() is not None:
            continue
        body = future.result()
        if not isinstance(body, Buffer):
            continue
        try:
            data = body.copy()
            nodeid_from_binary(data)  # the type id: ServiceFault or OpenSecureChannelResponse, same header next
            code = struct_from_binary(ua.ResponseHeader, data).ServiceResult.value
        except Exception:  # noqa: BLE001 - not a readable answer: asyncua's own error stands
            continue
        if code >> 30 >= 2:
            return code
    return None


async def connect(security: Security, on_lost: Callable[[Exception], Awaitable[None]] | None = None) -> Client:
    """A new, activated session. Raises DeviceError with a sentence a technician can act on."""
    client = _Client(security.endpoint, timeout=security.timeout, watchdog_intervall=security.keepalive)
    client.name = client.description = "edge-agent"
    client.application_uri = application_uri()
    client.product_uri = "urn:edge-agent"
    client.session_timeout = max(30_000, int(security.keepalive * 4_000))
    try:
        async with asyncio.timeout(security.timeout * 8 + 1):
            if security.security_mode != "None":
                await _secure(client, security)
            if security.username is not None:
                client.set_user(security.username)
                password = security.password()
                if password is not None:
                    client.set_password(password)
            elif security.user_certificate is not None and security.user_private_key is not None:
                await client.load_client_certificate(str(security.user_certificate))
                await client.load_private_key(security.user_private_key)
            await client.connect()
    except Exception as exc:  # every failure to connect becomes one DeviceError
        await close_quietly(client)
        raise DeviceError(describe_failure(exc, security)) from exc
    if on_lost is not None:
        client.connection_lost_callback = on_lost
    return client


async def _secure(client: Client, security: Security) -> None:
    policy = POLICIES[security.security_policy]
    mode = MODES[security.security_mode]
    # First, so that the technician has the agent's certificate to give the server even while trust fails.
    cert_path, key_path = ensure_application_certificate(security.certificate_directory)
    endpoints = await client.connect_and_get_server_endpoints()
    chosen = [e for e in endpoints if e.SecurityMode == mode and e.SecurityPolicyUri == policy.URI]
    if not chosen:
        offered = sorted({f"{e.SecurityMode.name.rstrip('_')}/{e.SecurityPolicyUri.rsplit('#', 1)[-1]}"
                          for e in endpoints})
        raise DeviceError(f"{security.endpoint}: security policy mismatch: the server does not offer "
                          f"{security.security_mode}/{security.security_policy}; it offers "
                          + ", ".join(offered))
    der = _first_certificate(chosen[0].ServerCertificate)
    check_trust(security, der)
    await client.set_security(policy, str(cert_path), str(key_path), server_certificate=der, mode=mode)


def _first_certificate(chain: bytes) -> bytes:
    """A server may send its chain; the first DER element is its own certificate."""
    if len(chain) > 4 and chain[0] == 0x30 and chain[1] == 0x82:
        return chain[:4 + int.from_bytes(chain[2:4], "big")]
    return chain


async def close_quietly(client: Client, within: float = 2.0) -> None:
    try:
        async with asyncio.timeout(within):
            await client.disconnect()
    except Exception:  # noqa: BLE001 - the session is being dropped anyway; the server times it out
        if client.uaclient.has_transport:
            client.uaclient.disconnect_socket()


# --- resolving points ---------------------------------------------------------------------------------------

@dataclass(slots=True)
class Resolved:
    """The points of a device as the server knows them in this session."""

    node_ids: list[ua.NodeId | None]        # per point; None: not resolved, see problems
    problems: dict[int, str] = field(default_factory=dict)  # point index -> why it has no node
    max_nodes_per_read: int = 0             # 0: the server sets no limit
    max_items_per_call: int = 0


async def resolve(client: Client, points: Sequence[OpcuaPoint], namespaces: dict[str, str]) -> Resolved:
    """Namespace URIs to today's indexes, browse paths to node ids (one batched call), the server's limits."""
    array = await client.get_namespace_array()
    index_of = {uri: i for i, uri in enumerate(array)}
    resolved = Resolved([None] * len(points))
    paths: list[tuple[int, ua.BrowsePath]] = []
    for i, point in enumerate(points):
        try:
            if point.node_id is not None:
                resolved.node_ids[i] = parse_node_id(point.node_id, index_of)
            else:
                assert point.browse_path is not None
                paths.append((i, browse_path(point.browse_path, namespaces, index_of)))
        except LookupError as exc:
            resolved.problems[i] = str(exc.args[0])
    if paths:
        results = await client.uaclient.translate_browsepaths_to_nodeids([p for _, p in paths])
        for (i, _), result in zip(paths, results, strict=True):
            if result.StatusCode.is_good() and result.Targets:
                target = result.Targets[0].TargetId  # an ExpandedNodeId: keep the plain NodeId part
                resolved.node_ids[i] = ua.NodeId(target.Identifier, target.NamespaceIndex, target.NodeIdType)
            else:
                resolved.problems[i] = f"browse path not found ({status_name(result.StatusCode.value)})"
    limits = await read(client, [ua.NodeId(n) for n in _LIMITS])
    values = [d.Value.Value if d.StatusCode.is_good() and d.Value is not None else 0 for d in limits]
    resolved.max_nodes_per_read, resolved.max_items_per_call = (int(v or 0) for v in values)
    return resolved


def parse_node_id(text: str, index_of: dict[str, int]) -> ua.NodeId:
    if text.startswith("nsu="):
        uri, _, rest = text[4:].partition(";")
        if uri not in index_of:
            raise LookupError(f"namespace {uri} is not on the server")
        text = f"ns={index_of[uri]};{rest}"
    return ua.NodeId.from_string(text)


def browse_path(text: str, namespaces: dict[str, str], index_of: dict[str, int]) -> ua.BrowsePath:
    elements = []
    for prefix, name in browse_path_elements(text):
        if prefix is None:
            index = 0
        elif prefix.isdigit():
            index = int(prefix)
        else:
            if prefix not in namespaces:
                raise LookupError(f"the namespace alias {prefix!r} is not defined in `namespaces`")
            uri = namespaces[prefix]
            if uri not in index_of:
                raise LookupError(f"namespace {uri} ({prefix}) is not on the server")
            index = index_of[uri]
        elements.append(ua.RelativePathElement(ReferenceTypeId=ua.NodeId(ua.ObjectIds.HierarchicalReferences),
                                               IsInverse=False, IncludeSubtypes=True,
                                               TargetName=ua.QualifiedName(name, index)))
    return ua.BrowsePath(StartingNode=OBJECTS_FOLDER, RelativePath=ua.RelativePath(Elements=elements))


async def read(client: Client, node_ids: Sequence[ua.NodeId], chunk: int = 0) -> list[ua.DataValue]:
    """Values with both timestamps, in as few Read requests as the server's limit allows."""
    size = chunk if chunk > 0 else max(len(node_ids), 1)
    out: list[ua.DataValue] = []
    for start in range(0, len(node_ids), size):
        params = ua.ReadParameters()
        params.MaxAge = 0
        params.TimestampsToReturn = ua.TimestampsToReturn.Both
        params.NodesToRead = [ua.ReadValueId(NodeId=n, AttributeId=ua.AttributeIds.Value)
                              for n in node_ids[start:start + size]]
        out.extend(await client.uaclient.read(params))
    return out
