"""Typed errors, so that each layer knows what to retry, what to stop and what to report.

- `ConfigError`: the configuration is wrong; nothing is started; the process exits 78 (EX_CONFIG).
- `DeviceError`: a transient device or link failure (timeout, refused, reset); the scheduler retries it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EX_CONFIG = 78


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a config file: where (a dotted path) and what was expected."""

    where: str
    message: str


class ConfigError(Exception):
    SHOWN = 50

    def __init__(self, source: Path | str, problems: list[Problem]) -> None:
        self.source = str(source)
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        # The first SHOWN problems: a file of a million unknown keys is not fixed by reading them all.
        lines = [f"{self.source}: {p.where}: {p.message}" if p.where else f"{self.source}: {p.message}"
                 for p in self.problems[:self.SHOWN]]
        count = len(self.problems)
        if count > self.SHOWN:
            lines.append(f"{self.source}: and {count - self.SHOWN} more")
        lines.append(f"{self.source}: {count} problem{'s' if count != 1 else ''}; nothing was started")
        return "\n".join(lines)


class DeviceError(Exception):
    """Transient: the device did not answer or the link failed. Retried with backoff."""
