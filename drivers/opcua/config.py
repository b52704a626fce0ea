"""The `[[devices]]` entry of an OPC-UA device and its points. Imports pydantic only: the whole config is
checked before asyncua is loaded.

A point is addressed either by `node_id` (`ns=2;s=Boiler.Temp`, or `nsu=<namespace URI>;s=Boiler.Temp`,
which survives a server that renumbers its namespaces) or by `browse_path` from the Objects folder
(`plant:Boiler/plant:Temperature`, where `plant` is an alias from the device's `namespaces` table or a
namespace index). Both are only parsed here; they are resolved against the server at each new session.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, Strict, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from agent.config import (
    DeviceBase,
    Duration,
    EnvName,
    FilePath,
    UserName,
    duration,
    file_problem,
    host_problem,
    valid_entries,
)
from agent.names import PointName

SecurityMode = Literal["None", "Sign", "SignAndEncrypt"]
SecurityPolicy = Literal["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
SECURE_POLICIES = ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss")

# OPC 10000-6 5.3.1.10 (string form of a NodeId), with `nsu=` for a namespace given by its URI.
_NODE_ID = re.compile(r"^(?:(?:ns=(?P<ns>\d+)|nsu=(?P<nsu>[^;]+));)?"
                      r"(?P<kind>[isgb])=(?P<id>.+)$", re.DOTALL)
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
_ENDPOINT = re.compile(r"^opc\.tcp://(?P<host>[^\s/:]+)(:(?P<port>\d{1,5}))?(/\S*)?$")
ENDPOINT_HELP = 'expected an endpoint URL such as "opc.tcp://192.168.10.30:4840"'
# An endpoint URL travels in every OPC-UA hello and session request; servers take 4096 bytes at most.
_ENDPOINT_MAX = 4096

PublishingInterval = duration(0.01, 86400, minimum_included=True)

NODE_ID_HELP = ('expected a NodeId such as "ns=2;i=1001", "ns=2;s=Boiler.Temperature" or '
                '"nsu=urn:example:plant;s=Boiler.Temperature"')


def node_id_problem(text: str) -> str | None:
    """What is wrong with a NodeId string, or None."""
    match = _NODE_ID.match(text)
    if not match:
        return NODE_ID_HELP
    kind, ident = match["kind"], match["id"]
    if kind == "i" and not (ident.isdigit() and int(ident) < 2**32):
        return f"a numeric identifier (i=) must be a whole number from 0 to 4294967295; {NODE_ID_HELP}"
    if kind == "g" and not _GUID.fullmatch(ident):
        return "a GUID identifier (g=) is written g=09087e75-8e5e-499b-954f-f2a9603db28a"
    if kind == "b" and not _BASE64.fullmatch(ident):
        return "an opaque identifier (b=) is base64"
    if match["ns"] is not None and int(match["ns"]) > 65535:
        return "a namespace index is 0 to 65535"
    return None


def browse_path_elements(text: str) -> list[tuple[str | None, str]]:
    """`plant:Boiler/2:Temperature` -> [("plant", "Boiler"), ("2", "Temperature")]; no prefix means
    namespace 0 (the OPC Foundation's own names, such as `Server`). Raises ValueError when malformed."""
    elements: list[tuple[str | None, str]] = []
    for part in text.split("/"):
        prefix, colon, name = part.partition(":")
        if not colon:
            prefix, name = None, part  # type: ignore[assignment]
        elif not (prefix.isdigit() or _ALIAS.fullmatch(prefix)):
            raise ValueError(f"{part!r}: the part before ':' must be a namespace index or an alias from "
                             "`namespaces`")
        if not name.strip():
            raise ValueError(f"empty browse name in {text!r}; write elements as alias:Name separated by '/'")
        elements.append((prefix, name))
    return elements


def _absolute(value: Path | None) -> Path | None:
    if value is not None:
        value = value.expanduser()
        if not value.is_absolute():
            # A config file's relative paths are resolved from its folder before validation (path_keys).
            raise ValueError("must be an absolute path, or relative to the config file's folder")
    return value


# A frozen slotted dataclass, as a Modbus point: a fraction of a pydantic model's memory per point.
# A pydantic dataclass cannot be strict as a whole (it would refuse the TOML table itself): each field is.
_Text = Annotated[str, Strict()]


@dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class OpcuaPoint:
    name: PointName
    node_id: _Text | None = Field(None, description='NodeId: "ns=2;s=Boiler.Temp", "nsu=<namespace URI>;i=1001".')
    browse_path: _Text | None = Field(
        None, description='Path from the Objects folder: "plant:Boiler/plant:Temperature" (alias or index '
        'before each name).')
    unit: _Text | None = Field(None, max_length=32)
    sampling_interval: Duration | None = Field(
        None, description="Subscribe mode: how often the server samples this node (default: the device's).")
    queue_size: Annotated[int, Strict()] | None = Field(
        None, ge=1, le=10000, description="Subscribe mode: values the server keeps between two publishes (default: "
                                          "the device's).")
    deadband: Annotated[float, Strict()] | None = Field(
        None, ge=0, description="Subscribe mode: a change smaller than this is not sent. Needs deadband_type.")
    deadband_type: Literal["absolute", "percent"] | None = Field(
        None, description='"absolute": in the value\'s unit; "percent": of the node\'s EURange.')

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str | None) -> str | None:
        if value is not None:
            problem = node_id_problem(value.strip())
            if problem:
                raise ValueError(problem)
            return value.strip()
        return value

    @field_validator("browse_path")
    @classmethod
    def _browse_path(cls, value: str | None) -> str | None:
        if value is not None:
            browse_path_elements(value.strip().strip("/"))
            return value.strip().strip("/")
        return value


