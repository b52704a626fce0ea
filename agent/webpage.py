"""The technician's status page: what the agent serves at / on its metrics listener.

A person commissioning a gateway stands in the plant with a laptop or a phone: is each meter answering,
what did it last say, is the RS-485 line overloaded, is anything waiting or lost, is the clock right. The
page (agent/web/: plain HTML, CSS and JavaScript shipped in the package, nothing fetched from anywhere
else) asks /page.json every 1.5 s while it is visible and draws it; with no browser open, nothing here runs
but `LatestReadings.record`, one dict assignment per poll.

What it promises:
- Read-only, and never a secret: the snapshot is built field by field from the status snapshot, the
  health and the last readings; no password, key, user name or config dump goes into it.
- Bounded memory: one poll per device or derived stream (the last complete one, plus the points a
  streaming device changed since), forgotten when the device is removed by a reload.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

from agent import __version__
from agent.config import AgentConfig
from agent.model import Float32, PollResult, Reading
from agent.payload import iso_utc

TEXT_MAX = 200  # characters of a string value or reason shown; a device can send long strings

# path -> (file in agent/web, content type)
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str


def load_assets() -> dict[str, Asset]:
    """Read once at start: a request costs no file access."""
    files = resources.files("agent").joinpath("web")
    return {path: Asset(files.joinpath(name).read_bytes(), content_type)
            for path, (name, content_type) in ASSETS.items()}


class LatestReadings:
    """The last values of each device (and each stream a stage derives, such as `<meter>/demand`)."""

    def __init__(self) -> None:
        self._polls: dict[str, PollResult] = {}
        # A streaming device (OPC-UA) emits only the points that changed: those newer than its last full emit.
        self._newer: dict[str, dict[str, tuple[float, Reading]]] = {}

    def record(self, result: PollResult) -> None:
        """Runs on every poll: as cheap as it can be for the common case, a poll of every point."""
        previous = self._polls.get(result.device)
        if previous is None or len(result.readings) >= len(previous.readings):
            self._polls[result.device] = result
            if result.device in self._newer:
                del self._newer[result.device]
            return
        newer = self._newer.setdefault(result.device, {})
        for reading in result.readings:
            newer[reading.point] = (result.ts, reading)

    def forget(self, device: str) -> None:
        """A device removed or changed by a reload: its values and its derived streams go."""
        for name in [name for name in self._polls if name == device or name.startswith(device + "/")]:
            self._polls.pop(name, None)
            self._newer.pop(name, None)

    def streams(self) -> list[str]:
        return sorted(self._polls)

    def points(self, device: str) -> list[dict[str, Any]]:
        poll = self._polls.get(device)
        if poll is None:
            return []
        newer = self._newer.get(device, {})
        shown = [_point(*newer.get(r.point, (poll.ts, r))) for r in poll.readings]
        listed = {r.point for r in poll.readings}
        shown += [_point(ts, r) for point, (ts, r) in newer.items() if point not in listed]
        return shown


def _point(ts: float, reading: Reading) -> dict[str, Any]:
    return {"point": reading.point, "value": _value(reading.value), "unit": reading.unit,
            "quality": str(reading.quality), "reason": _text(reading.reason), "ts": iso_utc(ts)}


def _value(value: object) -> object:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)  # JSON has no NaN: shown as text
        # The decimal the device meant ("229.8"), not the float32's exact binary value.
        return float(repr(value)) if isinstance(value, Float32) else value
    if isinstance(value, str):
        return _text(value)
    return value


def _text(text: str | None) -> str | None:
    return text if text is None or len(text) <= TEXT_MAX else text[:TEXT_MAX] + "..."


def page_snapshot(status: dict[str, Any], config: AgentConfig, uplink: Any, latest: LatestReadings,
                  now: float, energy: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What /page.json serves: the status snapshot (as /status.json) with what the page adds: the broker's
    address and session, the buffer's limits, each device's points, and `energy`: each meter's and group's
    live demand and latest windows (energy/wiring.py `page_section`). `uplink` is the MqttUplink."""
    mqtt = config.mqtt
    devices = []
    configured = set()
    for device in config.devices:
        configured.add(device.name)
        health = status["devices"].get(device.name, {})
        devices.append({"name": device.name, "driver": device.driver, "poll_interval_s": device.poll_interval,
                        **health, "points": latest.points(device.name)})
    since = uplink.connected_since
    last_error = uplink.last_error
    snapshot: dict[str, Any] = {
        "now": iso_utc(now),
        "gateway": {"id": config.gateway.id, "site": config.gateway.site, "version": __version__,
                    "uptime_s": status["uptime_s"]},
        "uplink": {"broker": f"{mqtt.host}:{mqtt.effective_port}", "tls": mqtt.tls_enabled,
                   "connected": uplink.connected, "connected_since": iso_utc(since) if since else None,
                   "inflight": status["uplink"]["inflight"],
                   "delivered_readings": status["uplink"]["delivered_readings"],
                   "last_error": _text(last_error[1]) if last_error else None,
                   "last_error_at": iso_utc(last_error[0]) if last_error else None},
        "buffer": {**status["buffer"], "max_bytes": config.buffer.max_bytes, "on_full": config.buffer.on_full,
                   "max_age_s": config.buffer.max_age},
        "lines": status.get("lines", []),
        "devices": devices,
    }
    # Sections other engineers' stages add to the status (clock health, energy figures) are passed on as
    # they are: the page draws whatever keys they have.
    if "clock" in status:
        snapshot["gateway"]["clock"] = status["clock"]
    streams = [{"stream": name, "points": latest.points(name)} for name in latest.streams()
               if name not in configured and "/" in name]
    if "energy" in status or streams or energy:
        snapshot["energy"] = {"figures": status.get("energy"), "meters": energy or [], "streams": streams}
    return snapshot
