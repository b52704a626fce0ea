"""The configuration: one TOML file, validated completely before the first byte goes on a wire.

Every problem is reported at once, each with the file, the dotted path (`devices[2].points[5].type`) and
what was expected, so a technician can fix the file in one pass. Unknown keys are errors (a typo must not
silently fall back to a default), with a "did you mean" where a close key exists. Device entries are
validated by their driver's own model, looked up in `drivers.REGISTRY`.
"""

from __future__ import annotations

import contextlib
import difflib
import grp
import ipaddress
import math
import os
import re
import ssl
import stat
import string
import tomllib
import types
import typing
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)
from pydantic.dataclasses import is_pydantic_dataclass
from pydantic.fields import FieldInfo

import drivers
from agent.errors import ConfigError, Problem
from agent.names import _NAME_CHARS, _WHY_NOT, Name
from agent.payload import DATA_TOPIC, META_TOPIC, STATUS_TOPIC
from energy.config import EnergySection, PlantEnergy, device_problems, group_problems

# --- value types a technician writes ---------------------------------------------------------------
#
# Types are strict: a TOML integer for an integer, an integer or a float for a number, a string for text;
# `true` is never 1 and "1883" never a port. Durations and sizes also take a string with a unit, as
# documented. Every value that ends up on a wire is bounded here to what the protocol can carry, so that
# what `check` accepts cannot stop delivery later.

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_DURATION_HELP = 'expected a duration such as 1, 0.5, "500ms", "1s", "15m" or "1h"'
_BYTES_HELP = 'expected a size such as 1048576, "500MB" or "2GiB"'
# What an error message shows of a value: a 50 MB string must not be echoed whole.
ECHO_CHARS = 60


