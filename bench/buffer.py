"""Buffer benchmark: how fast the writer path stores readings durably, and what a reading costs on disk
and on the wire.

Each poll is 50 float32 readings of a meter (shortest decimals, as the Modbus decoder produces them),
encoded as the buffer writer stores them (`--encoding`: JSON, or the compact CBOR encoding; Sparkplug stores
JSON and frames it as DDATA when sending), and committed
through `Buffer.append` (which compresses JSON) in transactions of `--polls-per-commit` polls, the way the
buffer writer batches one poll cycle. On the wire: each poll as a live message of its own (the header,
the topic and MQTT's fixed overhead included; with the compact encoding, the point tables a message
carries in band: each device's first message, then one every TABLE_REPEAT seconds of poll time, as the
uplink sends them with every message acknowledged at once; the retained meta message, once per device and
connection, is not; nor are Sparkplug's births). 50 devices polled every second for count / 50 seconds.
Framing (what the uplink does per message: JSON and CBOR join bytes, Sparkplug decodes the stored JSON and
builds the protobuf DDATA) is timed apart. Prints one JSON object.

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
from agent.sparkplug import SparkplugSession
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
        sent: list[tuple[PollResult, int, str | None]] = []  # (poll, fragment length, table)
        tables: dict[str, dict[str, str]] = {}
        started, cpu_started = time.perf_counter(), time.process_time()
        for first in range(0, count, per_commit):
            seq = buffer.next_seq
            batches = []
            for result in results[first:first + per_commit]:
                payload, table = encoder.fragment(result, seq)
                encoded_bytes += len(payload)
                sent.append((result, len(payload), table))
                batches.append(StoredBatch(seq, len(result.readings), result.device, result.ts, payload, table))
                seq += len(result.readings)
            new_tables = encoder.take_tables()
            for device, table_id, text in new_tables:
                tables.setdefault(device, {})[table_id] = text
            await buffer.append(batches, new_tables)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        for result, length, table in sent:  # each poll framed as a live message, when it would be sent
            if isinstance(encoder, CborEncoder):
                encoder.tables_known(result.device, tables[result.device])
                framed_bytes += encoder.framed_size(result.device, length, 1, now=result.ts)
                encoder.carried(result.device, encoder.due(result.device, [table], now=result.ts), now=result.ts)
            else:
                framed_bytes += encoder.framed_size(result.device, length, 1)
        framing_cpu, sparkplug_bytes = await _framing(encoder, encoding, results, buffer, tmp)
        await buffer.close()
        # The reserve for a full disk is held space of a fixed size, not a cost per reading: left out.
        on_disk = sum(p.stat().st_size for p in Path(tmp).iterdir()  # noqa: ASYNC240 - after the timing
                      if p.name.startswith("buffer.db") and not p.name.endswith((".lock", ".reserve")))
    readings = count * POINTS
    topic = Topics(DATA_TOPIC, "", "edge", "changwon-plant-a", "changwon-a-gw01").data("dev0001")
    if encoding == "sparkplug":
        framed_bytes = sparkplug_bytes
        topic = "spBv1.0/changwon-plant-a/DDATA/changwon-a-gw01/dev0001"
    wire = framed_bytes + count * (len(topic) + MQTT_PUBLISH_OVERHEAD)
    return {
        "benchmark": "buffer",
        "load": {"polls": count, "points_per_poll": POINTS, "polls_per_commit": per_commit, "durability": durability,
                 "value": "float32 voltage-like, shortest decimal",
                 "encoding": {"json": "JSON v1, zlib level 1 at rest", "cbor": "compact (CBOR), as is",
                              "sparkplug": "JSON v1 at rest, Sparkplug B DDATA on the wire"}[encoding]},
        "insert_readings_per_s": round(readings / elapsed),
        "commits_per_s": round(count / per_commit / elapsed, 1),
        "cpu_us_per_reading": round(cpu / readings * 1e6, 2),
        "cpu_us_per_reading_framing": round(framing_cpu / readings * 1e6, 2),
        "bytes_per_reading_on_disk": round(on_disk / readings, 2),
        "bytes_per_reading_encoded": round(encoded_bytes / readings, 2),
        "bytes_per_reading_on_the_wire": round(wire / readings, 2),
    }


class _Wire:
    """Stands for the MQTT client: counts what the Sparkplug session hands it."""

    def __init__(self) -> None:
        self.data_bytes = 0

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        if "/DDATA/" in topic:
            self.data_bytes += len(payload)

    def message_callback_add(self, topic: str, callback: object) -> None:
        pass


async def _framing(encoder: Encoder | CborEncoder, encoding: str, results: list[PollResult], buffer: Buffer,
                   tmp: str) -> tuple[float, int]:
    """CPU seconds to frame every stored row as a live message of its own, and (Sparkplug) the DDATA bytes."""
    rows = await buffer.read_after(0, len(results))
    wire = _Wire()
    session = SparkplugSession("changwon-plant-a", "changwon-a-gw01", None, buffer.buffer_id,
                               Path(tmp) / "bdseq", "bench", lambda: None)
    session.attach(wire)
    started = time.process_time()
    if encoding == "sparkplug":
        for row in rows:
            session.publish(wire, row.device, [row], False)
    elif isinstance(encoder, CborEncoder):
        for row in rows:
            encoder.frame(row.device, [row.payload])
    else:
        for row in rows:
            encoder.frame(row.device, [row.payload])
    cpu = time.process_time() - started
    session.stop()
    return cpu, wire.data_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=20_000)
    parser.add_argument("--polls-per-commit", type=int, default=50)
    parser.add_argument("--durability", choices=("power-loss", "process-crash"), default="power-loss")
    parser.add_argument("--encoding", choices=("json", "cbor", "sparkplug"), default="json")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.polls, args.polls_per_commit, args.durability, args.encoding))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
