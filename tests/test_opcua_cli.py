"""`edge-agent opcua browse` and `read` against the simulator: the tree, a config snippet the agent accepts,
one-off reads, and a clear exit 1 when the server is not there."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.demo.mosquitto import free_port
from drivers.opcua.cli import main
from drivers.opcua.simulator import PLANT, Simulator, start

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    server = await start(free_port(), padding=1, bulk=3)
    try:
        yield server
    finally:
        await server.stop()


async def run(*argv: str) -> int:
    # The tool runs its own event loop (asyncio.run); the simulator lives in the test's loop.
    return await asyncio.to_thread(main, list(argv))


async def test_browse_prints_the_tree_and_writes_a_snippet_the_agent_accepts(
        sim: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snippet = tmp_path / "boiler.toml"
    assert await run("browse", sim.url, "--depth", "4", "--certificate-dir", str(tmp_path / "pki"),
                     "--select", "Plant/Boiler/*", "--write-config", str(snippet), "--device-name", "boiler") == 0
    out = capsys.readouterr().out
    ns = sim.namespace_index
    assert f"  {ns}:Boiler  ns={ns};s=Boiler  Object" in out
    assert f"    {ns}:Temperature  ns={ns};s=Boiler.Temperature  Double = 21.5" in out
    assert f"    {ns}:Value0002  ns={ns};s=Bulk.0002  Double = 2.0" in out
    assert "ServerStatus" not in out  # the Server object is left out unless --all
    text = snippet.read_text()
    assert f'node_id = "nsu={PLANT};s=Boiler.Temperature"' in text and "Bulk" not in text
    assert '# { name = "Boiler_Curve"' in text  # the array is offered commented out, with why
    config = parse_config('[gateway]\nid = "gw"\nsite = "s"\n' + text)
    device = config.devices[0]
    assert device.name == "boiler" and [p.name for p in device.points] == [  # type: ignore[attr-defined]
        "Boiler_Temperature", "Boiler_Pressure", "Boiler_Running", "Boiler_Mode", "Boiler_Counter",
        "Boiler_Doubtful"]


async def test_read_prints_value_quality_and_timestamps(sim: Simulator, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    ns = sim.namespace_index
    assert await run("read", sim.url, f"nsu={PLANT};s=Boiler.Mode", f"{ns}:Plant/{ns}:Boiler/{ns}:Pressure",
                     f"ns={ns};s=Boiler.Gone", "--certificate-dir", str(tmp_path / "pki")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "'auto'  good  source 20" in lines[0]
    assert lines[1].split()[1:3] == ["1.25", "good"]
    assert lines[2].split()[1:] == ["None", "bad", "(BadNodeIdUnknown)"]


async def test_a_server_that_is_not_there_is_exit_1_with_a_sentence(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    url = f"opc.tcp://127.0.0.1:{free_port()}"
    assert await run("read", url, "i=2258", "--timeout", "1", "--certificate-dir", str(tmp_path / "pki")) == 1
    assert f"cannot connect to {url}: refused" in capsys.readouterr().err


async def test_read_with_an_alias_browse_path_takes_namespace_and_says_what_is_missing(
        sim: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = str(tmp_path / "pki")
    assert await run("read", sim.url, "plant:Plant/plant:Boiler/plant:Pressure", "--namespace", f"plant={PLANT}",
                     "--certificate-dir", pki) == 0
    assert capsys.readouterr().out.split()[1:3] == ["1.25", "good"]
    # Without the alias: a sentence, not "bad plant".
    assert await run("read", sim.url, "plant:Plant/plant:Boiler/plant:Pressure", "--certificate-dir", pki) == 0
    out = capsys.readouterr().out
    assert "bad  the namespace alias 'plant' is not known here: add --namespace plant=URI" in out
    assert "(2:Plant)" in out
