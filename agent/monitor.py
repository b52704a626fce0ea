"""The platform's view of what an agent delivers: subscribes to the broker, decodes every message and
accounts for sequence numbers per gateway and buffer (received, duplicates, gaps) and the latency from
poll to arrival. Used by the demo's live view, by the test suite and by the benchmarks.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.payload import SCHEMA


class SeqSet:
    """Which sequence numbers arrived, one byte each: compact for the millions a benchmark produces."""

    def __init__(self) -> None:
        self._seen = bytearray()
        self.count = 0
        self.duplicates = 0
        self.highest = 0

    def add(self, seq: int) -> None:
        if seq >= len(self._seen):
            self._seen.extend(bytes(max(seq + 1 - len(self._seen), len(self._seen))))
        if self._seen[seq]:
            self.duplicates += 1
        else:
            self._seen[seq] = 1
            self.count += 1
            self.highest = max(self.highest, seq)

    def __contains__(self, seq: int) -> bool:
        return seq < len(self._seen) and bool(self._seen[seq])

    def missing(self, first: int, last: int) -> list[int]:
        """Numbers in first..last (inclusive) that never arrived."""
        return [s for s in range(first, last + 1) if s not in self]


@dataclass
class Latest:
    value: Any
    unit: str | None
    quality: str
    ts: str


@dataclass
class StreamState:
    """One agent's buffer lifetime, identified by (gateway, buffer_id)."""

    seqs: SeqSet = field(default_factory=SeqSet)
    messages: int = 0


class Monitor:
    def __init__(self, host: str, port: int, topic_filter: str = "#", keep_latencies: int = 200_000,
                 on_message: Callable[[str, dict[str, Any]], None] | None = None,
                 session: str | None = None) -> None:
        """`session`: a client id for a persistent session, so that across a broker restart (with broker
        persistence) nothing published while this subscriber was away is missed."""
        self.host, self.port, self.topic_filter = host, port, topic_filter
        self._lock = threading.Lock()
        self.streams: dict[tuple[str, str], StreamState] = {}
        self.latest: dict[str, dict[str, Latest]] = {}
        self.latencies: deque[float] = deque(maxlen=keep_latencies)
        self.status: dict[str, dict[str, Any]] = {}
        self.invalid = 0
        self._subscribed = threading.Event()
        self._callback = on_message
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=session or f"edge-monitor-{id(self):x}",
                                   clean_session=session is None)
        self._client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.on_disconnect = lambda *a: self._subscribed.clear()

    def start(self, timeout: float = 10.0) -> Monitor:
        self._client.connect_async(self.host, self.port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise TimeoutError(f"monitor could not subscribe at {self.host}:{self.port}")
        return self

    def wait_subscribed(self, timeout: float) -> bool:
        """Block until (re)subscribed, e.g. after a broker restart."""
        return self._subscribed.wait(timeout)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.topic_filter, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        arrived = time.time()
        try:
            body = json.loads(message.payload)
        except ValueError:
            with self._lock:
                self.invalid += 1
            return
        if not isinstance(body, dict):
            return
        if message.topic.endswith("/status"):
            with self._lock:
                self.status[message.topic] = body
            return
        if body.get("schema") != SCHEMA:
            with self._lock:
                self.invalid += 1
            return
        poll_ts = _parse_ts(body["ts"])
        with self._lock:
            stream = self.streams.setdefault((body["gateway"], body["buffer_id"]), StreamState())
            stream.messages += 1
            latest = self.latest.setdefault(body["device"], {})
            for reading in body["readings"]:
                stream.seqs.add(reading["seq"])
                latest[reading["point"]] = Latest(reading["value"], reading.get("unit"), reading["quality"],
                                                  body["ts"])
            self.latencies.append(arrived - poll_ts)
        if self._callback is not None:
            self._callback(message.topic, body)

    # --- questions tests and the demo ask ----------------------------------------------------------

    def stream(self, gateway: str, buffer_id: str | None = None) -> StreamState:
        with self._lock:
            matches = [s for (gw, buf), s in self.streams.items() if gw == gateway and buffer_id in (None, buf)]
        if not matches:
            return StreamState()
        if len(matches) > 1:
            raise ValueError(f"gateway {gateway} has {len(matches)} buffers; name the buffer_id")
        return matches[0]

    def received(self, gateway: str, buffer_id: str | None = None) -> int:
        return self.stream(gateway, buffer_id).seqs.count

    def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.05)
        return condition()


def _parse_ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
