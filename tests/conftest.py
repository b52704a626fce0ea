"""Shared fixtures: real peers only. A mosquitto process on a free loopback port, pymodbus servers with
registers the test controls, the agent in-process or as a process the test can SIGKILL. Every process a
fixture starts is stopped by its PID at teardown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, load_config
from agent.demo.mosquitto import MosquittoProcess, find_mosquitto
from drivers.modbus.simulator import HOLDING_REGISTERS, INPUT_REGISTERS, SimServer, SimulatedDevice

REPO = Path(__file__).resolve().parent.parent

requires_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="the mosquitto binary is not installed "
                                        "(make test installs it where the machine allows)")

EDGE_AGENT = str(Path(sys.executable).with_name("edge-agent"))


async def edge_agent(*args: str, timeout: float = 30) -> tuple[int, str, str]:
    """Run the edge-agent command line as a technician would, bounded: exit code, stdout, stderr.

    The code run is this checkout's: the venv's editable install points at the clone it was made in, which
    in a git worktree sharing that venv is another checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    process = await asyncio.create_subprocess_exec(EDGE_AGENT, *args, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode or 0, out.decode(), err.decode()



@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    if find_mosquitto() is None:
        pytest.skip("the mosquitto binary is not installed")
    # Persistence lets a subscriber's session (and the messages queued for it) survive a broker restart,
    # so a test's monitor sees everything the agent delivered across an outage.
    # autosave_interval 1 keeps that session even through a SIGKILL of the broker.
    process = MosquittoProcess(work_dir=tmp_path / "mosquitto",
                               extra_config=["persistence true", f"persistence_location {tmp_path}/mosquitto/",
                                             "autosave_interval 1"])
    process.start()
    try:
        yield process
    finally:
        process.close()


class FixedRegisters(SimulatedDevice):
    """A device whose registers the test sets: for checking values end to end, correct to the register."""

    kind = "fixed"

    def __init__(self, holding: list[int] | None = None, inputs: list[int] | None = None,
                 coils: list[bool] | None = None, discrete_inputs: list[bool] | None = None) -> None:
        super().__init__((), holding_registers=len(holding or []), input_registers=len(inputs or []), seed=0,
                         coils=len(coils or []), discrete_inputs=len(discrete_inputs or []))
        for function_code, bits in ((1, coils or []), (2, discrete_inputs or [])):
            for address, value in enumerate(bits):
                self.set_bit(function_code, address, value)
        if holding:
            self._images[HOLDING_REGISTERS][:] = holding
        if inputs:
            self._images[INPUT_REGISTERS][:] = inputs

    def update(self, now: float) -> None:
        pass

    def set(self, function_code: int, address: int, registers: list[int]) -> None:
        self._images[function_code][address:address + len(registers)] = registers


@pytest.fixture
async def modbus_sim() -> AsyncIterator[SimServer]:
    """The plant simulator (power meter at unit 1, environmental sensor at unit 2) on a free port."""
    from drivers.modbus.simulator import EnvSensor, PowerMeter

    async with SimServer({1: PowerMeter(seed=1), 2: EnvSensor(seed=2)}, update_interval=0.2) as server:
        yield server


def agent_config(tmp_path: Path, mqtt_port: int, devices: str, *, extra_mqtt: str = "",
                 gateway: str = "gw-test", buffer_name: str = "buffer.db") -> Path:
    """Write a config file for the agent under test and return its path."""
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(f"""\
        [gateway]
        id = "{gateway}"
        site = "test-site"

        [buffer]
        path = "{tmp_path / buffer_name}"
        durability = "process-crash"

        [mqtt]
        host = "127.0.0.1"
        port = {mqtt_port}
        reconnect_min = "1s"
        reconnect_max = "2s"
        {textwrap.dedent(extra_mqtt)}

        [metrics]
        port = 0  # a free port: tests must not fight over 9108
        """) + textwrap.dedent(devices))
    return path