def echo(value: Any) -> str:
    """A value as an error message shows it, at most about ECHO_CHARS characters."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * ECHO_CHARS:
        # repr() of an integer beyond 4300 digits raises; the size is what a person needs to see.
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, str) and len(value) > ECHO_CHARS:
        return repr(value[:ECHO_CHARS - 1] + "…")
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS - 1] + "…"


def parse_duration(value: Any) -> Any:
    """Seconds as a number, or a string such as "500ms", "1s", "15m", "1h"."""
    if isinstance(value, bool):  # TOML's true is not a second
        raise ValueError(_DURATION_HELP)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(_DURATION_HELP)
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return value


def parse_bytes(value: Any) -> Any:
    """A byte count as an integer, or a string such as "512MB" or "1GiB"."""
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(_BYTES_HELP)
    if isinstance(value, str):
        match = _BYTES.match(value)
        if not match:
            raise ValueError(_BYTES_HELP)
        unit = (match.group(2) or "").lower().removesuffix("b")
        # Decimal, not float: "999...9MB" with 400 digits is a number too large, not an overflow.
        return int(Decimal(match.group(1)) * _BYTE_UNITS[unit])
    return value


def _seconds_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g} {unit}" if unit != "m" else f"{seconds / size:g} min"
    if seconds == 0:
        return "0"
    return f"{seconds * 1000:g} ms"


def _duration_in(minimum: float, maximum: float, why: str, minimum_included: bool) -> Any:
    def check(value: Any) -> float:
        value = parse_duration(value)
        if not isinstance(value, int | float):
            raise ValueError(_DURATION_HELP)
        try:
            seconds = float(value)
        except OverflowError:  # a TOML integer of hundreds of digits
            seconds = math.inf
        above = seconds >= minimum if minimum_included else seconds > minimum
        if not (above and seconds <= maximum):  # also NaN
            low = f"from {_seconds_text(minimum)}" if minimum_included else f"above {_seconds_text(minimum)}"
            raise ValueError(f"expected a duration {low} up to {_seconds_text(maximum)}{why}")
        return seconds
    return check


def duration(minimum: float = 0.0, maximum: float = 86400.0, why: str = "", *,
             minimum_included: bool = False, description: str = 'Seconds, or a string such as "500ms", "1s", '
             '"15m", "1h".') -> Any:
    """A duration type: seconds, or a string with a unit; `why` ends the message of a value out of range."""
    bound = "minimum" if minimum_included else "exclusiveMinimum"
    schema = {"anyOf": [{"type": "number", bound: minimum, "maximum": maximum},
                        {"type": "string", "pattern": _DURATION.pattern}], "description": description}
    return Annotated[float, BeforeValidator(_duration_in(minimum, maximum, why, minimum_included)),
                     WithJsonSchema(schema)]


def _size_in(minimum: int, maximum: int, why: str) -> Any:
    def check(value: Any) -> int:
        value = parse_bytes(value)
        if not isinstance(value, int):
            raise ValueError(_BYTES_HELP)
        if not minimum <= value <= maximum:
            raise ValueError(f"expected a size from {_bytes_text(minimum)} to {_bytes_text(maximum)}{why}")
        return value
    return check


def _bytes_text(count: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size and count % size == 0:
            return f"{count // size} {unit}"
    return f"{count} bytes"


def size(minimum: int, maximum: int, why: str = "") -> Any:
    schema = {"anyOf": [{"type": "integer", "minimum": minimum, "maximum": maximum},
                        {"type": "string", "pattern": _BYTES.pattern}],
              "description": f'Bytes, or a string such as "500MB" or "2GiB" ({_bytes_text(minimum)} to '
                             f'{_bytes_text(maximum)}).'}
    return Annotated[int, BeforeValidator(_size_in(minimum, maximum, why)), WithJsonSchema(schema)]


Duration = duration()
# An age can be long: a buffer's max_age is counted in days.
Age = duration(0.0, 3650 * 86400, description='Seconds, or a string such as "12h" or "30d".')
# Faster than this is thousands of messages a second for nothing a meter can show.
PollInterval = duration(0.1, 86400, "; faster than 100 ms is not polling a meter", minimum_included=True)
ByteSize = size(1 << 20, 1 << 48, " (the most SQLite can hold)")
StatusInterval = duration(1.0, 86400, minimum_included=True)
# MQTT carries the keepalive in 16 bits (65535 s); past an hour a dead link goes unnoticed for too long, and
# below 1 s it would round to 0, which switches keepalive off.
KeepAlive = duration(1.0, 3600, " (MQTT carries at most 65535 s; a dead link is noticed after about 1.5 "
                     "keepalives)", minimum_included=True)
# MQTT's largest packet is 256 MiB including the topic and headers.
MessageSize = size(1 << 10, 255 << 20, " (an MQTT packet is at most 256 MiB with its topic)")


# Host names: what DNS can carry (RFC 1035: 253 characters, labels of 63), or an IP address. A longer one
# passes Python's checks and then fails inside the MQTT thread or the metrics server's bind.
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
HOST_HELP = "expected a host name or IP address (at most 253 characters, labels of letters, digits and '-' " \
            "of at most 63)"


def host_problem(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    labels = value.removesuffix(".").split(".")
    if not value or len(value) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return HOST_HELP
    return None


def _host(value: str) -> str:
    problem = host_problem(value)
    if problem:
        raise ValueError(problem)
    return value


Host = Annotated[str, Strict(), AfterValidator(_host), WithJsonSchema({"type": "string", "maxLength": 253})]


def _printable(limit: int) -> Any:
    def check(value: str) -> str:
        if not value or len(value) > limit or not value.isprintable():
            raise ValueError(f"expected 1 to {limit} printable characters (no control characters such as NUL "
                             "or a line break)")
        return value
    return check


def text(limit: int) -> Any:
    """Text that goes on a wire: printable, bounded (MQTT strings carry at most 65535 bytes, and brokers
    refuse NUL)."""
    return Annotated[str, Strict(), AfterValidator(_printable(limit)),
                     WithJsonSchema({"type": "string", "minLength": 1, "maxLength": limit})]


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def _env_name(value: str) -> str:
    if not _ENV_NAME.fullmatch(value):
        raise ValueError("expected the name of an environment variable: letters, digits and '_', not starting "
                         "with a digit")
    return value


# MQTT 3.1.1 servers must accept client ids of 23 characters and most accept far more; 128 is what the
# strictest cloud brokers take.
ClientId = text(128)
UserName = text(256)
EnvName = Annotated[str, Strict(), AfterValidator(_env_name), WithJsonSchema({"type": "string",
                                                                               "pattern": _ENV_NAME.pattern})]

# Linux's limits: PATH_MAX and NAME_MAX, in bytes. A longer path makes every file check raise instead of
# answering.
_PATH_MAX, _NAME_MAX = 4095, 255


def _path_text(value: Any) -> Any:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str):
        return value  # pydantic says what a path is
    if not value.strip():
        raise ValueError("expected a file path, not an empty string")
    if "\0" in value:
        raise ValueError("a path cannot contain NUL")
    encoded = os.fsencode(value) if value.isprintable() else b""
    if not encoded:
        raise ValueError("expected a file path without control characters")
    if len(encoded) > _PATH_MAX or any(len(part) > _NAME_MAX for part in encoded.split(b"/")):
        raise ValueError(f"a path is at most {_PATH_MAX} bytes, each folder or file name at most {_NAME_MAX}")
    if value.startswith("~"):
        value = os.path.expanduser(value)  # an unknown user's ~name is left as it was
        if value.startswith("~"):
            user = value[1:].split("/", 1)[0]
            raise ValueError(f"~{user}: no such user on this machine; write the full path")
    return value


FilePath = Annotated[Path, Strict(False), BeforeValidator(_path_text)]


# Topics: every level, whatever the broker, is made of a name's characters; the placeholders are filled
# with names (at most 64 characters each), so a template of bounded length gives a topic far below the
# 65535 bytes MQTT can carry.
_TOPIC_LEVEL = re.compile(r"^[A-Za-z0-9_-]+$")
_PLACEHOLDERS = ("prefix", "site", "gateway", "device")
TOPIC_MAX_CHARS = 256


def topic_levels_problem(text: str) -> str | None:
    """What is wrong with literal topic text ("kicox/fems"), or None."""
    if len(text) > TOPIC_MAX_CHARS:
        return f"at most {TOPIC_MAX_CHARS} characters"
    for level in text.split("/"):
        if not level:
            return "an empty topic level (a '/' at the start or end, or '//'): levels are separated by one '/'"
        if level[0] in "$+#":
            return (f"a topic level cannot start with {level[0]!r} ({_WHY_NOT[level[0]]}: mosquitto refuses to "
                    "deliver and still acknowledges, so readings would be deleted unsent)"
                    if level[0] == "$" else f"{level[0]!r} is an MQTT wildcard: not allowed in a topic")
        if not _TOPIC_LEVEL.fullmatch(level):
            bad = next(char for char in level if not _NAME_CHARS.match(char))
            shown = repr(bad) if bad.isprintable() else ascii(bad)
            why = _WHY_NOT.get(bad, "every broker must carry the topic")
            return f"{shown} is not allowed in a topic ({why}): topic levels are letters, digits, '_' and '-'"
    return None


def topic_template_problem(template: str, device_allowed: bool) -> str | None:
    """What is wrong with a topic template, or None. Checked at config time, never at publish time."""
    allowed = [name for name in _PLACEHOLDERS if device_allowed or name != "device"]
    listed = ", ".join(f"{{{name}}}" for name in allowed)
    if len(template) > TOPIC_MAX_CHARS:
        return f"at most {TOPIC_MAX_CHARS} characters"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"not a valid template ({exc}); placeholders are written {{site}}"
    shape, fields = "", set()
    for literal, name, spec, conversion in parts:
        shape += literal
        if name is None:
            continue
        if name not in allowed:
            return f"unknown placeholder {{{name}}}; allowed: {listed}"
        if spec or conversion:
            return f"a placeholder is written {{{name}}}, without a format or conversion; allowed: {listed}"
        fields.add(name)
        shape += "x"  # a name: never empty, always allowed in a level
    problem = topic_levels_problem(shape)
    if problem:
        return problem
    if device_allowed and "device" not in fields:
        return "must contain {device}: the platform tells devices apart by topic"
    return None


def _topic_prefix(value: str) -> str:
    problem = topic_levels_problem(value)
    if problem:
        raise ValueError(problem)
    return value


TopicPrefix = Annotated[str, Strict(), AfterValidator(_topic_prefix),
                        WithJsonSchema({"type": "string", "maxLength": TOPIC_MAX_CHARS,
                                        "pattern": r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$"})]


class StrictModel(BaseModel):
    # strict: a TOML value of the wrong type is refused, never converted (`true` is not 1, "1883" not a port).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field checks, as (path relative to this model, message). Empty when all is well."""
        return []

    @classmethod
    def salvage(cls, raw: dict[str, Any]) -> list[tuple[str, str]]:
        """The cross-field checks that can still run on the valid parts of an entry that failed validation
        (e.g. overlapping points of a device whose host is missing)."""
        return []


