"""Names that become MQTT topic levels (sites, gateways, devices, energy groups), and point names, which travel
inside messages only. Kept apart from agent/config.py so that every section's validation (energy/config.py too)
refuses a bad name with the same words and the same suggested rename."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field, Strict, WithJsonSchema

# Names become MQTT topic levels on every broker: letters, digits, '_' and '-' only. NATS refuses '.' and
# ' ' in a topic, RabbitMQ turns '.' into '/', '+', '#' and '/' have meanings of their own.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_NAME_CHARS = re.compile(r"[A-Za-z0-9_-]")
_WHY_NOT = {".": "NATS refuses it in a topic, RabbitMQ turns it into '/'",
            " ": "NATS refuses it in a topic", "/": "it separates topic levels",
            "+": "it is an MQTT wildcard", "#": "it is an MQTT wildcard",
            "$": "topics starting with it are the broker's own"}


def suggest_name(value: str) -> str:
    """What to rename a bad name to: each run of other characters becomes one '-'."""
    suggestion = re.sub(r"[^A-Za-z0-9_-]+", "-", value).strip("-_")
    return suggestion[:64].rstrip("-_")


def _name_problem(value: str) -> str | None:
    if _NAME.fullmatch(value):
        return None
    rule = ("expected a name of 1 to 64 letters A-Z a-z, digits, '_' and '-', starting with a letter or digit "
            "(names are MQTT topic levels)")
    bad = next((char for char in value if not _NAME_CHARS.match(char)), None)
    if bad is not None:
        why = _WHY_NOT.get(bad, "not every broker carries it in a topic")
        shown = repr(bad) if bad.isprintable() else ascii(bad)
        what = f"{shown} is not allowed: {why}"
    elif not value:
        return rule
    elif len(value) > 64:
        what = f"{len(value)} characters is too long"
    else:
        what = f"{value[0]!r} cannot come first"
    suggestion = suggest_name(value)
    rename = f"; rename it to {suggestion!r}" if suggestion and _NAME.fullmatch(suggestion) else ""
    return f"{rule}; {what}{rename}"


def _name(value: str) -> str:
    problem = _name_problem(value)
    if problem:
        raise ValueError(problem)
    return value


_NAME_SCHEMA = {"type": "string", "pattern": _NAME.pattern}
Name = Annotated[str, Strict(), AfterValidator(_name), WithJsonSchema(_NAME_SCHEMA)]
# Point names travel inside messages, never in a topic: '.' is allowed there ("press_line.2").
PointName = Annotated[str, Strict(), Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