class OpcuaDevice(DeviceBase):
    path_keys = ("password_file", "user_certificate", "user_private_key", "certificate_dir", "trust_dir")

    driver: Literal["opcua"]
    endpoint: str = Field(description='The server\'s endpoint URL, "opc.tcp://192.168.10.30:4840" (a path may '
                                      'follow).')
    # In subscribe mode this is the publishing interval: the server sends only changes, and a fast one is what
    # a test bench or a fast process asks for. A read-mode poll stays at 100 ms or more (checked in problems).
    poll_interval: PublishingInterval = Field(
        1.0, description="read: how often every node is read (at least 100 ms). subscribe: the publishing "
                         "interval (at least 10 ms).")
    mode: Literal["read", "subscribe"] = Field(
        "read", description='"read": every node read in one batched request per poll_interval, on the clock. '
        '"subscribe": the server sends changes; poll_interval is the publishing interval.')
    security_mode: SecurityMode = "None"
    security_policy: SecurityPolicy = Field("None", description="With Sign or SignAndEncrypt: Basic256Sha256, "
                                                                "Aes128_Sha256_RsaOaep or Aes256_Sha256_RsaPss.")
    username: UserName | None = None
    password_file: FilePath | None = Field(None, description="File holding the password (first line).")
    password_env: EnvName | None = Field(None, description="Environment variable holding the password.")
    allow_password_without_security: bool = Field(
        False, description="Send a password on an endpoint with security_mode None. Only on closed test networks.")
    user_certificate: FilePath | None = Field(None, description="X.509 user identity: certificate (DER or PEM).")
    user_private_key: FilePath | None = Field(None, description="X.509 user identity: its private key (PEM).")
    certificate_dir: FilePath | None = Field(
        None, description="Where the agent's application certificate and key are kept (created on first start). "
        "Default: the folder 'opcua' beside the buffer file.")
    trust_dir: FilePath | None = Field(None, description="Trusted server certificates. Default: "
                                                         "certificate_dir/trusted.")
    trust_on_first_use: bool = Field(
        False, description="Commissioning only: trust and store the certificate a server presents when none for "
        "that server is trusted yet (logged). A changed certificate is still refused.")
    namespaces: dict[str, str] = Field(
        default_factory=dict, description='Aliases for namespace URIs, used in browse_path: { plant = '
        '"urn:example:plant" }.')
    keepalive: Duration = Field(5.0, description="How often the session is checked; a server silent this long "
                                                 "(twice, for subscriptions) counts as lost.")
    sampling_interval: Duration | None = Field(None, description="Subscribe mode: default sampling interval "
                                                                 "(default: poll_interval).")
    queue_size: int = Field(10, ge=1, le=10000, description="Subscribe mode: default queue size per node.")
    heartbeat: Duration | None = Field(None, description="Subscribe mode: send a point's last value again when "
                                                         "it has not changed for this long.")
    points: list[OpcuaPoint] = Field(min_length=1)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        match = _ENDPOINT.fullmatch(value) if len(value) <= _ENDPOINT_MAX else None
        if not match:
            raise ValueError(ENDPOINT_HELP)
        if match["port"] is not None and not 1 <= int(match["port"]) <= 65535:
            raise ValueError(f"a TCP port is 1 to 65535; {ENDPOINT_HELP}")
        if host_problem(match["host"]):
            raise ValueError(f"{host_problem(match['host'])}; {ENDPOINT_HELP}")
        return value

    @field_validator("password_file", "user_certificate", "user_private_key", "certificate_dir", "trust_dir")
    @classmethod
    def _paths(cls, value: Path | None) -> Path | None:
        return _absolute(value)

    @field_validator("namespaces")
    @classmethod
    def _aliases(cls, value: dict[str, str]) -> dict[str, str]:
        for alias, uri in value.items():
            if not _ALIAS.fullmatch(alias):
                raise ValueError(f"alias {alias!r}: letters, digits and _, starting with a letter")
            if not uri.strip():
                raise ValueError(f"alias {alias!r}: empty namespace URI")
        return value

    def problems(self) -> list[tuple[str, str]]:
        out = self._security_problems()
        if self.mode == "read" and self.poll_interval < 0.1:
            out.append(("poll_interval", f'expected 100 ms or more in mode "read"; faster than 100 ms is not '
                                         f"polling a meter (got {self.poll_interval:g})"))
        out.extend(_point_problems(list(enumerate(self.points)), self.mode, set(self.namespaces)))
        if self.mode == "read" and self.heartbeat is not None:
            out.append(("heartbeat", 'applies to mode = "subscribe" only (read mode sends every poll)'))
        return out

    def _security_problems(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if self.security_mode == "None" and self.security_policy != "None":
            out.append(("security_mode", f'security_policy {self.security_policy} needs security_mode "Sign" or '
                                         '"SignAndEncrypt"'))
        if self.security_mode != "None" and self.security_policy == "None":
            out.append(("security_policy", f"security_mode {self.security_mode} needs a policy: "
                                           + ", ".join(SECURE_POLICIES)))
        for key, path in (("password_file", self.password_file), ("user_certificate", self.user_certificate),
                          ("user_private_key", self.user_private_key)):
            if path is not None and (problem := file_problem(path)):
                out.append((key, problem))
        if self.password_file is not None and self.password_env is not None:
            out.append(("password_env", "give the password either in password_file or in password_env"))
        if self.password_env is not None and self.password_env not in os.environ:
            out.append(("password_env", f"the environment variable {self.password_env} is not set"))
        has_password = self.password_file is not None or self.password_env is not None
        if has_password and self.username is None:
            out.append(("username", "a password is configured but no username"))
        if self.username is not None and not has_password:
            out.append(("password_file", "a username needs a password: password_file or password_env"))
        if has_password and self.security_mode == "None" and not self.allow_password_without_security:
            out.append(("security_mode", 'a password would cross the network on an unsecured channel: use '
                                         '"SignAndEncrypt", or set allow_password_without_security = true on a '
                                         'closed test network'))
        if (self.user_certificate is None) != (self.user_private_key is None):
            out.append(("user_private_key" if self.user_private_key is None else "user_certificate",
                        "an X.509 user identity needs both user_certificate and user_private_key"))
        if self.user_certificate is not None and self.username is not None:
            out.append(("user_certificate", "give one user identity: username/password or user_certificate"))
        return out

    @classmethod
    def salvage(cls, raw: dict[str, Any]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        try:  # the device's own keys may be fine while a point is not: check security and files too
            shell = cls.model_validate({**raw, "points": [{"name": "p", "node_id": "i=1"}], "heartbeat": None})
        except ValidationError:
            pass
        else:
            out.extend(shell._security_problems())
        valid = valid_entries(raw.get("points"), OpcuaPoint)
        mode = raw.get("mode", "read")
        aliases = raw.get("namespaces", {})
        return out + _point_problems(valid, mode if mode in ("read", "subscribe") else "subscribe",
                                     set(aliases) if isinstance(aliases, dict) else None)


def _point_problems(points: list[tuple[int, OpcuaPoint]], mode: str,
                    aliases: set[str] | None) -> list[tuple[str, str]]:
    """One address per point, deadbands complete, subscribe-only keys in read mode, aliases known, names
    unique. `aliases` None: the device's namespaces table is itself invalid, skip that check."""
    out: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for index, point in points:
        where = f"points[{index}]"
        if point.name in seen:
            out.append((f"{where}.name", f"duplicate point name {point.name!r} "
                                         f"(already used by points[{seen[point.name]}])"))
        seen.setdefault(point.name, index)
        if (point.node_id is None) == (point.browse_path is None):
            out.append((f"{where}.node_id", "give either node_id or browse_path (exactly one)"))
        if point.deadband is not None and point.deadband_type is None:
            out.append((f"{where}.deadband_type", 'a deadband needs deadband_type = "absolute" or "percent"'))
        if point.deadband_type is not None and point.deadband is None:
            out.append((f"{where}.deadband", f"deadband_type {point.deadband_type!r} needs a deadband value"))
        if point.deadband_type == "percent" and point.deadband is not None and point.deadband > 100:
            out.append((f"{where}.deadband", "a percent deadband is 0 to 100"))
        if mode == "read":
            for key in ("sampling_interval", "queue_size", "deadband", "deadband_type"):
                if getattr(point, key) is not None:
                    out.append((f"{where}.{key}", 'applies to mode = "subscribe" only'))
                    break
        if point.browse_path is not None and aliases is not None:
            for prefix, _ in browse_path_elements(point.browse_path):
                if prefix is not None and not prefix.isdigit() and prefix not in aliases:
                    known = ", ".join(sorted(aliases)) or "none defined"
                    out.append((f"{where}.browse_path", f"unknown namespace alias {prefix!r} (in the device's "
                                                        f"namespaces table: {known})"))
                    break
    return out
