"""Modbus TCP polling: one connection per device, the read plan computed at start-up.

Transient failures (refused, timed out, reset) close the connection and raise `DeviceError`; the agent's
scheduler decides when to try again, so pymodbus's own retries and reconnects are switched off. An
exception response (illegal address, device busy) is an answer, not a failure: the points of that
request come back with quality "bad" and the exception named.
"""

from __future__ import annotations

import logging

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ExceptionResponse

from agent.errors import DeviceError
from agent.model import Reading
from drivers.modbus.config import ModbusDevice
from drivers.modbus.decode import ReadRequest, plan

# pymodbus logs every failed connect at ERROR; the agent logs the first failure itself and repeats quietly.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

EXCEPTION_NAMES = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value", 4: "device failure",
    5: "acknowledge", 6: "device busy", 8: "memory parity error", 10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


class ModbusTcpDriver:
    def __init__(self, config: ModbusDevice) -> None:
        self.config = config
        self.requests: tuple[ReadRequest, ...] = plan(config.points)
        self._client: AsyncModbusTcpClient | None = None

    @property
    def max_poll_seconds(self) -> float:
        return self.config.timeout * (len(self.requests) + 1) + 1.0

    @property
    def endpoint(self) -> str:
        return f"{self.config.host}:{self.config.port} unit {self.config.unit_id}"

    async def poll(self) -> list[Reading]:
        client = await self._connected()
        readings: list[Reading] = []
        for request in self.requests:
            readings.extend(await self._read(client, request))
        return readings

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _connected(self) -> AsyncModbusTcpClient:
        if self._client is not None and self._client.connected:
            return self._client
        await self.close()
        client = AsyncModbusTcpClient(self.config.host, port=self.config.port, timeout=self.config.timeout,
                                      retries=0, reconnect_delay=0, name=self.config.name)
        if not await client.connect():
            client.close()
            raise DeviceError(f"cannot connect to {self.config.host}:{self.config.port} "
                              "(refused or no answer; check the address, the port and the network)")
        self._client = client
        return client

    async def _read(self, client: AsyncModbusTcpClient, request: ReadRequest) -> list[Reading]:
        read = client.read_holding_registers if request.function == "holding" else client.read_input_registers
        try:
            response = await read(request.address, count=request.count, device_id=self.config.unit_id)
        except ModbusException as exc:
            await self.close()
            raise DeviceError(f"no valid answer from {self.endpoint} to FC{request.function_code:02d} "
                              f"{request.address}+{request.count}: {exc}") from exc
        if isinstance(response, ExceptionResponse) or response.isError():
            code = getattr(response, "exception_code", 0)
            reason = f"Modbus exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')}) for FC" \
                     f"{request.function_code:02d} {request.address}+{request.count}"
            return [Reading.bad(p.name, reason, p.unit) for p in request.decoder.points]
        try:
            return request.decoder.decode(response.registers)
        except ValueError as exc:
            return [Reading.bad(p.name, f"malformed response: {exc}", p.unit) for p in request.decoder.points]