_M = typing.TypeVar("_M")


def valid_entries(items: Any, model: type[_M]) -> list[tuple[int, _M]]:
    """The entries of a list that validate on their own, with their indices: what a driver's `salvage`
    cross-checks when the device as a whole failed (the invalid entries are reported with its errors).
    `model` is a pydantic model or a pydantic dataclass."""
    valid: list[tuple[int, _M]] = []
    adapter = TypeAdapter(model)
    for index, item in enumerate(items if isinstance(items, list) else []):
        try:
            valid.append((index, adapter.validate_python(item)))
        except ValidationError:
            continue
    return valid


# --- sections --------------------------------------------------------------------------------------

class GatewayConfig(StrictModel):
    id: Name = Field(description="This gateway's id, unique on the platform; part of every topic.")
    site: Name = Field(description="The site (factory) this gateway belongs to; part of every topic.")
    status_interval: StatusInterval = Field(60.0, description="How often the status message (buffer, losses, device "
                                                        "health) is sent; also at once after every reconnect.")


class BufferConfig(StrictModel):
    path: FilePath = Field(Path("/var/lib/edge-agent/buffer.db"), description="SQLite file of the buffer.")
    max_bytes: ByteSize = Field(
        1 << 30, description="Cap on the buffer's size on disk; when reached, the oldest readings are dropped "
        "and counted.")
    on_full: Literal["drop_oldest", "reject_new"] = Field(
        "drop_oldest", description='At the cap: "drop_oldest" keeps the newest readings (the oldest are dropped '
        'and counted); "reject_new" keeps the oldest (new readings are refused and counted).')
    max_age: Age | None = Field(
        None, description="Delete readings older than this even if unsent (counted as expired). Off by default: "
        "an outage must not purge unsent data unless you decide it.")
    durability: Literal["power-loss", "process-crash"] = Field(
        "power-loss", description='"power-loss": every commit is fsynced (survives a power cut); '
        '"process-crash": survives a crash of the agent, a power cut may lose the last second.')

    def problems(self) -> list[tuple[str, str]]:
        if self.path.is_dir():
            return [("path", f"{self.path} is a folder: give the buffer file's path, e.g. "
                             f"{self.path / 'buffer.db'}")]
        return []


