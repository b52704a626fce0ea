"""An OPC-UA DataValue as a reading: the value, its quality from the status code, its timestamps.

- Status: the top two bits of the StatusCode give the severity: Good -> "good", Uncertain -> "uncertain"
  (the value is kept, the code's name is the reason), Bad -> "bad" (value null, the code's name is the
  reason, e.g. "BadNodeIdUnknown").
- Values: Boolean, the integer types, Float, Double, String, LocalizedText (its text), DateTime (ISO 8601
  UTC) and enumerations (their integer) are sent. Float is shortened to the shortest decimal that is the
  same single-precision number (229.8, not 229.8000030517578), as the Modbus driver does.
- Arrays, matrices, structures (ExtensionObject), ByteString, Guid and the other types are not flattened:
  the point becomes a bad reading that says what the node holds, so a technician can point it at the
  element or field node instead. One odd node never stops the others.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from asyncua import ua

from agent.model import Float32, Quality, Reading

_SCALAR_TYPES = {
    ua.VariantType.Boolean, ua.VariantType.SByte, ua.VariantType.Byte, ua.VariantType.Int16, ua.VariantType.UInt16,
    ua.VariantType.Int32, ua.VariantType.UInt32, ua.VariantType.Int64, ua.VariantType.UInt64,
    ua.VariantType.Double, ua.VariantType.String,
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_names: dict[int, str] = {}


def status_name(code: int) -> str:
    """"BadNodeIdUnknown" for 0x80340000; the info bits (the low 16) do not hide the name."""
    name = _names.get(code)
    if name is None:
        name, _ = ua.status_codes.get_name_and_doc(code)
        if name in ("Good", "Uncertain", "Bad") and code & 0xFFFF:
            base, _ = ua.status_codes.get_name_and_doc(code & 0xFFFF0000)
            name = base if base not in ("Good", "Uncertain", "Bad") else name
        if name in ("Good", "Uncertain", "Bad") and code & 0xFFFF0000:
            name = f"{name} (0x{code:08X})"
        _names[code] = name
    return name


def epoch(value: datetime | None) -> float | None:
    """Seconds since 1970 UTC; None for a missing timestamp or the OPC-UA 'no time' (1601-01-01)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    seconds = (value - _EPOCH).total_seconds()
    return seconds if seconds > 0 else None


def to_reading(point: str, unit: str | None, data: ua.DataValue) -> Reading:
    code = data.StatusCode.value if data.StatusCode is not None else 0
    source_ts = epoch(data.SourceTimestamp)
    server_ts = epoch(data.ServerTimestamp)
    severity = code >> 30
    if severity >= 2:
        return Reading(point, None, unit, Quality.BAD, status_name(code), source_ts, server_ts)
    value, problem = convert(data.Value)
    if problem is not None:
        return Reading(point, None, unit, Quality.BAD, problem, source_ts, server_ts)
    if severity == 1:
        return Reading(point, value, unit, Quality.UNCERTAIN, status_name(code), source_ts, server_ts)
    return Reading(point, value, unit, Quality.GOOD, None, source_ts, server_ts)


def convert(variant: ua.Variant | None) -> tuple[Any, str | None]:
    """(value, None) or (None, why the value cannot be sent)."""
    if variant is None or variant.VariantType is ua.VariantType.Null or variant.Value is None:
        return None, "the server sent no value (null)"
    kind, value = variant.VariantType, variant.Value
    if variant.is_array or isinstance(value, list | tuple):
        count = len(value) if isinstance(value, list | tuple) else "?"
        return None, (f"an array of {count} {kind.name} values is not supported: address one element's node "
                      "(or a scalar node) instead")
    if kind in _SCALAR_TYPES:
        return value, None
    if kind is ua.VariantType.Float:
        return Float32(value), None
    if kind is ua.VariantType.LocalizedText:
        return value.Text or "", None
    if kind is ua.VariantType.DateTime:
        seconds = epoch(value)
        if seconds is None:
            return None, "a DateTime with no time (1601-01-01)"
        return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"), None
    if kind is ua.VariantType.ExtensionObject or hasattr(value, "ua_types"):
        return None, (f"a structure ({type(value).__name__}) is not supported: address the nodes of its fields "
                      "instead")
    return None, f"a {kind.name} value is not supported (numbers, booleans and strings are)"
