"""A SunSpec device for the tests: its register layout is read straight from the SunSpec Alliance's model
files in the `pysunspec2` package, not from the agent's compact table or its code, so a layout mistake in
drivers/modbus/sunspec.py (an offset, a size, a scale factor's address) shows up as a wrong value in a test.

Every point starts at SunSpec's "not implemented" value (scale factors too), as on a device that implements
only part of a model; a test sets the raw values it implements with `set(model, point, raw)`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from drivers.modbus.simulator import HOLDING_REGISTERS, SimulatedDevice

DEFINITIONS = Path(str(resources.files("sunspec2"))) / "models" / "json"
_NOT_IMPLEMENTED = {"int16": 0x8000, "sunssf": 0x8000, "pad": 0x8000, "uint16": 0xFFFF, "enum16": 0xFFFF,
                    "bitfield16": 0xFFFF, "count": 0xFFFF, "acc16": 0, "acc32": 0, "uint32": 0xFFFFFFFF,
                    "int32": 0x80000000, "bitfield32": 0xFFFFFFFF, "enum32": 0xFFFFFFFF, "string": 0,
                    "float32": 0x7FC00000}


@dataclass(frozen=True)
class Register:
    model: int
    point: str
    type: str
    address: int
    size: int


def definition(model_id: int) -> dict:
    return json.loads((DEFINITIONS / f"model_{model_id}.json").read_text("utf-8"))["group"]


class SunSpecDevice(SimulatedDevice):
    """Models laid out one after the other from `base`: "SunS", then (id, length, registers) per model, then
    the end marker. `repeats` gives the number of repeating blocks (MPPT modules) of a model."""

    kind = "sunspec"

    def __init__(self, models: list[int], base: int = 40000, repeats: dict[int, int] | None = None) -> None:
        self.base = base
        self.points: dict[tuple[int, str], Register] = {}
        self.model_address: dict[int, int] = {}
        words: list[int] = [0x5375, 0x6E53]
        for model_id in models:
            group = definition(model_id)
            header = base + len(words)
            self.model_address[model_id] = header
            body: list[tuple[str, dict]] = [("", p) for p in group["points"][2:]]
            for sub in group.get("groups", []):
                for index in range((repeats or {}).get(model_id, 1)):
                    body += [(f"{sub['name']}{index + 1}.", p) for p in sub["points"]]
            length = sum(p["size"] for _, p in body)
            words += [model_id, length]
            for prefix, p in body:
                address = base + len(words)
                self.points[(model_id, prefix + p["name"])] = Register(model_id, prefix + p["name"], p["type"],
                                                                      address, p["size"])
                words += self._encode(p["type"], p["size"], _NOT_IMPLEMENTED.get(p["type"], 0))
        self.end_address = base + len(words)
        words += [0xFFFF, 0]
        super().__init__((), holding_registers=base + len(words), input_registers=0, seed=0)
        self._images[HOLDING_REGISTERS][base:base + len(words)] = words

    @staticmethod
    def _encode(sunspec_type: str, size: int, raw: int | float | str) -> list[int]:
        if sunspec_type == "string":
            data = str(raw or "").encode()[:2 * size].ljust(2 * size, b"\0")
            return list(struct.unpack(f">{size}H", data))
        if sunspec_type == "float32" and isinstance(raw, float):
            return list(struct.unpack(">2H", struct.pack(">f", raw)))
        value = int(raw) % (1 << (16 * size))  # negative int16 -> two's complement
        return [(value >> (16 * (size - 1 - i))) & 0xFFFF for i in range(size)]

    def set(self, model_id: int, point: str, raw: int | float | str) -> Register:
        register = self.points[(model_id, point)]
        words = self._encode(register.type, register.size, raw)
        self._images[HOLDING_REGISTERS][register.address:register.address + register.size] = words
        return register

    def update(self, now: float) -> None:
        pass
