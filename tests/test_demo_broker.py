"""The embedded demo broker, driven by the real paho-mqtt client (and raw sockets for protocol faults).

paho runs its network loop in a thread; the broker runs in the test's event loop, so every blocking wait
on a paho event goes through `asyncio.to_thread` to keep the loop (and the broker) serving.
"""

from __future__ import annotations

import asyncio
import queue
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.demo.broker import EmbeddedBroker, encode_remaining_length, topic_matches, valid_filter

WAIT_S = 3.0


class PahoClient:
    """paho client with its callbacks bridged to queues the async test can await."""

    def __init__(self, port: int, client_id: str = "", keepalive: int = 60) -> None:
        self.port, self.keepalive = port, keepalive
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311
        )
        self.connected = threading.Event()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.published: queue.Queue[int] = queue.Queue()
        self.subscribed: queue.Queue[list[int]] = queue.Queue()
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connected.set() if rc == 0 else None
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_publish = lambda _c, _u, mid, _rc, _p: self.published.put(mid)
        self.client.on_subscribe = lambda _c, _u, _mid, rcs, _p: self.subscribed.put([rc.value for rc in rcs])

    async def connect(self) -> None:
        self.client.connect("127.0.0.1", self.port, keepalive=self.keepalive)
        self.client.loop_start()
        assert await asyncio.to_thread(self.connected.wait, WAIT_S), "no CONNACK"

    async def subscribe(self, topic_filter: str, qos: int) -> list[int]:
        self.client.subscribe(topic_filter, qos)
        return await asyncio.to_thread(self.subscribed.get, timeout=WAIT_S)

    async def publish_acked(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        assert await asyncio.to_thread(self.published.get, timeout=WAIT_S) == info.mid

    async def next_message(self) -> mqtt.MQTTMessage:
        return await asyncio.to_thread(self.messages.get, timeout=WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def paho(broker: EmbeddedBroker) -> Iterator[Callable[..., PahoClient]]:
    clients: list[PahoClient] = []

    def make(client_id: str = "", keepalive: int = 60) -> PahoClient:
        clients.append(PahoClient(broker.port, client_id, keepalive))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def _str(text: str) -> bytes:
    return struct.pack("!H", len(text.encode())) + text.encode()


def connect_packet(
    client_id: str, keepalive: int = 60, level: int = 4, will: tuple[str, bytes] | None = None
) -> bytes:
    flags, payload = 0x02, _str(client_id)
    if will is not None:
        flags |= 0x04 | 0x08 | 0x20  # will, will QoS 1, will retain
        payload += _str(will[0]) + struct.pack("!H", len(will[1])) + will[1]
    body = _str("MQTT") + bytes([level, flags]) + struct.pack("!H", keepalive) + payload
    return b"\x10" + encode_remaining_length(len(body)) + body


async def raw_connect(
    broker: EmbeddedBroker, packet: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    writer.write(packet)
    await writer.drain()
    return reader, writer


async def test_qos1_publish_is_acked_and_reaches_wildcard_subscriber(paho: Callable[..., PahoClient]) -> None:
    subscriber, publisher = paho("display"), paho("agent")
    await subscriber.connect()
    await publisher.connect()
    assert await subscriber.subscribe("plant/+/meter/#", qos=1) == [1]

    await publisher.publish_acked("plant/hall1/meter/7/energy", b"42.5", qos=1)

    message = await subscriber.next_message()
    assert (message.topic, message.payload, message.qos, message.retain) == (
        "plant/hall1/meter/7/energy",
        b"42.5",
        1,
        False,
    )


async def test_subscribe_grants_at_most_qos1_and_qos2_publish_is_delivered_once(
    paho: Callable[..., PahoClient],
) -> None:
    subscriber, publisher = paho(), paho()
    await subscriber.connect()
    await publisher.connect()
    assert await subscriber.subscribe("a/#", qos=2) == [1]

    await publisher.publish_acked("a/b", b"once", qos=2)  # on_publish fires on PUBCOMP

    message = await subscriber.next_message()
    assert (message.payload, message.qos) == (b"once", 1)
    await publisher.publish_acked("a/b", b"marker", qos=1)
    assert (await subscriber.next_message()).payload == b"marker"


async def test_retained_message_reaches_late_subscriber_and_empty_payload_clears_it(
    paho: Callable[..., PahoClient],
) -> None:
    publisher = paho()
    await publisher.connect()
    await publisher.publish_acked("site/status", b"online", qos=1, retain=True)
    await publisher.publish_acked("site/gone", b"x", qos=1, retain=True)
    await publisher.publish_acked("site/gone", b"", qos=1, retain=True)

    late = paho()
    await late.connect()
    await late.subscribe("site/#", qos=1)

    message = await late.next_message()
    assert (message.topic, message.payload, message.retain) == ("site/status", b"online", True)
    await asyncio.sleep(0.2)
    assert late.messages.empty()


async def test_last_will_is_published_when_a_client_drops_without_disconnect(
    paho: Callable[..., PahoClient],
) -> None:
    watcher, doomed = paho(), paho("doomed")
    await watcher.connect()
    await watcher.subscribe("agents/+/state", qos=1)
    doomed.client.will_set("agents/doomed/state", b"offline", qos=1, retain=True)
    await doomed.connect()

    doomed.client.loop_stop()
    doomed.client.socket().close()  # no DISCONNECT packet: the broker sees the socket die

    message = await watcher.next_message()
    assert (message.topic, message.payload) == ("agents/doomed/state", b"offline")
    late = paho()
    await late.connect()
    await late.subscribe("agents/doomed/state", qos=1)
    assert (await late.next_message()).retain is True


async def test_clean_disconnect_does_not_publish_the_will(
    broker: EmbeddedBroker, paho: Callable[..., PahoClient]
) -> None:
    watcher = paho()
    await watcher.connect()
    await watcher.subscribe("will/#", qos=1)
    _, writer = await raw_connect(broker, connect_packet("polite", will=("will/polite", b"bye")))
    writer.write(b"\xe0\x00")  # DISCONNECT
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.3)
    assert watcher.messages.empty()


async def test_keepalive_expiry_drops_the_client_and_fires_its_will(
    broker: EmbeddedBroker, paho: Callable[..., PahoClient]
) -> None:
    watcher = paho()
    await watcher.connect()
    await watcher.subscribe("will/#", qos=1)
    reader, writer = await raw_connect(
        broker, connect_packet("silent", keepalive=1, will=("will/silent", b"lost"))
    )
    assert await reader.readexactly(4) == b"\x20\x02\x00\x00"

    message = await watcher.next_message()  # 1.5 s after the last packet

    assert message.payload == b"lost"
    assert await asyncio.wait_for(reader.read(), WAIT_S) == b""  # broker closed the connection
    writer.close()


async def test_wrong_protocol_level_gets_connack_1_and_is_closed(broker: EmbeddedBroker) -> None:
    reader, writer = await raw_connect(broker, connect_packet("old", level=3))
    assert await asyncio.wait_for(reader.read(), WAIT_S) == b"\x20\x02\x00\x01"
    writer.close()


async def test_same_client_id_disconnects_the_older_connection(broker: EmbeddedBroker) -> None:
    old_reader, old_writer = await raw_connect(broker, connect_packet("meter-gw"))
    assert await old_reader.readexactly(4) == b"\x20\x02\x00\x00"
    new_reader, new_writer = await raw_connect(broker, connect_packet("meter-gw"))
    assert await new_reader.readexactly(4) == b"\x20\x02\x00\x00"

    assert await asyncio.wait_for(old_reader.read(), WAIT_S) == b""
    new_writer.write(b"\xc0\x00")  # PINGREQ: the new connection still works
    await new_writer.drain()
    assert await new_reader.readexactly(2) == b"\xd0\x00"
    old_writer.close()
    new_writer.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff" * 64,  # reserved packet type
        b"\x10\xff\xff\xff\xff\x7f",  # remaining length longer than 4 bytes
        b"\x10\x20\x00\x04MQ",  # CONNECT cut off mid-packet
        b"\x30\x05\x00\x01a",  # PUBLISH before CONNECT, truncated
        connect_packet("ok") + b"\x82\x04\x00\x01\x00\x09",  # SUBSCRIBE with a filter length past the end
    ],
)
async def test_garbage_closes_only_that_client(
    broker: EmbeddedBroker, paho: Callable[..., PahoClient], garbage: bytes
) -> None:
    reader, writer = await raw_connect(broker, garbage)
    writer.write_eof()
    await asyncio.wait_for(reader.read(), WAIT_S)  # broker closes its side
    writer.close()

    subscriber, publisher = paho(), paho()
    await subscriber.connect()
    await publisher.connect()
    await subscriber.subscribe("still/alive", qos=1)
    await publisher.publish_acked("still/alive", b"yes", qos=1)
    assert (await subscriber.next_message()).payload == b"yes"


async def test_stop_closes_clients_and_leaves_no_tasks() -> None:
    broker = EmbeddedBroker()
    await broker.start()
    reader, writer = await raw_connect(broker, connect_packet("lingering"))
    await reader.readexactly(4)

    await broker.stop()

    assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
    assert asyncio.all_tasks() == {asyncio.current_task()}
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", broker.port)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("#", "$SYS/uptime", False),
        ("+/uptime", "$SYS/uptime", False),
        ("a/+", "a/b/c", False),
        ("a/b", "a/b", True),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [("a/#", True), ("a/+/b", True), ("a/#/b", False), ("a#", False), ("a/b+", False), ("", False)],
)
def test_valid_filter(topic_filter: str, expected: bool) -> None:
    assert valid_filter(topic_filter) is expected
