"""Log lines under journald carry their syslog priority (`<3>` for ERROR, sd-daemon(3)), so that
`journalctl -p warning` sees them; anywhere else they carry none. The agent runs as a child process with
JOURNAL_STREAM set to the device and inode of its stderr, as systemd sets it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.demo.mosquitto import free_port
from tests.conftest import REPO, agent_config, meter_device

pytestmark = pytest.mark.timeout(30)

PREFIXED = re.compile(r"^<([0-7])>")


def run_agent(config: Path, log: Path, journal: str | None, until: str = "ERROR",
              args: tuple[str, ...] = ()) -> str:
    """Run `edge-agent run` until `until` shows in its stderr (then SIGTERM), or until it exits."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with log.open("wb") as stderr:
        st = os.fstat(stderr.fileno())
        if journal == "match":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal is not None:
            env["JOURNAL_STREAM"] = journal
        process = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config), *args],
                                   cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                   env={**env, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 20
        while until not in log.read_text(errors="replace") and process.poll() is None:
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    return log.read_text(errors="replace")


def test_under_journald_every_line_starts_with_its_priority(tmp_path: Path) -> None:
    # No broker and no meter: the agent logs INFO lines and then ERROR lines for both.
    config = agent_config(tmp_path, free_port(), meter_device(free_port()))
    text = run_agent(config, tmp_path / "journal.log", "match", until="ERROR agent: device")
    lines = [line for line in text.splitlines() if line]
    assert lines and all(PREFIXED.match(line) for line in lines), text
    assert any(line.startswith("<3>ERROR agent: device power-meter") for line in lines), text
    assert any(line.startswith("<6>INFO ") for line in lines), text
    # An explicit --log-format text under journald is prefixed too; JSON never (it is parsed as JSON).
    text = run_agent(config, tmp_path / "json.log", "match", until="error", args=("--log-format", "json"))
    assert not any(PREFIXED.match(line) for line in text.splitlines()), text


def test_elsewhere_no_prefix(tmp_path: Path) -> None:
    config = agent_config(tmp_path, free_port(), meter_device(free_port()))
    for journal in (None, "1:2"):  # not under systemd; a JOURNAL_STREAM that is not this stderr (redirected)
        text = run_agent(config, tmp_path / f"plain-{journal}.log", journal, until="ERROR agent: device")
        assert "ERROR agent: device power-meter" in text
        assert not any(PREFIXED.match(line) for line in text.splitlines()), text


def test_a_refused_config_reaches_the_journal_as_an_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[gateway]\nid = "gw"\nsite = "s"\n[[devices]]\nname = "m"\ndriver = "nosuch"\n')
    text = run_agent(config, tmp_path / "bad.log", "match", until="\n\n")
    lines = [line for line in text.splitlines() if line]
    assert lines and all(line.startswith("<3>") for line in lines), text