def meter_device(port: int, name: str = "power-meter", interval: str = "200ms", unit_id: int = 1) -> str:
    return f"""
        [[devices]]
        name = "{name}"
        driver = "modbus"
        host = "127.0.0.1"
        port = {port}
        unit_id = {unit_id}
        poll_interval = "{interval}"
        timeout = "500ms"
        points = [
          {{ name = "voltage_avg",   function = "input", address = 0,  type = "float32", unit = "V" }},
          {{ name = "current_l1",    function = "input", address = 2,  type = "float32", unit = "A" }},
          {{ name = "active_power",  function = "input", address = 24, type = "float32", unit = "kW" }},
          {{ name = "active_energy_wh", function = "holding", address = 100, type = "uint32", word_order = "CDAB" }},
        ]
        """


def point_config_error(tmp_path: Path, function: str, point: dict[str, Any], neighbour: str) -> tuple[Path, str]:
    """A config file whose one Modbus device has `point` (its keys written as TOML values) as its first point
    and the inline table `neighbour` as its second, loaded: the file's path and the error it must raise,
    rendered as the command line prints it."""
    fields = ", ".join(f"{k} = {v!r}".replace("'", '"') for k, v in point.items())
    path = tmp_path / "config.toml"
    path.write_text('[gateway]\nid = "gw-1"\nsite = "plant-a"\n[[devices]]\nname = "m"\ndriver = "modbus"\n'
                    f'host = "127.0.0.1"\npoints = [\n  {{ function = "{function}", {fields} }},\n  {neighbour},\n]\n',
                    encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return path, caught.value.render()


class AgentProcess:
    """`edge-agent run` as a child process, so a test can SIGKILL it like a power cut of the process."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config), "--log-format", "text"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout: float = 10.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connected(self) -> bool:
        """This run (not an earlier one sharing the log file) has connected to the broker."""
        return "connected to MQTT broker" in self.log().split("agent started")[-1]


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[type[AgentProcess]]:
    started: list[AgentProcess] = []

    class Tracked(AgentProcess):
        def start(self) -> None:
            super().start()
            started.append(self)

    yield Tracked
    for process in started:
        process.close()


class _Link:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter, blackholed: bool) -> None:
        self.client, self.upstream, self.blackholed = client, upstream, blackholed


class PartitionProxy:
    """A TCP proxy between the agent and the broker that can cut the network: `partition()` silently drops
    everything the agent sends on its current connections (as a failed link does), new connections flow
    again after `heal()`.

    Why tests need it: mosquitto acknowledges a PUBLISH and queues it for subscribers in the same step
    and writes both later, so a SIGKILL can lose a message the broker had already acknowledged (it keeps
    nothing on disk between autosaves). No publisher can prevent that. Cutting the agent off first lets the
    broker finish handing out what it acknowledged, while everything the agent sends meanwhile stays
    unacknowledged: the agent's guarantees are tested, not the broker's durability."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._cut = False
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def partition(self) -> None:
        self._cut = True
        for link in self._links:
            link.blackholed = True

    def heal(self) -> None:
        self._cut = False

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.client.close()
            link.upstream.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            self._handlers.discard(task)
            return
        link = _Link(writer, up_writer, self._cut)
        self._links.add(link)
        await asyncio.gather(self._pump(reader, up_writer, link), self._pump(up_reader, writer, None))
        self._links.discard(link)
        self._handlers.discard(task)

    @staticmethod
    async def _pump(source: asyncio.StreamReader, target: asyncio.StreamWriter, link: _Link | None) -> None:
        """Copy one direction; `link` given: the agent-to-broker direction, which a partition blackholes."""
        try:
            while data := await source.read(65536):
                if link is None or not link.blackholed:
                    target.write(data)
                    await target.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            target.close()


@pytest.fixture
async def partition_proxy(mosquitto: MosquittoProcess) -> AsyncIterator[PartitionProxy]:
    proxy = PartitionProxy(mosquitto.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
