"""The configuration: one TOML file, validated completely before the first byte goes on a wire.

Every problem is reported at once, each with the file, the dotted path (`devices[2].points[5].type`) and
what was expected, so a technician can fix the file in one pass. Unknown keys are errors (a typo must not
silently fall back to a default), with a "did you mean" where a close key exists. Device entries are
validated by their driver's own model, looked up in `drivers.REGISTRY`.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)
from pydantic.dataclasses import is_pydantic_dataclass
from pydantic.fields import FieldInfo

import drivers
from agent.errors import ConfigError, Problem
from agent.payload import DATA_TOPIC, META_TOPIC, STATUS_TOPIC, topic_template_problem
from energy.config import EnergySection, PlantEnergy, device_problems, group_problems

# --- value types a technician writes ---------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_duration(value: Any) -> Any:
    """Seconds as a number, or a string such as "500ms", "1s", "15m", "1h"."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError('expected a duration such as 1, 0.5, "500ms", "1s", "15m" or "1h"')
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return value


def parse_bytes(value: Any) -> Any:
    """A byte count as a number, or a string such as "512MB" or "1GiB"."""
    if isinstance(value, str):
        match = _BYTES.match(value)
        if not match:
            raise ValueError('expected a size such as 1048576, "500MB" or "2GiB"')
        unit = (match.group(2) or "").lower().removesuffix("b")
        return int(float(match.group(1)) * _BYTE_UNITS[unit])
    return value


_DURATION_SCHEMA = {"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
                              {"type": "string", "pattern": _DURATION.pattern}],
                    "description": 'Seconds, or a string such as "500ms", "1s", "15m", "1h".'}
_BYTES_SCHEMA = {"anyOf": [{"type": "integer", "minimum": 1 << 20}, {"type": "string", "pattern": _BYTES.pattern}],
                 "description": 'Bytes, or a string such as "500MB" or "2GiB" (at least 1 MiB).'}
Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0, le=86400), WithJsonSchema(_DURATION_SCHEMA)]
# An age can be long: a buffer's max_age is counted in days.
Age = Annotated[float, BeforeValidator(parse_duration), Field(gt=0, le=3650 * 86400),
                WithJsonSchema({**_DURATION_SCHEMA, "description": 'Seconds, or a string such as "12h" or "30d".'})]
ByteSize = Annotated[int, BeforeValidator(parse_bytes), Field(ge=1 << 20), WithJsonSchema(_BYTES_SCHEMA)]
# Names end up in MQTT topics and metric labels: no '/', '+', '#' or spaces.
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

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
    status_interval: Duration = Field(60.0, description="How often the status message (buffer, losses, device "
                                                        "health) is sent; also at once after every reconnect.")


class BufferConfig(StrictModel):
    path: Path = Field(Path("/var/lib/edge-agent/buffer.db"), description="SQLite file of the buffer.")
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


class TlsConfig(StrictModel):
    enabled: bool = True
    ca_file: Path | None = Field(None, description="CA bundle to verify the broker; the system store if unset.")
    cert_file: Path | None = Field(None, description="Client certificate, for mutual TLS.")
    key_file: Path | None = Field(None, description="Client private key, for mutual TLS.")

    def problems(self) -> list[tuple[str, str]]:
        out = [(name, f"file not found: {path}") for name, path in
               (("ca_file", self.ca_file), ("cert_file", self.cert_file), ("key_file", self.key_file))
               if path is not None and not path.is_file()]
        if (self.cert_file is None) != (self.key_file is None):
            out.append(("key_file" if self.key_file is None else "cert_file",
                        "mutual TLS needs both cert_file and key_file"))
        return out


class MqttConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535, description="Default 1883, or 8883 with TLS.")
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    client_id: str | None = Field(None, description='Default "edge-agent-<gateway.id>".')
    keepalive: Duration = 30.0
    username: str | None = None
    password_file: Path | None = Field(None, description="File holding the password (first line).")
    password_env: str | None = Field(None, description="Environment variable holding the password.")
    allow_password_without_tls: bool = Field(
        False, description="Send a password over a connection without TLS. Only for closed test networks.")
    tls: TlsConfig | None = None
    topic_prefix: Annotated[str, Field(pattern=r"^[^#+]+$")] = "edge"
    data_topic: str = Field(DATA_TOPIC, description="Topic of each device's readings. Placeholders: {prefix} "
                                                    "(topic_prefix), {site}, {gateway}, {device} (required).")
    status_topic: str = Field(STATUS_TOPIC, description="Topic of the retained status message and last will. "
                                                        "Placeholders: {prefix}, {site}, {gateway}.")
    encoding: Literal["json", "cbor"] = Field(
        "json", description='Data messages: "json" (readable, about 60 bytes per reading on the wire) or "cbor" '
        "(compact: about 6 to 8 bytes per reading on the wire and on disk; point names travel in a retained "
        "message on meta_topic). See docs/payload.md.")
    meta_topic: str = Field(META_TOPIC, description='Topic of each device\'s retained point tables when encoding = '
                                                    '"cbor". Placeholders as data_topic; {device} is required.')
    max_inflight: int = Field(32, ge=1, le=1000, description="QoS 1 messages awaiting PUBACK at once.")
    max_message_bytes: Annotated[int, BeforeValidator(parse_bytes), Field(ge=1024, le=256 << 20)] = Field(
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
        if self.password_file is not None and not self.password_file.is_file():
            out.append(("password_file", f"file not found: {self.password_file}"))
        if self.password_env is not None and self.password_env not in os.environ:
            out.append(("password_env", f"the environment variable {self.password_env} is not set"))
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
    host: str = Field("127.0.0.1", description="Address to listen on. Keep it on localhost unless the network "
                                               "is trusted: the figures name every device.")
    port: int = Field(9108, ge=0, le=65535, description="TCP port of /metrics (Prometheus) and /status.json.")


class DeviceBase(StrictModel):
    """What every device has, whatever its driver. Drivers subclass this."""

    name: Name = Field(description="Unique device name; part of the topic and of every reading.")
    # Keys of the entry that name files or folders: relative values are taken from the config file's folder.
    path_keys: ClassVar[tuple[str, ...]] = ()

    driver: str
    poll_interval: Duration = Field(
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


_SECTIONS: dict[str, type[StrictModel]] = {"gateway": GatewayConfig, "buffer": BufferConfig, "mqtt": MqttConfig}


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

def load_config(path: Path | str) -> AgentConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, [Problem("", f"cannot read the config file: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [Problem("", f"not UTF-8 text: {exc}")]) from exc
    return parse_config(text, source=str(path), base_dir=path.resolve().parent)


def parse_config(text: str, source: str = "<config>", base_dir: Path | None = None) -> AgentConfig:
    """`base_dir`: where relative file paths in the config point from (the config file's folder)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [Problem("", f"not valid TOML: {exc}")]) from exc
    if base_dir is not None:
        _resolve_paths(raw, base_dir)
    return validate_config(raw, source)


# Keys that name files: relative values are taken from the config file's folder, not from the working
# directory (which is / under systemd).
_PATH_KEYS = (("buffer", "path"), ("mqtt", "password_file"), ("mqtt", "tls", "ca_file"),
              ("mqtt", "tls", "cert_file"), ("mqtt", "tls", "key_file"))


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
        if isinstance(table, dict) and isinstance(table.get(keys[-1]), str):
            value = Path(table[keys[-1]]).expanduser()
            table[keys[-1]] = str(value if value.is_absolute() else base_dir / value)


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
                problems.append(Problem(_dotted((*where, "name")), f"duplicate device name {name!r} "
                                        f"(already used by {_dotted(('devices', first_index[name]))})"))
            first_index.setdefault(name, index)
        driver = raw.get("driver")
        if driver is None:
            problems.append(Problem(_dotted((*where, "driver")), f"missing required key; expected one of: {known}"))
            continue
        if driver not in drivers.REGISTRY:
            problems.append(Problem(_dotted((*where, "driver")),
                                    f"unknown driver {driver!r}; expected one of: {known}"))
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
        loc = tuple(part for part in error["loc"] if not _is_internal(part))
        where = _dotted(prefix + loc)
        kind = error["type"]
        if kind == "missing":
            message = "missing required key"
        elif kind in ("extra_forbidden", "unexpected_keyword_argument"):  # a model's, a dataclass's
            message = "unknown key" + _suggestion(model, loc)
        else:
            # A TOML array kept as a tuple (a point must be hashable) is still a list to the person writing it.
            message = "Input should be a valid list" if kind == "tuple_type" else \
                error["msg"].removeprefix("Value error, ")
            given = error.get("input")
            if isinstance(given, str | int | float | bool) and not isinstance(given, dict):
                message += f" (got {given!r})"
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
