"""The agent's work per Modbus answer without the network: the line's receive path (drivers/modbus/transport.py:
the MBAP frame cut, judged against the request and made a PDU), then the driver's decoding to readings. Repeatable under
`valgrind --tool=callgrind` (instruction counts do not depend on the machine's load), e.g.

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.decode --answers 2000
    valgrind ... python -m bench.decode --answers 4000     # the difference is 2000 answers' worth

Values: "bench" is what the benchmark simulator serves (full float32 precision, 7 to 9 digits); "meter" is
what a power meter sends (229.8 V, 49.98 Hz: 1 to 6 digits).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import struct
import sys
import time

from drivers.modbus import driver as modbus_driver
from drivers.modbus import transport
from drivers.modbus.config import ModbusDevice


def device(points: int) -> ModbusDevice:
    return ModbusDevice.model_validate({
        "name": "bench", "driver": "modbus", "host": "127.0.0.1", "unit_id": 1, "poll_interval": 1.0,
        "points": [{"name": f"p{i}", "function": "holding", "address": 2 * i, "type": "float32"}
                   for i in range(points)]})


def values(kind: str, points: int) -> list[float]:
    if kind == "bench":
        return [i + 100 * math.sin(1.3 + 2 * math.pi * i / points) for i in range(points)]
    chosen = random.Random(7)
    return [round(chosen.uniform(0, 500), chosen.choice((1, 2, 3))) for _ in range(points)]


def frame(payload: bytes, transaction_id: int) -> bytes:
    """A Modbus TCP answer to FC03: MBAP header, function code, byte count, registers."""
    pdu = bytes([3, len(payload)]) + payload
    return struct.pack(">HHHB", transaction_id, 0, len(pdu) + 1, 1) + pdu


async def run(points: int, kind: str, answers: int) -> dict[str, object]:
    config = device(points)
    driver = modbus_driver.ModbusDriver(config)
    [request] = driver.requests
    receiver = transport.MbapReceiver(transport.LineCounters())
    expect = transport.Expect(1, request.function_code, 2 * request.count, 1)
    frames = [frame(struct.pack(f">{points}f", *values(kind, points)), 1)]
    readings = 0
    started = time.process_time()
    for _ in range(answers):
        for data in frames:
            receiver.expect = expect
            response = receiver.feed(data)
            assert response is not None
            readings += len(modbus_driver.readings_of(request, response))
    cpu = time.process_time() - started
    return {"benchmark": "decode", "points": points, "values": kind, "answers": answers, "readings": readings,
            "cpu_us_per_reading": round(cpu / readings * 1e6, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=50, help="float32 per answer")
    parser.add_argument("--values", choices=("bench", "meter"), default="bench")
    parser.add_argument("--answers", type=int, default=20_000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.points, args.values, args.answers))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
