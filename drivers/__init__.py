"""The driver registry: one line per protocol.

A driver is a package under `drivers/` that exposes, from its `__init__`:
- `DeviceConfig`: the pydantic model of one `[[devices]]` entry with `driver = "<name>"`. It must be cheap
  to import (pydantic only): the whole config is validated before any protocol library is loaded.
- `create(config) -> PollingDriver`: builds the driver; this is where the protocol library is imported.
"""

from __future__ import annotations

import importlib
from types import ModuleType

REGISTRY: dict[str, str] = {
    "modbus": "drivers.modbus",
    "opcua": "drivers.opcua",
}


def load(name: str) -> ModuleType:
    return importlib.import_module(REGISTRY[name])
