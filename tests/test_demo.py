"""`edge-agent demo` as a user runs it: with mosquitto, and with the embedded broker of a bare machine."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, requires_mosquitto


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "demo", "--duration", "4", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("broker", ["embedded", pytest.param("mosquitto", marks=requires_mosquitto)])
def test_demo_delivers_everything_it_polls(broker: str) -> None:
    result = run_demo("--broker", broker)
    assert result.returncode == 0, result.stderr
    summary = re.search(r"demo summary: .* polled (\d+) readings, delivered (\d+), still buffered (\d+), "
                        r"lost (\d+), duplicates (\d+)", result.stdout)
    assert summary, result.stdout
    polled, delivered, buffered, lost, _ = map(int, summary.groups())
    assert polled >= 3 * 16  # the meter polled every second (16 points)
    assert lost == 0 and delivered + buffered == polled
    # The live view shows what reached the broker, decoded as the platform sees it.
    assert re.search(r"power-meter +seq \d+\.\.\d+\n(.*\n)*? +.*voltage_avg=2\d\d(\.\d+)?\xa0V", result.stdout), \
        result.stdout
    assert "Traceback" not in result.stderr
