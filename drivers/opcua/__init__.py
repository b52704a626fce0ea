"""OPC-UA driver. Registered in `drivers.REGISTRY`; imports asyncua only when a device is created or
described, so that checking a config loads pydantic only."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from drivers.opcua.config import OpcuaDevice as DeviceConfig

if TYPE_CHECKING:
    from drivers.opcua.driver import OpcuaReader, OpcuaSubscriber

__all__ = ["USES_STATE_DIR", "DeviceConfig", "create", "describe"]

# The agent passes its state directory (the buffer's folder): the application certificate lives there.
USES_STATE_DIR = True


def create(config: DeviceConfig, state_dir: Path | None = None) -> OpcuaReader | OpcuaSubscriber:
    from drivers.opcua.driver import OpcuaReader, OpcuaSubscriber

    return OpcuaSubscriber(config, state_dir) if config.mode == "subscribe" else OpcuaReader(config, state_dir)


def describe(config: DeviceConfig) -> list[str]:
    """What `edge-agent check` prints for this device: endpoint, security, user, mode and each point."""
    security = "no security" if config.security_mode == "None" else \
        f"{config.security_mode} {config.security_policy}"
    if config.username is not None:
        source = "file" if config.password_file is not None else f"${config.password_env}"
        user = f"user {config.username!r} (password from {source})"
    elif config.user_certificate is not None:
        user = f"X.509 user {config.user_certificate}"
    else:
        user = "anonymous"
    tofu = ", trust on first use ON" if config.trust_on_first_use else ""
    count = f"{len(config.points)} node{'s' if len(config.points) != 1 else ''}"
    if config.mode == "read":
        how = (f"read mode, every {config.poll_interval:g} s: {count} in one Read request per poll (split only "
               "if the server limits nodes per read)")
    else:
        sampling = config.sampling_interval or config.poll_interval
        heartbeat = f", heartbeat {config.heartbeat:g} s" if config.heartbeat else ""
        how = (f"subscribe mode, publishing every {config.poll_interval:g} s, sampling {sampling:g} s, queue "
               f"{config.queue_size}{heartbeat}: {count} monitored")
    lines = [f"device {config.name}: opcua {config.endpoint}, {security}, {user}{tofu}, timeout {config.timeout:g} s",
             f"  {how}"]
    for alias, uri in config.namespaces.items():
        lines.append(f"  namespace {alias} = {uri}")
    for point in config.points:
        address = f"node {point.node_id}" if point.node_id is not None else f"path {point.browse_path}"
        extra = []
        if point.sampling_interval is not None:
            extra.append(f"sampling {point.sampling_interval:g} s")
        if point.queue_size is not None:
            extra.append(f"queue {point.queue_size}")
        if point.deadband is not None:
            extra.append(f"deadband {point.deadband:g}{' %' if point.deadband_type == 'percent' else ''}")
        lines.append(f"    {point.name:<24} {address} {point.unit or ''} {', '.join(extra)}".rstrip())
    return lines