class TlsConfig(StrictModel):
    enabled: bool = True
    ca_file: FilePath | None = Field(None, description="CA bundle to verify the broker; the system store if unset.")
    cert_file: FilePath | None = Field(None, description="Client certificate, for mutual TLS.")
    key_file: FilePath | None = Field(None, description="Client private key, for mutual TLS.")

    def problems(self) -> list[tuple[str, str]]:
        out = [(name, problem) for name, path in
               (("ca_file", self.ca_file), ("cert_file", self.cert_file), ("key_file", self.key_file))
               if path is not None and (problem := file_problem(path))]
        if (self.cert_file is None) != (self.key_file is None):
            out.append(("key_file" if self.key_file is None else "cert_file",
                        "mutual TLS needs both cert_file and key_file"))
        if not out:
            out.extend(self._load_problems())
        return out

    def _load_problems(self) -> list[tuple[str, str]]:
        """Load the files as the uplink will: a file that is not a certificate must fail here, with the key to
        fix, not in the MQTT thread at the first connect."""
        context = ssl.create_default_context()
        try:
            if self.ca_file is not None:
                context.load_verify_locations(cafile=str(self.ca_file))
        except (ssl.SSLError, OSError, ValueError) as exc:
            return [("ca_file", f"not a PEM certificate bundle ({_ssl_reason(exc)}): {self.ca_file}")]
        if self.cert_file is not None and self.key_file is not None:
            return certificate_and_key_problems(("cert_file", self.cert_file), ("key_file", self.key_file))
        return []


def certificate_and_key_problems(cert: tuple[str, Path], key: tuple[str, Path]) -> list[tuple[str, str]]:
    """Load a certificate and its private key as the TLS code will, each given as (its key in the config, the
    file); what is wrong is named at the file to fix: the certificate, or the key (not a key, encrypted, or
    not the certificate's). Used by [mqtt.tls] and [metrics]."""
    (cert_key, cert_file), (key_key, key_file) = cert, key
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        # Only certificates load here, so a key or a text file given as the certificate is named as such.
        context.load_verify_locations(cafile=str(cert_file))
    except (ssl.SSLError, OSError, ValueError) as exc:
        return [(cert_key, f"not a PEM certificate ({_ssl_reason(exc)}): {cert_file}")]
    try:
        # An empty password: an encrypted key fails here instead of asking on a terminal.
        context.load_cert_chain(str(cert_file), str(key_file), password="")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return [(key_key, f"not the key of the certificate {cert_file} (the first certificate in that file "
                              f"must be the one this key was made with): {key_file}")]
        return [(key_key, "expected an unencrypted PEM private key (a key with a passphrase cannot be loaded "
                          f"unattended): {key_file}")]
    except (OSError, ValueError) as exc:
        return [(key_key, f"cannot load the key ({_ssl_reason(exc)}): {key_file}")]
    return []


# The group the unit runs the agent in (systemd/edge-agent.service, Group=).
SERVICE_GROUP = "edge-agent"


def key_exposure(path: Path) -> str | None:
    """Who besides the agent can read a private key file, in words, or None. The key of the status page's
    certificate lets whoever holds it pose as the page and read the password a browser sends. Readable by
    the agent's own group is fine: that is how a key owned by root reaches the service (root:edge-agent,
    0640, as docs/install.md does it); that group is the service's, or this process's when `check` runs as
    another user."""
    try:
        info = path.stat()
    except OSError:
        return None  # the config check names a missing or unreadable file
    mode = stat.S_IMODE(info.st_mode)
    if mode & stat.S_IROTH:
        return f"every user of this machine (mode {mode:04o})"
    if mode & stat.S_IRGRP and info.st_gid not in _agent_groups():
        try:
            group = grp.getgrgid(info.st_gid).gr_name
        except KeyError:
            group = str(info.st_gid)
        return f"the members of group {group} (mode {mode:04o})"
    return None


def _agent_groups() -> set[int]:
    groups = {os.getegid(), *os.getgroups()}
    with contextlib.suppress(KeyError):
        groups.add(grp.getgrnam(SERVICE_GROUP).gr_gid)
    return groups


def _ssl_reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return str(reason).replace("_", " ").lower() if isinstance(reason, str) and reason.isupper() else str(reason)


