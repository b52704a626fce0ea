"""Buffer benchmark: how fast the writer path stores readings durably, and what a reading costs on disk
and on the wire.

Each poll is 50 float32 readings of a meter (shortest decimals, as the Modbus decoder produces them),
encoded as the uplink sends them, compressed and committed through `Buffer.append` in transactions of
`--polls-per-commit` polls, the way the buffer writer batches one poll cycle. Prints one JSON object.

    python -m bench.buffer --polls 20000 --polls-per-commit 50
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

from agent.model import PollResult, Reading
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
        readings = tuple(Reading(f"p{i}", shortest_float32(220 + 15 * math.sin(n / 50 + i) + rng.random()), "V")
                         for i in range(POINTS))
        out.append(PollResult(device, start + n // devices, readings))
    return out


async def run(count: int, per_commit: int, durability: str) -> dict[str, object]:
    results = polls(count, devices=50)
    with tempfile.TemporaryDirectory(prefix="edge-bench-buffer-") as tmp:
        buffer = await Buffer.open(Path(tmp) / "buffer.db", max_bytes=8 << 30,
                                   durability=durability)  # type: ignore[arg-type]
        encoder = Encoder("changwon-a-gw01", "changwon-plant-a", buffer.buffer_id)
        encoded_bytes = 0
        started, cpu_started = time.perf_counter(), time.process_time()
        for first in range(0, count, per_commit):
            seq = buffer.next_seq
            batches = []
            for result in results[first:first + per_commit]:
                payload = encoder.encode(result, seq)
                encoded_bytes += len(payload)
                batches.append(StoredBatch(seq, len(result.readings), result.device, result.ts, payload))
                seq += len(result.readings)
            await buffer.append(batches)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        await buffer.close()
        on_disk = sum(p.stat().st_size for p in Path(tmp).iterdir()  # noqa: ASYNC240 - after the timing
                      if p.name.startswith("buffer.db") and not p.name.endswith(".lock"))
    readings = count * POINTS
    topic = Topics(DATA_TOPIC, "", "edge", "changwon-plant-a", "changwon-a-gw01").data("dev0001")
    wire = encoded_bytes + count * (len(topic) + MQTT_PUBLISH_OVERHEAD)
    return {
        "benchmark": "buffer",
        "load": {"polls": count, "points_per_poll": POINTS, "polls_per_commit": per_commit, "durability": durability,
                 "value": "float32 voltage-like, shortest decimal", "encoding": "JSON v1, zlib level 1 at rest"},
        "insert_readings_per_s": round(readings / elapsed),
        "commits_per_s": round(count / per_commit / elapsed, 1),
        "cpu_us_per_reading": round(cpu / readings * 1e6, 2),
        "bytes_per_reading_on_disk": round(on_disk / readings, 2),
        "bytes_per_reading_json": round(encoded_bytes / readings, 2),
        "bytes_per_reading_on_the_wire": round(wire / readings, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=20_000)
    parser.add_argument("--polls-per-commit", type=int, default=50)
    parser.add_argument("--durability", choices=("power-loss", "process-crash"), default="power-loss")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.polls, args.polls_per_commit, args.durability))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
