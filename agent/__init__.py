"""edge-agent: the factory gateway daemon (config, data model, scheduling, uplink, CLI)."""

__version__ = "0.1.0"
