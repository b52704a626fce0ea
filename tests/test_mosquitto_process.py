"""MosquittoProcess against the real mosquitto binary: start, crash, restart on the same port, stop clean."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.demo.mosquitto import MosquittoProcess, MosquittoStartError, find_mosquitto, free_port

pytestmark = pytest.mark.skipif(
    find_mosquitto() is None, reason="mosquitto binary not installed (apt-get install mosquitto)"
)

WAIT_S = 5.0


class PahoClient:
    def __init__(self, port: int) -> None:
        self.port = port
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connected.set() if rc == 0 else None
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)

    def connect(self) -> None:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self.connected.wait(WAIT_S), "no CONNACK"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    with MosquittoProcess(work_dir=tmp_path) as broker:
        yield broker


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_publish_and_receive(mosquitto: MosquittoProcess) -> None:
    assert mosquitto.running and mosquitto.port != 1883
    subscriber, publisher = PahoClient(mosquitto.port), PahoClient(mosquitto.port)
    try:
        subscriber.connect()
        subscriber.client.subscribe("plant/#", qos=1)
        assert subscriber.subscribed.wait(WAIT_S)
        publisher.connect()
        publisher.client.publish("plant/meter/1", b"230.1", qos=1).wait_for_publish(WAIT_S)

        message = subscriber.messages.get(timeout=WAIT_S)
        assert (message.topic, message.payload) == ("plant/meter/1", b"230.1")
    finally:
        subscriber.close()
        publisher.close()


def test_kill_then_restart_on_the_same_port(mosquitto: MosquittoProcess) -> None:
    port, first_pid = mosquitto.port, mosquitto.pid
    client = PahoClient(port)
    client.connect()  # an open connection at kill time leaves the server side of the port busy
    client.client.loop_stop()

    mosquitto.kill()
    assert not mosquitto.running
    assert first_pid is not None and _pid_gone(first_pid)

    mosquitto.restart()
    assert mosquitto.running and mosquitto.port == port and mosquitto.pid != first_pid
    again = PahoClient(port)
    try:
        again.connect()
    finally:
        again.close()
        client.client.socket().close()


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    broker = MosquittoProcess(work_dir=tmp_path)
    broker.start()
    pid = broker.pid
    assert pid is not None and not _pid_gone(pid)

    broker.stop()

    assert not broker.running and _pid_gone(pid)
    broker.stop()  # idempotent


def test_context_manager_stops_and_removes_its_temp_dir() -> None:
    with MosquittoProcess() as broker:
        pid, work_dir = broker.pid, broker.work_dir
        assert work_dir.is_dir()
    assert pid is not None and _pid_gone(pid)
    assert not work_dir.exists()


def test_config_uses_unlimited_queues_and_extra_lines(tmp_path: Path) -> None:
    broker = MosquittoProcess(work_dir=tmp_path, extra_config=["max_keepalive 120"])
    text = broker.config_text()
    assert f"listener {broker.port} 127.0.0.1" in text
    assert "max_queued_messages 0" in text and "max_inflight_messages 0" in text
    assert text.rstrip().endswith("max_keepalive 120")


def test_bad_config_raises_with_the_log_tail(tmp_path: Path) -> None:
    broker = MosquittoProcess(work_dir=tmp_path, extra_config=["no_such_option 1"])
    with pytest.raises(MosquittoStartError, match="no_such_option"):
        broker.start()
    assert not broker.running


def test_port_taken_by_another_listener_fails_cleanly(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    clash = MosquittoProcess(port=mosquitto.port, work_dir=tmp_path / "clash")
    with pytest.raises(MosquittoStartError, match="in use"):
        clash.start()
    assert not clash.running and mosquitto.running


def test_free_port_is_bindable() -> None:
    assert 0 < free_port() < 65536