def file_problem(path: Path) -> str | None:
    """Why a configured file cannot be used, or None. Never raises: a path too long or unreadable is an
    answer, not a traceback. The path is shown whole (FilePath bounds it): its end names the file."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return f"file not found: {path}"
    except OSError as exc:
        return f"cannot use {path}: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):
        return f"not a regular file: {path}"
    return None


class SparkplugConfig(StrictModel):
    group_id: Name | None = Field(None, description="The Sparkplug group id (a topic level). Default: gateway.site.")
    edge_node_id: Name | None = Field(None, description="The Sparkplug edge node id (a topic level). Default: "
                                                        "gateway.id.")
    primary_host_id: Name | None = Field(
        None, description="The primary host application's id: data is held in the buffer until its STATE message "
        "says online, and while it says offline. Unset: data is sent whenever the broker is connected.")


class MqttConfig(StrictModel):
    host: Host = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535, description="Default 1883, or 8883 with TLS.")
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    client_id: ClientId | None = Field(None, description='Default "edge-agent-<gateway.id>"; at most 128 '
                                                         'characters.')
    keepalive: KeepAlive = 30.0
    username: UserName | None = None
    password_file: FilePath | None = Field(None, description="File holding the password (first line).")
    password_env: EnvName | None = Field(None, description="Environment variable holding the password.")
    allow_password_without_tls: bool = Field(
        False, description="Send a password over a connection without TLS. Only for closed test networks.")
    tls: TlsConfig | None = None
    topic_prefix: TopicPrefix = "edge"
    data_topic: str = Field(DATA_TOPIC, description="Topic of each device's readings. Placeholders: {prefix} "
                                                    "(topic_prefix), {site}, {gateway}, {device} (required).")
    status_topic: str = Field(STATUS_TOPIC, description="Topic of the retained status message and last will. "
                                                        "Placeholders: {prefix}, {site}, {gateway}.")
    encoding: Literal["json", "cbor", "sparkplug"] = Field(
        "json", description='Data messages: "json" (readable, about 60 bytes per reading on the wire), "cbor" '
        "(compact: about 6 to 8 bytes per reading on the wire and on disk; point names travel in a retained "
        'message on meta_topic) or "sparkplug" (Sparkplug B 3.0 under spBv1.0/, settings in [mqtt.sparkplug]). '
        "See docs/payload.md.")
    sparkplug: SparkplugConfig = SparkplugConfig()
    meta_topic: str = Field(META_TOPIC, description='Topic of each device\'s retained point tables when encoding = '
                                                    '"cbor". Placeholders as data_topic; {device} is required.')
    max_inflight: int = Field(32, ge=1, le=1000, description="QoS 1 messages awaiting PUBACK at once.")
    max_message_bytes: MessageSize = Field(
        65536, description="Largest message: after an outage a device's polls are batched up to this size. "
        "A single poll larger than it is still sent alone.")
    reconnect_min: Duration = 1.0
    reconnect_max: Duration = 60.0

    @property
    def tls_enabled(self) -> bool:
        return self.tls is not None and self.tls.enabled

    @property
    def effective_port(self) -> int:
        return self.port or (8883 if self.tls_enabled else 1883)

    def problems(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if self.password_file is not None and self.password_env is not None:
            out.append(("password_env", "give the password either in password_file or in password_env"))
        if self.password_file is not None and (problem := file_problem(self.password_file)):
            out.append(("password_file", problem))
        if self.password_env is not None and self.password_env not in os.environ:
            out.append(("password_env", f"the environment variable {self.password_env} is not set"))
        elif self.password_env is not None and len(os.fsencode(os.environ[self.password_env])) > 65535:
            out.append(("password_env", f"the password in {self.password_env} is longer than the 65535 bytes "
                                        "MQTT carries"))
        has_password = self.password_file is not None or self.password_env is not None
        if has_password and self.username is None:
            out.append(("username", "a password is configured but no username"))
        if has_password and not self.tls_enabled and not self.allow_password_without_tls:
            out.append(("tls", "a password would be sent in clear text: enable [mqtt.tls], or set "
                               "allow_password_without_tls = true on a closed test network"))
        for key, template, device_allowed in (("data_topic", self.data_topic, True),
                                              ("status_topic", self.status_topic, False),
                                              ("meta_topic", self.meta_topic, True)):
            problem = topic_template_problem(template, device_allowed)
            if problem:
                out.append((key, problem))
        if self.reconnect_max < self.reconnect_min:
            out.append(("reconnect_max", "must be at least reconnect_min"))
        if self.tls is not None:
            out.extend((f"tls.{where}", msg) for where, msg in self.tls.problems())
        return out


class MetricsConfig(StrictModel):
    enabled: bool = True
    host: Host = Field("127.0.0.1", description="Address to listen on. Keep it on localhost unless the network "
                                               "is trusted: the figures name every device. Any other address "
                                               "needs password_file.")
    port: int = Field(9108, ge=0, le=65535, description="TCP port of the status page (/), /metrics "
                                                        "(Prometheus) and /status.json.")
    password_file: FilePath | None = Field(
        None, description="File holding the password (first line) that the status page, /metrics and "
        "/status.json ask for (HTTP Basic, any user name). Required when host is not a loopback address.")
    tls_cert_file: FilePath | None = Field(
        None, description="Certificate (PEM) to serve HTTPS with, with tls_key_file: off loopback the password "
        "and the figures are then encrypted. Read at start.")
    tls_key_file: FilePath | None = Field(
        None, description="The certificate's private key (PEM, unencrypted). Read at start.")

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None and self.tls_key_file is not None

    def problems(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if self.password_file is not None:
            problem = file_problem(self.password_file)
            if problem is None and not read_first_line(self.password_file):
                problem = f"the first line of {self.password_file} is empty: it must hold the password"
            if problem:
                out.append(("password_file", problem))
        elif not is_loopback(self.host):
            out.append(("host", f"listening on {self.host} makes the status page reachable from the network: set "
                                "metrics.password_file to a file holding a password, or keep host = "
                                "\"127.0.0.1\" and use an SSH tunnel"))
        out.extend(self._tls_problems())
        return out

    def _tls_problems(self) -> list[tuple[str, str]]:
        # As [mqtt.tls] cert_file and key_file: each file must exist, the two go together, and they are loaded
        # here as the listener will load them at start.
        out = [(key, problem) for key, path in (("tls_cert_file", self.tls_cert_file),
                                                ("tls_key_file", self.tls_key_file))
               if path is not None and (problem := file_problem(path))]
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            out.append(("tls_key_file" if self.tls_key_file is None else "tls_cert_file",
                        "HTTPS needs both tls_cert_file and tls_key_file"))
        if not out and self.tls_cert_file is not None and self.tls_key_file is not None:
            out.extend(certificate_and_key_problems(("tls_cert_file", self.tls_cert_file),
                                                    ("tls_key_file", self.tls_key_file)))
        return out

    def warnings(self) -> list[str]:
        """What works but should not stay as it is: logged at start and printed by `check`."""
        out: list[str] = []
        if self.enabled and self.password_file is not None and not self.tls_enabled and not is_loopback(self.host):
            out.append(f"metrics: listening on {self.host} over plain HTTP: the status page's password and the "
                       "figures cross the network unencrypted, readable by anyone who can capture its traffic; "
                       "set [metrics] tls_cert_file and tls_key_file to serve HTTPS "
                       "(docs/troubleshooting.md, The status page)")
        if self.enabled and self.tls_key_file is not None and (who := key_exposure(self.tls_key_file)):
            out.append(f"metrics.tls_key_file: {self.tls_key_file} can be read by {who}: whoever reads it can "
                       "pose as this status page; chmod 0640 and chown root:edge-agent (or 0600, owned by the "
                       "agent's user)")
        return out


def is_loopback(host: str) -> bool:
    """Only this machine can connect: 127.0.0.0/8, ::1 or "localhost". A host name is taken as reachable from
    the network (it may resolve to any address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_first_line(path: Path) -> str:
    """A password file's password: its first line, without the line end ("" for an empty or unreadable file)."""
    try:
        with path.open(encoding="utf-8") as file:
            return file.readline(65536).rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return ""


class DeviceBase(StrictModel):
    """What every device has, whatever its driver. Drivers subclass this."""

    name: Name = Field(description="Unique device name; part of the topic and of every reading.")
    # Keys of the entry that name files or folders: relative values are taken from the config file's folder.
    path_keys: ClassVar[tuple[str, ...]] = ()

    driver: str
    poll_interval: PollInterval = Field(
        1.0, description="Polls are aligned to the wall clock: 1s on whole seconds, 15m on :00/:15/:30/:45.")
    timeout: Duration = Field(1.0, description="How long one request may take before the device counts as "
                                               "not answering.")
    energy: EnergySection | None = Field(None, description="Demand windows from this meter's energy counter "
                                                           "(docs/energy.md).")

    @classmethod
    def expand(cls, raw: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """Turn shorthand (a driver's profiles, say) into the plain entry before validation; problems as
        (path relative to the entry, message). Most drivers have none."""
        return raw, []

    @classmethod
    def across(cls, devices: list[tuple[int, Any]]) -> list[tuple[int, str, str]]:
        """Checks across the valid devices of this driver, as (device index, dotted path, message): e.g.
        devices sharing one serial line must agree on its settings."""
        return []


class _TopLevel(StrictModel):
    gateway: GatewayConfig
    buffer: BufferConfig = BufferConfig()
    mqtt: MqttConfig = MqttConfig()
    metrics: MetricsConfig = MetricsConfig()
    devices: list[Any] = Field(default_factory=list, description="[[devices]] tables; see each driver.")
    energy: PlantEnergy = PlantEnergy()


_SECTIONS: dict[str, type[StrictModel]] = {"gateway": GatewayConfig, "buffer": BufferConfig, "mqtt": MqttConfig,
                                            "metrics": MetricsConfig}


@dataclass(frozen=True, slots=True)
class AgentConfig:
    source: str
    gateway: GatewayConfig
    buffer: BufferConfig
    mqtt: MqttConfig
    metrics: MetricsConfig
    devices: tuple[DeviceBase, ...]
    energy: PlantEnergy = field(default_factory=PlantEnergy)


# --- loading ---------------------------------------------------------------------------------------

# A plant's config with a thousand devices read through profiles is well under 1 MB; the largest shape the
# agent is measured at, 1,000 devices of 100 points each written out (bench/e2e.py), is 7.6 MB. Bounding what
# is read keeps `check` quick on a wrong file (a log, a disk image), and a FIFO or a device given by mistake is
# refused, not waited on.
MAX_CONFIG_BYTES = 16 << 20
# Tables and arrays deeper than this are no config of ours; far deeper ones exhaust Python's recursion.
MAX_NESTING = 32
# No table of the config has more than a few dozen keys (`overrides` one per point of a profile). A table of
# a million unknown keys is refused as a whole: validating it would cost seconds and hundreds of MB.
MAX_TABLE_KEYS = 1000


def load_config(path: Path | str) -> AgentConfig:
    path = Path(path)
    data = _read_bounded(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [Problem("", f"not UTF-8 text: {exc.reason} at byte {exc.start}")]) from exc
    return parse_config(text, source=str(path), base_dir=path.resolve().parent)


def _read_bounded(path: Path) -> bytes:
    def refuse(message: str) -> ConfigError:
        return ConfigError(path, [Problem("", message)])

    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below as not a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise refuse(f"cannot read the config file: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode) else \
                "a device or socket"
            raise refuse(f"cannot read the config file: it is {kind}, not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise refuse(f"the config file has {info.st_size:,} bytes; at most {MAX_CONFIG_BYTES:,} are read "
                         "(is it the right file?)")
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise refuse(f"cannot read the config file: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:  # it grew while being read
        raise refuse(f"the config file has more than {MAX_CONFIG_BYTES:,} bytes (is it the right file?)")
    return data


def parse_config(text: str, source: str = "<config>", base_dir: Path | None = None) -> AgentConfig:
    """`base_dir`: where relative file paths in the config point from (the config file's folder)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [Problem("", f"not valid TOML: {exc}")]) from exc
    except ValueError as exc:  # tomllib's int() of a number beyond Python's 4300-digit limit
        raise ConfigError(source, [Problem("", "not valid TOML for the agent: an integer of more than 4300 "
                                               "digits")]) from exc
    except RecursionError as exc:
        raise ConfigError(source, [Problem("", f"arrays or tables nested more than {MAX_NESTING} deep")]) from exc
    shape = _shape_problem(raw)
    if shape is not None:
        raise ConfigError(source, [Problem(_dotted(shape[0]), shape[1])])
    if base_dir is not None:
        _resolve_paths(raw, base_dir)
    return validate_config(raw, source)


def _shape_problem(raw: dict[str, Any]) -> tuple[tuple[str | int, ...], str] | None:
    """A value nested deeper than MAX_NESTING or a table of more than MAX_TABLE_KEYS keys, as (path,
    message), or None. Iterative: the point is not to recurse."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(raw, ())]
    while stack:
        value, where = stack.pop()
        if len(where) > MAX_NESTING:
            # Named by the key holding the deep value, not by thirty [0]s.
            keys = [index for index, part in enumerate(where) if isinstance(part, str)]
            return where[:keys[-1] + 1] if keys else where[:1], f"arrays or tables nested more than {MAX_NESTING} deep"
        if isinstance(value, dict) and len(value) > MAX_TABLE_KEYS:
            return where, (f"a table of {len(value):,} keys; no table of the config has more than "
                           f"{MAX_TABLE_KEYS:,} (is it the right file?)")
        if isinstance(value, dict):
            stack.extend((item, (*where, key)) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((item, (*where, index)) for index, item in enumerate(value))
    return None


# Keys that name files: relative values are taken from the config file's folder, not from the working
# directory (which is / under systemd).
_PATH_KEYS = (("buffer", "path"), ("mqtt", "password_file"), ("mqtt", "tls", "ca_file"),
              ("mqtt", "tls", "cert_file"), ("mqtt", "tls", "key_file"), ("metrics", "password_file"),
              ("metrics", "tls_cert_file"), ("metrics", "tls_key_file"))


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    tables: list[tuple[Any, tuple[str, ...]]] = [(raw, keys) for keys in _PATH_KEYS]
    devices = raw.get("devices")
    for device in devices if isinstance(devices, list) else []:
        driver = device.get("driver") if isinstance(device, dict) else None
        if isinstance(driver, str) and driver in drivers.REGISTRY:
            model: type[DeviceBase] = drivers.load(driver).DeviceConfig
            tables.extend((device, (key,)) for key in model.path_keys)
    for table, keys in tables:
        for key in keys[:-1]:
            table = table.get(key) if isinstance(table, dict) else None
        # An empty or unexpandable value is left as written, for validation to name what is wrong with it.
        value = table.get(keys[-1]) if isinstance(table, dict) else None
        if isinstance(value, str) and value.strip() and "\0" not in value:
            path = Path(os.path.expanduser(value))
            if not str(path).startswith("~"):
                table[keys[-1]] = str(path if path.is_absolute() else base_dir / path)


def validate_config(raw: dict[str, Any], source: str = "<config>") -> AgentConfig:
    """Validate an already parsed config (the TOML file's tables as dicts)."""
    problems: list[Problem] = []
    top: _TopLevel | None = None
    try:
        top = _TopLevel.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_problems_from(exc, (), _TopLevel))
    # Cross-field checks of each section that is valid on its own, even when another section is not:
    # every problem of the file is reported in one pass.
    for name, model in _SECTIONS.items():
        section = raw.get(name, {})
        if isinstance(section, dict):
            try:
                problems.extend(_cross_checks(model.model_validate(section), (name,)))
            except ValidationError:
                pass  # already reported through _TopLevel

    raw_devices = raw.get("devices", [])
    devices: list[DeviceBase] = []
    if isinstance(raw_devices, list):
        devices = _validate_devices(raw_devices, problems)
        if not raw_devices:
            problems.append(Problem("devices", "no devices configured: add at least one [[devices]] table"))
    if top is not None:
        problems.extend(Problem(where, message) for where, message in group_problems(top.energy, devices))
    if problems:
        raise ConfigError(source, problems)
    assert top is not None
    return AgentConfig(source, top.gateway, top.buffer, top.mqtt, top.metrics, tuple(devices), top.energy)


def _validate_devices(raw_devices: list[Any], problems: list[Problem]) -> list[DeviceBase]:
    devices: list[DeviceBase] = []
    indices: list[int] = []
    first_index: dict[str, int] = {}
    known = ", ".join(sorted(drivers.REGISTRY))
    for index, raw in enumerate(raw_devices):
        where = ("devices", index)
        if not isinstance(raw, dict):
            problems.append(Problem(_dotted(where), "expected a table ([[devices]])"))
            continue
        name = raw.get("name")
        if isinstance(name, str):
            if name in first_index:
                problems.append(Problem(_dotted((*where, "name")), f"duplicate device name {echo(name)} "
                                        f"(already used by {_dotted(('devices', first_index[name]))})"))
            first_index.setdefault(name, index)
        driver = raw.get("driver")
        if driver is None:
            problems.append(Problem(_dotted((*where, "driver")), f"missing required key; expected one of: {known}"))
            continue
        if not isinstance(driver, str) or driver not in drivers.REGISTRY:
            message = f"unknown driver {echo(driver)}; expected one of: {known}" if isinstance(driver, str) else \
                f"expected the driver's name as a string, one of: {known} (got {echo(driver)})"
            problems.append(Problem(_dotted((*where, "driver")), message))
            continue
        model: type[DeviceBase] = drivers.load(driver).DeviceConfig
        raw, expanded = model.expand(raw)
        if expanded:
            problems.extend(Problem(f"{_dotted(where)}.{sub}", message) for sub, message in expanded)
            continue
        try:
            device = model.model_validate(raw)
        except ValidationError as exc:
            problems.extend(_problems_from(exc, where, model))
            problems.extend(Problem(f"{_dotted(where)}.{sub}", message) for sub, message in model.salvage(raw))
            continue
        problems.extend(_cross_checks(device, where))
        problems.extend(Problem(f"{_dotted(where)}.{sub}", message) for sub, message in device_problems(device))
        devices.append(device)
        indices.append(index)
    by_model: dict[type[DeviceBase], list[tuple[int, DeviceBase]]] = {}
    for index, device in zip(indices, devices, strict=True):
        by_model.setdefault(type(device), []).append((index, device))
    for model, members in by_model.items():
        problems.extend(Problem(_dotted(("devices", index, *sub.split("."))), message)
                        for index, sub, message in model.across(members))
    return devices


def _cross_checks(model: StrictModel, where: tuple[str | int, ...]) -> list[Problem]:
    return [Problem(f"{_dotted(where)}.{sub}", message) for sub, message in model.problems()]


def _problems_from(exc: ValidationError, prefix: tuple[str | int, ...], model: type[BaseModel]) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False):
        kind = error["type"]
        # The last part of an unknown key's location is the key as written, even one named "int" or "bool".
        keep = 1 if kind in ("extra_forbidden", "unexpected_keyword_argument") else 0
        loc = tuple(part for part in error["loc"][:len(error["loc"]) - keep] if not _is_internal(part)) \
            + tuple(error["loc"][len(error["loc"]) - keep:])
        where = _dotted(prefix + loc)
        if kind == "missing":
            message = "missing required key"
        elif kind in ("extra_forbidden", "unexpected_keyword_argument"):  # a model's, a dataclass's
            message = "unknown key" + _suggestion(model, loc)
        else:
            # A TOML array kept as a tuple (a point must be hashable) is still a list to the person writing it.
            message = "Input should be a valid list" if kind == "tuple_type" else \
                error["msg"].removeprefix("Value error, ")
            given = error.get("input")
            if isinstance(given, str | int | float | bool):
                message += f" (got {echo(given)})"
        problems.append(Problem(where, message))
    return problems


def _is_internal(part: str | int) -> bool:
    # pydantic adds pseudo-locations for union members and validators, e.g. "function-before[...]".
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "list"})


def _suggestion(model: type[BaseModel], loc: tuple[str | int, ...]) -> str:
    """Walk the model along `loc` to the table holding the unknown key, and offer the closest real key."""
    fields: dict[str, FieldInfo] | None = _fields_of(model)
    for part in loc[:-1]:
        if fields is None:
            return ""
        if isinstance(part, int):
            continue
        field = fields.get(part)
        fields = _fields_in(field.annotation) if field is not None else None
    if fields is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(fields), n=1, cutoff=0.6)
    allowed = ", ".join(fields)
    return f"; did you mean {close[0]!r}?" if close else f"; expected one of: {allowed}"


