"""Buffer benchmark: how fast the writer path stores readings durably, and what a reading costs on disk
and on the wire.

Each poll is 50 float32 readings of a meter (shortest decimals, as the Modbus decoder produces them),
encoded as the uplink sends them (`--encoding`: JSON, or the compact CBOR encoding), and committed
through `Buffer.append` (which compresses JSON) in transactions of `--polls-per-commit` polls, the way the
buffer writer batches one poll cycle. On the wire: each poll as a live message of its own (the header,
the topic and MQTT's fixed overhead included; the compact encoding's meta message, once per device and
connection, is not). Prints one JSON object.

    python -m bench.buffer --polls 20000 --polls-per-commit 50 --encoding cbor
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

from agent.compact import CborEncoder
from agent.model import Float32, PollResult, Reading
from agent.payload import DATA_TOPIC, Encoder, Topics
from buffer.store import Buffer, StoredBatch
from drivers.modbus.decode import shortest_float32

POINTS = 50
MQTT_PUBLISH_OVERHEAD = 2 + 2 + 2  # fixed header (2 for these sizes), topic length, packet id (QoS 1)


def polls(count: int, devices: int) -> list[PollResult]:
    rng = random.Random(1)
    start = 1_764_000_000.0
    out = []
    for n in range(count):
        device = f"dev{n % devices:04d}"
        readings = tuple(Reading(f"p{i}", Float32(shortest_float32(220 + 15 * math.sin(n / 50 + i) + rng.random())),
                                 "V") for i in range(POINTS))
        out.append(PollResult(device, start + n // devices, readings))
    return out


async def run(count: int, per_commit: int, durability: str, encoding: str) -> dict[str, object]:
    results = polls(count, devices=50)
    with tempfile.TemporaryDirectory(prefix="edge-bench-buffer-") as tmp:
        buffer = await Buffer.open(Path(tmp) / "buffer.db", max_bytes=8 << 30,
                                   durability=durability)  # type: ignore[arg-type]
        encoder = (CborEncoder if encoding == "cbor" else Encoder)("changwon-a-gw01", "changwon-plant-a",
                                                                   buffer.buffer_id)
        encoded_bytes = framed_bytes = 0
        started, cpu_started = time.perf_counter(), time.process_time()
        for first in range(0, count, per_commit):
            seq = buffer.next_seq
            batches = []
            for result in results[first:first + per_commit]:
                payload, table = encoder.fragment(result, seq)
                encoded_bytes += len(payload)
                framed_bytes += encoder.framed_size(result.device, len(payload), 1)
                batches.append(StoredBatch(seq, len(result.readings), result.device, result.ts, payload, table))
                seq += len(result.readings)
            await buffer.append(batches, encoder.take_tables())
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        await buffer.close()
        # The reserve for a full disk is held space of a fixed size, not a cost per reading: left out.
        on_disk = sum(p.stat().st_size for p in Path(tmp).iterdir()  # noqa: ASYNC240 - after the timing
                      if p.name.startswith("buffer.db") and not p.name.endswith((".lock", ".reserve")))
    readings = count * POINTS
    topic = Topics(DATA_TOPIC, "", "edge", "changwon-plant-a", "changwon-a-gw01").data("dev0001")
    wire = framed_bytes + count * (len(topic) + MQTT_PUBLISH_OVERHEAD)
    return {
        "benchmark": "buffer",
        "load": {"polls": count, "points_per_poll": POINTS, "polls_per_commit": per_commit, "durability": durability,
                 "value": "float32 voltage-like, shortest decimal",
                 "encoding": "JSON v1, zlib level 1 at rest" if encoding == "json" else "compact (CBOR), as is"},
        "insert_readings_per_s": round(readings / elapsed),
        "commits_per_s": round(count / per_commit / elapsed, 1),
        "cpu_us_per_reading": round(cpu / readings * 1e6, 2),
        "bytes_per_reading_on_disk": round(on_disk / readings, 2),
        "bytes_per_reading_encoded": round(encoded_bytes / readings, 2),
        "bytes_per_reading_on_the_wire": round(wire / readings, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=20_000)
    parser.add_argument("--polls-per-commit", type=int, default=50)
    parser.add_argument("--durability", choices=("power-loss", "process-crash"), default="power-loss")
    parser.add_argument("--encoding", choices=("json", "cbor"), default="json")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.polls, args.polls_per_commit, args.durability, args.encoding))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