def _fields_of(annotation: Any) -> dict[str, FieldInfo] | None:
    """The fields of a pydantic model or pydantic dataclass (a table in the file), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.model_fields
    if isinstance(annotation, type) and is_pydantic_dataclass(annotation):
        return annotation.__pydantic_fields__
    return None


def _fields_in(annotation: Any) -> dict[str, FieldInfo] | None:
    """The fields of the table an annotation holds, looking inside list[...], X | None and Annotated."""
    fields = _fields_of(annotation)
    if fields is not None:
        return fields
    if typing.get_origin(annotation) in (list, tuple, typing.Union, types.UnionType, Annotated):
        for arg in typing.get_args(annotation):
            found = _fields_in(arg)
            if found is not None:
                return found
    return None


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str):  # a key as written: it may be 50 MB long, or hold a line break
            part = part if len(part) <= ECHO_CHARS else part[:ECHO_CHARS - 1] + "…"
            part = part if part.isprintable() else ascii(part)[1:-1]
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the whole file, for editors (`edge-agent schema`)."""
    schema = _TopLevel.model_json_schema()
    device_schemas = [drivers.load(name).DeviceConfig.model_json_schema() for name in sorted(drivers.REGISTRY)]
    defs = schema.setdefault("$defs", {})
    for device_schema in device_schemas:
        defs.update(device_schema.pop("$defs", {}))
    schema["properties"]["devices"] = {"type": "array", "minItems": 1, "items": {"oneOf": device_schemas},
                                       "description": "[[devices]] tables, one per device; `driver` selects "
                                                      "the fields."}
    schema["required"] = sorted({*schema.get("required", []), "devices"})
    schema["title"] = "edge-agent configuration"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
